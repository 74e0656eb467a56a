"""``slimlm compress-kv SRC DST --kv-heads H``: KV-head compression (slimlm.kvcache.kv_heads)."""

from __future__ import annotations

import argparse
import sys


def cmd_compress_kv(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from slimlm.compress.calib import calibration_windows, window_perplexity
    from slimlm.kvcache.kv_heads import check_kv_heads, compress_kv_heads
    from slimlm.model.hub import load
    from slimlm.model.weights import save_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.src)
    model = lm.model.float().eval()
    before_heads = model.cfg.num_kv_heads
    check_kv_heads(model.cfg, args.kv_heads)
    windows = calibration_windows(args.calib, lm.tokenizer, args.calib_tokens, args.seq_len)
    with torch.no_grad():
        before = window_perplexity(model, windows)
        stats = compress_kv_heads(model, windows, args.kv_heads, weighted=not args.unweighted)
        after = window_perplexity(model, windows)
    out = save_model_dir(model, Path(args.dst), lm.tokenizer, lm.generation_config)
    k = sum(s["keys"] for s in stats) / len(stats)
    v = sum(s["values"] for s in stats) / len(stats)
    err = [s["error"] for s in stats if "error" in s]
    report = {"src": args.src, "kv_heads": [before_heads, args.kv_heads], "weighted": not args.unweighted,
              "calib": args.calib, "calib_tokens": int(windows.numel()), "calib_perplexity": [before, after],
              "layers": stats}
    (Path(out) / "kv_heads.json").write_text(json.dumps(report, indent=1) + "\n")
    worst = max(range(len(err)), key=err.__getitem__) if err else None
    print(f"wrote {out}: KV heads {before_heads} -> {args.kv_heads} (KV cache {before_heads / args.kv_heads:g}x "
          f"smaller); {'weighted' if not args.unweighted else 'plain'} PCA; energy kept (mean over layers): keys "
          f"{k:.3f}, values {v:.3f}; attention output relative error (mean over layers) "
          + (f"{sum(err) / len(err):.3f}, worst layer {worst} {err[worst]:.3f}" if err else "not measured")
          + f"; calibration perplexity {before:.2f} -> {after:.2f} ({windows.numel():,} tokens of {args.calib}); "
          f"per layer: {out}/kv_heads.json", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("compress-kv", help="KV-head compression: MHA/GQA -> fewer KV heads (SVD on calibration)",
                       description="Turn a model's KV heads into fewer (a normal GQA checkpoint) by low-rank "
                                   "projections of each group's keys and values fitted on calibration activations; "
                                   "keys with RoPE-commuting (per-frequency complex) projections. Recover with "
                                   "`slimlm train` / `slimlm distill` from the written directory.")
    p.add_argument("src", help="known model name or HF directory")
    p.add_argument("dst", help="output HF directory")
    p.add_argument("--kv-heads", type=int, required=True, help="KV heads of the result (divides the current ones)")
    p.add_argument("--calib", default="python-stdlib", help="corpus, file, folder or prepared token folder")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--unweighted", action="store_true",
                   help="plain PCA of the key / value activations (the first build), not weighted by the "
                        "queries that read the keys and the output projection that reads the values")
    p.set_defaults(func=cmd_compress_kv)
