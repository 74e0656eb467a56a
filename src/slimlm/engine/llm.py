"""The offline API in vLLM's shape: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from slimlm.engine.batch_prefix import prefix_order
from slimlm.engine.config import EngineConfig
from slimlm.engine.engine import LLMEngine
from slimlm.engine.params import SamplingParams
from slimlm.engine.request import RequestOutput
from slimlm.model.hub import DEFAULT_MODEL, LoadedModel, load


class LLM:
    """``LLM(model="smollm2-135m-instruct", dtype="float32", block_size=16, kv_cache_bytes=...,
    max_num_batched_tokens=2048, enable_prefix_caching=True, batch_prefix_scheduling=True,
    kv_policy=None, speculative=None, ...)`` — every keyword of :class:`EngineConfig`."""

    def __init__(self, model: str | LoadedModel = DEFAULT_MODEL, **config: Any):
        cfg = EngineConfig(**config)
        lm = model if isinstance(model, LoadedModel) else load(model, dtype=cfg.dtype, device=cfg.device)
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
        prompts: str | list[int] | Sequence[str] | Sequence[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Every prompt is validated before anything runs."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        ids = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            try:
                ids.append(self.engine.validate(p, sp))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        order = list(range(len(prompts)))
        if self.engine.config.batch_prefix_scheduling and len(prompts) > 1:
            order = prefix_order(ids, [p.max_tokens for p in params], self.engine.config.block_size)
        base = f"gen-{id(self)}-{self.engine.stats['steps']}-"
        for i in order:
            self.engine.add_request(ids[i], params[i], request_id=base + str(i))
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
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt) for c in convs]
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        outs = self.generate(ids, sampling_params, use_tqdm)
        for o, t in zip(outs, texts):
            o.prompt = t
        return outs

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that changed it (text so far)."""
        rid = self.engine.add_request(prompt, sampling_params or SamplingParams())
        while True:
            outs = [o for o in self.engine.step() if o.request_id == rid]
            for o in outs:
                yield o
                if o.finished:
                    return
            if not self.engine.has_unfinished():
                return
