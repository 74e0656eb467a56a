"""Vertical-slash pattern statistics on the real model (issue 18): which settings keep the
attention a passkey prompt needs, before spending CPU on passkey runs.

The engine prefills a needle prompt densely (the reference: every chunk runs dense attention), and
at every long chunk of every layer the probe (the chunk's last ``probe`` queries) picks each
candidate setting's pattern, which is then scored on 64 held-out queries spread over the rest of
the chunk: the share of their dense attention mass the pattern keeps (recall; mean over heads and
the worst head) and the share of their causal pairs it computes.

Usage: PYTHONPATH=src python docs/results/raw/sparse_prefill_probe.py LENGTH [DEPTH [MIN_KEYS]] > out.json
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field, replace

import torch

from slimlm import LLM, SamplingParams
from slimlm.engine.sparse_prefill import VerticalSlash
from slimlm.eval.needle import build_prompt, filler_ids

CONFIGS = [  # (vertical, slash, local)
    (1024, 64, 64), (1024, 256, 64), (1024, 1024, 64), (1024, 1024, 512), (2048, 256, 64),
    (2048, 1024, 256), (512, 2048, 256), (256, 256, 64),
]


@dataclass(frozen=True)
class Recorder(VerticalSlash):
    rows: list = field(default_factory=list, compare=False, hash=False, repr=False)

    def attend(self, q, k, v, q_pos, k_pos, scale):
        _, Hq, T, d = q.shape
        G = Hq // k.shape[1]
        qf, kx, vx = q[0].float(), k[0].float().repeat_interleave(G, 0), v[0].float().repeat_interleave(G, 0)
        qp, kp = q_pos[0], k_pos[0]
        valid = kp >= 0
        S = kx.shape[1]
        sel = torch.linspace(0, T - self.probe - 1, 64).long()  # held out: not probe rows
        dist = qp[sel][:, None] - kp[None, :]  # (64, S)
        causal = (dist >= 0) & valid[None]
        att = ((qf[:, sel] @ kx.transpose(-1, -2)) * scale).masked_fill(~causal, float("-inf")).softmax(-1)
        for vv, ss, ll in CONFIGS:
            vs = VerticalSlash(vertical=vv, slash=ss, local=ll, probe=self.probe, min_keys=1)
            _, _, is_v, is_s = vs._pattern(qf, kx, qp, kp, valid, scale)
            on_s = is_s.gather(1, dist.clamp(min=0, max=is_s.shape[1] - 1).flatten()[None].expand(Hq, -1))
            allow = causal[None] & (is_v[:, None, :] | on_s.view(Hq, 64, S))
            recall = (att * allow).sum(-1).mean(-1)  # (Hq,)
            self.rows.append({"call": len(self.rows) // len(CONFIGS), "keys": int(valid.sum()), "cfg": [vv, ss, ll],
                              "recall": float(recall.mean()), "recall_min": float(recall.min()),
                              "share": float(allow.sum() / (Hq * causal.sum()))})
        bias = torch.zeros(T, S).masked_fill_(~(((qp[:, None] - kp[None]) >= 0) & valid[None]), float("-inf"))
        out = torch.nn.functional.scaled_dot_product_attention(qf[None], kx[None], vx[None], attn_mask=bias, scale=scale)
        return out.to(q.dtype)


def main() -> None:
    torch.set_num_threads(1)
    length, depth = int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
    llm = LLM("smollm2-135m-instruct", dtype="bfloat16", sparse_prefill="vertical-slash")
    rec = Recorder(min_keys=int(sys.argv[3]) if len(sys.argv) > 3 else 4096)
    llm.engine.runner.paths = replace(llm.engine.runner.paths, sparse_prefill=rec)
    rng = random.Random(f"0-{length}-0-0")
    key = str(rng.randint(10000, 99999))
    ids, _ = build_prompt(llm.tokenizer, filler_ids("essays", llm.tokenizer), length, depth, key, rng.randrange(1 << 30))
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    layers = llm.engine.model.cfg.num_layers
    summary = {}
    for cfg in CONFIGS:
        rows = [r for r in rec.rows if r["cfg"] == list(cfg)]
        summary[str(cfg)] = {
            "recall_mean": sum(r["recall"] for r in rows) / len(rows),
            "recall_worst_layer": min(r["recall"] for r in rows),
            "worst_layer": min(rows, key=lambda r: r["recall"])["call"] % layers,
            "recall_min_head_mean": sum(r["recall_min"] for r in rows) / len(rows),
            "share_mean": sum(r["share"] for r in rows) / len(rows)}
    json.dump({"length": length, "depth": depth, "key": key, "dense_answer": out, "summary": summary,
               "rows": rec.rows}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
