"""Importing this module registers every quality task in ``TASKS``."""

from slimlm.eval import batchprompt, mc, needle, perplexity, rag, set_mc  # noqa: F401
from slimlm.eval.base import TASKS

__all__ = ["TASKS"]
