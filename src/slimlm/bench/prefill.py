"""``prefill``: time to first token for prompts of several lengths (256 ... 8192 tokens).

Each length has its own stretch of real text; slimlm's prefix cache is reset before each
prompt, so every prompt is computed. Lengths at or past the context slimlm accepts are clamped to
``context - 1`` (noted): the model's trained context, or with ``--rope-extension`` the extension's
``context`` (lengths past the trained range are then noted as such; the baselines run them with
plain RoPE). The engine's chunk size is ``--max-num-batched-tokens``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimlm.bench.base import SCENARIOS, WorkerScenario, int_list, speedups, standard_systems
from slimlm.bench.base import summary_table

DEFAULT_LENGTHS = [256, 1024, 2048, 4096, 8192]


def context_of(model: str) -> int:
    from slimlm.bench.systems import model_config

    return model_config(model).context_length


def accepted_context(model: str, engine: dict[str, Any], notes: list[str]) -> tuple[int, int]:
    """The longest sequence slimlm's engine takes: the model's trained context, or the context a
    ``rope_extension`` lifts it to (as the engine computes it); and the trained context."""
    from slimlm.bench.systems import model_config
    from slimlm.errors import SlimLMError
    from slimlm.model.rope_extension import ROPE_EXTENSIONS

    cfg = model_config(model)
    name = engine.get("rope_extension")
    if not name:
        return cfg.context_length, cfg.context_length
    try:
        ext = ROPE_EXTENSIONS.get(name)(cfg, **engine.get("rope_extension_args", {}))
    except TypeError as e:
        raise SlimLMError(f"rope_extension={name!r}: {e}") from None
    notes.append(f"rope_extension={name}: the engine accepts {ext.context} tokens (trained: {cfg.context_length})")
    return ext.context, cfg.context_length


def note_past_trained(lengths: list[int], trained: int, notes: list[str]) -> None:
    past = [n for n in lengths if n >= trained]
    if past:
        which = f"lengths {', '.join(map(str, past))} are" if len(past) > 1 else f"length {past[0]} is"
        notes.append(f"{which} past the model's trained context ({trained}): positions "
                     "beyond it were never seen in training; only slimlm applies the rope extension, baselines run "
                     "plain RoPE")


def clamp_lengths(lengths: list[int], context: int, unbounded: bool, notes: list[str]) -> list[int]:
    if unbounded:
        return lengths
    out = sorted({min(n, context - 1) for n in lengths})
    if out != sorted(set(lengths)):
        notes.append(f"lengths clamped to the context slimlm accepts: {context - 1} tokens at most")
    return out


@SCENARIOS.register("prefill")
class Prefill(WorkerScenario):
    help = "time to first token for prompts of 256...8192 tokens"

    @classmethod
    def add_args(cls, g) -> None:
        g.add_argument("--lengths", default=None,
                       help="prefill, memory: prompt lengths (default 256,1024,2048,4096,8192; memory 1024,4096); "
                            "packing: the batch's prompt lengths")

    def systems(self, a, s):
        notes: list[str] = []
        context, trained = accepted_context(s.model, s.engine, notes)
        lengths = clamp_lengths(int_list(a.lengths, DEFAULT_LENGTHS), context, False, notes)
        note_past_trained(lengths, trained, notes)
        extra = {"lengths": lengths, "n_ctx": max(lengths) + 64}
        if getattr(a, "precisions", None):
            from slimlm.bench.precision import precision_systems

            systems, more, pairs = precision_systems(a, s, extra)
            return systems, {**s.base_args(), "lengths": lengths, "precisions": a.precisions, "pairs": pairs}, notes + more
        systems, more = standard_systems(a, s, extra)
        return systems, {**s.base_args(), "lengths": lengths}, notes + more

    @staticmethod
    def worker(args: dict[str, Any]) -> dict[str, float]:
        from slimlm.bench.machine import peak_rss_mb
        from slimlm.bench.systems import SYSTEMS
        from slimlm.bench.workloads import lengths_prompts, text_prompt

        system = SYSTEMS.get(args["system"])(args)
        system.prefill(text_prompt(system.tokenizer, 32, offset=20_000))  # warm-up
        res = {}
        for n, ids in zip(args["lengths"], lengths_prompts(system.tokenizer, args["lengths"])):
            dt = system.prefill(ids)
            res[f"ttft_s[{n}]"], res[f"prefill_tok_s[{n}]"] = dt, n / dt
        return {**res, "peak_rss_mb": peak_rss_mb()}

    def derive(self, report: dict[str, Any]) -> None:
        pairs = report["settings"].get("pairs")
        if pairs:
            from slimlm.bench.precision import pair_ratios

            report["speedup"] = {str(n): pair_ratios(report["summary"], pairs, f"ttft_s[{n}]", False)
                                 for n in report["settings"]["lengths"]}
            return
        report["speedup"] = {str(n): speedups(report["summary"], f"ttft_s[{n}]", False)
                             for n in report["settings"]["lengths"]}

    def table(self, report: dict[str, Any]) -> str:
        lengths = report["settings"]["lengths"]
        cols = [(f"ttft_s[{n}]", f"TTFT {n} tok (s)", ".3f") for n in lengths]
        text = summary_table(report["summary"], cols)
        tps = [(f"prefill_tok_s[{n}]", f"{n} tok", ".0f") for n in lengths]
        text += "\n\nPrefill tokens/s:\n\n" + summary_table(report["summary"], tps)
        sp = {n: v for n, v in report.get("speedup", {}).items() if v}
        if sp:
            others = sorted({k for v in sp.values() for k in v})
            text += "\n\nslimlm TTFT speed-up: " + "; ".join(
                f"vs {o}: " + ", ".join(f"{n}: {v[o]:.2f}x" for n, v in sp.items() if o in v) for o in others)
        return text

    def plot(self, report: dict[str, Any], out: Path) -> list[Path]:
        from slimlm.bench.plots import lines

        lengths = report["settings"]["lengths"]
        series = {name: [s.get(f"ttft_s[{n}]", {}).get("median") for n in lengths]
                  for name, s in report["summary"].items()}
        return [lines(lengths, series, "prompt tokens", "time to first token (s)", "prefill", out.with_suffix(".png"),
                      log=True)]
