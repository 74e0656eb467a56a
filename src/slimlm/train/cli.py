"""`slimlm train`, `slimlm data prepare`, `slimlm tokenizer train`, `slimlm schedule plot`."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

ALIASES = {"time_budget": "train.time_budget_minutes", "steps": "train.steps", "out": "out_dir"}


def cmd_train(args: argparse.Namespace) -> int:
    from slimlm.train.config import load_config, parse_overrides
    from slimlm.train.interrupt import EXIT_CODES, resume_command
    from slimlm.train.trainer import Trainer

    given = [o for o in args.overrides if o != "--print-config"]
    print_config = args.print_config or len(given) < len(args.overrides)
    overrides = [a for a in given if a != "--allow-config-change"]
    if len(overrides) < len(given):
        overrides += ["--checkpoint.allow_config_change", "true"]
    pairs = [(ALIASES.get(k, k), v) for k, v in parse_overrides(overrides)]
    cfg = load_config(args.config, [x for k, v in pairs for x in (f"--{k}", v)])
    if print_config:
        from slimlm.train.config_toml import to_toml

        print(to_toml(cfg.to_dict()), end="")
        return 0
    trainer = Trainer(cfg)
    if trainer.finished:
        trainer.close()
        if trainer.world.main:
            print(f"{cfg.out_dir} already finished: {trainer.step} of {trainer.horizon.total_steps} updates done, "
                  f"final checkpoint {trainer.checkpoint}; nothing to train (raise --train.steps to continue it, "
                  f"or pick another --out_dir to start over)", file=sys.stderr)
        return 0
    try:
        last = trainer.fit()
    finally:
        trainer.close()
    if not trainer.world.main:
        return EXIT_CODES.get(getattr(signal, trainer.interrupted, None), 0) if trainer.interrupted else 0
    if trainer.interrupted:
        cmd = resume_command(args.config, args.overrides, cfg.checkpoint.resume, cfg.checkpoint.resume_from)
        print(f"interrupted ({trainer.interrupted}) at update {trainer.step} of {trainer.horizon.total_steps}; "
              f"checkpoint {trainer.checkpoint}; resume with: {cmd}", file=sys.stderr)
        return EXIT_CODES.get(getattr(signal, trainer.interrupted, None), 1)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith(("loss", "val_")))
    print(f"done: {trainer.step} updates, {trainer.tokens:,} tokens; {shown}; final checkpoint {trainer.checkpoint}",
          file=sys.stderr)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from slimlm.data.prepare import prepare

    meta = prepare(args.sources, args.tokenizer, args.out, args.val_fraction, args.max_docs,
                   progress=not args.no_progress)
    print(f"{args.out}: train {meta.docs['train']:,} docs / {meta.tokens['train']:,} tokens, "
          f"val {meta.docs['val']:,} docs / {meta.tokens['val']:,} tokens ({meta.dtype})", file=sys.stderr)
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from slimlm.data.tokenizer_train import train_tokenizer

    tok = train_tokenizer(args.sources, args.out, args.vocab_size, args.val_fraction, args.max_chars)
    print(f"wrote {Path(args.out) / 'tokenizer.json'} ({tok.vocab_size:,} tokens)", file=sys.stderr)
    return 0


def cmd_schedule_plot(args: argparse.Namespace) -> int:
    from slimlm.train.config import load_config
    from slimlm.train.plot import plot

    configs = {Path(c).stem: load_config(c) for c in args.configs}
    out = plot(configs, args.out, args.runs or [], args.steps)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def config_keys() -> str:
    """Every config key by section, for ``train --help``."""
    import dataclasses
    import typing

    from slimlm.train.config import TrainConfig
    from slimlm.train.schedules import SCHEDULES

    lines, top = [], []
    for f in dataclasses.fields(TrainConfig):
        kind = typing.get_type_hints(TrainConfig)[f.name]
        if f.name == "schedule":
            lines.append(f"  [schedule] name ({', '.join(SCHEDULES.names())}), "
                         + ", ".join(x.name for x in dataclasses.fields(kind)) + ", and the named schedule's fields")
        elif dataclasses.is_dataclass(kind):
            lines.append(f"  [{f.name}] " + ", ".join(x.name for x in dataclasses.fields(kind)))
        else:
            top.append(f.name)
    return "config keys (--section.key VALUE):\n  " + ", ".join(top) + "\n" + "\n".join(lines)


def cmd_layer_effect(args: argparse.Namespace) -> int:
    from slimlm.data.loader import PackedLoader
    from slimlm.data.tokens import TokenDataset
    from slimlm.model.hub import load
    from slimlm.train.layer_effect import layer_effects

    lm = load(args.model)
    loader = PackedLoader([TokenDataset(args.data, args.split)], args.seq_len, args.micro_batch, None, "document",
                          0, 1, 0, shuffle=False)
    base, effects = layer_effects(lm.model, [loader.next_batch() for _ in range(args.batches)])
    print(f"{lm.path}: held-out loss {base:.4f} ({lm.model.cfg.norm_placement}-LN)")
    print("layer  angular_distance  loss_increase_when_dropped")
    for e in effects:
        print(f"{e.layer:5d}  {e.angular_distance:16.4f}  {e.drop_delta:26.4f}")
    return 0


def cmd_expert_load(args: argparse.Namespace) -> int:
    from slimlm.data.loader import PackedLoader
    from slimlm.data.tokens import TokenDataset
    from slimlm.model.hub import load
    from slimlm.errors import SlimLMError
    from slimlm.train.expert_load import expert_load, report

    domains, vocab = {}, 0
    for spec in args.data:
        name, eq, folder = spec.partition("=")
        if not eq or not name or not folder:
            raise SlimLMError(f"--data wants NAME=FOLDER (e.g. code=data/stdlib-8k); got '{spec}'")
        ds = TokenDataset(folder, args.split)
        vocab = max(vocab, ds.meta.vocab_size)
        loader = PackedLoader([ds], args.seq_len, args.micro_batch, None, "document", 0, 1, 0, shuffle=False)
        domains[name] = [loader.next_batch() for _ in range(args.batches)]
    lm = load(args.model)
    if lm.model.cfg.vocab_size < vocab:
        raise SlimLMError(f"the data's vocabulary ({vocab}) is larger than the model's ({lm.model.cfg.vocab_size}): "
                          "prepare it with the model's tokenizer")
    print(f"{lm.path}: expert load per domain ({args.batches} x {args.micro_batch} x {args.seq_len} tokens each)")
    print("\n".join(report(expert_load(lm.model.float(), domains))))
    return 0


def cmd_runs_compare(args: argparse.Namespace) -> int:
    from slimlm.train.compare import compare

    print("\n".join(compare(args.baseline, args.runs)))
    return 0


def cmd_runs_lr_sweep(args: argparse.Namespace) -> int:
    from slimlm.train import sweep

    g = sweep.groups(args.runs, args.shared_width)
    print("\n".join(sweep.table(g)))
    if args.out:
        print(f"wrote {sweep.plot(g, args.out)}")
    return 0


def cmd_runs_consolidate(args: argparse.Namespace) -> int:
    from slimlm.train.sharded_checkpoint import consolidate

    print(f"wrote {consolidate(args.checkpoint, args.out)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="pre-train or continue pre-training a model", epilog=config_keys(),
                       description="Train from a TOML/JSON config; override any key with --section.key value "
                                   "(e.g. --train.steps 100 --schedule.name cosine); --time-budget MINUTES. "
                                   "--print-config prints the effective config (after overrides) as TOML "
                                   "and exits; an unknown key lists the valid ones. Ctrl-C / SIGTERM checkpoints "
                                   "the current update and prints the resume command; --allow-config-change "
                                   "resumes a run whose technique settings changed.")
    t.add_argument("--print-config", action="store_true", help="print the effective config as TOML and exit")
    t.add_argument("config", help="TOML or JSON config file")
    t.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value ...")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = d.add_parser("prepare", help="tokenize sources into memory-mapped token files")
    p.add_argument("sources", nargs="+", help="files, folders or corpora (python-stdlib, python-docs, shakespeare)")
    p.add_argument("--tokenizer", required=True, help="known model name or folder with tokenizer.json")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out")
    p.add_argument("--max-docs", type=int, default=None, help="at most this many documents per source")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_data_prepare)

    k = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    tt = k.add_parser("train", help="train a byte-level BPE tokenizer")
    tt.add_argument("sources", nargs="+", help="files, folders or corpora")
    tt.add_argument("--out", required=True)
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--val-fraction", type=float, default=0.01, help="held-out share, excluded from training")
    tt.add_argument("--max-chars", type=int, default=None, help="train on at most this many characters")
    tt.set_defaults(func=cmd_tokenizer_train)

    le = sub.add_parser("layer-effect", help="per-layer angular distance and loss when each layer is dropped",
                        description="How much each layer contributes (Mix-LN vs Pre-LN): angular distance between "
                                    "a layer's input and output, and the held-out loss increase without it.")
    le.add_argument("model", help="model name, HF directory or a training run folder")
    le.add_argument("--data", required=True, help="prepared token folder")
    le.add_argument("--split", default="val", choices=["train", "val"])
    le.add_argument("--batches", type=int, default=4)
    le.add_argument("--micro-batch", type=int, default=4)
    le.add_argument("--seq-len", type=int, default=256)
    le.set_defaults(func=cmd_layer_effect)

    el = sub.add_parser("expert-load", help="per-domain expert load and specialization of a mixture-of-experts model",
                        description="Share of routing choices per expert for each domain's held-out tokens, "
                                    "its entropy, and the Jensen-Shannon divergence between domains (specialization).")
    el.add_argument("model", help="model name, HF directory or a training run folder")
    el.add_argument("--data", action="append", required=True, metavar="NAME=FOLDER",
                    help="a domain: its name and a prepared token folder (repeat for each domain)")
    el.add_argument("--split", default="val", choices=["train", "val"])
    el.add_argument("--batches", type=int, default=4)
    el.add_argument("--micro-batch", type=int, default=4)
    el.add_argument("--seq-len", type=int, default=256)
    el.set_defaults(func=cmd_expert_load)

    r = sub.add_parser("runs", help="finished training runs").add_subparsers(dest="runs_command", required=True,
                                                                             metavar="COMMAND")
    rc = r.add_parser("compare", help="final held-out loss, optimizer memory, tokens/s and tokens to reach the "
                                      "baseline's final loss, each run against the first")
    rc.add_argument("baseline", help="the baseline run folder")
    rc.add_argument("runs", nargs="+", help="run folders to compare with it")
    rc.set_defaults(func=cmd_runs_compare)
    rl = r.add_parser("lr-sweep", help="final held-out loss per peak lr, grouped by width and parameterization "
                                       "(does the best lr transfer across widths? μP vs standard)")
    rl.add_argument("runs", nargs="+", help="finished run folders of the sweep")
    rl.add_argument("--out", default=None, help="also draw the sweep to this PNG")
    rl.add_argument("--shared-width", type=int, default=None,
                    help="the μP base width: standard runs at this width also count as μP runs (the same model there)")
    rl.set_defaults(func=cmd_runs_lr_sweep)
    co = r.add_parser("consolidate", help="a sharded checkpoint (checkpoint.sharded) as a Hugging Face directory")
    co.add_argument("checkpoint", help="a step-XXXXXXXX folder with a dcp/ sub-folder")
    co.add_argument("--out", required=True, help="the model directory to write")
    co.set_defaults(func=cmd_runs_consolidate)

    s = sub.add_parser("schedule", help="learning-rate schedules").add_subparsers(dest="schedule_command", required=True, metavar="COMMAND")
    sp = s.add_parser("plot", help="draw the schedule of one or more configs to a PNG")
    sp.add_argument("configs", nargs="+")
    sp.add_argument("--out", default="schedule.png")
    sp.add_argument("--train.steps", "--steps", dest="steps", type=int, default=None,
                    help="horizon, as train's --train.steps (default: each config's train.steps)")
    sp.add_argument("--runs", nargs="*", help="run folders whose loss curves go in a second panel")
    sp.set_defaults(func=cmd_schedule_plot)
