"""LLMEngine: requests in, token outputs out; one ``step()`` = schedule -> run -> update."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from typing import Any

import torch

from slimlm.engine import sparse_prefill
from slimlm.engine.config import EngineConfig, default_kv_bytes, format_size
from slimlm.engine.hooks import LAYER_HOOKS
from slimlm.engine.paged_attention import AttentionPaths
from slimlm.engine.params import SamplingParams
from slimlm.engine.request import Request, RequestOutput, Sequence, SeqStatus
from slimlm.engine.runner import ModelRunner
from slimlm.engine.sampling import SamplingError, SequenceSampler, sample_next
from slimlm.engine.scheduler import Scheduler
from slimlm.engine.spec import SPEC_METHODS, Proposer, ProposerContext
from slimlm.engine.spec.guard import ProposerGuard
from slimlm.engine.spec.tree_rows import plan_tree_rows, scratch_needed
from slimlm.errors import SlimLMError
from slimlm.kernels import gemm
from slimlm.kvcache.block_pool import BlockPool
from slimlm.kvcache.codec import offsets as kv_offsets
from slimlm.kvcache.compose import check_composition
from slimlm.kvcache.key_tier import build_tier
from slimlm.kvcache.manager import KVCacheManager
from slimlm.kvcache.policy import KV_POLICIES, AttentionSpan
from slimlm.kvcache.spec import KVCacheSpec
from slimlm.kvcache.storage import PagedKVCache
from slimlm.model.hub import LoadedModel
from slimlm.model.fuse import fuse_projections
from slimlm.model.weights import release_freed_heap
from slimlm.model.quant.model import serve_weights
from slimlm.model.rope_extension import ROPE_EXTENSIONS, RopeExtension, dca_native_library


def check_layout(engine: LLMEngine, ids: list[int], layout) -> None:
    """A set-based layout fits these ids and this engine (what it cannot follow is refused)."""
    if len(layout.positions) != len(ids):
        raise ValueError(f"layout has {len(layout.positions)} positions for {len(ids)} prompt tokens")
    if engine.proposer is not None and layout.has_sets:
        raise ValueError("set-based prompts cannot be combined with speculative decoding")
    if engine.rope_ext is not None and engine.rope_ext.dual_chunk is not None:
        raise ValueError("segmented prompts (sets, chunks) cannot be combined with rope_extension='dca'")
    if engine.policy is not None and engine.policy.granularity == "token" and layout.has_sets:
        raise ValueError(f"set-based prompts cannot be combined with kv_policy={engine.config.kv_policy!r}")


def rope_extension(cfg, config: EngineConfig, policy) -> RopeExtension | None:
    """The configured RoPE extension, checked against what it cannot follow."""
    if config.rope_extension is None:
        if config.rope_extension_args:
            raise SlimLMError("rope_extension_args given without rope_extension")
        return None
    cls = ROPE_EXTENSIONS.get(config.rope_extension)
    if policy is not None or config.hooks or config.speculative:
        raise SlimLMError(f"rope_extension={config.rope_extension!r} cannot be combined with a KV policy, "
                          "layer hooks or speculative decoding")
    if any(w for w in (cfg.window_for_layer(i) for i in range(cfg.num_layers))):
        raise SlimLMError("rope_extension does not support sliding-window layers")
    try:
        return cls(cfg, **config.rope_extension_args)
    except TypeError as e:
        raise SlimLMError(f"rope_extension={config.rope_extension!r}: {e}") from None


class LLMEngine:
    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        lm = serve_weights(lm, config.weights, config.weights_group_size)  # int8 / int4 of a loaded model
        if fuse_projections(lm.model):  # q/k/v and gate/up as one matmul each (model/fuse.py)
            release_freed_heap()  # the separate projections' storage
        gemm.install(lm.model, config.native_kernels,  # SLIMLM_GEMM=1: the layer path's dense linears (kernels/gemm.py)
                     min_rows=1 if config.batch_invariant else gemm.MIN_ROWS)
        self.lm, self.model, self.tokenizer = lm, lm.model, lm.tokenizer
        self.stop_token_ids = lm.stop_token_ids()
        cfg = self.model.cfg
        self.context_length = cfg.context_length
        self.policy = KV_POLICIES.get(config.kv_policy)(**config.kv_policy_args) if config.kv_policy else None
        self.rope_ext = rope_extension(cfg, config, self.policy)
        if self.rope_ext is not None:
            self.context_length = self.rope_ext.context
        token_policy = self.policy is not None and self.policy.granularity == "token"
        if self.policy is not None:
            self.policy.validate(cfg)
        shared, merge = self.policy.layer_sharing(cfg.num_layers, config.block_size) if self.policy else ({}, None)
        self.spec = KVCacheSpec.from_model(cfg, self.model.dtype, config.kv_cache_dtype, shared, merge)
        check_composition(self.spec, config.kv_policy, config.speculative)
        if token_policy and self.spec.has_windows:
            raise SlimLMError(f"kv_policy={config.kv_policy!r} compacts tokens, which sliding-window layers "
                              "cannot follow (their masks need positions); use a model without sliding windows")
        span = self.policy.span() if self.policy else AttentionSpan()
        self.hooks = [LAYER_HOOKS.get(h)(**config.hook_args.get(h, {})) for h in config.hooks]
        alone = [n for n, h in zip(config.hooks, self.hooks) if not h.with_kv_policy]
        if alone and self.policy is not None:
            raise SlimLMError(f"hook {alone[0]!r} cannot be combined with kv_policy={config.kv_policy!r} "
                              "(its KV is absent at some layers until revived)")
        # a compacted sequence's blocks no longer hold its prefix, and some hooks make a
        # prefix's KV depend on what follows it: then no prefix is shared
        prefix_caching = config.enable_prefix_caching and not token_policy and all(h.prefix_exact for h in self.hooks)
        per_block = self.spec.bytes_per_block(config.block_size)
        self.bytes_per_block = per_block
        full_context = per_block * -(-(self.context_length + 1) // config.block_size)
        kv_bytes = config.kv_cache_bytes or default_kv_bytes(config.device, min_bytes=full_context)
        self.proposer: Proposer | None = None
        if config.speculative:
            ctx = ProposerContext(self.model, config, self.context_length, cfg.vocab_size, self.tokenizer)
            self.proposer = SPEC_METHODS.get(config.speculative)(ctx, **config.speculative_args)
            kv_bytes -= self.proposer.kv_bytes(kv_bytes)
        self.spec_guard = ProposerGuard(self.proposer, cfg.vocab_size) if self.proposer is not None else None
        num_blocks = kv_bytes // per_block
        if num_blocks < 1:
            raise SlimLMError(f"kv_cache_bytes={kv_bytes} holds no KV block ({per_block} bytes each)")
        tier = None
        if getattr(self.policy, "key_share", 0):  # ShadowKV's second tier: keys held apart from values
            num_blocks, tier = build_tier(kv_bytes, self.spec, config.block_size, self.policy.key_share)
        self.pool = BlockPool(num_blocks, config.block_size, prefix_caching)
        self.pool.tier = tier
        if tier is not None:
            tier.ref_count = self.pool.ref_count
        self.kv = KVCacheManager(self.pool)
        track = token_policy and self.policy.observe_attention
        self.cache = PagedKVCache(self.spec, num_blocks, config.block_size, self.model.device, track_attention=track,
                                  tier=tier)
        kv_offsets.apply(self.cache, self.model, self.tokenizer)  # int4 keys' static offsets (one short forward)
        dca = self.rope_ext.dual_chunk if self.rope_ext is not None else None
        sparse = self.policy if self.policy is not None and self.policy.sparse_decode else None
        paths = AttentionPaths.choose(self.cache, cfg.head_dim, span, track, config.native_kernels and dca is None, sparse)
        sparse_pf = sparse_prefill.build(config.sparse_prefill, config.sparse_prefill_args)
        if sparse_pf is not None and self.policy is not None:
            raise SlimLMError("sparse_prefill cannot be combined with a KV policy")
        sparse_lib = sparse_prefill.native_library(sparse_pf, self.cache, cfg.head_dim, config.native_kernels)
        dca_lib = dca_native_library(dca, self.cache, cfg.head_dim, config.native_kernels)  # DCA's key ranges
        paths = replace(paths, dual_chunk=dca, sparse_prefill=sparse_pf, sparse_prefill_native=sparse_lib,
                        dca_native=dca_lib, observe_window=getattr(self.policy, "observe_window", 0) if track else 0)
        self.runner = ModelRunner(self.model, self.cache, paths, self.hooks, self.rope_ext)
        self.runner.batch_invariant = config.batch_invariant
        if self.proposer is not None:
            self.runner.capture |= set(self.proposer.hidden_layers())
        self.scheduler = Scheduler(
            self.kv, config.max_num_batched_tokens, config.max_num_seqs, self.policy,
            dedup_prefixes=config.batch_prefix_scheduling and prefix_caching,
            num_drafts=(lambda s: len(s.draft_ids)) if self.proposer else None,
        )
        self.blender = None  # CacheBlend, built with the first prompt that has chunks
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._arrival = itertools.count()
        self.stats = {"prompt_tokens": 0, "computed_prompt_tokens": 0, "generated_tokens": 0, "steps": 0,
                      "draft_tokens": 0, "accepted_draft_tokens": 0, "verify_steps": 0, "kv_peak_bytes": 0,
                      "tree_rows": 0, "tree_cut": 0, "tree_off_chain": 0}
        """tree_rows: tree chunks verified as decode rows over key views; tree_cut: tree chunks cut
        to their main chain (``_tree_rows``); tree_off_chain: accepted paths that left the main chain."""

    def kv_bytes_in_use(self) -> int:
        """KV bytes the pool's referenced blocks hold now (all layers, in the codec's format)."""
        if self.pool.tier is not None:  # value blocks + key blocks held + factored keys
            return self.pool.tier.bytes_held(self.pool.num_used(), self.pool.key_blocks_in_use())
        return self.pool.num_used() * self.bytes_per_block

    @classmethod
    def from_model(cls, model: str = "smollm2-135m-instruct", **config: Any) -> LLMEngine:
        from slimlm.model.hub import load

        cfg = EngineConfig(**config)
        return cls(load(model, cfg.dtype, cfg.device, cfg.weights, cfg.weights_group_size), cfg)

    # ------------------------------------------------------------------ requests
    def validate(self, prompt: str | list[int], params: SamplingParams, layout=None) -> list[int]:
        """Token ids of ``prompt``; ValueError naming the problem if the request cannot run.
        ``layout``: a ``PromptLayout`` (set-based prompt) for these ids."""
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
        if params.top_k > vocab:
            raise ValueError(f"top_k must be -1, 0 or at most the vocabulary size {vocab}, got {params.top_k}")
        if layout is not None:
            check_layout(self, ids, layout)
        span = layout.span if layout is not None else len(ids)
        bounded = self.policy is not None and self.policy.max_blocks(1, 1) is not None
        if not bounded and span >= self.context_length:
            raise ValueError(
                (f"prompt spans {span} positions" if layout is not None else f"prompt has {span} tokens")
                + f"; the model's context is {self.context_length} "
                "(a KV policy such as 'sink' or a rope_extension lifts this)"
            )
        need = self._blocks_needed(len(ids), params)
        if need > self.pool.capacity:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens})"
                f"{f' x n ({params.n})' if params.n > 1 else ''} needs {need} KV blocks; "
                f"the pool has {self.pool.capacity}: set kv_cache_bytes to at least "
                f"{format_size(need * self.bytes_per_block)} (--kv-cache-bytes), or lower max_tokens"
            )
        return ids

    def _blocks_needed(self, prompt_len: int, params: SamplingParams) -> int:
        total = self.kv.blocks_for(prompt_len + params.max_tokens + 1)
        per_fork = self.kv.blocks_for(params.max_tokens + 1) + 1  # n > 1: shared prompt, own outputs
        if self.policy is not None:
            bound = self.policy.max_blocks(self.config.max_num_batched_tokens, self.config.block_size)
            if bound is not None:
                total, per_fork = min(total, bound), min(per_fork, bound)
        return total + (params.n - 1) * per_fork

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, layout=None) -> str:
        params = params or SamplingParams()
        ids = self.validate(prompt, params, layout)
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self.requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        req = Request(rid, prompt if isinstance(prompt, str) else None, ids, params, self.tokenizer,
                      next(self._arrival), layout=layout)
        seq = self._new_seq(req, 0, list(ids))  # may raise: nothing is stored before this
        if layout is not None and layout.chunks:
            self._blend(seq, layout.chunks)
        self.requests[rid] = req
        self.scheduler.add(seq)
        self.stats["prompt_tokens"] += len(ids)
        return rid

    def _blend(self, seq: Sequence, chunks) -> None:
        """CacheBlend (``engine/cacheblend.py``): write the blended KV of all prompt tokens but
        the last into the sequence's blocks; the engine computes the last one. A pool too short
        for it now leaves the prompt to an ordinary prefill (the request never fails for it)."""
        n = seq.prompt_len - 1
        if n < 1 or seq.request.params.prompt_logprobs is not None or not self.kv.allocate(seq.seq_id, n):
            return  # prompt logprobs need every row computed: an ordinary prefill
        if self.blender is None:
            from slimlm.engine.cacheblend import CacheBlend
            from slimlm.kvcache.chunk_store import ChunkStore

            self.blender = CacheBlend(self.model, self.runner.rotary, ChunkStore(self.config.chunk_store_bytes),
                                      self.config.blend_recompute_ratio, self.config.blend_select_layer,
                                      self.config.blend_chunk_context,
                                      native_prefill=self.runner.paths.native_prefill)
        before = self.blender.stats["recomputed_tokens"]
        try:
            kv = self.blender.prefill(seq.token_ids[:n], list(chunks))
        except Exception:
            self.kv.free(seq.seq_id)
            raise
        bs = self.config.block_size
        table = self.kv.tables[seq.seq_id]
        slots = torch.tensor([table[i // bs] * bs + i % bs for i in range(n)], device=self.model.device)
        for layer, (k, v) in enumerate(kv):
            self.cache.write(layer, slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
        seq.num_computed, seq.kv_preset = n, True
        self.stats["computed_prompt_tokens"] += self.blender.stats["recomputed_tokens"] - before

    def _new_seq(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        sampler = SequenceSampler(req.params, req.prompt_ids, index, self.model.device)
        seq = Sequence(next(self._ids) + 1_000_000_000, req, index, token_ids, sampler)
        req.seqs.append(seq)
        salt = req.params.cache_salt
        if req.layout is not None:  # a set's (or a blend's) KV depends on its layout, not only its tokens
            salt = f"{salt or ''}\0{req.layout.digest()}"
            if req.layout.chunks:
                salt += (f"\0blend {self.config.blend_recompute_ratio} {self.config.blend_select_layer} "
                         f"{self.config.blend_chunk_context}")
        if salt is not None:
            self.kv.salts[seq.seq_id] = salt
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
        now = time.time()
        if self.config.batch_invariant:
            self._tree_rows(out)
        result = self.runner.execute(out)
        logits = result.logits
        if self.proposer is not None:
            self.proposer.step_result = result  # its hidden states, for verify (Judge decoding)
        seqs = {s.seq_id: s for s in self.scheduler.running}
        for c in out.chunks:
            m = seqs[c.seq_id].request.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
        for c in out.chunks:  # prompt tokens whose KV was computed (not taken from the cache)
            plen = seqs[c.seq_id].prompt_len
            self.stats["computed_prompt_tokens"] += max(0, min(plen, c.start + len(c.token_ids)) - c.start)
        accepted: dict[int, int] = {}
        failed: dict[str, Request] = {}  # requests that failed this step (the others go on)
        new_tokens: dict[int, list[int]] = {}
        plain = []  # (seq, row) for ordinary sampling, batched
        forks = []
        for c in out.chunks:
            if not c.num_logits or c.seq_id not in seqs:
                continue
            seq = seqs[c.seq_id]
            rows = logits[c.seq_id]
            got = self.spec_guard.verify(seq, rows, c.tree_parents) if c.num_drafts else None
            if c.num_drafts and got is None:  # the proposer failed: a plain step from the first row
                accepted[c.seq_id] = 1
                plain.append((seq, rows[0]))
                continue
            if c.num_drafts:  # verify drafts
                toks, lps, path = got
                if path is not None:  # a tree: move the accepted path's KV to the front of the chunk
                    self.stats["tree_off_chain"] += path != list(range(len(path)))
                    self._keep_path(c, path)
                accepted[c.seq_id] = len(toks)  # decode token + accepted drafts have valid KV
                new_tokens[c.seq_id] = list(zip(toks, lps))
                self.stats["draft_tokens"] += c.num_drafts
                self.stats["accepted_draft_tokens"] += len(toks) - 1
                self.stats["verify_steps"] += 1
                continue
            if seq.prompt_logprobs is not None and c.start < seq.prompt_len:
                self._record_prompt_logprobs(seq, c.start, c.token_ids, rows)
            if c.sample:
                plain.append((seq, rows[-1]))
                if c.num_samples > 1:
                    req = seq.request
                    try:
                        for j in range(1, c.num_samples):
                            child = self._new_seq(req, j, list(seq.token_ids))
                            child.prompt_logprobs = seq.prompt_logprobs
                            forks.append((seq, child))
                            plain.append((child, rows[-1]))
                    except Exception as e:  # noqa: BLE001 - fails this request only
                        failed[req.request_id] = self._fail(req, e)
        for c in out.chunks:  # tree key views' scratch blocks: the accepted path was moved out
            for b in c.tree_rows.scratch if c.tree_rows is not None else ():
                self.pool.free(b)
        plain = [(s, r) for s, r in plain if s.request.request_id not in failed]
        forks = [(p, c) for p, c in forks if p.request.request_id not in failed]
        if plain:
            plain, toks, lps = self._sample_isolated(plain, failed)
            for (seq, _), t, lp in zip(plain, toks, lps):
                new_tokens.setdefault(seq.seq_id, []).append((t, lp))
                if seq.seq_id not in seqs:
                    seqs[seq.seq_id] = seq
        self.scheduler.update(out, accepted)
        if self.policy is not None and self.policy.granularity == "token":
            for c in out.chunks:
                seq = seqs.get(c.seq_id)
                if seq is not None and seq.status == SeqStatus.RUNNING:
                    self._compact(seq)
        for parent, child in forks:
            # a token policy compacts (in place) and scores blocks per sequence: the child gets
            # its own copy of what the parent stores
            token = self.policy is not None and self.policy.granularity == "token"
            copies = self.kv.fork(parent.seq_id, child.seq_id, parent.num_stored, share=not token)
            child.num_computed, child.kv_dropped = parent.prompt_len, parent.kv_dropped
            if copies is not None and self.policy is not None:
                self.policy.fork(parent.seq_id, child.seq_id)
            for h in self.hooks:
                h.fork(parent.seq_id, child.seq_id)
            if copies is None:  # pool short: recompute the prompt later (prefix cache helps)
                child.num_computed = child.kv_dropped = 0
                self.scheduler.add(child)
            else:
                self.scheduler.add_running(child, copies)
        self._account_kv(out, seqs)
        changed: dict[str, Request] = dict(failed)
        now = time.time()
        for sid, toks in new_tokens.items():
            seq = seqs[sid]
            if seq.finished:  # its request failed this step
                continue
            m = seq.request.metrics
            m.first_token_time = m.first_token_time or now
            m.last_token_time = now
            for t, lp in toks:
                if self._append(seq, t, lp):
                    break
            changed[seq.request.request_id] = seq.request
        if self.proposer is not None:
            live = [s for s in self.scheduler.running if s.is_decode and not s.finished]
            self.spec_guard.propose(live, out, result)
        outs = []
        for req in changed.values():
            if req.finished:
                req.metrics.finished_time = now
                self.requests.pop(req.request_id, None)
            outs.append(req.output())
        return outs

    def _tree_rows(self, out) -> None:
        """``batch_invariant``: give each tree chunk key views so its nodes are verified as decode
        rows (``engine/spec/tree_rows.py``); a tree that cannot have them (hooks, a prompt layout,
        a query policy, the pool short of scratch blocks) is verified as its main chain."""
        seqs = {s.seq_id: s for s in self.scheduler.running}
        bs = self.config.block_size
        for c in out.chunks:
            if not c.tree_parents:
                continue
            ok = self.runner.tree_rows_ok(c)
            need = scratch_needed(c.tree_parents, c.kv_start, c.block_table, bs) if ok else None
            if need is not None and need <= self.pool.num_free():
                c.tree_rows = plan_tree_rows(c.tree_parents, c.kv_start, c.block_table, bs, self.pool.allocate)
                self.stats["tree_rows"] += 1
            else:
                self._main_chain(c, seqs[c.seq_id])
                self.stats["tree_cut"] += 1

    @staticmethod
    def _main_chain(c, seq: Sequence) -> None:
        """Cut a tree chunk (and the sequence's drafts) to its first chain: tokens 0..m-1 with
        parent i - 1, verified row by row as any chain."""
        m = next((i for i, p in enumerate(c.tree_parents) if p != i - 1), len(c.tree_parents))
        c.token_ids, c.tree_parents = c.token_ids[:m], None
        c.num_drafts, c.num_logits = m - 1, m
        seq.draft_ids, seq.draft_parents = seq.draft_ids[: m - 1], None

    def _keep_path(self, c, path: list[int]) -> None:
        """After tree verification: copy the KV of the accepted path's nodes to storage
        indices kv_start.. (the chain the sequence continues from); the chunk then reads as
        that chain for the scheduler's update. With key views (``c.tree_rows``) a node's KV is
        in its view's slot."""
        bs = self.config.block_size
        slot = lambda i: c.block_table[i // bs] * bs + i % bs  # noqa: E731
        src = c.tree_rows.slot if c.tree_rows is not None else (lambda n: slot(c.kv_start + n))
        pairs = [(src(n), slot(c.kv_start + i)) for i, n in enumerate(path) if src(n) != slot(c.kv_start + i)]
        self.cache.move_slots([a for a, _ in pairs], [b for _, b in pairs])
        c.token_ids = [c.token_ids[n] for n in path]
        c.tree_parents = None

    def _compact(self, seq: Sequence) -> None:
        """Token-level KV policy: once the sequence stores more than its budget (plus slack),
        keep the rows the policy selects per layer and head, move them to the front of the
        sequence's blocks and give the rest back to the pool."""
        policy, bs = self.policy, self.config.block_size
        stored = seq.num_stored
        keep = policy.budget(seq.num_computed)
        if stored <= keep + policy.slack(bs) or policy.defer(seq.num_computed, seq.prompt_len):
            return
        table = self.kv.tables[seq.seq_id]
        mass = None
        if self.cache.mass is not None:
            blocks = torch.tensor(table, device=self.cache.device)
            mass = torch.stack([m.index_select(0, blocks).flatten(0, 1)[:stored].T for m in self.cache.mass])  # (L, H, S)
        idx = policy.select_seq(seq.seq_id, mass, stored, seq.num_computed, keep)
        self.cache.compact(table, idx)
        self.kv.truncate(seq.seq_id, keep)
        seq.kv_dropped += stored - keep

    def _account_kv(self, out, seqs: dict[int, Sequence]) -> None:
        """Per-request peak KV bytes and the engine's peak, after eviction and compaction."""
        used = self.kv_bytes_in_use()
        if used > self.stats["kv_peak_bytes"]:
            self.stats["kv_peak_bytes"] = used
        reqs = {seqs[c.seq_id].request.request_id: seqs[c.seq_id].request for c in out.chunks if c.seq_id in seqs}
        for req in reqs.values():
            live = [s for s in req.seqs if not s.finished]
            if len(live) == 1:
                n = len(self.kv.held_blocks(live[0].seq_id))
            else:
                n = len({b for s in live for b in self.kv.held_blocks(s.seq_id)})
            req.metrics.kv_peak_bytes = max(req.metrics.kv_peak_bytes, n * self.bytes_per_block)

    # ------------------------------------------------------------------ failure isolation
    def _sample_isolated(self, plain: list, failed: dict[str, Request]) -> tuple[list, list, list]:
        """``sample_next`` over the batch; a row that cannot be sampled fails its own request and
        the rest is sampled again (SamplingError is raised before any generator draws, so the
        others sample exactly what they would alone)."""
        while plain:
            try:
                toks, lps = sample_next(torch.stack([r for _, r in plain]), [s.sampler for s, _ in plain])
                return plain, toks, lps
            except SamplingError as e:
                bad = {plain[i][0].request.request_id: plain[i][0].request for i in e.rows}
                why = "sampling failed: the distribution is not finite (temperature or penalties too extreme)"
            except Exception as e:  # noqa: BLE001 - unknown: find the culprits row by row (this advances
                bad = {}  # the others' generators once more: they stay valid, not batch-independent)
                why = f"sampling failed: {type(e).__name__}: {e}"
                for seq, row in plain:
                    try:
                        sample_next(row[None], [seq.sampler])
                        seq.sampler.output_ids.pop()
                    except Exception:  # noqa: BLE001
                        bad[seq.request.request_id] = seq.request
                if not bad:
                    raise e
            for rid, req in bad.items():
                failed[rid] = self._fail(req, why)
            plain = [(s, r) for s, r in plain if s.request.request_id not in bad]
        return [], [], []

    def _fail(self, req: Request, err: Exception | str) -> Request:
        """Fail one request: its sequences finish (KV freed), its output carries the error."""
        req.error = str(err) or type(err).__name__
        for s in req.seqs:
            if not s.finished:
                s.finish_reason = "error"
                self._finish(s)
        return req

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
        for h in self.hooks:
            h.release(seq.seq_id)
        self.kv.salts.pop(seq.seq_id, None)
        if self.spec_guard is not None:
            self.spec_guard.release(seq)
