"""Parameter-efficient fine-tuning: one file per method, chosen by name from ``METHODS``."""

from slimlm.compress.adapters import compacter, lora, norm  # noqa: F401  (registers the methods)
from slimlm.compress.adapters.base import LINEARS, METHODS, FinetuneConfig, Method, trainable

__all__ = ["LINEARS", "METHODS", "FinetuneConfig", "Method", "trainable"]
