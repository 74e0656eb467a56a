"""LLMEngine: requests in, token outputs out; one ``step()`` = schedule -> run -> update."""

from __future__ import annotations

import itertools
from typing import Any

import torch

from slimlm.engine.config import EngineConfig, default_kv_bytes, format_size
from slimlm.engine.hooks import LAYER_HOOKS
from slimlm.engine.paged_attention import PagedKVCache
from slimlm.engine.params import SamplingParams
from slimlm.engine.request import Request, RequestOutput, Sequence, SeqStatus
from slimlm.engine.runner import ModelRunner
from slimlm.engine.sampling import SequenceSampler, sample_next
from slimlm.engine.scheduler import Scheduler
from slimlm.engine.spec import SPEC_METHODS, Proposer
from slimlm.errors import SlimLMError
from slimlm.kvcache.block_pool import BlockPool
from slimlm.kvcache.manager import KVCacheManager
from slimlm.kvcache.policy import KV_POLICIES, AttentionSpan
from slimlm.model.hub import LoadedModel


class LLMEngine:
    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.lm, self.model, self.tokenizer = lm, lm.model, lm.tokenizer
        self.stop_token_ids = lm.stop_token_ids()
        cfg = self.model.cfg
        self.context_length = cfg.context_length
        self.policy = KV_POLICIES.get(config.kv_policy)(**config.kv_policy_args) if config.kv_policy else None
        span = self.policy.span() if self.policy else AttentionSpan()
        per_block = PagedKVCache.bytes_per_block(cfg, config.block_size, self.model.dtype)
        self.kv_block_bytes = per_block
        full_context = per_block * -(-(cfg.context_length + 1) // config.block_size)
        kv_bytes = config.kv_cache_bytes or default_kv_bytes(config.device, min_bytes=full_context)
        self.proposer: Proposer | None = None
        if config.speculative:
            self.proposer = SPEC_METHODS.get(config.speculative)(self, **config.speculative_args)
            kv_bytes -= self.proposer.kv_bytes(kv_bytes)
        num_blocks = kv_bytes // per_block
        if num_blocks < 1:
            raise SlimLMError(f"kv_cache_bytes={kv_bytes} holds no KV block ({per_block} bytes each)")
        self.pool = BlockPool(num_blocks, config.block_size, config.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool)
        self.cache = PagedKVCache(cfg, num_blocks, config.block_size, self.model.dtype, self.model.device)
        hooks = [LAYER_HOOKS.get(h)(**config.hook_args.get(h, {})) for h in config.hooks]
        self.runner = ModelRunner(self.model, self.cache, span, hooks, config.native_kernels)
        self.scheduler = Scheduler(
            self.kv, config.max_num_batched_tokens, config.max_num_seqs, self.policy,
            dedup_prefixes=config.batch_prefix_scheduling and config.enable_prefix_caching,
            num_drafts=(lambda s: len(s.draft_ids)) if self.proposer else None,
        )
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._arrival = itertools.count()
        self.stats = {"prompt_tokens": 0, "computed_prompt_tokens": 0, "generated_tokens": 0, "steps": 0,
                      "draft_tokens": 0, "accepted_draft_tokens": 0}

    @classmethod
    def from_model(cls, model: str = "smollm2-135m-instruct", **config: Any) -> LLMEngine:
        from slimlm.model.hub import load

        cfg = EngineConfig(**config)
        return cls(load(model, dtype=cfg.dtype, device=cfg.device), cfg)

    # ------------------------------------------------------------------ requests
    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Token ids of ``prompt``; ValueError naming the problem if the request cannot run."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text but the model has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model.cfg.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {vocab})")
        bounded = self.policy is not None and self.policy.max_blocks(1, 1) is not None
        if not bounded and len(ids) >= self.context_length:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the model's context is {self.context_length} "
                "(a KV policy such as 'sink' lifts this)"
            )
        need = self._blocks_needed(len(ids), params)
        if need > self.pool.num_blocks:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) needs {need} KV blocks; "
                f"the pool has {self.pool.num_blocks}: set kv_cache_bytes to at least "
                f"{format_size(need * self.kv_block_bytes)} (--kv-cache-bytes), or lower max_tokens"
            )
        return ids

    def _blocks_needed(self, prompt_len: int, params: SamplingParams) -> int:
        total = self.kv.blocks_for(prompt_len + params.max_tokens + 1)
        if self.policy is not None:
            bound = self.policy.max_blocks(self.config.max_num_batched_tokens, self.config.block_size)
            total = min(total, bound) if bound is not None else total
        return total

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        ids = self.validate(prompt, params)
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self.requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        req = Request(rid, prompt if isinstance(prompt, str) else None, ids, params, self.tokenizer,
                      next(self._arrival))
        self.requests[rid] = req
        self.scheduler.add(self._new_seq(req, 0, list(ids)))
        self.stats["prompt_tokens"] += len(ids)
        return rid

    def _new_seq(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        sampler = SequenceSampler(req.params, req.prompt_ids, index, self.model.device)
        seq = Sequence(next(self._ids) + 1_000_000_000, req, index, token_ids, sampler)
        req.seqs.append(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for s in req.seqs:
            if not s.finished:
                s.finish_reason = "abort"
                self._finish(s)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of requests that changed (finished ones last time)."""
        out = self.scheduler.schedule()
        if out.empty:
            return []
        self.stats["steps"] += 1
        logits = self.runner.execute(out)
        seqs = {s.seq_id: s for s in self.scheduler.running}
        for c in out.chunks:  # prompt tokens whose KV was computed (not taken from the cache)
            plen = seqs[c.seq_id].prompt_len
            self.stats["computed_prompt_tokens"] += max(0, min(plen, c.start + len(c.token_ids)) - c.start)
        accepted: dict[int, int] = {}
        new_tokens: dict[int, list[int]] = {}
        plain = []  # (seq, row) for ordinary sampling, batched
        forks = []
        for c in out.chunks:
            if not c.num_logits or c.seq_id not in seqs:
                continue
            seq = seqs[c.seq_id]
            rows = logits[c.seq_id]
            if c.num_drafts:  # verify drafts
                toks, lps = self.proposer.verify(seq, rows)
                accepted[c.seq_id] = len(toks)  # decode token + accepted drafts have valid KV
                new_tokens[c.seq_id] = list(zip(toks, lps))
                self.stats["draft_tokens"] += c.num_drafts
                self.stats["accepted_draft_tokens"] += len(toks) - 1
                continue
            if seq.prompt_logprobs is not None and c.start < seq.prompt_len:
                self._record_prompt_logprobs(seq, c.start, c.token_ids, rows)
            if c.sample:
                plain.append((seq, rows[-1]))
                if c.num_samples > 1:
                    req = seq.request
                    for j in range(1, c.num_samples):
                        child = self._new_seq(req, j, list(seq.token_ids))
                        child.prompt_logprobs = seq.prompt_logprobs
                        forks.append((seq, child))
                        plain.append((child, rows[-1]))
        if plain:
            toks, lps = sample_next(torch.stack([r for _, r in plain]), [s.sampler for s, _ in plain])
            for (seq, _), t, lp in zip(plain, toks, lps):
                new_tokens.setdefault(seq.seq_id, []).append((t, lp))
                if seq.seq_id not in seqs:
                    seqs[seq.seq_id] = seq
        self.scheduler.update(out, accepted)
        for parent, child in forks:
            copies = self.kv.fork(parent.seq_id, child.seq_id, parent.prompt_len)
            child.num_computed = parent.prompt_len
            if copies is None:  # pool short: recompute the prompt later (prefix cache helps)
                child.num_computed = 0
                self.scheduler.add(child)
            else:
                self.scheduler.add_running(child, copies)
        changed: dict[str, Request] = {}
        for sid, toks in new_tokens.items():
            seq = seqs[sid]
            for t, lp in toks:
                if self._append(seq, t, lp):
                    break
            changed[seq.request.request_id] = seq.request
        if self.proposer is not None:
            self.proposer.propose([s for s in self.scheduler.running if s.is_decode and not s.finished])
        outs = []
        for req in changed.values():
            outs.append(req.output())
            if req.finished:
                self.requests.pop(req.request_id, None)
        return outs

    def _record_prompt_logprobs(self, seq: Sequence, start: int, tokens: list[int], rows: torch.Tensor) -> None:
        """Row i (position start + i) scores the prompt token at position start + i + 1."""
        from slimlm.engine.sampling import top_logprobs

        k = seq.request.params.prompt_logprobs
        n = min(len(tokens), seq.prompt_len - 1 - start)
        if n <= 0:
            return
        targets = torch.tensor(seq.token_ids[start + 1 : start + 1 + n], device=rows.device)
        seq.prompt_logprobs += top_logprobs(rows[:n].float().log_softmax(-1), targets, k)

    def _append(self, seq: Sequence, tok: int, lp: dict[int, float] | None) -> bool:
        """Append one token and apply stop conditions; True if the sequence finished."""
        p = seq.request.params
        seq.token_ids.append(tok)
        self.stats["generated_tokens"] += 1
        if seq.logprobs is not None:
            seq.logprobs.append(lp)
        is_stop_token = tok in p.stop_token_ids or (not p.ignore_eos and tok in self.stop_token_ids)
        if seq.detok is not None and not is_stop_token:
            old = len(seq.text)
            seq.text += seq.detok.push([tok])
            stopped, seq.visible = seq.stop.update(seq.text, old)
            if stopped:
                seq.finish_reason = "stop"
                seq.stop_reason = next((s for s in p.stop if s in seq.text[: seq.visible + len(s)]), None)
                seq.text = seq.text[: seq.visible]
                self._finish(seq)
                return True
        if is_stop_token:
            seq.finish_reason, seq.stop_reason = "stop", tok
        elif len(seq.output_ids) >= p.max_tokens:
            seq.finish_reason = "length"
        elif seq.num_tokens >= self.context_length and not (self.policy and self.policy.max_blocks(1, 1)):
            seq.finish_reason = "length"
        if seq.finish_reason:
            if seq.detok is not None and seq.finish_reason == "length":
                seq.text += seq.detok.flush()
            seq.visible = len(seq.text)
            self._finish(seq)
            return True
        return False

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if self.proposer is not None:
            self.proposer.release(seq)
