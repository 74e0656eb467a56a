"""User-facing errors.

Anything raised as :class:`SlimLMError` is a user mistake or an environment problem that the
CLI prints as one line (``error: ...``) with a non-zero exit, never a traceback.
"""

from __future__ import annotations


class SlimLMError(Exception):
    """A problem the user can fix (bad path, bad file, bad option)."""


class ModelLoadError(SlimLMError):
    """A model directory or weight file that cannot be loaded."""


class UnsupportedArchitectureError(ModelLoadError):
    """A checkpoint whose architecture slimlm does not implement."""
