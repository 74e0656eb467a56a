"""Speculative and early-exit decoding: proposers draft tokens, the target verifies them.

Importing this package registers every method in ``SPEC_METHODS``.
"""

from slimlm.engine.spec.base import SPEC_METHODS, Proposer, ProposerContext
from slimlm.engine.spec import bild, chimera, draft_model, judge, kangaroo  # noqa: F401  (register the methods)

__all__ = ["SPEC_METHODS", "Proposer", "ProposerContext"]
