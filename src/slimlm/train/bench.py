"""Training throughput: slimlm's trainer against a plain transformers training loop.

    python -m slimlm.train.bench [--steps 8] [--threads 2] [--precision fp32] [--data DIR]

Same model (tiny-15m, identical initial weights), same batches (document-packed rows of the
Python standard library), same optimizer (AdamW, clip 1.0), same threads. The two loops take
turns update by update in ABBA order, so a busy machine slows both alike; the first ``--warmup``
updates of each are not timed. The ratio is the median over pairs of consecutive updates of
(transformers' time / slimlm's time), which cancels slow drifts in the machine's load. Prints
tokens/s of each (median), the ratio, and packed-token efficiency.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slimlm.data.tokens import TokenDataset


def build_data(tmp: Path, max_docs: int) -> Path:
    from slimlm.data.prepare import prepare
    from slimlm.data.tokenizer_train import train_tokenizer

    train_tokenizer(["python-stdlib"], tmp / "tok", vocab_size=8192, max_chars=3_000_000)
    prepare(["python-stdlib"], tmp / "tok", tmp / "data", val_fraction=0.01, max_docs=max_docs, progress=False)
    return tmp / "data"


def padded_efficiency(ds: TokenDataset, seq_len: int) -> float:
    """Real / computed tokens if each row held one document, padded (documents cut at seq_len)."""
    lengths = ds.lengths
    rows = -(-lengths // seq_len)
    return float(lengths.sum() / (rows.sum() * seq_len))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="timed updates per loop")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="slimlm with train.compile (torch.compile)")
    ap.add_argument("--data", default=None, help="a prepared folder (default: build one from the stdlib)")
    ap.add_argument("--max-docs", type=int, default=400)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else build_data(Path(tmp), args.max_docs)
        run(args, data, Path(tmp) / "run")


def run(args: argparse.Namespace, data: Path, out: Path) -> None:
    import transformers

    from slimlm.train.config import load_config
    from slimlm.train.trainer import Trainer

    cfg = load_config(None, [
        "--out_dir", str(out), "--data.train", str(data), "--data.seq_len", str(args.seq_len),
        "--data.micro_batch", str(args.micro_batch), "--model.preset", "tiny-15m",
        "--train.threads", str(args.threads), "--train.precision", args.precision,
        "--train.steps", str(10**6), "--schedule.name", "constant", "--schedule.lr", "1e-3",
        "--log.progress", "false", "--log.tensorboard", "false", "--train.compile", str(args.compile),
    ])
    ours = Trainer(cfg)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ours.model.cfg.to_hf()))
    ref.load_state_dict(ours.model.state_dict(), strict=False)  # identical initial weights
    ref.tie_weights()
    ref.train()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    feed = Trainer(load_config(None, ["--out_dir", str(out), "--data.train", str(data), "--data.seq_len",
                                      str(args.seq_len), "--data.micro_batch", str(args.micro_batch)]))  # same rows
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def hf_update() -> None:
        b = feed.loader.next_batch()
        with autocast:
            loss = ref(input_ids=b.input_ids, labels=b.input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"slimlm": [], "transformers": []}
    real = computed = targets = 0
    for i in range(args.warmup + args.steps):
        for name in ("slimlm", "transformers") if i % 2 == 0 else ("transformers", "slimlm"):
            t0 = time.perf_counter()
            if name == "slimlm":
                ours.update()
            else:
                hf_update()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    probe = Trainer(load_config(None, ["--out_dir", str(out), "--data.train", str(data), "--data.seq_len",
                                       str(args.seq_len), "--data.micro_batch", str(args.micro_batch)]))
    for _ in range(args.warmup + args.steps):
        b = probe.loader.next_batch()
        real, computed, targets = real + b.real_tokens, computed + b.computed_tokens, targets + b.target_tokens
    tokens = args.micro_batch * args.seq_len
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    ds = TokenDataset(data)
    print(f"tiny-15m ({sum(p.numel() for p in ours.model.parameters()) / 1e6:.1f}M params), {args.micro_batch}x{args.seq_len} "
          f"tokens/update, {args.precision}, {args.threads} threads, {args.steps} timed updates each (median), "
          f"slimlm {'compiled' if args.compile else 'eager'}, "
          f"transformers {transformers.__version__} ({ref.config._attn_implementation})")
    print(f"slimlm        {tps['slimlm']:8,.0f} tokens/s")
    print(f"transformers  {tps['transformers']:8,.0f} tokens/s")
    pairs = [h / o for o, h in zip(times["slimlm"], times["transformers"])]
    print(f"ratio slimlm / transformers (median over {len(pairs)} pairs of updates): {statistics.median(pairs):.2f}x "
          f"(pairs from {min(pairs):.2f}x to {max(pairs):.2f}x)")
    print(f"packed-token efficiency (real / computed tokens): {100 * real / computed:.2f}% "
          f"(positions with a target: {100 * targets / computed:.2f}%; "
          f"one padded document per row would be {100 * padded_efficiency(ds, args.seq_len):.1f}%)")
    for t in (ours, feed, probe):
        t.close()


if __name__ == "__main__":
    main()
