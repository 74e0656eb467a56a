"""CacheBlend (Yao et al. 2024, "CacheBlend: Fast LLM Serving for RAG with Cached Knowledge
Fusion"): reuse the KV of text chunks that are not a prefix, and recompute a few tokens so the
chunks attend to each other again.

A prompt given as segments may mark chunks (``{"chunk": text}``, ``engine/segments.py``). Each
chunk's KV is computed once and kept in a :class:`ChunkStore` (``kvcache/chunk_store.py``, LRU,
bounded in bytes): with ``chunk_context="prefix"`` (default) after the prompt's tokens before its
first chunk (the instruction; positions P..P+n-1, keyed by prefix + chunk), so the chunk does not
start cold as the beginning of a text (Block-Attention / APE); with ``"none"`` alone at positions
0..n-1 (the paper). On SmolLM2-135M the prefix halves the reused KV's deviation from a full
prefill (docs/prompts.md). For a new prompt:

1. every chunk's cached keys are moved to the chunk's offset by a RoPE rotation
   (R(start - P) R(P + j) = R(start + j); values need nothing);
2. *selection* (paper section 4.2): the first ``select_layer + 1`` layers run over all tokens
   with fresh KV; at ``select_layer`` the tokens whose fresh KV deviates most from the reused
   KV (squared L2 over heads, keys + values) are the ones to recompute: a fraction ``ratio`` of
   the chunk tokens. Tokens outside chunks (instructions, the question) have no cached KV and
   are always computed;
3. *blend*: layers 0 .. ``select_layer`` keep the selection probe's fresh KV for every token
   (the paper recomputes the first layer in full); every layer runs on the selected tokens only;
   each attends over the reused KV with the selected tokens' rows replaced by their fresh KV
   (causal by position).

Where the time goes (docs/prompts.md): the probe runs layers ``0 .. select_layer - 1`` over
all tokens and only the key / value projections of ``select_layer``; the recompute pass starts
at ``select_layer`` from the probe's hidden states of the selected rows (the probe's layers are
not run twice); the reused KV of all layers is one (layers, T, Hkv, d) buffer per keys / values,
each chunk moved into it by one rotation over all its layers, and the recomputed rows' fresh KV
is written into it in place; the selected rows attend in blocks of ``Q_BLOCK`` rows, each only
over the keys up to its last row (causality costs about half of the dense (R, T) scores).

``ratio = 0`` is plain reuse (chunks' KV as cached, only the other tokens computed);
``ratio = 1`` recomputes everything, which is a full prefill (both tested). The prompt's last
token is left to the engine, which computes it (and its logits) over the blended KV.
"""

from __future__ import annotations

import math
import time

import torch

from slimlm.kvcache.chunk_store import ChunkKV, ChunkStore
from slimlm.model.attention import attention
from slimlm.model.rope import rotate_half, rotation
from slimlm.model.transformer import RowPlan


CHUNK_CONTEXTS = ("prefix", "none")
PHASES = ("miss", "move", "select", "recompute")
Q_BLOCK = 64
"""The recomputed rows attend in blocks of this many, each against the keys up to its last
row only (PyTorch's CPU attention computes every key it is given, masked or not)."""
NATIVE_MIN_SHARE = 0.2
"""The native kernel serves the blend's attention when the selected rows are at least this share
of the rows it would compute (all from the first selected one): per query-key pair it costs
about a fifth of PyTorch's (SmolLM2-135M, bf16, 1 thread: 50 % of 700 rows 0.6 vs 0.78 s for
the whole recompute; 17 % of 1,700 rows 1.01 vs 0.93 s)."""
NATIVE_BLOCK = 16
"""Rows per block when the native prefill kernel reads the blend's KV buffers as a pool."""


class _Capture:
    """Dense causal attention over this forward's tokens that keeps each layer's k and v."""

    def __init__(self, T: int, scale: float, device):
        idx = torch.arange(T, device=device)
        self.mask = (idx[None, :] <= idx[:, None])[None, None]  # (1, 1, T, T)
        self.scale = scale
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer, q, k, v, q_rows=None):
        self.kv[layer] = (k, v)
        if q_rows is not None:  # keys and values only (the probe's last layer; its output is not used)
            return torch.zeros_like(q)
        return attention(q, k, v, self.mask, self.scale)


class _Blend:
    """The selected rows ``sel`` (ascending positions) query; keys are the reused KV ``K``, ``V``
    (layers, T, Hkv, d) with the selected rows' fresh KV written in place.

    ``native``: the loaded ``paged_prefill`` kernel, or None. It is used when the selected rows
    are at least ``NATIVE_MIN_SHARE`` of the rows from the first selected one: all those rows
    query (the unselected with zero queries, their outputs dropped), ``K`` and ``V`` read as a
    pool of ``block``-row blocks. Otherwise PyTorch attends in ``Q_BLOCK``-row query blocks."""

    dev_layer: int | None = None
    """Where the fresh rows' deviation from the reused KV is recorded in ``dev`` (R,) before they
    replace it (gradual filtering)."""

    def __init__(self, K: torch.Tensor, V: torch.Tensor, sel: torch.Tensor, scale: float, native=None,
                 block: int = 16):
        self.K, self.V, self.sel, self.scale, self.block = K, V, sel, scale, block
        R = sel.numel()
        self.native = native if R and R >= NATIVE_MIN_SHARE * (int(sel[-1]) - int(sel[0]) + 1) else None
        self.parts = []  # (first row, end row, keys needed, mask (1, 1, e - a, n))
        if self.native is None:
            ends = list(range(Q_BLOCK, R, Q_BLOCK)) + [R]
            for a, e in zip([0] + ends[:-1], ends):
                n = int(sel[e - 1]) + 1
                keys = torch.arange(n, device=sel.device)
                self.parts.append((a, e, n, (keys[None, :] <= sel[a:e, None])[None, None]))

    def attend(self, layer, q, k, v, q_rows=None):
        K, V = self.K[layer], self.V[layer]  # (T, Hkv, d)
        if layer == self.dev_layer:
            kf, vf = k[0].transpose(0, 1), v[0].transpose(0, 1)  # (R, Hkv, d)
            self.dev = ((kf - K[self.sel]).float() ** 2).sum((1, 2)) + ((vf - V[self.sel]).float() ** 2).sum((1, 2))
        K.index_copy_(0, self.sel, k[0].transpose(0, 1))
        V.index_copy_(0, self.sel, v[0].transpose(0, 1))
        if self.native is not None:
            return self._native(layer, q)
        n = self.parts[-1][2]
        Kh, Vh = K[:n].transpose(0, 1)[None], V[:n].transpose(0, 1)[None]  # (1, Hkv, n, d) views
        qf, dtype = q, q.dtype
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            qf, dtype = q.float(), torch.float32  # widened once per layer, not per block (model/attention.py)
        Kh, Vh = (t.to(dtype, memory_format=torch.contiguous_format) for t in (Kh, Vh))
        if len(self.parts) == 1:
            return attention(qf, Kh, Vh, self.parts[0][3], self.scale).to(q.dtype)
        out = torch.empty(qf.shape, dtype=q.dtype, device=q.device)  # (1, Hq, R, d)
        for a, e, n, mask in self.parts:
            out[:, :, a:e] = attention(qf[:, :, a:e], Kh[:, :, :n], Vh[:, :, :n], mask, self.scale)
        return out

    def _native(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        from slimlm.kernels.ops import native_prefill

        s0, n = int(self.sel[0]), int(self.sel[-1]) + 1
        T, Hkv, d = self.K.shape[1:]
        qs = q.new_zeros(n - s0, q.shape[1], d)  # (rows s0 .. n-1, Hq, d)
        qs.index_copy_(0, self.sel - s0, q[0].transpose(0, 1))
        out = torch.empty_like(qs)
        pool = T // self.block, self.block, Hkv, d
        table = torch.arange(pool[0], device=q.device)
        native_prefill(self.native, qs, self.K[layer].view(pool), self.V[layer].view(pool), table, s0, out, self.scale)
        return out.index_select(0, self.sel - s0).transpose(0, 1)[None]  # (1, Hq, R, d)


class CacheBlend:
    def __init__(self, model, rotary, store: ChunkStore, ratio: float, select_layer: int = 1,
                 chunk_context: str = "prefix", first_ratio: float | None = None, native_prefill=None):
        if chunk_context not in CHUNK_CONTEXTS:
            raise ValueError(f"blend_chunk_context must be one of {', '.join(CHUNK_CONTEXTS)}, got {chunk_context!r}")
        self.model, self.rotary, self.store = model, rotary, store
        self.ratio, self.chunk_context = ratio, chunk_context
        self.first_ratio = first_ratio
        self.native = None
        """The ``paged_prefill`` kernel when it computes this model's dtype and head size on the CPU."""
        if native_prefill is not None and model.device.type == "cpu":
            from slimlm.kernels.ops import NATIVE_DTYPES

            code = NATIVE_DTYPES.get(model.dtype)
            if code is not None and native_prefill.slimlm_prefill_supported(model.cfg.head_dim, code):
                self.native = native_prefill
        """Gradual filtering (paper section 4.3): select ``first_ratio`` (> ratio) at the selection
        layer, recompute them through the next layer, then keep the ``ratio`` whose fresh KV
        deviates most there for the remaining layers. None: one selection."""
        self.select_layer = min(select_layer, model.cfg.num_layers - 1)
        self.stats = {"blended_prompts": 0, "prompt_tokens": 0, "recomputed_tokens": 0, "probe_tokens": 0,
                      "chunk_tokens_computed": 0, "cpu_s": dict.fromkeys(PHASES, 0.0)}
        """``cpu_s``: this process's CPU seconds per phase (where a blend's time goes): ``miss``
        computing chunks not in the store, ``move`` assembling the reused KV (RoPE rotation),
        ``select`` the selection probe, ``recompute`` the selected rows through every layer."""

    def _first(self) -> float:
        gradual = self.first_ratio is not None and 0 < self.ratio < 1
        return max(self.first_ratio, self.ratio) if gradual else self.ratio

    def _phase(self, name: str, t0: float) -> float:
        t = time.process_time()
        self.stats["cpu_s"][name] += t - t0
        return t

    # ------------------------------------------------------------------ pieces
    def _layers(self, h: torch.Tensor, positions: torch.Tensor, attn, first: int = 0, end: int | None = None,
                kv_only: int | None = None) -> torch.Tensor:
        """Hidden states (1, T, D) after layers ``first .. end - 1``. Layer ``kv_only`` is run
        for its keys and values only: one query row (the model has no zero-row plan), whose
        output is meaningless (the caller discards it)."""
        cos, sin = self.rotary(positions[None], h.dtype)
        layers = self.model.model.layers
        for i in range(first, end if end is not None else len(layers)):
            plan = RowPlan(q_rows=positions.new_tensor([0])) if i == kv_only else None
            h = layers[i](h, cos, sin, attn, plan)
        return h

    def _run(self, ids: list[int], positions: torch.Tensor, attn, layers: int | None = None) -> torch.Tensor:
        h = self.model.embed(torch.tensor([ids], device=self.model.device))  # (1, T, D)
        return self._layers(h, positions, attn, 0, layers)

    def chunk_kv(self, ids: list[int], prefix: list[int] = ()) -> ChunkKV:
        """The chunk's KV (keys, values: (layers, n, Hkv, d) each) computed after ``prefix``
        (positions P..P+n-1 for a prefix of P tokens; alone at 0..n-1 without one), from the
        store or computed and stored. The store key is the prefix and the chunk (a chunk after
        another prefix is another entry)."""
        prefix = list(prefix)
        key = prefix + [-1] + ids if prefix else ids  # -1: no token id, separates the two
        kv = self.store.get(key)
        if kv is None:
            t0 = time.process_time()
            P, run = len(prefix), prefix + ids
            cap = _Capture(len(run), self.model.attn_scale, self.model.device)
            self._run(run, torch.arange(len(run), device=self.model.device), cap)
            kv = tuple(torch.stack([cap.kv[i][j][0, :, P:].transpose(0, 1) for i in range(len(cap.kv))])
                       for j in (0, 1))  # (layers, n, Hkv, d)
            self.store.put(key, kv)
            self.stats["chunk_tokens_computed"] += len(run)
            self.stats["cpu_s"]["move"] -= self._phase("miss", t0) - t0  # reused_kv's clock includes it
        return kv

    def reused_kv(self, ids: list[int], spans: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
        """Keys and values (layers, T + pad, Hkv, d) with every chunk's cached KV moved to its
        offset (zeros elsewhere; ``pad`` rounds T up to whole native blocks), and the bool (T,)
        mask of chunk tokens."""
        m, T = self.model, len(ids)
        cfg = m.cfg
        pad = -T % NATIVE_BLOCK  # the native kernel reads K, V as a pool of whole blocks
        K = torch.zeros(cfg.num_layers, T + pad, cfg.num_kv_heads, cfg.head_dim, dtype=m.dtype, device=m.device)
        V = torch.zeros_like(K)
        in_chunk = torch.zeros(T, dtype=torch.bool, device=m.device)
        P = spans[0][0] if spans and self.chunk_context == "prefix" else 0
        for a, b in spans:
            k, v = self.chunk_kv(ids[a:b], ids[:P])  # cached at positions P.., moved by a - P
            if a != P:  # R(a-P) R(P+j) = R(a+j): one rotation of every layer's keys
                cos, sin = rotation(self.rotary.inv_freq, torch.full((1, 1), a - P, device=m.device), m.dtype)
                k = k * cos[0, 0] + rotate_half(k) * sin[0, 0]
            K[:, a:b], V[:, a:b] = k, v
            in_chunk[a:b] = True
        return K, V, in_chunk

    def _blend(self, K, V, sel) -> _Blend:
        return _Blend(K, V, sel, self.model.attn_scale, self.native, NATIVE_BLOCK)

    def select(self, ids: list[int], K: torch.Tensor, V: torch.Tensor, in_chunk: torch.Tensor):
        """Rows to recompute (ascending): every non-chunk token and the ``ratio`` of chunk tokens
        whose KV deviates most at ``select_layer``; and the probe's hidden states (1, T, D) after
        layer ``select_layer - 1`` with its fresh KV of layers 0 .. ``select_layer`` for every
        token written into ``K``, ``V`` (None when no probe ran)."""
        n_chunk = int(in_chunk.sum())
        want = min(n_chunk, math.ceil(self._first() * n_chunk - 1e-9))
        always = (~in_chunk).nonzero()[:, 0]
        if want == 0:
            return always, None
        if want == n_chunk:
            return torch.arange(len(ids), device=in_chunk.device), None
        T, L = len(ids), self.select_layer
        cap = _Capture(T, self.model.attn_scale, self.model.device)
        positions = torch.arange(T, device=self.model.device)
        h = self.model.embed(torch.tensor([ids], device=self.model.device))
        h = self._layers(h, positions, cap, 0, L)
        self._layers(h, positions, cap, L, L + 1, kv_only=L)  # layer L: its keys and values only
        self.stats["probe_tokens"] += T
        kf, vf = (t[0].transpose(0, 1) for t in cap.kv[L])  # (T, Hkv, d)
        dev = ((kf - K[L, :T]).float() ** 2).sum((1, 2)) + ((vf - V[L, :T]).float() ** 2).sum((1, 2))  # (T,)
        dev = dev.masked_fill(~in_chunk, float("-inf"))
        top = dev.topk(want).indices
        for layer, (k, v) in cap.kv.items():  # the probe computed these layers for every token: keep them
            K[layer, :T], V[layer, :T] = k[0].transpose(0, 1), v[0].transpose(0, 1)
        return torch.cat([always, top]).sort().values, h

    # ------------------------------------------------------------------ the blend
    @torch.inference_mode()
    def prefill(self, ids: list[int], spans: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Blended KV (1, Hkv, T, d) per layer (views of one (layers, T, Hkv, d) buffer) for
        ``ids`` (the prompt without its last token)."""
        spans = [(a, min(b, len(ids))) for a, b in spans if a < len(ids)]
        t = time.process_time()
        K, V, in_chunk = self.reused_kv(ids, spans)
        t = self._phase("move", t)
        sel, h = self.select(ids, K, V, in_chunk)
        t = self._phase("select", t)
        self.stats["blended_prompts"] += 1
        self.stats["prompt_tokens"] += len(ids)
        first = int(sel.numel())  # rows recomputed (with gradual filtering: rows x layers / layers)
        if sel.numel():
            blend = self._blend(K, V, sel)
            if h is None:  # no probe: the selected rows from their embeddings
                self._run([ids[i] for i in sel.tolist()], sel, blend)
            elif self._first() == self.ratio or self.select_layer + 2 >= len(K):
                self._layers(h[:, sel], sel, blend, self.select_layer)  # from the probe's hidden states
            else:  # gradual filtering: the first selection through one more layer, then the ratio
                L = self.select_layer
                blend.dev_layer = L + 1
                h = self._layers(h[:, sel], sel, blend, L, L + 2)
                n_chunk = int(in_chunk.sum())
                want = min(n_chunk, math.ceil(self.ratio * n_chunk - 1e-9))
                chunk_rows = in_chunk[sel]
                keep = blend.dev.masked_fill(~chunk_rows, float("-inf")).topk(want).indices
                local = torch.cat([(~chunk_rows).nonzero()[:, 0], keep]).sort().values
                sel = sel[local]
                self._layers(h[:, local], sel, self._blend(K, V, sel), L + 2)
                first = round((2 * first + (len(K) - 2) * int(sel.numel())) / len(K))
            self._phase("recompute", t)
        self.stats["recomputed_tokens"] += first
        T = len(ids)
        return [(K[i, :T].transpose(0, 1)[None], V[i, :T].transpose(0, 1)[None]) for i in range(K.shape[0])]
