"""``kernels``: the native CPU attention kernels against the PyTorch path they replace.

One layer of the model's attention shape (query heads, KV heads, head size from its config) in
``--dtype``, over a synthetic block pool (blocks of 16 tokens placed at random), through the
engine's own :class:`~slimlm.engine.paged_attention.PagedAttention` (KV write included):

- prefill: one causal prompt of each ``--lengths`` tokens (default 512,1500): ``paged_prefill``
  against SDPA in causal 128-row query blocks;
- decode: ``--batch`` sequences (default 64) at each length, one new token each:
  ``paged_decode`` against gathering the blocks into a padded batch and one masked SDPA call.

Both paths run in this process, interleaved, for ``--repeats`` rounds; the table gives the
median ms a layer of each and their ratio, measured in the same run. A path the CPU or build
cannot serve shows as "-" (its reason is in the notes).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from slimlm.bench.base import SCENARIOS, Scenario, int_list, resolve

DEFAULT_LENGTHS = [512, 1500]
BLOCK = 16
CALLS = 5
"""Calls timed per path per round (the round's figure is their median)."""


class _Case:
    """One layer's pool and inputs for a prefill of ``n`` tokens or ``batch`` decodes at ``n``."""

    def __init__(self, cfg, dtype: torch.dtype, n: int, batch: int, seed: int = 0):
        from slimlm.kvcache.spec import KVCacheSpec
        from slimlm.kvcache.storage import PagedKVCache

        g = torch.Generator().manual_seed(seed)
        self.cfg, self.n, self.batch = cfg, n, batch
        self.nb = -(-n // BLOCK)
        spec = KVCacheSpec.from_model(dataclasses.replace(cfg, num_layers=1), dtype)
        self.cache = PagedKVCache(spec, batch * self.nb + 8, BLOCK, "cpu")
        for t in (self.cache.k[0][0], self.cache.v[0][0]):
            t.copy_(torch.randn(t.shape, generator=g).to(dtype))
        self.tables = torch.randperm(self.cache.num_blocks, generator=g)[: batch * self.nb].view(batch, self.nb)
        self.scale = cfg.head_dim**-0.5
        self.g = g

    def qkv(self, rows: int):
        c, dt = self.cfg, self.cache.k[0][0].dtype
        q = torch.randn(1, rows, c.num_heads, c.head_dim, generator=self.g).to(dt).transpose(1, 2)
        k = torch.randn(1, rows, c.num_kv_heads, c.head_dim, generator=self.g).to(dt).transpose(1, 2)
        return q, k, torch.randn_like(k)

    def prefill(self, native):
        from slimlm.engine.paged_attention import AttentionPaths, PagedAttention, PrefillSegment

        n, table = self.n, self.tables[0].contiguous()
        pos = torch.arange(n)[None]
        slots = table[pos[0] // BLOCK] * BLOCK + pos[0] % BLOCK
        seg = PrefillSegment(slice(0, n), pos, None, pos, table=table if native is not None else None)
        attn = PagedAttention(self.cache, AttentionPaths(native_prefill=native), slots, [], [seg], {}, self.scale, None)
        q, k, v = self.qkv(n)
        return lambda: attn.attend(0, q, k, v)

    def decode(self, native):
        from slimlm.engine.paged_attention import AttentionPaths, DecodeGroup, DecodeTable, PagedAttention

        B, n, tables = self.batch, self.n, self.tables.contiguous()
        rows = torch.arange(B)
        slots = tables[:, (n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK
        if native is not None:
            dt, groups = DecodeTable(rows, tables, torch.full((B,), n, dtype=torch.long)), []
        else:
            dt = None
            kpos = torch.arange(self.nb * BLOCK).expand(B, -1).contiguous()
            groups = [DecodeGroup(rows, torch.full((B, 1), n - 1), tables.flatten(), kpos, self.nb)]
        attn = PagedAttention(self.cache, AttentionPaths(native_decode=native), slots, groups, [], {}, self.scale,
                              None, decode_table=dt)
        q, k, v = self.qkv(B)
        return lambda: attn.attend(0, q, k, v)


def _time(fn) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(CALLS):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


@SCENARIOS.register("kernels")
class Kernels(Scenario):
    help = "native CPU attention kernels vs the PyTorch path (ms a layer, prefill and decode)"

    @classmethod
    def add_args(cls, g) -> None:
        g.add_argument("--batch", type=int, default=None, help="kernels: decode sequences per step (default 64)")

    def run(self, a, s) -> dict[str, Any]:
        from slimlm import kernels
        from slimlm.bench.machine import machine_info
        from slimlm.bench.runner import summarise
        from slimlm.engine.paged_attention import NATIVE_DTYPES
        from slimlm.errors import SlimLMError
        from slimlm.model.weights import parse_dtype

        from slimlm.bench.systems import model_config

        torch.set_num_threads(s.threads)
        cfg = model_config(s.model)
        dtype = parse_dtype(s.dtype)
        if dtype not in NATIVE_DTYPES:
            raise SlimLMError(f"kernels: --dtype must be float32 or bfloat16, got {s.dtype}")
        lengths, batch = int_list(a.lengths, DEFAULT_LENGTHS), resolve(a.batch, 64)
        notes: list[str] = []
        libs = {"decode": kernels.load("paged_decode"), "prefill": kernels.load("paged_prefill")}
        if libs["decode"] is None:
            notes.append("paged_decode unavailable (no compiler, failed build or SLIMLM_NATIVE=0)")
        if libs["prefill"] is not None and not libs["prefill"].slimlm_prefill_supported(cfg.head_dim, NATIVE_DTYPES[dtype]):
            notes.append(f"paged_prefill does not serve head size {cfg.head_dim} in {s.dtype} on this CPU/build")
            libs["prefill"] = None
        elif libs["prefill"] is None:
            notes.append("paged_prefill unavailable (no compiler, failed build or SLIMLM_NATIVE=0)")
        runs: dict[str, list[dict[str, float]]] = {}
        with torch.inference_mode():
            for n in lengths:
                cases = {"prefill": _Case(cfg, dtype, n, 1), "decode": _Case(cfg, dtype, n, batch)}
                for kind, case in cases.items():
                    make = case.prefill if kind == "prefill" else case.decode
                    paths = {"pytorch": make(None)}
                    if libs[kind] is not None:
                        paths["native"] = make(libs[kind])
                    for r in range(s.repeats):
                        for path, fn in paths.items():  # interleaved, round by round
                            runs.setdefault(f"{kind}[{n}]/{path}", []).append({"ms": _time(fn)})
                    s.log(f"{kind} {n}: " + ", ".join(f"{p} {runs[f'{kind}[{n}]/{p}'][-1]['ms']:.2f} ms" for p in paths))
        summary = {k: {"ms": summarise([r["ms"] for r in v])} for k, v in runs.items()}
        shape = {"heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim}
        return {"scenario": self.name,
                "settings": {**s.base_args(), "repeats": s.repeats, "lengths": lengths, "batch": batch, **shape},
                "machine": machine_info(s.threads), "runs": runs, "summary": summary, "notes": notes}

    def table(self, report: dict[str, Any]) -> str:
        from slimlm.bench.base import cell

        st, summ = report["settings"], report["summary"]
        rows = ["| case | PyTorch path (ms a layer) | native kernel (ms a layer) | speed-up |", "|---|---|---|---|"]
        for kind in ("prefill", "decode"):
            for n in st["lengths"]:
                label = f"prefill, 1 x {n} tokens" if kind == "prefill" else f"decode, {st['batch']} x {n} tokens"
                p, q = summ.get(f"{kind}[{n}]/pytorch", {}).get("ms"), summ.get(f"{kind}[{n}]/native", {}).get("ms")
                ratio = f"**{p['median'] / q['median']:.2f}x**" if p and q else "-"
                rows.append(f"| {label} | {cell(p, '.2f')} | {cell(q, '.2f')} | {ratio} |")
        text = "\n".join(rows)
        text += (f"\n\n{st['dtype']}, {st['heads']} query heads, {st['kv_heads']} KV heads, head size {st['head_dim']}, "
                 f"{st['threads']} threads; median of {st['repeats']} rounds")
        for n in report.get("notes", []):
            text += f"\nnote: {n}"
        return text
