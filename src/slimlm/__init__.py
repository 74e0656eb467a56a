"""slimlm: serve, compress and train small language models fast, on CPU and GPU."""

from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from slimlm.engine.request import CompletionOutput, RequestOutput
from slimlm.errors import ModelLoadError, SlimLMError
from slimlm.model.hub import DEFAULT_MODEL, load

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_MODEL", "LLM", "CompletionOutput", "ModelLoadError", "RequestOutput", "SamplingParams",
    "SlimLMError", "load",
]
