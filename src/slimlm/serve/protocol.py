"""OpenAI request bodies (pydantic) and their mapping to SamplingParams.

Validation follows OpenAI: a field this server does not implement is refused with a 400 naming
it (never silently ignored), unknown fields are refused as OpenAI does ("Unrecognized request
argument"), ``max_tokens: 0`` is an error, not the default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from slimlm.engine.params import SamplingParams

MAX_STOP = 16
"""Stop strings per request (each is searched in the growing text at every token)."""
MAX_STOP_CHARS = 256


class UnsupportedField(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


IGNORED_FIELDS = {"metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"}
"""Fields accepted and without effect on a local server (bookkeeping on OpenAI's side)."""


def _inert(name: str, value: Any) -> bool:
    """True when an unsupported field has a value that asks for nothing (its default)."""
    if value is None or value is False or value == [] or value == {} or value == "":
        return True
    if name == "response_format":
        return isinstance(value, dict) and value.get("type") == "text"
    if name in ("tool_choice", "function_call"):
        return value == "none"
    if name == "best_of":
        return value == 1
    if name == "modalities":
        return value == ["text"]
    return False


UNSUPPORTED = {
    "echo": "echo is not supported by this server",
    "suffix": "suffix (insertion) is not supported by this server",
    "response_format": "response_format other than {'type': 'text'} is not supported by this server",
    "tools": "tools (function calling) are not supported by this server",
    "tool_choice": "tool_choice is not supported by this server",
    "functions": "functions (function calling) are not supported by this server",
    "function_call": "function_call is not supported by this server",
    "logit_bias": "logit_bias is not supported by this server",
    "best_of": "best_of is not supported by this server; use n",
    "audio": "audio output is not supported by this server",
    "modalities": "only the text modality is supported by this server",
    "prediction": "predicted outputs are not supported by this server",
    "reasoning_effort": "reasoning_effort is not supported by this server",
    "web_search_options": "web search is not supported by this server",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    min_p: float | None = None
    n: StrictInt = 1
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    ignore_eos: StrictBool = False
    user: str | None = None
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)
    """vLLM's prefix-cache salt: only requests with the same salt share cached prefixes."""

    def check_fields(self) -> None:
        """Refuse fields this server does not implement (UnsupportedField names the first)."""
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED_FIELDS:
                continue
            if name in UNSUPPORTED:
                if not _inert(name, value):
                    raise UnsupportedField(name, UNSUPPORTED[name])
                continue
            raise UnsupportedField(name, f"Unrecognized request argument supplied: {name}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise UnsupportedField("stop", f"stop takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} "
                                           "characters")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_params(self, max_tokens: int, logprobs: int | None, cache_salt: str | None = None) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            cache_salt=cache_salt,
        )


class CompletionRequest(_Common):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]] | None = None
    segments: list[Any] | None = None
    """Instead of ``prompt``: a list of segments, each a string, {"text": str}, {"ids": [int]} or
    {"set": [segment, ...]} (an unordered set: Set-Based Prompting; ``engine/segments.py``)."""

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if (self.prompt is None) == (self.segments is None):
            raise ValueError("give exactly one of 'prompt' and 'segments'")
        return self
    logprobs: StrictInt | None = Field(default=None, ge=0, le=5)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for p in self.content:
                if p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise UnsupportedField("messages", f"only text content parts are supported, got type "
                                                       f"{p.get('type')!r}")
                parts.append(p["text"])
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: StrictBool = True
