"""Sparse prefill for long prompts (``sparse_prefill``): MInference's vertical-slash pattern
(Jiang et al. 2024), as Qwen2.5-1M uses it, chosen per head from a short probe.

For each prefill chunk with at least ``min_keys`` keys, every query head gets its own pattern
from the attention of the chunk's last ``probe`` queries to all keys:

- **vertical**: the ``vertical`` key columns with the most probe attention (sinks, headings,
  the needle...): every query attends them;
- **slash**: the ``slash`` diagonals (query position - key position) with the most probe
  attention, the offsets below ``local`` always among them: every query attends the keys at
  those distances.

A query at i attends key j <= i iff j is a vertical column or i - j is a slash offset. The
queries run in blocks of ``block``; a block gathers only its candidate keys (the verticals and
the keys some query of the block sees on a slash diagonal), so a query attends at most
``vertical + slash`` keys instead of S. ``VerticalSlash(vertical >= S)`` is the full pattern:
dense attention (tested).

Decode steps, short chunks and the first ``dense_layers`` layers stay dense. The engine keeps
storage index == position (no token policy) so a key's column is its position.

Two paths attend the same pattern: :meth:`VerticalSlash.attend_paged`, the native kernel
(``kernels/sparse_prefill.c``, reading the block pool in place) wherever :func:`native_library`
finds it, and :meth:`VerticalSlash.attend`, PyTorch gathers, elsewhere (tests: they agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimlm.errors import SlimLMError
from slimlm.registry import Registry

SPARSE_PREFILL: Registry[type] = Registry("sparse prefill pattern")


@SPARSE_PREFILL.register("vertical-slash")
@dataclass(frozen=True)
class VerticalSlash:
    vertical: int = 1024
    """Key columns every query attends (per head)."""
    slash: int = 1024
    """Diagonals (relative distances) every query attends (per head), the local ones included.
    1,024 (MInference uses thousands): on SmolLM2-135M at 8k tokens 64 kept 89 % of held-out
    queries' attention mass, 1,024 96 % (docs/prompts.md, "Sparse prefill")."""
    local: int | None = None
    """Distances 0 .. local-1 are always slash diagonals (the local window); None = min(256, slash)."""
    dense_layers: int = 1
    """The first layers stay dense: SmolLM2's layer 0 attends broadly (no tried pattern keeps more
    than 80 % of its mass at 8k), every later layer 87-100 % with these defaults."""
    probe: int = 64
    """The chunk's last queries whose attention picks the pattern."""
    block: int = 64
    """Queries per block (a block gathers its candidate keys once)."""
    min_keys: int = 4096
    """Chunks with fewer keys stay dense."""
    stats: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    """Running totals over the sparse chunks (all heads and layers): ``computed`` query-key pairs
    the pattern attends, ``causal`` pairs dense attention would (deterministic: the share
    computed predicts the attention part of the TTFT gain)."""
    scratch: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    """The probe's reused buffers (``_pattern``): its float32 scores and the keys' float32 copy,
    held for the pattern's life at the largest key range seen (~100 MB at 32k keys, 9 heads)."""

    def __post_init__(self) -> None:
        if self.local is None and isinstance(self.slash, int):
            object.__setattr__(self, "local", min(256, self.slash))
        if isinstance(self.dense_layers, bool) or not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise SlimLMError(f"sparse_prefill vertical-slash: dense_layers must be an integer >= 0, "
                              f"got {self.dense_layers!r}")
        for name in ("vertical", "slash", "probe", "block", "min_keys"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SlimLMError(f"sparse_prefill vertical-slash: {name} must be a positive integer, got {v!r}")
        if not 0 <= self.local <= self.slash:
            raise SlimLMError(f"sparse_prefill vertical-slash: local must be in [0, slash={self.slash}], "
                              f"got {self.local}")

    def applies(self, num_keys: int, layer: int = 0) -> bool:
        return num_keys >= self.min_keys and layer >= self.dense_layers

    def share_bound(self, length: int, chunk: int, layers: int) -> float:
        """Upper bound on the share of a ``length``-token prompt's causal query-key pairs this
        pattern computes, prefilled in chunks of ``chunk`` tokens by a model of ``layers`` layers:
        a query of a sparse chunk attends at most ``vertical + slash`` keys (fewer where the
        verticals and the diagonals meet)."""
        i = torch.arange(length, dtype=torch.float64)
        keys = ((i // chunk + 1) * chunk).clamp(max=length)  # keys of the query's chunk
        capped = torch.where(keys >= self.min_keys, (i + 1).clamp(max=self.vertical + self.slash), i + 1)
        dense = min(self.dense_layers, layers)
        return float((dense * (i + 1).sum() + (layers - dense) * capped.sum()) / (layers * (i + 1).sum()))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
               scale: float, dca: tuple | None = None) -> torch.Tensor:
        """q (1, Hq, T, d) at positions q_pos (1, T) ascending; k, v (1, Hkv, S, d) with k_pos
        (1, S) == arange(L) then -1 padding. Returns (1, Hq, T, d).

        ``dca`` = (DualChunk, inv_freq) composes the pattern with Dual Chunk Attention
        (``model/rope_extension.py``): q and k carry DCA's ``mod c`` rotations and each pair is
        scored with the query rotation its chunk distance selects, the probe's pairs included, so
        the pattern is chosen from and applied to DCA's own attention (the full pattern == DCA)."""
        _, Hq, T, d = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        G = Hq // Hkv
        work = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
        qf = q[0].to(work)  # (Hq, T, d)
        kx = k[0].to(work).repeat_interleave(G, 0)  # (Hq, S, d)
        vx = v[0].to(work).repeat_interleave(G, 0)
        kp, qp = k_pos[0], q_pos[0]
        valid = kp >= 0
        rot = None  # DCA: the three query rotations and the chunk length
        if dca is not None:
            from slimlm.model.rope_extension import dca_queries

            dc, inv_freq = dca
            rot = (*(x[0] for x in dca_queries(q, q_pos, dc, inv_freq)), dc.chunk_len)
            scale = scale * dc.logit_scale
        _, _, is_v, is_s = self._pattern(qf, kx, qp, kp, valid, scale, rot)
        on_s = torch.zeros(Hq, is_s.shape[1] + 1, dtype=torch.int32, device=q.device)
        on_s[:, 1:] = is_s.cumsum(1)  # on_s[:, x] = slash offsets below x
        out = torch.empty(Hq, T, d, dtype=work, device=q.device)
        computed = causal = scored = 0
        for a in range(0, T, self.block):
            e = min(a + self.block, T)
            p0, p1 = int(qp[a]), int(qp[e - 1])
            n = min(p1 + 1, S)
            j = torch.arange(n, device=q.device)
            # key j is a candidate of the block iff a vertical, or some query i in [p0, p1] has i - j a slash
            hit = (on_s[:, p1 - j + 1] - on_s[:, (p0 - j).clamp(min=0)]) > 0  # (Hq, n)
            pick = (is_v[:, :n] | hit) & valid[:n]
            scored += (e - a) * int(pick.sum())
            K = max(int(pick.sum(1).max()), 1)
            slot = torch.where(pick, pick.cumsum(1) - 1, K)  # candidates packed to the left, in key order
            cand = torch.full((Hq, K + 1), -1, dtype=torch.long, device=q.device)
            cand.scatter_(1, slot, j.expand(Hq, n))
            cand = cand[:, :K]  # (Hq, K), -1 = no key
            col = cand.clamp(min=0)
            kc, vc = kx.gather(1, col[..., None].expand(Hq, K, d)), vx.gather(1, col[..., None].expand(Hq, K, d))
            dist = qp[a:e][None, :, None] - col[:, None, :]  # (Hq, B, K)
            if rot is None:
                scores = (qf[:, a:e] @ kc.transpose(-1, -2)) * scale  # (Hq, B, K)
            else:
                scores = _dca_scores(rot, a, e, qp[a:e][None, :, None], col[:, None, :], kc) * scale
            ok = (cand >= 0)[:, None] & (dist >= 0)
            on_slash = is_s.gather(1, dist.clamp(min=0, max=is_s.shape[1] - 1).flatten(1)).view_as(dist)
            ok &= is_v.gather(1, col)[:, None] | on_slash
            scores = scores.masked_fill(~ok, float("-inf"))
            out[:, a:e] = scores.softmax(-1) @ vc
            computed += int(ok.sum())
            causal += Hq * int(((qp[a:e, None] - kp[None, :n]) >= 0).logical_and(valid[None, :n]).sum())
        self._count(computed, causal, scored)
        return out[None].to(q.dtype)

    def _count(self, computed: int, causal: int, scored: int) -> None:
        for name, x in (("computed", computed), ("causal", causal), ("scored", scored)):
            self.stats[name] = self.stats.get(name, 0) + x

    def attend_paged(self, lib, q_rows: torch.Tensor, keys: torch.Tensor, k_parts: list[torch.Tensor],
                     v_parts: list[torch.Tensor], code: int, table: torch.Tensor, q_start: int, out: torch.Tensor,
                     scale: float, dca: tuple | None = None) -> None:
        """The native kernel's path (``kernels/sparse_prefill.c``): the same pattern, chosen from
        ``keys`` (Hkv, n, d), the chunk's context decoded (n = q_start + T), then attended by the
        kernel reading the pools in place. q_rows (T, Hq, d) at positions q_start..; writes ``out``
        (T, Hq, d). ``dca`` = (DualChunk, inv_freq): as in :meth:`attend`, the probe scores each
        pair with the query rotation DCA assigns it, and the rows of each DCA chunk attend the
        pattern in its three key ranges (older chunks, previous chunk, own chunk), one kernel call
        each with that range's query rotation, merged exactly by their log-sum-exps."""
        from slimlm.kernels.ops import native_sparse_prefill

        T, Hq, _ = q_rows.shape
        n = keys.shape[1]
        pos = torch.arange(n, device=q_rows.device)
        work = torch.float32 if q_rows.dtype in (torch.bfloat16, torch.float16) else q_rows.dtype
        m = min(self.probe, T)
        probe = q_rows[T - m :].transpose(0, 1).to(work)  # (Hq, m, d): only the probe's rows
        # (Hkv, n, d) contiguous (4x faster matmul than strided), in a reused buffer (no fresh mapping per call)
        kx = self._buffer("keys", keys.numel(), work, keys.device).view(keys.shape).copy_(keys)
        rot = None
        if dca is not None:
            from slimlm.model.rope_extension import dca_queries

            dc, inv_freq = dca
            scale = scale * dc.logit_scale
            rot = (*(x[0] for x in dca_queries(probe[None], pos[n - m :][None], dc, inv_freq)), dc.chunk_len)
        cols, offs, _, _ = self._pattern(probe, kx, pos[n - m :], pos, pos >= 0, scale, rot)
        cols = cols.sort(-1).values.to(torch.int32).contiguous()
        offs = offs.sort(-1).values.to(torch.int32).contiguous()
        stats = torch.zeros(2, dtype=torch.int64)
        if dca is None:
            native_sparse_prefill(lib, q_rows, k_parts, v_parts, code, table, q_start, cols, offs, self.block, out,
                                  scale, stats)
        else:
            _dca_ranges_native(lib, q_rows, k_parts, v_parts, code, table, q_start, cols, offs, self.block, out,
                               scale, stats, dca)
        causal = Hq * ((q_start + 1 + n) * T // 2)  # sum of i + 1 over the chunk's positions
        self._count(int(stats[0]), causal, int(stats[1]))

    def _pattern(self, qf, kx, qp, kp, valid, scale, rot=None) -> tuple[torch.Tensor, ...]:
        """Per head: the vertical columns (Hq, nv) and slash offsets (Hq, ns) the probe attends
        most, and the same as masks over columns (Hq, S) and offsets (Hq, last position + 1).
        ``rot``: DCA's query rotations (``attend``), the probe's scores DCA's.

        The probe's (Hq, probe, S) scores are written into one float32 buffer reused by every
        (chunk, layer) (``scratch``, grown to the largest key range seen): fresh tensors of that
        size (75 MB at 32k keys, several under DCA) were new memory mappings each time, ~100,000
        minor page faults per call. Under DCA each key range is scored with its own rotation only
        (not all three over every key, then picked). The values are the same bits as scoring in
        full (the same GEMM per head, each column range at least 64 keys wide; tested against the
        full-size formulation), so the pattern is unchanged."""
        Hq, T, d = qf.shape
        Hkv, S = kx.shape[0], kx.shape[1]  # kx: one head per query head, or per KV head (GQA)
        G = Hq // Hkv
        m = min(self.probe, T)
        pq = qp[T - m :]  # (m,)
        att = self._buffer("att", Hq * m * S, qf.dtype, qf.device).view(Hq, m, S)
        att_g = att.view(Hkv, G * m, S)

        def probe_rows(qx):  # (Hkv, G*m, d): the probe's scaled rows, grouped by KV head
            return (qx[:, T - m :] * scale).reshape(Hkv, G * m, d)

        if rot is None:
            torch.matmul(probe_rows(qf), kx.transpose(-1, -2), out=att_g)
        else:
            self._dca_logits(att, [probe_rows(x) for x in rot[:3]], kx, pq, rot[3])
        L = int(valid.sum())
        if bool((kp[:L] == torch.arange(L, device=kp.device)).all()) and not bool(valid[L:].any()):
            for r, p in enumerate(pq.tolist()):  # column == position: row r sees keys 0..min(p, L - 1)
                att[:, r, min(p, L - 1) + 1 :] = float("-inf")
        else:  # general positions (not produced by the engine)
            att.masked_fill_(~(((pq[:, None] - kp[None, :]) >= 0) & valid[None, :]), float("-inf"))
        torch.ops.aten._softmax.out(att, -1, False, out=att)  # in place: the same values as .softmax(-1)
        n_off = int(qp[-1]) + 1  # offsets 0 .. last position
        vert = torch.sum(att, 1, out=self._buffer("vert", Hq * S, att.dtype, att.device).view(Hq, S))
        if L < S:
            vert.masked_fill_(~valid, -1.0)
        cols = vert.topk(min(self.vertical, S), -1).indices  # padding columns are masked later
        is_v = torch.zeros(Hq, S, dtype=torch.bool, device=qf.device).scatter_(1, cols, True)
        # slash[o] sums the probe's attention at offset o = p - j; accumulated reversed (rev[P - o])
        # so each row adds one contiguous slice: rev[P - p : P + 1] += att[r, 0 : p + 1]
        P = n_off - 1
        rev = torch.zeros(Hq, n_off, dtype=att.dtype, device=qf.device)
        for r, p in enumerate(pq.tolist()):
            rev[:, P - p :] += att[:, r, : p + 1]
        slash = rev.flip(-1)
        slash[:, : self.local] = float("inf")  # the local window always
        offs = slash.topk(min(self.slash, n_off), -1).indices
        is_s = torch.zeros(Hq, n_off, dtype=torch.bool, device=qf.device).scatter_(1, offs, True)
        return cols, offs, is_v, is_s

    def _buffer(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A reused flat buffer of at least ``numel`` elements (grown by at least 1.25x, so a
        prompt's growing key ranges reallocate it a few times, not once per chunk)."""
        buf = self.scratch.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            size = numel if buf is None or buf.dtype != dtype or buf.device != device else max(numel, buf.numel() * 5 // 4)
            buf = self.scratch[name] = torch.empty(size, dtype=dtype, device=device)
        return buf[:numel]

    def _dca_logits(self, att, rows, kx, pq, c) -> None:
        """DCA's probe scores into ``att`` (Hq, m, S): per key chunk of c keys, each probe row's
        score with the rotation its chunk distance selects (0 intra, 1 successive, else inter),
        as :func:`dca_pick` over all three; adjacent key chunks with the same rotations in one
        GEMM. ``rows`` (intra, succ, inter), each (Hkv, G*m, d)."""
        Hq, m, S = att.shape
        Hkv = kx.shape[0]
        G = Hq // Hkv
        qc = pq // c  # (m,) the rows' DCA chunks
        segs = []  # (lo, hi, rotation per row)
        for kc in range((S + c - 1) // c):
            dist = qc - kc
            which = torch.where(dist == 0, 0, torch.where(dist == 1, 1, 2))
            lo, hi = kc * c, min((kc + 1) * c, S)
            if segs and torch.equal(segs[-1][2], which):
                segs[-1] = (segs[-1][0], hi, which)
            else:
                segs.append((lo, hi, which))
        att_g = att.view(Hkv, G * m, S)
        for lo, hi, which in segs:
            # a GEMM narrower than 64 keys may round differently (N = 1 is a matrix-vector
            # product): such a range is scored within the 64 keys ending at it, then copied
            wlo = min(lo, max(0, hi - 64))
            whi = min(S, max(hi, wlo + 64))
            used = which.unique().tolist()
            direct = len(used) == 1 and (wlo, whi) == (lo, hi)
            for rho in used:
                if direct:
                    for h in range(Hkv):
                        torch.mm(rows[rho][h], kx[h, lo:hi].transpose(0, 1), out=att_g[h, :, lo:hi])
                    continue
                tmp = torch.stack([rows[rho][h] @ kx[h, wlo:whi].transpose(0, 1) for h in range(Hkv)])
                tmp = tmp.view(Hq, m, whi - wlo)[:, :, lo - wlo : hi - wlo]
                if len(used) == 1:
                    att[:, :, lo:hi] = tmp
                else:
                    sel = which == rho
                    att[:, sel, lo:hi] = tmp[:, sel]


def _dca_scores(rot: tuple, a: int, e: int, qpos: torch.Tensor, kpos: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
    """Scores of query rows a:e (positions ``qpos`` (1, B, 1)) against gathered keys kc (Hq, K, d)
    (positions ``kpos`` (Hq, 1, K)) under DCA: the rotation each pair's chunk distance selects."""
    from slimlm.model.rope_extension import dca_pick

    intra, succ, inter, c = rot
    return dca_pick(qpos // c - kpos // c, *(x[:, a:e] @ kc.transpose(-1, -2) for x in (intra, succ, inter)))


def _dca_ranges_native(lib, q_rows, k_parts, v_parts, code, table, q_start, cols, offs, block, out, scale, stats,
                       dca) -> None:
    """The pattern under DCA on the native kernel: per DCA chunk of the rows, one
    ``sparse_prefill_range`` call per key range with that range's query rotation (``scale``
    already carries DCA's ``logit_scale``), merged by log-sum-exps into ``out``."""
    from slimlm.kernels.ops import native_sparse_prefill_range
    from slimlm.model.rope_extension import _merge, dca_queries, dca_ranges, length_factor

    dc, inv_freq = dca
    T, Hq, d = q_rows.shape
    for r0, r1, ranges in dca_ranges(q_start, T, dc.chunk_len):
        q = q_rows[r0:r1]
        rot = {"intra": q}
        p = torch.arange(q_start + r0, q_start + r1, device=q.device)[None]
        scaled = length_factor(p, dc) is not None  # logit_scale "auto" / "yarn" past the trained context
        if scaled or any(name != "intra" for name, *_ in ranges):
            intra, succ, inter = dca_queries(q.transpose(0, 1)[None], p, dc, inv_freq)
            rot["succ"], rot["inter"] = (x[0].transpose(0, 1).to(q.dtype) for x in (succ, inter))
            if scaled:  # the own chunk's queries carry the length factor too
                rot["intra"] = intra[0].transpose(0, 1).to(q.dtype)
        parts = []
        for name, lo, hi, _causal in ranges:  # the kernel is causal in every range
            o = torch.empty(r1 - r0, Hq, d, dtype=torch.float32, device=q.device)
            lse = torch.empty(r1 - r0, Hq, dtype=torch.float32, device=q.device)
            native_sparse_prefill_range(lib, rot[name], k_parts, v_parts, code, table, q_start + r0, cols, offs,
                                        block, lo, hi, o, lse, scale, stats)
            parts.append((o, lse))
        out[r0:r1] = _merge(parts).to(out.dtype)


def native_library(pattern: VerticalSlash | None, cache, head_dim: int, native_kernels: bool):
    """The loaded ``sparse_prefill`` kernel when it serves this engine's sparse chunks, else None
    (the PyTorch path): native kernels on, a CPU cache whose compute dtype is float32 / bfloat16,
    keys and values stored in one format the kernels read (plain, int8, int4), not rotated (the
    probe would see rotated keys), no merged layers, and a head size the build serves."""
    from slimlm.kernels.ops import NATIVE_DTYPES

    codec, vcodec = cache.codec, cache.vcodec
    if pattern is None or not native_kernels or cache.device.type != "cpu" or cache.state \
            or cache.spec.compute_dtype not in NATIVE_DTYPES or codec.native_code is None \
            or vcodec.native_code != codec.native_code or codec.rotates or vcodec.rotates:
        return None
    from slimlm import kernels

    lib = kernels.load("sparse_prefill")
    return lib if lib is not None and lib.slimlm_sparse_prefill_supported(head_dim) else None


def build(name: str | None, args: dict) -> VerticalSlash | None:
    if name is None:
        if args:
            raise SlimLMError("sparse_prefill_args given without sparse_prefill")
        return None
    cls = SPARSE_PREFILL.get(name)
    try:
        return cls(**args)
    except TypeError as e:
        raise SlimLMError(f"sparse_prefill={name!r}: {e}") from None
