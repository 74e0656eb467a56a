"""Requests, their sequences, and the outputs users get back (vLLM's shapes)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from slimlm.engine.params import SamplingParams
from slimlm.engine.sampling import SequenceSampler
from slimlm.engine.stop import StopChecker
from slimlm.tokenizer import IncrementalDetokenizer


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """'stop', 'length' or 'abort'; None while running."""
    logprobs: list[dict[int, float]] | None = None
    stop_reason: str | int | None = None


@dataclass
class RequestMetrics:
    """Per-request timings (``time.time()`` seconds, vLLM's field names) and KV memory."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    kv_peak_bytes: int = 0
    """The most KV bytes the request held at once: all its sequences' blocks (a block shared
    between its samples counted once), all layers, after eviction and in the KV codec's format."""

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_in_queue(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """Per prompt token: {token: logprob} of it (and the top-k) given what precedes it."""
    metrics: RequestMetrics | None = None
    error: str | None = None
    """Set when this request failed on its own (e.g. its sampling); the others went on."""


class Sequence:
    """One sample of a request: the unit the scheduler schedules and the KV cache stores."""

    def __init__(self, seq_id: int, request: Request, index: int, token_ids: list[int], sampler: SequenceSampler):
        self.seq_id, self.request, self.index = seq_id, request, index
        self.token_ids = token_ids
        self.prompt_len = len(request.prompt_ids)
        self.num_computed = 0
        self.kv_dropped = 0  # tokens seen but no longer stored (a token-level KV policy compacted them)
        self.status = SeqStatus.WAITING
        self.sampler = sampler
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[dict[int, float]] | None = [] if request.params.logprobs is not None else None
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if request.params.prompt_logprobs is not None else None)  # the first token has none
        self.detok = IncrementalDetokenizer(request.tokenizer, request.params.skip_special_tokens) \
            if request.tokenizer is not None else None
        self.stop = StopChecker(request.params.stop, request.params.include_stop_str_in_output)
        self.text = ""
        self.visible = 0  # characters of text released (stop strings may hold some back)
        self.block_hashes: list[bytes] | None = None  # filled lazily by the scheduler (sha256 chain keys)
        self.draft_ids: list[int] = []  # speculative tokens proposed for the next step
        self.draft_probs = None  # (k, V) draft distribution for sampled requests
        self.draft_parents: list[int] | None = None  # tree drafts: parent of each draft (-1 = last token)
        self.kv_preset = False  # its first num_computed tokens' KV was written by CacheBlend (no prefix match)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_stored(self) -> int:
        """Tokens whose KV the sequence's blocks hold (its storage length)."""
        return self.num_computed - self.kv_dropped

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_decode(self) -> bool:
        return self.num_uncomputed == 1 and self.num_computed > 0

    @property
    def finished(self) -> bool:
        return self.status == SeqStatus.FINISHED


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: object | None
    arrival: int
    seqs: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int = 0
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.time()))
    error: str | None = None
    layout: object | None = None
    """``PromptLayout`` of a segmented prompt with a set (``engine/segments.py``), else None."""

    @property
    def finished(self) -> bool:
        return self.error is not None or (len(self.seqs) == self.params.n and all(s.finished for s in self.seqs))

    def output(self) -> RequestOutput:
        outs = [
            CompletionOutput(s.index, s.text[: s.visible], s.output_ids, s.finish_reason, s.logprobs, s.stop_reason)
            for s in sorted(self.seqs, key=lambda s: s.index)
        ]
        first = self.seqs[0] if self.seqs else None
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outs, self.finished,
                             self.num_cached_tokens, first.prompt_logprobs if first else None, self.metrics,
                             self.error)
