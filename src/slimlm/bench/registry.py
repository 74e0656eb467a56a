"""Importing this module registers every benchmark scenario in ``SCENARIOS``."""

from slimlm.bench import decode, frontier, kernels, memory, packing, prefill, wrapped  # noqa: F401
from slimlm.bench.base import SCENARIOS

__all__ = ["SCENARIOS"]
