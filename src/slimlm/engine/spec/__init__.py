"""Speculative and early-exit decoding: proposers draft tokens, the target verifies them.

Importing this package registers every method in ``SPEC_METHODS``.
"""

from slimlm.engine.spec.base import SPEC_METHODS, Proposer, ProposerContext
from slimlm.engine.spec import bild, draft_model, kangaroo  # noqa: F401  (register "bild", "draft", "kangaroo")

__all__ = ["SPEC_METHODS", "Proposer", "ProposerContext"]
