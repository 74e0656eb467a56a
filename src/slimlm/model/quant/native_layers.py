"""Decode steps through whole decoder layers in one native call (``kernels/decode_layer.c``).

A batch-1 decode step of a packed model spends about a third of its time outside the matmuls:
RMSNorm, RoPE, the KV write, residual adds, SiLU, reshapes, each an aten op with its dispatch and
the Python of the layer around it. When every projection of every layer is packed or a plain dense
float32 / bfloat16 ``nn.Linear`` (``kernels/dense_linear.c``) and nothing needs a layer's
internals, the runner hands a step whose rows are all decode rows to
:class:`NativeDecodeLayers`, which runs the layers ``[first, last)`` in one C call per range
(the whole stack, or up to each layer whose entering hidden states a proposer captures).

Chosen once, at the runner's construction (:func:`native_decode_layers`; :func:`unsupported`
says why not). It needs: a float32 or bfloat16 model on the CPU; per layer the fused q/k/v and
gate/up projections (``model/fuse.py``) and o / down, each a :class:`QuantLinear` with a native
kernel or a dense ``nn.Linear`` (float32 / bfloat16: the fused weights read in place, no copy);
Pre-LN, SiLU MLP, no sliding window, no MoE; a float32 / bfloat16 KV pool, or an int8 / int4 one
(``kv_cache_dtype``: rows quantized in the call as the codec writes them, the same bytes, keys
shifted by the codec's offsets and Hadamard-rotated, the query rotated alike; no rotated values),
no merged storage, no attention mass; the native decode attention, or under a query KV policy
(float32 / bfloat16 pool, no key tier) its native selection + sparse attention between the
layer's two native halves; no layer hooks, RoPE extension or span. Otherwise, and for any step with a prefill chunk,
a dropped block or more than ``max_rows`` rows (packed: ``NATIVE_MAX_ROWS``; dense:
``DENSE_MAX_ROWS``), the layer-by-layer PyTorch path serves (it is also the reference: tests
compare the two). ``SLIMLM_DECODE_LAYER=0`` turns it off.

A query KV policy (ShadowKV, Squeezed Attention: ``paths.sparse`` with its native kernel) attends
in between: :meth:`NativeDecodeLayers.forward_sparse` runs per layer the native first half
(RMSNorm, q/k/v, RoPE, the KV write), the policy's native selection + sparse attention
(``PagedAttention.sparse_decode``) and the native second half (o-proj, residual, RMSNorm, MLP),
with the activations float32 throughout (tests: the same greedy tokens as the layer-by-layer path).
Not with ShadowKV's key tier (keys held apart from the values).

Activations are float32 inside the call for a bfloat16 model too (the embedding row widened, the
hidden states rounded back to bf16 on the way out): PyTorch's bf16 path rounds every op's output
to bf16, so the two differ by that rounding (tests: one step's logits within 3 % relative L2,
measured 0.7 %, PyTorch's bf16 step itself 0.8 % off the fp32 model). The bf16 matmuls take
``vdpbf16ps`` on x rounded to bf16, as llama.cpp does (``SLIMLM_QLINEAR=fp32``: the weights
widened to fp32, x unrounded); on a CPU with AMX the same products on AMX tiles (``TDPBF16PS``,
``kernels/amx.h``; ``SLIMLM_AMX=0`` turns them off), at every row count, so a row rounds alike at
batch 1 and batch 64. The tiles read each weight as it lies (row-major W is the tile product's
first operand; the step's few x rows are re-laid per call), so no packed copy is made and
resident memory does not grow; 2-3x the AVX-512 loops' GFLOPS on 24-64-row steps, batch 1
unchanged (docs/benchmarks.md, "session 12: AMX decode projections"). Decode attention on a bf16 pool
scores its keys on AMX tiles there too (``paged_decode.c``'s decode_rows_amx, batch-invariant alike;
docs/benchmarks.md, "session 13: decode steps on the AMX machine"). float32 models: identical greedy tokens, logits within 1e-4.

The C code holds raw pointers to the weights and pools, so this object keeps references to
every tensor it points at; the model must not be modified while an engine serves it (as for
the fused projections).
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from slimlm.model.quant.formats import KERNEL_ENV, NATIVE_MAX_ROWS, _native_fn, scale_flags
from slimlm.model.quant.huge_pages import to_huge_pages
from slimlm.model.quant.linear import QuantLinear

ENV = "SLIMLM_DECODE_LAYER"
"""``0`` turns the native layer path off (the per-op path serves every step; for A/B runs)."""

_NPTR, _NDESC, _NDIM = 2 + 4 * 4 + 2 + 5, 3 * 4, 10  # kernels/decode_layer.c: NPTR, NDESC, NDIM
DENSE_MAX_ROWS = 64
"""All-decode steps of a dense model up to this many rows take the native layers: the weights are
read once per step either way, and every row rounds as it would alone (batch invariance in bf16:
a speculative verification pass of 4 sequences x 5 rows, 20 rows, rounds as plain decoding)."""
DTYPES = (torch.float32, torch.bfloat16)
"""Model dtypes served: activations are float32 inside the call either way (see the module docstring)."""


def unsupported(model, cache, paths, hooks, rope_ext) -> str | None:
    """Why the native layer path cannot serve this model / cache / plug-ins, or None if it can."""
    from slimlm.kvcache.policy.base import AttentionSpan
    from slimlm.model.fuse import fused_ok
    from slimlm.model.transformer import MLP, Attention

    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if hooks:
        return "layer hooks plan the rows of each layer"
    if rope_ext is not None:
        return "a RoPE extension rotates by its own positions"
    query = paths.sparse is not None and paths.sparse_native is not None  # a query policy's native sparse decode
    if (paths.native_decode is None and not query) or paths.track_mass or paths.dual_chunk is not None \
            or paths.span != AttentionSpan():
        return "decode attention is not the plain native kernel (KV policy, span or no kernel)"
    if cache.tier is not None:
        return "keys are held apart from the values (a key tier)"
    if model.device.type != "cpu" or model.dtype not in DTYPES:
        return "activations are not float32 / bfloat16 on the CPU"
    if any(w is not None for w in model.windows().values()):
        return "sliding-window layers"
    if cache.state or cache.mass is not None:
        return "merged or mass-tracking KV storage"
    why = _codec_unsupported(cache)
    if why:
        return why
    if query and (cache.codec.native_code not in (0, 1) or cache.codec.rotates):
        return "a query policy's native path reads float32 / bfloat16 pools"
    for layer in model.model.layers:
        a, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if getattr(layer, "post_ln", True) or type(a) is not Attention or type(mlp) is not MLP:
            return "a layer is not Pre-LN attention + SwiGLU MLP"
        if not (fused_ok(a.qkv, a.q_proj) and fused_ok(mlp.gate_up, mlp.gate_proj)):
            return "q/k/v or gate/up are not fused"
        for m in (a.qkv, a.o_proj, mlp.gate_up, mlp.down_proj):
            why = _weight_unsupported(m)
            if why:
                return why
        for n in (layer.input_layernorm, layer.post_attention_layernorm):
            if n.weight.dtype not in DTYPES:
                return "norm weights are not float32 / bfloat16"
    from slimlm import kernels

    if kernels.load("decode_layer") is None:
        return "the decode_layer kernel is unavailable"
    return None


def _codec_unsupported(cache) -> str | None:
    """Pools the layers write and read in place: float32 / bfloat16 rows, or int8 / int4 (the
    codecs' bytes, ``store_kv`` in decode_layer.c) with keys rotated by the Hadamard transform only
    (a power-of-two head size) and values unrotated."""
    from slimlm.kvcache.codec.int4 import Int4Codec
    from slimlm.kvcache.codec.int8 import Int8Codec
    from slimlm.kvcache.codec.plain import PlainCodec

    k, v = cache.codec, cache.vcodec
    if type(k) is not type(v) or k.native_code != v.native_code:
        return "K and V pools are stored in different formats"
    if isinstance(k, PlainCodec):
        if k.native_code not in (0, 1) or k.rotates or v.rotates:
            return f"KV codec stores {getattr(k, 'storage_dtype', 'other')} rows"
        return None
    if type(k) not in (Int8Codec, Int4Codec) or k.native_code not in (2, 3, 4, 5, 6):  # kernels/kv_pool.h's codes
        return f"KV codec {k.name!r} has no native layer write"
    d = k.head_dim
    if v.rotates or (k.rotates and d & (d - 1)):
        return "KV codec rotates values or rotates keys by a non-Hadamard matrix"
    return None


def _weight_unsupported(m) -> str | None:
    if type(m) is QuantLinear:
        if not m.native or _native_fn(m.kind, m.group_size) is None:
            return "a projection is packed in a layout with no native kernel"
        return None
    if type(m) is nn.Linear:
        w = m.weight
        if w.dtype not in DTYPES or not w.is_contiguous():
            return "a dense projection is not a contiguous float32 / bfloat16 weight"
        return None
    return "a projection is neither packed nor a plain nn.Linear (adapter, low-rank, ...)"


def native_decode_layers(model, cache, paths, hooks, rope_ext) -> NativeDecodeLayers | None:
    """The native layer path for this runner, or None (see :func:`unsupported`)."""
    if unsupported(model, cache, paths, hooks, rope_ext) is not None:
        return None
    from slimlm import kernels

    return NativeDecodeLayers(kernels.load("decode_layer"), model, cache, hooks)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


class NativeDecodeLayers:
    def __init__(self, lib, model, cache, hooks: list | None = None):
        cfg = model.cfg
        self.lib, self.model = lib, model
        self.hooks = hooks if hooks is not None else []
        """The runner's hook list (the same object): a hook appended after construction sends
        every later step down the layer-by-layer path."""
        self.num_layers = cfg.num_layers
        self.eps = float(model.model.layers[0].input_layernorm.eps)
        self.scale = float(model.attn_scale)
        dense = [m.weight for layer in model.model.layers for m in (layer.self_attn.qkv, layer.self_attn.o_proj,
                                                                     layer.mlp.gate_up, layer.mlp.down_proj)
                 if type(m) is nn.Linear]  # packed weights: no gain measured (again with the prefetching kernels, s14)
        self.huge_bytes = to_huge_pages(model, dense)
        """Bytes of dense weights moved onto 2 MiB pages (``huge_pages.py``; 1.5x a bf16 / fp32 step)."""
        self._keep: list[torch.Tensor] = []  # every tensor a pointer below refers to
        self._mods: list[QuantLinear] = []
        ptrs: list[int | None] = []
        for i, layer in enumerate(model.model.layers):
            if float(layer.input_layernorm.eps) != self.eps or float(layer.post_attention_layernorm.eps) != self.eps:
                raise ValueError("native decode layers: one RMSNorm eps for every layer is needed")
            row: list[torch.Tensor | None] = [_f32(layer.input_layernorm.weight),
                                              _f32(layer.post_attention_layernorm.weight)]
            a, mlp = layer.self_attn, layer.mlp
            for m in (a.qkv, a.o_proj, mlp.gate_up, mlp.down_proj):
                self._mods.append(m)
                if type(m) is QuantLinear:
                    row += [m.qweight, m.scales, m._buffers.get("mins"), _f32(m.bias)]
                else:  # dense: the weight itself (the fused one is a view-free tensor, read in place)
                    row += [m.weight.detach(), None, None, _f32(m.bias)]
            kp, vp = cache.pools(i)
            aux = lambda parts, j: parts[j] if len(parts) > j else None  # noqa: E731
            row += [kp[0], vp[0], aux(kp, 1), aux(kp, 2), aux(vp, 1), aux(vp, 2), cache.codec.offset(kp)]
            for t in row:
                if t is not None and not t.is_contiguous():
                    raise ValueError("native decode layers: a weight or pool is not contiguous")
            self._keep += [t for t in row if t is not None]
            ptrs += [t.data_ptr() if t is not None else None for t in row]
        assert len(ptrs) == _NPTR * self.num_layers
        self.ptrs = (ctypes.c_void_p * len(ptrs))(*ptrs)
        k0 = cache.pools(0)[0][0]
        self.dims = (ctypes.c_int64 * _NDIM)(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                             cfg.intermediate_size, cache.block_size, cache.codec.native_code, 0,
                                             k0.shape[0], int(cache.codec.rotates))
        self.desc = (ctypes.c_int64 * (_NDESC * self.num_layers))()
        self._mode: tuple | None = None
        packed = any(type(m) is QuantLinear for m in self._mods)
        self.max_rows = NATIVE_MAX_ROWS if packed else DENSE_MAX_ROWS
        n = (ctypes.c_int(), ctypes.c_int(), ctypes.c_int())
        lib.slimlm_decode_layer_sizes(*(ctypes.byref(x) for x in n))
        if tuple(x.value for x in n) != (_NPTR, _NDESC, _NDIM):
            raise RuntimeError("decode_layer kernel and its Python wrapper disagree on the table sizes")

    def _set_mode(self) -> None:
        """Kernel per weight (VNNI or fp32 activations), re-read when ``SLIMLM_QLINEAR`` changes."""
        mode = (os.environ.get(KERNEL_ENV, "vnni"), os.environ.get("SLIMLM_NATIVE", "1"))
        if mode == self._mode:
            return
        dpbf16 = mode[0] == "vnni" and bool(self.lib.slimlm_dense_has_dpbf16())
        for j, m in enumerate(self._mods):
            if type(m) is not QuantLinear:
                bf16 = m.weight.dtype == torch.bfloat16
                self.desc[3 * j: 3 * j + 3] = [3 if bf16 else 2, 0, int(bf16 and dpbf16)]
                continue
            fn = _native_fn(m.kind, m.group_size)
            sh = scale_flags(m._buffers)  # fp16 scales / minimums: bits 1-2 of the flags
            if fn is None or sh is None:
                raise RuntimeError("native decode layers: a packed kernel became unavailable")
            self.desc[3 * j: 3 * j + 3] = [0 if m.kind == "int8" else 1, m.group_size,
                                           int(fn.__name__.endswith("_vnni")) | (sh << 1)]
        self._mode = mode

    def applies(self, attn, T: int) -> bool:
        """The step's rows are all single-token decodes on the native table (no prefill chunk,
        no dropped block), few enough for the kernels (``max_rows``)."""
        t = attn.decode_table
        return not self.hooks and not attn.prefills and t is not None and t.rows.numel() == T <= self.max_rows

    def applies_sparse(self, attn, T: int) -> bool:
        """The step's rows are all single-token decodes attended by a query policy's native path."""
        return not self.hooks and not attn.prefills and attn.decode_table is None \
            and attn.paths.sparse_native is not None and attn.paths.sparse is not None \
            and sum(int(g.rows.numel()) for g in attn.decodes) == T <= self.max_rows

    def forward_sparse(self, ids: torch.Tensor, positions: torch.Tensor, attn, rotary, capture: set[int],
                       logit_rows: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """:meth:`forward` for a query policy: per layer the native first half, the policy's
        native attention, the native second half."""
        dt = self.model.dtype
        h = self.model.embed(ids)[0].float().contiguous()  # (T, D) float32
        cos, sin = rotary(positions, torch.float32)
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        M, Hq, d = h.shape[0], self.dims[1], self.dims[3]
        self._check(h, cos, sin, attn.slots)
        self._set_mode()
        q = torch.empty(M, Hq, d)  # (T, Hq, d) rotated queries
        hidden: dict[int, torch.Tensor] = {}
        nt = torch.get_num_threads()
        for i in range(self.num_layers):
            if i in capture:
                hidden[i] = h[logit_rows].to(dt)
            rc = self.lib.slimlm_decode_layer_in(h.data_ptr(), M, i, self.dims, self.ptrs, self.desc, cos.data_ptr(),
                                                 sin.data_ptr(), attn.slots.data_ptr(), q.data_ptr(), self.eps, nt)
            if not rc:
                att = attn.sparse_decode(i, q).float().contiguous()  # (T, Hq, d)
                rc = self.lib.slimlm_decode_layer_out(h.data_ptr(), M, i, self.dims, self.ptrs, self.desc,
                                                      att.data_ptr(), self.eps, nt)
            self._raise(rc)
        if self.num_layers in capture:
            hidden[self.num_layers] = h[logit_rows].to(dt)
        return h[logit_rows].to(dt), hidden

    def _check(self, h, cos, sin, slots) -> None:
        M, D = h.shape
        d = self.dims[3]
        if h.dtype != torch.float32 or not h.is_contiguous() or D != self.dims[0]:
            raise ValueError("native decode layers: h must be contiguous float32 (rows, hidden)")
        for t, shape in ((cos, (M, d)), (sin, (M, d))):
            if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != shape:
                raise ValueError("native decode layers: cos / sin must be contiguous float32 (rows, head_dim)")
        if slots.dtype != torch.int64 or not slots.is_contiguous() or slots.shape != (M,):
            raise ValueError("native decode layers: slots must be contiguous int64, one per row")

    @staticmethod
    def _raise(rc: int) -> None:
        if rc == 4:
            raise ValueError("native decode layers: a slot, block id or length lies outside the KV pool")
        if rc:
            raise RuntimeError(f"decode_layer kernel failed (code {rc})")

    def run(self, h: torch.Tensor, first: int, last: int, cos: torch.Tensor, sin: torch.Tensor,
            slots: torch.Tensor, table: torch.Tensor, lens: torch.Tensor) -> None:
        """h (M, D) float32 through layers [first, last), in place; cos / sin (M, head_dim); slots,
        lens (M,) and table (M, max_blocks) int64 (checked against the pool in C)."""
        self._check(h, cos, sin, slots)
        M = h.shape[0]
        for t in (table, lens):
            if t.dtype != torch.int64 or not t.is_contiguous() or t.shape[0] != M:
                raise ValueError("native decode layers: table and lens must be contiguous int64, one row each")
        if not 0 <= first <= last <= self.num_layers:
            raise ValueError(f"native decode layers: layers [{first}, {last}) outside [0, {self.num_layers})")
        self._set_mode()
        self.dims[7] = table.shape[1]
        rc = self.lib.slimlm_decode_layers(h.data_ptr(), M, first, last, self.dims, self.ptrs, self.desc,
                                           cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), table.data_ptr(),
                                           lens.data_ptr(), self.eps, self.scale, torch.get_num_threads())
        self._raise(rc)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attn, rotary, capture: set[int],
                logit_rows: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The runner's ``_forward`` for an all-decode step: (the logit rows' final hidden states
        (R, D), captured hidden states)."""
        dt = self.model.dtype
        h = self.model.embed(ids)[0].float().contiguous()  # (T, D) float32 (a copy for bf16 models)
        cos, sin = rotary(positions, torch.float32)  # (1, T, d)
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        t = attn.decode_table
        hidden: dict[int, torch.Tensor] = {}
        start = 0
        for c in sorted(x for x in capture if 0 <= x <= self.num_layers):
            self.run(h, start, c, cos, sin, attn.slots, t.table, t.lens)
            hidden[c] = h[logit_rows].to(dt)  # a copy: h changes in place
            start = c
        self.run(h, start, self.num_layers, cos, sin, attn.slots, t.table, t.lens)
        return h[logit_rows].to(dt), hidden
