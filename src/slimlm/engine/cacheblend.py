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
from slimlm.model.rope import apply_rope, rotation


CHUNK_CONTEXTS = ("prefix", "none")
PHASES = ("miss", "move", "select", "recompute")


class _Capture:
    """Dense causal attention over this forward's tokens that keeps each layer's k and v."""

    def __init__(self, T: int, scale: float, device):
        idx = torch.arange(T, device=device)
        self.mask = (idx[None, :] <= idx[:, None])[None, None]  # (1, 1, T, T)
        self.scale = scale
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer, q, k, v, q_rows=None):
        self.kv[layer] = (k, v)
        return attention(q, k, v, self.mask, self.scale)


class _Blend:
    """Selected rows query; keys are the reused KV with the selected rows' fresh KV in place."""

    def __init__(self, reused: list[tuple[torch.Tensor, torch.Tensor]], sel: torch.Tensor, scale: float):
        self.reused, self.sel, self.scale = reused, sel, scale
        T = reused[0][0].shape[2]
        idx = torch.arange(T, device=sel.device)
        self.mask = (idx[None, :] <= sel[:, None])[None, None]  # (1, 1, R, T)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer, q, k, v, q_rows=None):
        K, V = self.reused[layer]
        K, V = K.clone(), V.clone()  # (1, Hkv, T, d)
        K[:, :, self.sel], V[:, :, self.sel] = k, v
        self.kv[layer] = (K, V)
        return attention(q, K, V, self.mask, self.scale)


class CacheBlend:
    def __init__(self, model, rotary, store: ChunkStore, ratio: float, select_layer: int = 1,
                 chunk_context: str = "prefix"):
        if chunk_context not in CHUNK_CONTEXTS:
            raise ValueError(f"blend_chunk_context must be one of {', '.join(CHUNK_CONTEXTS)}, got {chunk_context!r}")
        self.model, self.rotary, self.store = model, rotary, store
        self.ratio, self.chunk_context = ratio, chunk_context
        self.select_layer = min(select_layer, model.cfg.num_layers - 1)
        self.stats = {"blended_prompts": 0, "prompt_tokens": 0, "recomputed_tokens": 0, "probe_tokens": 0,
                      "chunk_tokens_computed": 0, "cpu_s": dict.fromkeys(PHASES, 0.0)}
        """``cpu_s``: this process's CPU seconds per phase (where a blend's time goes): ``miss``
        computing chunks not in the store, ``move`` assembling the reused KV (RoPE rotation),
        ``select`` the selection probe, ``recompute`` the selected rows through every layer."""

    def _phase(self, name: str, t0: float) -> float:
        t = time.process_time()
        self.stats["cpu_s"][name] += t - t0
        return t

    # ------------------------------------------------------------------ pieces
    def _run(self, ids: list[int], positions: torch.Tensor, attn, layers: int | None = None) -> None:
        m = self.model
        x = torch.tensor([ids], device=m.device)
        h = m.embed(x)  # (1, T, D)
        cos, sin = self.rotary(positions[None], h.dtype)
        for layer in m.model.layers[: layers if layers is not None else len(m.model.layers)]:
            h = layer(h, cos, sin, attn)

    def chunk_kv(self, ids: list[int], prefix: list[int] = ()) -> ChunkKV:
        """The chunk's KV computed after ``prefix`` (positions P..P+n-1 for a prefix of P
        tokens; alone at 0..n-1 without one), from the store or computed and stored. The store
        key is the prefix and the chunk (a chunk after another prefix is another entry)."""
        prefix = list(prefix)
        key = prefix + [-1] + ids if prefix else ids  # -1: no token id, separates the two
        kv = self.store.get(key)
        if kv is None:
            t0 = time.process_time()
            P, run = len(prefix), prefix + ids
            cap = _Capture(len(run), self.model.attn_scale, self.model.device)
            self._run(run, torch.arange(len(run), device=self.model.device), cap)
            kv = [(cap.kv[i][0][0, :, P:].transpose(0, 1).contiguous(),
                   cap.kv[i][1][0, :, P:].transpose(0, 1).contiguous())
                  for i in range(len(cap.kv))]  # (n, Hkv, d) per layer
            self.store.put(key, kv)
            self.stats["chunk_tokens_computed"] += len(run)
            self.stats["cpu_s"]["move"] -= self._phase("miss", t0) - t0  # reused_kv's clock includes it
        return kv

    def reused_kv(self, ids: list[int], spans: list[tuple[int, int]]) -> tuple[list, torch.Tensor]:
        """Per layer (1, Hkv, T, d) keys / values with every chunk's cached KV moved to its
        offset (zeros elsewhere), and the bool (T,) mask of chunk tokens."""
        m, T = self.model, len(ids)
        cfg = m.cfg
        out = [(torch.zeros(1, cfg.num_kv_heads, T, cfg.head_dim, dtype=m.dtype, device=m.device),
                torch.zeros(1, cfg.num_kv_heads, T, cfg.head_dim, dtype=m.dtype, device=m.device))
               for _ in range(cfg.num_layers)]
        in_chunk = torch.zeros(T, dtype=torch.bool, device=m.device)
        P = spans[0][0] if spans and self.chunk_context == "prefix" else 0
        for a, b in spans:
            kv = self.chunk_kv(ids[a:b], ids[:P])  # cached at positions P.., moved by a - P
            cos, sin = rotation(self.rotary.inv_freq, torch.full((1, b - a), a - P, device=m.device), m.dtype)
            for (K, V), (k, v) in zip(out, kv):
                K[0, :, a:b] = apply_rope(k.transpose(0, 1)[None], cos, sin)[0]  # R(a-P) R(P+j) = R(a+j)
                V[0, :, a:b] = v.transpose(0, 1)
            in_chunk[a:b] = True
        return out, in_chunk

    def select(self, ids: list[int], reused: list, in_chunk: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Rows to recompute (ascending): every non-chunk token and the ``ratio`` of chunk tokens
        whose KV deviates most at ``select_layer``; and the probe's fresh KV of layers 0 ..
        ``select_layer`` for every token ({} when no probe ran)."""
        n_chunk = int(in_chunk.sum())
        want = min(n_chunk, math.ceil(self.ratio * n_chunk - 1e-9))
        always = (~in_chunk).nonzero()[:, 0]
        if want == 0:
            return always, {}
        if want == n_chunk:
            return torch.arange(len(ids), device=in_chunk.device), {}
        T, L = len(ids), self.select_layer
        cap = _Capture(T, self.model.attn_scale, self.model.device)
        self._run(ids, torch.arange(T, device=self.model.device), cap, layers=L + 1)
        self.stats["probe_tokens"] += T
        (kf, vf), (kc, vc) = cap.kv[L], reused[L]
        dev = ((kf - kc).float() ** 2).sum((0, 1, 3)) + ((vf - vc).float() ** 2).sum((0, 1, 3))  # (T,)
        dev = dev.masked_fill(~in_chunk, float("-inf"))
        top = dev.topk(want).indices
        return torch.cat([always, top]).sort().values, cap.kv

    # ------------------------------------------------------------------ the blend
    @torch.inference_mode()
    def prefill(self, ids: list[int], spans: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Blended KV (1, Hkv, T, d) per layer for ``ids`` (the prompt without its last token)."""
        spans = [(a, min(b, len(ids))) for a, b in spans if a < len(ids)]
        t = time.process_time()
        reused, in_chunk = self.reused_kv(ids, spans)
        t = self._phase("move", t)
        sel, fresh = self.select(ids, reused, in_chunk)
        t = self._phase("select", t)
        for layer, kv in fresh.items():  # the probe computed these layers for every token: keep them
            reused[layer] = kv
        self.stats["blended_prompts"] += 1
        self.stats["prompt_tokens"] += len(ids)
        self.stats["recomputed_tokens"] += int(sel.numel())
        if sel.numel() == 0:
            return reused
        blend = _Blend(reused, sel, self.model.attn_scale)
        self._run([ids[i] for i in sel.tolist()], sel, blend)
        self._phase("recompute", t)
        return [blend.kv[i] for i in range(len(reused))]
