"""The offline API in vLLM's shape: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from slimlm.engine.batch_prefix import prefix_order
from slimlm.engine.config import EngineConfig
from slimlm.engine.engine import LLMEngine
from slimlm.engine.params import SamplingParams
from slimlm.engine.request import CompletionOutput, RequestOutput
from slimlm.engine.segments import prepare
from slimlm.model.hub import DEFAULT_MODEL, LoadedModel, load


class LLM:
    """``LLM(model="smollm2-135m-instruct", dtype="float32", block_size=16, kv_cache_bytes=...,
    max_num_batched_tokens=2048, enable_prefix_caching=True, batch_prefix_scheduling=True,
    kv_policy=None, speculative=None, ...)`` — every keyword of :class:`EngineConfig`."""

    def __init__(self, model: str | LoadedModel = DEFAULT_MODEL, **config: Any):
        cfg = EngineConfig(**config)
        lm = model if isinstance(model, LoadedModel) else load(model, cfg.dtype, cfg.device, cfg.weights,
                                                                  cfg.weights_group_size)
        self.engine = LLMEngine(lm, cfg)
        self.tokenizer = lm.tokenizer

    def _params_list(self, params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
        return list(params)

    def generate(
        self,
        prompts: str | list[int] | dict | Sequence[str] | Sequence[list[int]] | Sequence[dict],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Every prompt is validated before anything runs.
        A prompt is text, token ids, or ``{"segments": [...]}`` (``engine/segments.py``: sets of
        unordered segments)."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        ids, layouts = [], {}
        for i, (p, sp) in enumerate(zip(prompts, params)):
            try:
                if isinstance(p, dict):  # {"segments": [...]}: engine/segments.py
                    p_ids, layouts[i] = prepare(self.engine, p, sp)
                    ids.append(p_ids)
                else:
                    ids.append(self._validate(p, sp))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        order = list(range(len(prompts)))
        if self.engine.config.batch_prefix_scheduling and len(prompts) > 1:
            order = prefix_order(ids, [p.max_tokens for p in params], self.engine.config.block_size)
        base = f"gen-{id(self)}-{self.engine.stats['steps']}-"
        for i in order:
            self.engine.add_request(ids[i], params[i], request_id=base + str(i), layout=layouts.get(i))
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(prompts) > 1:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), desc="generating", unit="req", leave=False)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        outs = [results[base + str(i)] for i in range(len(prompts))]
        for o, p in zip(outs, prompts):
            o.prompt = p if isinstance(p, str) else None
        return outs

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the chat template to each conversation, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        texts, ids = zip(*[self._chat_ids(c, add_generation_prompt) for c in convs]) if convs else ((), ())
        ids = list(ids)
        outs = self.generate(ids, sampling_params, use_tqdm)
        for o, t in zip(outs, texts):
            o.prompt = t
        return outs

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def _validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The engine's checks, and prompt + max_tokens within the model's context (unless a KV
        policy bounds memory and lifts the context limit)."""
        if isinstance(prompt, str) and self.tokenizer is not None:
            prompt = self.tokenizer.encode(prompt)
        ids = list(prompt) if isinstance(params, SamplingParams) else self.engine.validate(prompt, params)
        policy = self.engine.policy
        bounded = policy is not None and policy.max_blocks(1, 1) is not None
        if not bounded and len(ids) < self.context_length < len(ids) + params.max_tokens:
            raise ValueError(
                f"prompt ({_n(len(ids), 'token')}) + max_tokens ({params.max_tokens}) = "
                f"{len(ids) + params.max_tokens} is past the model's context of {self.context_length} tokens; "
                f"use max_tokens <= {max(self.context_length - len(ids), 0)}"
            )
        return self.engine.validate(ids, params)

    def _chat_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer; this model has none")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    def stream(
        self,
        prompt: str | list[int] | list[dict[str, str]] | dict,
        sampling_params: SamplingParams | None = None,
    ) -> Iterator[RequestOutput]:
        """Stream one request as deltas, like vLLM's ``RequestOutputKind.DELTA`` and OpenAI's
        streaming chunks: each yielded output's ``text`` / ``token_ids`` (/ ``logprobs``) hold only
        what is new since the previous yield, per sample; ``"".join`` of the texts is the whole
        output. The last one has ``finished=True`` and the ``finish_reason``. ``prompt`` is text,
        token ids, or chat messages (the chat template is applied)."""
        params = sampling_params or SamplingParams()
        text = prompt if isinstance(prompt, str) else None
        layout = None
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            text, prompt = self._chat_ids(prompt)  # type: ignore[arg-type]
        if isinstance(prompt, dict):  # {"segments": [...]}
            ids, layout = prepare(self.engine, prompt, params)
        else:
            ids = self._validate(prompt, params)  # type: ignore[arg-type]
        rid = self.engine.add_request(ids, params, layout=layout)
        seen: dict[int, tuple[int, int]] = {}  # sample index -> (chars, tokens) already yielded
        try:
            while self.engine.has_unfinished():
                for o in self.engine.step():
                    if o.request_id != rid:
                        continue
                    deltas = []
                    for c in o.outputs:
                        chars, toks = seen.get(c.index, (0, 0))
                        seen[c.index] = (len(c.text), len(c.token_ids))
                        deltas.append(CompletionOutput(
                            c.index, c.text[chars:], c.token_ids[toks:], c.finish_reason,
                            c.logprobs[toks:] if c.logprobs is not None else None, c.stop_reason))
                    yield replace(o, prompt=text, outputs=deltas)
                    if o.finished:
                        return
        finally:
            if rid in self.engine.requests and not all(s.finished for s in self.engine.requests[rid].seqs):
                self.engine.abort(rid)  # the consumer stopped early: free the KV blocks


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"
