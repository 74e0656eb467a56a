"""Running a RoPE model past its trained context, without training (``rope_extension``).

An extension states the longest sequence the engine then accepts (``context``, default 4x the
trained range) and how positions reach the model:

- ``extrapolate``: plain RoPE past the trained range (the baseline: relative distances the
  model never saw);
- ``yarn``: YaRN with ``factor = context / trained`` (Peng et al. 2023), see ``model/rope.py``;
- ``dynamic``: dynamic NTK scaling with the same factor;
- ``dca``: Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of LLMs";
  Qwen2.5-1M's length extrapolation): the sequence is cut into chunks of ``c = chunk_size -
  local_window`` tokens; keys are rotated by ``j mod c``; a query at i is rotated three ways:

  ======================  ==========================  ================================
  key j                   query rotated by            relative distance
  ======================  ==========================  ================================
  same chunk (intra)      ``i mod c``                 ``i - j`` (exact)
  previous chunk (succ)   ``min(i mod c + c, s)``     ``i - j`` while ``i mod c <= w``,
                                                      else capped at ``s - (j mod c)``
  older chunks (inter)    ``s``                       ``s - (j mod c)`` in ``(w, s]``
  ======================  ==========================  ================================

  so no relative distance exceeds ``s = chunk_size`` (< the trained context). Below ``c`` tokens
  every key is intra and DCA *is* standard attention (tested exactly). The defaults and the
  mapping are those of the paper's reference code (ChunkLlama): ``s`` = 3/4 of the trained
  context, ``w`` = 1/16 of it (6,144 and 512 for SmolLM2's 8,192: chunks of 5,632 tokens), the
  successive-chunk query clamped at ``s`` and the inter-chunk query at ``s``.

The engine keeps storage index == position for these (no token policy compacts), rotates keys
by :meth:`RopeExtension.rope_positions` and, for DCA, attends through :func:`dca_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from slimlm.errors import SlimLMError
from slimlm.model.config import ModelConfig
from slimlm.model.rope import RotaryEmbedding, apply_rope, rotation
from slimlm.registry import Registry

ROPE_EXTENSIONS: Registry[type[RopeExtension]] = Registry("rope extension")


@dataclass
class RopeExtension:
    """Base: plain RoPE, the engine's context raised to ``context`` tokens."""

    cfg: ModelConfig
    context: int | None = None
    """Longest sequence (prompt + output) the engine accepts; None = 4x the trained context."""

    name = "extrapolate"

    def __post_init__(self) -> None:
        trained = self.cfg.context_length
        if self.context is None:
            self.context = 4 * trained
        self.context = int(self.context)
        if self.context < 2:
            raise SlimLMError(f"rope_extension context must be at least 2 tokens, got {self.context}")

    @property
    def trained(self) -> int:
        return self.cfg.context_length

    def rotary(self) -> RotaryEmbedding:
        """The rotary embedding the engine uses (cos/sin for rope positions)."""
        return RotaryEmbedding(self.cfg)

    def rope_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions that rotate the step's queries and keys (what the cache stores)."""
        return positions

    @property
    def dual_chunk(self) -> DualChunk | None:
        return None


ROPE_EXTENSIONS.register("extrapolate")(RopeExtension)


def _scaled(ext: RopeExtension, kind: str) -> RotaryEmbedding:
    if (ext.cfg.rope_scaling or {}).get("rope_type", "default") != "default":
        raise SlimLMError(f"rope_extension={ext.name!r}: the model already scales RoPE "
                          f"({ext.cfg.rope_scaling['rope_type']}); use 'extrapolate' or 'dca'")
    factor = max(ext.context / ext.trained, 1.0)
    params = {"rope_type": kind, "factor": factor, "original_max_position_embeddings": ext.trained}
    cfg = replace(ext.cfg, rope_scaling=params)
    if kind == "yarn":
        cfg = replace(cfg, max_position_embeddings=ext.context)
    return RotaryEmbedding(cfg)


@ROPE_EXTENSIONS.register("yarn")
@dataclass
class YarnExtension(RopeExtension):
    """YaRN, factor = context / trained (Peng et al. 2023)."""

    def rotary(self) -> RotaryEmbedding:
        return _scaled(self, "yarn")


@ROPE_EXTENSIONS.register("dynamic")
@dataclass
class DynamicExtension(RopeExtension):
    """Dynamic NTK-aware scaling, factor = context / trained."""

    def rotary(self) -> RotaryEmbedding:
        return _scaled(self, "dynamic")


@dataclass(frozen=True)
class DualChunk:
    chunk_size: int
    """s: the largest relative distance DCA ever shows the model (< the trained context)."""
    local_window: int
    """w: queries this close to their chunk's start see the previous chunk at exact distances."""
    logit_scale: float = 1.0
    """Attention logits multiplied by this (1 = none): YaRN's temperature, which Qwen2.5-1M
    combines with DCA, sharpens attention spread over more keys than training saw."""
    cross_scale: float = 1.0
    """Logits of the pairs in different chunks (successive and inter) multiplied by this on top of
    ``logit_scale`` (1 = none); folded into those two query rotations (:func:`dca_queries`), so
    every path that rotates queries through it applies it. No pair is cross-chunk below ``c``."""
    length_base: int = 0
    """0 = off; else a query at position i has its logits multiplied by ``max(1, 0.1 ln((i + 1) /
    length_base) + 1)`` (Qwen2.5-1M's YaRN factor for the keys a query sees; 1 up to
    ``length_base``, the trained context), folded into the three query rotations."""
    length_power: int = 1
    """The length factor to this power: 1 Qwen2.5-1M's (its keys carry it), 2 YaRN's (q and k)."""

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_window


@ROPE_EXTENSIONS.register("dca")
@dataclass
class DualChunkExtension(RopeExtension):
    """Dual Chunk Attention (module docstring)."""

    chunk_size: int | None = None
    """s; None = 3/4 of the trained context (ChunkLlama's choice)."""
    local_window: int | None = None
    """w; None = 1/16 of the trained context (ChunkLlama's default), at most s / 2."""
    logit_scale: float | str = "yarn"
    """Multiplies attention logits. ``"yarn"`` (the default since issue 18's session 13; graded
    on the 16k passkey grid, docs/prompts.md): per query at i, ``max(1, 0.1 ln((i + 1) /
    trained) + 1)^2``, YaRN's temperature for the keys the query sees (1.1433 for a query at
    16,384 of 8,192; 1 inside the trained context, where DCA below its chunk stays standard
    attention exactly). ``"auto"``: that factor unsquared (Qwen2.5-1M's, which its DCA applies to
    every key of a sequence of n tokens). A number: a fixed factor on every pair; 1 = off (the
    default before session 13)."""
    cross_scale: float = 1.0
    """Multiplies the logits of cross-chunk pairs only (successive and inter chunks; 1 = off): a
    temperature for the keys DCA maps to capped distances, leaving the own chunk's exact."""

    def __post_init__(self) -> None:
        super().__post_init__()
        s = int(self.chunk_size) if self.chunk_size is not None else self.trained * 3 // 4
        if s >= self.trained:
            raise SlimLMError(f"dca chunk_size {s} must be below the trained context ({self.trained})")
        w = int(self.local_window) if self.local_window is not None else min(self.trained // 16, s // 2)
        if s < 2 or not 0 <= w < s:
            raise SlimLMError(f"dca needs chunk_size >= 2 and 0 <= local_window < chunk_size; got {s}, {w}")
        self.chunk_size, self.local_window = s, w
        self.length_base, self.length_power = 0, 1
        if self.logit_scale in ("auto", "yarn"):
            self.length_base, self.length_power = self.trained, 1 if self.logit_scale == "auto" else 2
            self.logit_scale = 1.0
        try:
            self.logit_scale = float(self.logit_scale)
        except (TypeError, ValueError):
            raise SlimLMError(f"dca logit_scale must be a number in (0, 4], 'auto' or 'yarn', got "
                              f"{self.logit_scale!r}") from None
        if not 0 < self.logit_scale <= 4:
            raise SlimLMError(f"dca logit_scale must be in (0, 4], got {self.logit_scale}")
        self.cross_scale = float(self.cross_scale)
        if not 0 < self.cross_scale <= 4:
            raise SlimLMError(f"dca cross_scale must be in (0, 4], got {self.cross_scale}")

    @property
    def dual_chunk(self) -> DualChunk:
        return DualChunk(self.chunk_size, self.local_window, self.logit_scale, self.cross_scale, self.length_base,
                         self.length_power)

    def rope_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions % self.dual_chunk.chunk_len


def dca_queries(q: torch.Tensor, q_pos: torch.Tensor, dc: DualChunk,
                inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three rotations of queries q (..., T, d) at true positions q_pos (..., T), q already
    rotated by ``i mod c``: (intra, successive-chunk, inter-chunk), in float32 for half inputs; the
    two cross-chunk ones carry ``dc.cross_scale`` (a query scaled by f scales its logits by f)."""
    c, s = dc.chunk_len, dc.chunk_size
    work = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
    qf = q.to(work)
    qi = q_pos % c  # the rotation q already carries
    cs, ss = rotation(inv_freq, (qi + c).clamp(max=s) - qi, work)
    ci, si = rotation(inv_freq, s - qi, work)
    succ, inter = apply_rope(qf, cs, ss), apply_rope(qf, ci, si)
    if dc.cross_scale != 1.0:
        succ, inter = succ * dc.cross_scale, inter * dc.cross_scale
    f = length_factor(q_pos, dc)
    if f is not None:
        f = f.to(work)[..., None]  # broadcast over heads: q (..., H, T, d), q_pos (..., T)
        qf, succ, inter = qf * f, succ * f, inter * f
    return qf, succ, inter


def length_factor(q_pos: torch.Tensor, dc: DualChunk) -> torch.Tensor | None:
    """Per query, ``max(1, 0.1 ln((i + 1) / length_base) + 1)`` with a head axis (q_pos (B, T) ->
    (B, 1, T)); None when off or 1 for every query (positions inside ``length_base``)."""
    if not dc.length_base or int(q_pos.max()) + 1 <= dc.length_base:
        return None
    n = (q_pos + 1).clamp(min=1).to(torch.float64)
    return ((0.1 * torch.log(n / dc.length_base) + 1).clamp(min=1) ** dc.length_power).to(torch.float32)[..., None, :]


def dca_pick(chunk_distance: torch.Tensor, intra: torch.Tensor, succ: torch.Tensor,
             inter: torch.Tensor) -> torch.Tensor:
    """Per query-key pair, the score of the rotation DCA assigns it by the chunk distance
    (query chunk - key chunk: 0 intra, 1 successive, more inter)."""
    return torch.where(chunk_distance == 0, intra, torch.where(chunk_distance == 1, succ, inter))


def dca_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, q_pos: torch.Tensor,
                  k_pos: torch.Tensor, dc: DualChunk, inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
    """Dual chunk attention over keys rotated by ``j mod c``, queries rotated by ``i mod c``.

    q (B, Hq, T, d); k, v (B, Hkv, S, d); mask (B, 1, T, S) bool (causality, padding); q_pos
    (B, T), k_pos (B, S) true positions (-1 = padding; ascending when B == 1). With one sequence
    (a prefill chunk) the queries are split by chunk and each group's keys fall in three ranges,
    one fused attention call each (flash attention on CPU, memory linear in the keys), merged
    exactly through their log-sum-exps: DCA costs what dense attention costs. Decode groups
    (B > 1) score pair by pair. Returns (B, Hq, T, d).
    """
    c = dc.chunk_len
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    work = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
    kf, vf = k.to(work), v.to(work)
    qf, q_succ, q_inter = dca_queries(q, q_pos, dc, inv_freq)

    def scores_of(qx: torch.Tensor, kx: torch.Tensor) -> torch.Tensor:  # grouped heads, no repeat of k
        return (qx.reshape(B, Hkv, G * T, d) @ kx.transpose(-1, -2)).view(B, Hkv, G, T, -1)

    qc, kc = q_pos // c, k_pos // c  # chunk ids
    if B == 1 and int(qc.min()) != int(qc.max()):  # queries across a chunk boundary: one call per chunk
        parts = []
        for chunk in qc[0].unique().tolist():
            rows = (qc[0] == chunk).nonzero()[:, 0]
            parts.append(dca_attention(q[:, :, rows], k, v, mask[:, :, rows], q_pos[:, rows], k_pos, dc, inv_freq,
                                       scale))
        return torch.cat(parts, 2)
    scale = scale * dc.logit_scale
    if B == 1:  # one query chunk Q: keys split into older chunks | chunk Q-1 | chunk Q, one fused call each
        Q = int(qc[0, 0])
        kp = k_pos[0].masked_fill(k_pos[0] < 0, torch.iinfo(k_pos.dtype).max)  # padding sorts last
        a, b = torch.searchsorted(kp.contiguous(), torch.tensor([(Q - 1) * c, Q * c], device=k_pos.device)).tolist()
        pieces = [(qx, lo, hi) for qx, lo, hi in ((q_inter, 0, a), (q_succ, a, b), (qf, b, k.shape[2])) if hi > lo]
        outs = [_partial_attention(qx.reshape(B, Hkv, G * T, d), kf[:, :, lo:hi], vf[:, :, lo:hi],
                                   mask[:, :, :, lo:hi], G, scale) for qx, lo, hi in pieces]
        return _merge(outs).view(B, Hq, T, d).to(q.dtype)
    # decode groups: per pair
    dist = (qc[:, :, None] - kc[:, None, :])[:, None, None]  # (B, 1, 1, T, S) chunk distance
    scores = dca_pick(dist, scores_of(qf, kf), scores_of(q_succ, kf), scores_of(q_inter, kf))
    scores = (scores * scale).masked_fill(~mask[:, :, None], float("-inf"))
    out = scores.softmax(-1).view(B, Hkv, G * T, -1) @ vf  # (B, Hkv, G*T, d)
    return out.view(B, Hq, T, d).to(q.dtype)


def _partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, G: int,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over one key range, with its log-sum-exp so ranges merge exactly.

    q (B, Hkv, G*T, d) (grouped query heads, row g*T + t); k, v (B, Hkv, n, d); mask (B, 1, T, n)
    bool. Returns out (B, Hkv, G*T, d) and lse (B, Hkv, G*T) (-inf for rows with no key here).
    On CPU this is one fused flash-attention call (memory linear in n); elsewhere the scores.
    """
    rows = mask.any(-1).repeat(1, 1, G)  # (B, 1, G*T): the row has a key in this range
    full = bool(mask.all())
    if q.device.type == "cpu":
        bias = None
        if not full:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
            bias = bias.repeat(1, 1, G, 1)  # (B, 1, G*T, n)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
    else:
        scores = (q @ k.transpose(-1, -2)) * scale  # (B, Hkv, G*T, n)
        if not full:
            scores = scores.masked_fill(~mask.repeat(1, 1, G, 1), float("-inf"))
        lse = scores.logsumexp(-1)
        out = (scores - lse[..., None]).exp().nan_to_num(0.0) @ v
    return out, lse.masked_fill(~rows, float("-inf"))


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One softmax over the union of key ranges from each range's (out, lse)."""
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.stack([p[1] for p in parts])  # (R, B, H, T)
    w = (lse - lse.logsumexp(0)).exp().nan_to_num(0.0)  # each range's share of the softmax mass
    return sum(wi[..., None] * o for wi, (o, _) in zip(w, parts))


# ---------------------------------------------------------------------- native prefill (paged_prefill.c)
def dca_native_library(dc: DualChunk | None, cache, head_dim: int, native_kernels: bool):
    """The loaded ``paged_prefill`` kernel when it serves DCA's prefill chunks through its
    key-range entry (:func:`dca_prefill_native`), else None (the PyTorch path): native kernels
    on, a CPU cache whose compute dtype is float32 / bfloat16, keys and values stored in one format
    the kernel reads (plain, int8, int4), not rotated (DCA re-rotates queries against the stored
    keys), no merged layers or key tier, and a head size the build serves."""
    from slimlm.kernels.ops import NATIVE_DTYPES

    codec, vcodec = cache.codec, cache.vcodec
    compute = NATIVE_DTYPES.get(cache.spec.compute_dtype)
    if dc is None or not native_kernels or cache.device.type != "cpu" or cache.state or cache.tier is not None \
            or compute is None or codec.native_code is None or vcodec.native_code != codec.native_code \
            or codec.rotates or vcodec.rotates:
        return None
    from slimlm import kernels

    lib = kernels.load("paged_prefill")
    return lib if lib is not None and lib.slimlm_prefill_supported(head_dim, compute) else None


def dca_ranges(q_start: int, T: int, c: int) -> list[tuple[int, int, list[tuple[str, int, int, bool]]]]:
    """DCA's work for a prefill chunk of T queries at positions q_start..: per DCA chunk Q the
    chunk's rows [r0, r1) and its key ranges (rotation, k_lo, k_hi, causal): older chunks
    ("inter", [0, (Q-1)c)), the previous chunk ("succ", [(Q-1)c, Qc)) and its own ("intra",
    [Qc, last position], causal); empty ranges left out."""
    out = []
    p = q_start
    while p < q_start + T:
        Q = p // c
        end = min((Q + 1) * c, q_start + T)
        ranges = [(name, lo, hi, causal) for name, lo, hi, causal in
                  (("inter", 0, max(Q - 1, 0) * c, False), ("succ", max(Q - 1, 0) * c, Q * c, False),
                   ("intra", Q * c, end, True)) if hi > lo]
        out.append((p - q_start, end - q_start, ranges))
        p = end
    return out


def dca_prefill_native(lib, q_rows: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor],
                       code: int, table: torch.Tensor, q_start: int, out: torch.Tensor, dc: DualChunk,
                       inv_freq: torch.Tensor, scale: float) -> None:
    """DCA attention of one prefill chunk on the native kernel: q_rows (T, Hq, d) at positions
    q_start.. (rotated by ``i mod c``), keys read in place from the pools (rotated by ``j mod c``).
    The rows of each DCA chunk attend its three key ranges, each with its own query rotation
    (:func:`dca_queries`), one ``paged_prefill_range`` call each; the float32 outputs merge exactly
    by their log-sum-exps into ``out`` (T, Hq, d), as :func:`dca_attention`'s PyTorch ranges do."""
    from slimlm.kernels.ops import native_prefill_range

    T, Hq, d = q_rows.shape
    scale = scale * dc.logit_scale
    for r0, r1, ranges in dca_ranges(q_start, T, dc.chunk_len):
        q = q_rows[r0:r1]
        pos = torch.arange(q_start + r0, q_start + r1, device=q.device)[None]
        rot = {"intra": q}
        scaled = length_factor(pos, dc) is not None  # the own chunk's queries carry the length factor too
        if scaled or any(name != "intra" for name, *_ in ranges):
            intra, succ, inter = dca_queries(q.transpose(0, 1)[None], pos, dc, inv_freq)  # (1, Hq, n, d)
            rot = {"intra": intra[0].transpose(0, 1).to(q.dtype) if scaled else q,
                   "succ": succ[0].transpose(0, 1).to(q.dtype), "inter": inter[0].transpose(0, 1).to(q.dtype)}
        parts = []
        for name, lo, hi, causal in ranges:
            o = torch.empty(r1 - r0, Hq, d, dtype=torch.float32, device=q.device)
            lse = torch.empty(r1 - r0, Hq, dtype=torch.float32, device=q.device)
            native_prefill_range(lib, rot[name], k_parts, v_parts, code, table,
                                 q_start + r0, lo, hi, causal, o, lse, scale)
            parts.append((o, lse))
        out[r0:r1] = _merge(parts).to(out.dtype)
