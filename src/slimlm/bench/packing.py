"""``packing``: prefill of one batch of mixed-length prompts, padded against packed.

- ``slimlm-padded``: slimlm's model on a (B, longest) batch, right-padded; padding keys masked.
- ``slimlm-packed``: the same model on one (1, total) row, each prompt its own segment with
  positions restarting (prepacking): no compute goes to padding.
- ``slimlm-engine``: the engine's own step (``LLM.generate``, one token), a step budget that fits
  the whole batch so it is one prepacked step.
- ``transformers-padded``: transformers' forward on the left-padded batch with its attention mask.

All get the same prompts (``--lengths``, real text) and compute logits for each prompt's last
token only. Tokens/s counts real prompt tokens; "computed" counts padded positions too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from slimlm.bench.base import SCENARIOS, WorkerScenario, int_list, speedups

DEFAULT_LENGTHS = [32, 64, 128, 256, 384, 512, 768, 1024]


def packed_last_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """(B, V) logits at each prompt's last token from one packed row."""
    lens = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p])[None]  # (1, T)
    pos = torch.cat([torch.arange(n) for n in lens])[None]  # (1, T) restarting per prompt
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]  # (1, T)
    last = torch.tensor(lens).cumsum(0) - 1  # (B,)
    return model(ids, pos, segment_ids=seg, logits_index=last[None])[0]  # (B, V)


def padded_last_logits(model, prompts: list[list[int]], pad: int = 0) -> torch.Tensor:
    """(B, V) logits at each prompt's last token from a right-padded (B, longest) batch."""
    L = max(map(len, prompts))
    ids = torch.tensor([p + [pad] * (L - len(p)) for p in prompts])  # (B, L)
    seg = torch.tensor([[0] * len(p) + [-1] * (L - len(p)) for p in prompts])  # (B, L), -1 = padding
    pos = torch.arange(L).expand(len(prompts), L)  # (B, L)
    last = torch.tensor([len(p) - 1 for p in prompts])[:, None]  # (B, 1)
    return model(ids, pos, segment_ids=seg, logits_index=last)[:, 0]  # (B, V)


def batch_runner(system: str, args: dict[str, Any]):
    """Load ``system`` once; returns run(prompts) -> positions computed, which prefills the batch."""
    from slimlm.bench.systems import hf_dir

    if system == "transformers-padded":
        import transformers

        transformers.logging.set_verbosity_error()
        m = transformers.AutoModelForCausalLM.from_pretrained(hf_dir(args["model"]),
                                                              dtype=getattr(torch, args["dtype"])).eval()

        def hf_padded(prompts):
            L = max(map(len, prompts))
            ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])  # (B, L), left-padded
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
            m(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            return ids.numel()
        return hf_padded
    from slimlm.model.hub import load

    lm = load(args["model"], dtype=args["dtype"])
    if system == "slimlm-engine":
        from slimlm import LLM, SamplingParams

        total = sum(args["lengths"])
        engine = {**args.get("engine", {}), "max_num_batched_tokens": total, "max_num_seqs": len(args["lengths"])}
        llm = LLM(lm, dtype=args["dtype"], **engine)
        sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

        def engine_step(prompts):
            llm.engine.pool.reset_prefix_cache()
            llm.generate(prompts, sp, use_tqdm=False)
            return sum(map(len, prompts))
        return engine_step
    if system == "slimlm-packed":
        return lambda prompts: (packed_last_logits(lm.model, prompts), sum(map(len, prompts)))[1]
    return lambda prompts: (padded_last_logits(lm.model, prompts), len(prompts) * max(map(len, prompts)))[1]


@SCENARIOS.register("packing")
class Packing(WorkerScenario):
    help = "mixed-length batch prefill: padded vs packed"
    columns = [("seconds", "seconds", ".3f"), ("tokens_per_s", "prompt tok/s", ".0f"),
               ("computed_tokens", "positions computed", ".0f"), ("peak_rss_mb", "peak RSS MB", ".0f")]

    def systems(self, a, s):
        from slimlm.bench.systems import unavailable

        lengths = int_list(a.lengths, DEFAULT_LENGTHS)
        notes = ["llama.cpp not measured: llama-cpp-python's high-level API has no batched multi-prompt prefill"]
        systems = {}
        for label in ("slimlm-padded", "slimlm-packed", "slimlm-engine", "transformers-padded"):
            if label.split("-")[0] in s.skip:
                continue
            why = unavailable("transformers", s.model) if label.startswith("transformers") else None
            if why:
                notes.append(why)
                continue
            systems[label] = {**s.base_args(), "system": label, "lengths": lengths}
        return systems, {**s.base_args(), "lengths": lengths, "real_tokens": sum(lengths),
                         "padded_tokens": len(lengths) * max(lengths)}, notes

    @staticmethod
    def worker(args: dict[str, Any]) -> dict[str, float]:
        from slimlm.bench.machine import peak_rss_mb
        from slimlm.bench.systems import hf_dir
        from slimlm.bench.workloads import lengths_prompts, text_prompt
        from slimlm.model.hub import load
        from slimlm.tokenizer import Tokenizer

        torch.set_num_threads(args["threads"])
        d = hf_dir(args["model"])
        tok = Tokenizer.from_dir(d) if d else load(args["model"]).tokenizer
        prompts = lengths_prompts(tok, args["lengths"], spacing=2048)
        run = batch_runner(args["system"], args)
        with torch.inference_mode():
            run([text_prompt(tok, 16, offset=20_000), text_prompt(tok, 8, offset=30_000)])  # warm-up
            t0 = time.perf_counter()
            computed = run(prompts)
            dt = time.perf_counter() - t0
        real = sum(args["lengths"])
        return {"seconds": dt, "tokens_per_s": real / dt, "computed_tokens": float(computed),
                "real_tokens": float(real), "peak_rss_mb": peak_rss_mb()}

    def derive(self, report: dict[str, Any]) -> None:
        sp = speedups(report["summary"], "seconds", False, ref="slimlm-packed")
        report["speedup"] = {"packed vs " + k: v for k, v in sp.items()}

    def table(self, report: dict[str, Any]) -> str:
        st = report["settings"]
        head = (f"Batch of {len(st['lengths'])} prompts ({', '.join(map(str, st['lengths']))} tokens): "
                f"{st['real_tokens']} real tokens, {st['padded_tokens']} positions when padded "
                f"({1 - st['real_tokens'] / st['padded_tokens']:.0%} padding).\n\n")
        sp = report.get("speedup") or {}
        tail = ("\n\nslimlm-packed speed-up " + "; ".join(f"{k.removeprefix('packed ')}: **{v:.2f}x**"
                                                         for k, v in sp.items())) if sp else ""
        return head + super().table({**report, "speedup": None}) + tail

    def plot(self, report: dict[str, Any], out: Path) -> list[Path]:
        from slimlm.bench.plots import bars

        return [bars(report["summary"], "seconds", "mixed-length batch prefill (s, lower is better)",
                     out.with_suffix(".png"))]
