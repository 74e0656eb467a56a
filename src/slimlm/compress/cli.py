"""`slimlm prune`, `slimlm distill`, `slimlm finetune`, `slimlm lowrank`, `slimlm select`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slimlm.errors import SlimLMError


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got '{s}'") from None


def cmd_prune(args: argparse.Namespace) -> int:
    import torch

    from slimlm.compress.calib import calibration_windows
    from slimlm.compress.importance import measure
    from slimlm.compress.prune import PruneConfig, prune
    from slimlm.model.hub import load
    from slimlm.model.weights import save_model_dir
    from slimlm.train.presets import count_params

    pc = PruneConfig(args.hidden, args.intermediate, args.heads, args.kv_heads, args.layers, args.drop_layers or [])
    lm = load(args.src)
    pc.validate(lm.model.cfg)  # bad targets fail before calibration
    if args.threads:
        torch.set_num_threads(args.threads)
    windows = calibration_windows(args.calib, lm.tokenizer, args.calib_tokens, args.seq_len)
    imp = measure(lm.model.float(), windows)
    for line in imp.ranking():
        print(line, file=sys.stderr)
    pruned, plan = prune(lm.model, imp, pc)
    if args.random_init:  # the same shape, trained from scratch: Minitron's baseline
        from slimlm.train.presets import new_model

        pruned = new_model(pruned.cfg, 0.02, args.seed)
    out = save_model_dir(pruned, args.dst, lm.tokenizer, lm.generation_config)
    report = {
        "source": str(args.src), "calib": args.calib, "calib_tokens": imp.tokens,
        "params_before": count_params(lm.model), "params_after": count_params(pruned),
        "kept_layers": plan.layers, "kept_channels": plan.channels.tolist(),
        "kept_heads": {str(k): v.tolist() for k, v in plan.heads.items()},
        "layer_importance": imp.layers.tolist(), "head_importance": imp.heads.tolist(),
        "channel_importance": imp.channels.tolist(),
    }
    (out / "prune_report.json").write_text(json.dumps(report))
    print(f"wrote {out}: {report['params_before'] / 1e6:.1f}M -> {report['params_after'] / 1e6:.1f}M params "
          f"(layers {len(plan.layers)}, hidden {pruned.cfg.hidden_size}, heads {pruned.cfg.num_heads}/"
          f"{pruned.cfg.num_kv_heads}, intermediate {pruned.cfg.intermediate_size}); ranking in prune_report.json",
          file=sys.stderr)
    return 0


def _finish(trainer, last: dict) -> None:
    if trainer.world.main:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith(("loss", "val_")))
        print(f"done: {trainer.step} updates, {trainer.tokens:,} tokens; {shown}; "
              f"checkpoints in {trainer.out / 'checkpoints'}", file=sys.stderr)


def cmd_distill(args: argparse.Namespace) -> int:
    from slimlm.compress.distill import (DistillConfig, DistillObjective, add_projection, drop_projection,
                                         load_teacher, needs_projection)
    from slimlm.compress.run_config import load_run
    from slimlm.model.weights import read_config
    from slimlm.train.presets import count_params
    from slimlm.train.trainer import Trainer

    cfg, dcfg = load_run(args.config, args.overrides, "distill", DistillConfig)
    steps = []
    if dcfg.lowrank:
        from slimlm.compress.lowrank import refactor

        if not cfg.model.init_from:
            raise SlimLMError("distill.lowrank needs model.init_from: the `slimlm lowrank` output")
        init = cfg.model.init_from
        steps.append(lambda model: refactor(model, init))
    teacher_lm = None
    if dcfg.hidden_weight or not dcfg.topk_cache:
        teacher_lm = _load_teacher_lm(dcfg.teacher)
        if needs_projection(dcfg, _student_cfg(cfg, read_config), teacher_lm.model.cfg, cfg.model.init_from):
            width = teacher_lm.model.cfg.hidden_size
            steps.append(lambda model: add_projection(model, width))
    adapt = (lambda model: [f(model) for f in steps]) if steps else None
    trainer = Trainer(cfg, adapt=adapt)
    try:
        cache = None
        if dcfg.topk_cache:
            from slimlm.compress.topk_cache import TopKCache
            from slimlm.data.prepare import tokenizer_sha256

            cache = TopKCache(dcfg.topk_cache)
            cache.check(trainer.model.cfg.vocab_size, tokenizer_sha256(trainer.tokenizer) if trainer.tokenizer else None,
                        cfg.data.seq_len)
        teacher = (load_teacher(dcfg, trainer.model, trainer.tokenizer, trainer.world.device, teacher_lm)
                   if teacher_lm is not None else None)
        trainer.objective = DistillObjective(dcfg, teacher, trainer.model, cfg.model.init_from, cache)
        src = f"the top-k cache {dcfg.topk_cache}" if cache is not None and teacher is None else dcfg.teacher
        size = f" ({count_params(teacher) / 1e6:.1f}M params)" if teacher is not None else ""
        trainer.say(f"slimlm: distilling from {src}{size}, "
                    f"T={dcfg.temperature:g}, weights kl {dcfg.kl_weight:g} / lm {dcfg.lm_weight:g} / hidden "
                    f"{dcfg.hidden_weight:g}" + (f", teacher off after update {dcfg.teacher_until_step}"
                                                 if dcfg.teacher_until_step else "")
                    + (", learned hidden-state projection" if hasattr(trainer.model, "distill_proj") else ""))
        last = trainer.fit()
        done = trainer.world.main and trainer.step >= trainer.horizon.total_steps
        student = trainer.model
        if done and cfg.dist.strategy == "fsdp2" and trainer.world.distributed:
            student = trainer.full_model  # the sharded model cannot be written; its gathered copy can
            if student is None:
                done = False
                trainer.say("slimlm: sharded checkpoints: `final` not written; consolidate the last checkpoint")
        if done and dcfg.lowrank:
            import json

            from slimlm.compress.lowrank import LOWRANK_FILE, save_lowrank

            drop_projection(student)
            ranks = json.loads((Path(cfg.model.init_from) / LOWRANK_FILE).read_text())["ranks"]
            trainer.say(f"slimlm: wrote {save_lowrank(student, ranks, trainer.out / 'final', trainer.tokenizer)}")
        elif done and hasattr(student, "distill_proj"):
            from slimlm.model.weights import save_model_dir

            drop_projection(student)  # the projection only served the loss
            trainer.say(f"slimlm: wrote {save_model_dir(student, trainer.out / 'final', trainer.tokenizer)} "
                        "(the student without its distillation projection)")
    finally:
        trainer.close()
    _finish(trainer, last)
    return 0


def _load_teacher_lm(name: str):
    from slimlm.model.hub import load

    return load(name)


def _student_cfg(cfg, read_config):
    """The student's model config before the trainer builds it (its init_from, or the preset's)."""
    if cfg.model.init_from:
        from slimlm.model.hub import load, newest_run_checkpoint

        path = Path(cfg.model.init_from)
        if path.is_dir() and (newest_run_checkpoint(path) / "config.json").is_file():
            return read_config(newest_run_checkpoint(path))
        return load(cfg.model.init_from).model.cfg
    from slimlm.train.presets import model_config

    return model_config(cfg.model.preset, cfg.model.vocab_size or 0)


def cmd_distill_cache(args: argparse.Namespace) -> int:
    import torch

    from slimlm.compress.distill import DistillConfig
    from slimlm.compress.run_config import load_run
    from slimlm.compress.topk_cache import write_cache
    from slimlm.data.loader import PackedLoader
    from slimlm.data.prepare import tokenizer_sha256
    from slimlm.train import build

    cfg, dcfg = load_run(args.config, args.overrides, "distill", DistillConfig)
    if not dcfg.topk_cache or not dcfg.top_k:
        raise SlimLMError("distill-cache needs distill.topk_cache (the output folder) and distill.top_k")
    out = Path(dcfg.topk_cache)
    if out.exists() and any(out.iterdir()):
        raise SlimLMError(f"{out} exists and is not empty; choose a new distill.topk_cache folder")
    if cfg.data.packing == "varlen":
        raise SlimLMError("distill-cache replays the packed loader; data.packing 'varlen' is not supported")
    if args.processes < 1:
        raise SlimLMError(f"--processes must be >= 1, got {args.processes}")
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    sets = build.train_datasets(cfg)
    lm = _load_teacher_lm(dcfg.teacher)
    tok_sha = sets[0].meta.tokenizer_sha256
    if lm.tokenizer is not None and tokenizer_sha256(lm.tokenizer) != tok_sha:
        raise SlimLMError(f"teacher {dcfg.teacher} uses another tokenizer than {sets[0].path}; distillation needs "
                          "the same tokenizer")
    teacher = lm.model.float().eval()
    d = cfg.data
    # one process replays every rank's rows: rank r of P takes rows r::P of the same global batches
    loader = PackedLoader(sets, d.seq_len, d.micro_batch * args.processes, d.weights or None, d.packing, 0, 1, d.seed)
    n = write_cache(teacher, loader, cfg.train.steps * cfg.train.grad_accum, dcfg.top_k, out,
                    {"teacher": dcfg.teacher, "vocab_size": teacher.cfg.vocab_size, "tokenizer_sha256": tok_sha})
    print(f"wrote {out}: teacher top-{dcfg.top_k} logits of {n} rows x {d.seq_len} tokens "
          f"({cfg.train.steps} updates); distil with --distill.topk_cache {out}", file=sys.stderr)
    return 0


def cmd_lowrank(args: argparse.Namespace) -> int:
    import torch

    from slimlm.compress.calib import calibration_windows, window_perplexity
    from slimlm.compress.lowrank import (LowRankConfig, check_rank, factored_params, input_scales, lowrank,
                                         save_lowrank)
    from slimlm.model.hub import load

    from slimlm.compress.adapters.base import LINEARS

    cfg = LowRankConfig(args.rank, args.energy, args.targets.split(",") if args.targets else list(LINEARS))
    lm = load(args.src)
    model = lm.model.float()
    check_rank(model, cfg)
    if args.threads:
        torch.set_num_threads(args.threads)
    windows = calibration_windows(args.calib, lm.tokenizer, args.calib_tokens, args.seq_len)
    before_params, before_ppl = factored_params(model), window_perplexity(model, windows)
    scales = input_scales(model, windows, cfg.targets) if args.activation_aware else None
    ranks = lowrank(model, cfg, scales)
    after_params, after_ppl = factored_params(model), window_perplexity(model, windows)
    out = save_lowrank(model, ranks, Path(args.dst), lm.tokenizer, lm.generation_config)
    rs = sorted(ranks.values())
    print(f"wrote {out}: {len(ranks)} layers factored (rank {rs[0]}..{rs[-1]}); params {before_params / 1e6:.2f}M -> "
          f"{after_params / 1e6:.2f}M factored; calibration perplexity {before_ppl:.2f} -> {after_ppl:.2f} "
          f"({windows.numel():,} tokens of {args.calib}); recover with `slimlm distill` and distill.lowrank = true",
          file=sys.stderr)
    return 0


def _scoring_model(name: str, data, role: str):
    from slimlm.data.prepare import tokenizer_sha256
    from slimlm.model.hub import load

    lm = load(name)
    if lm.tokenizer is not None and tokenizer_sha256(lm.tokenizer) != data.meta.tokenizer_sha256:
        raise SlimLMError(f"{role} {name} uses another tokenizer than {data.path}; prepare the data with its tokenizer")
    if lm.model.cfg.vocab_size < data.meta.vocab_size:
        raise SlimLMError(f"{role} {name} has {lm.model.cfg.vocab_size} tokens, the data {data.meta.vocab_size}")
    return lm.model.float().eval()


def cmd_select(args: argparse.Namespace) -> int:
    import torch

    from slimlm.compress.select import SelectConfig, choose, doc_logprob, write_selection
    from slimlm.data.tokens import TokenDataset

    cfg = SelectConfig(args.method, args.keep, args.max_tokens, args.seed, args.skip_easiest)
    if cfg.method != "random" and not args.teacher:
        raise SlimLMError(f"--method {cfg.method} needs --teacher (a model with the data's tokenizer)")
    if cfg.method == "miniplm" and not args.reference:
        raise SlimLMError("--method miniplm needs --reference (a small model with the same tokenizer)")
    if Path(args.out).exists():
        raise SlimLMError(f"{args.out} exists; choose a new output folder (selection never overwrites data)")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = TokenDataset(args.data, "train")
    if cfg.method == "random":
        import numpy as np

        scores = np.random.default_rng(cfg.seed).random(data.n_docs)
        kept = choose(scores, cfg.keep)
        meta = write_selection(data, kept, Path(args.out), {"method": "random", "seed": cfg.seed,
                                                            "scores": scores.tolist()})
        print(f"wrote {args.out}: kept {len(kept)} of {data.n_docs} documents ({meta.tokens['train']:,} of "
              f"{data.n_tokens:,} tokens) at random (seed {cfg.seed})", file=sys.stderr)
        return 0
    teacher = _scoring_model(args.teacher, data, "teacher")
    reference = _scoring_model(args.reference, data, "reference") if cfg.method == "miniplm" else None
    scores = doc_logprob(teacher, data, cfg.max_tokens)
    if reference is not None:
        scores = scores - doc_logprob(reference, data, cfg.max_tokens)
    kept = choose(scores, cfg.keep, cfg.skip_easiest if cfg.method == "salt" else 0.0)
    meta = write_selection(data, kept, Path(args.out), {"method": cfg.method, "teacher": args.teacher,
                                                        "reference": args.reference, "scores": scores.tolist()})
    print(f"wrote {args.out}: kept {len(kept)} of {data.n_docs} documents ({meta.tokens['train']:,} of "
          f"{data.n_tokens:,} tokens) by {cfg.method} score {scores[kept].mean():.3f} (all: {scores.mean():.3f})",
          file=sys.stderr)
    return 0


def cmd_draft_bench(args: argparse.Namespace) -> int:
    import torch

    from slimlm.compress.draft_bench import draft_bench

    torch.set_num_threads(args.threads or torch.get_num_threads())
    r = draft_bench(args.target, args.draft, args.k, args.prompt_tokens, args.max_tokens, args.repeats, args.dtype,
                    args.tree)
    print("\n".join(r.lines()))
    return 0


def cmd_rationales(args: argparse.Namespace) -> int:
    from slimlm.compress.rationale import generate_rationales, rationale_prompts, write_rationales
    from slimlm.engine.llm import LLM

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SlimLMError(f"{out} exists and is not empty; choose a new folder")
    task = Path(args.task)
    if not task.is_file():
        from slimlm.eval.data import bigbench_task

        task = bigbench_task(args.task)
    pairs = rationale_prompts(task, args.n, args.seed)
    llm = LLM(args.teacher)
    rationales = generate_rationales(llm, pairs, args.max_tokens)
    label_dir, rat_dir = write_rationales(pairs, rationales, out)
    print(f"wrote {len(pairs)} examples: {label_dir} and {rat_dir}; prepare both with `slimlm data prepare` and "
          f"mix them with data.weights", file=sys.stderr)
    return 0


def cmd_seqkd(args: argparse.Namespace) -> int:
    import time

    import torch

    from slimlm.compress.seqkd import continuation_prompts, generate_continuations, write_documents
    from slimlm.engine.llm import LLM
    from slimlm.model.hub import load

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SlimLMError(f"{out} exists and is not empty; choose a new folder")
    if args.max_tokens < 1 or args.batch < 1:
        raise SlimLMError(f"--max-tokens and --batch must be positive (got {args.max_tokens}, {args.batch})")
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.teacher)
    prompts = continuation_prompts(lm.tokenizer, args.prompts, args.prompt_tokens, args.skip_tokens, args.spacing)
    t0 = time.perf_counter()
    conts = generate_continuations(LLM(lm), prompts, args.max_tokens, args.batch)
    dt = time.perf_counter() - t0
    n = write_documents(lm.tokenizer, prompts, conts, out)
    print(f"wrote {n} documents to {out}: {args.prompt_tokens} prompt + {args.max_tokens} generated tokens each "
          f"({sum(map(len, conts))} generated tokens in {dt:.0f} s); prepare them with `slimlm data prepare {out} "
          f"--tokenizer {args.teacher}` and distil the draft on them", file=sys.stderr)
    return 0


def optimizer_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
               if hasattr(v, "numel") and v.dim() > 0)


def cmd_finetune(args: argparse.Namespace) -> int:
    from slimlm.compress.adapters import METHODS, FinetuneConfig, trainable
    from slimlm.compress.run_config import load_run
    from slimlm.train.presets import count_params
    from slimlm.train.trainer import Trainer

    cfg, fcfg = load_run(args.config, args.overrides, "finetune", FinetuneConfig)
    method = METHODS.get(fcfg.method)(fcfg)
    adapt = method.apply
    if fcfg.new_tokens:
        from slimlm.compress.vocab import fold_new_rows, new_token_ids, train_new_rows

        if not cfg.model.init_from:
            raise SlimLMError("finetune.new_tokens needs model.init_from: a folder made by `slimlm extend-vocab`")
        ids = new_token_ids(cfg.model.init_from)
        adapt = lambda model: (method.apply(model), train_new_rows(model, ids))  # noqa: E731
    trainer = Trainer(cfg, adapt=adapt)
    try:
        n_train, n_all = trainable(trainer.model), count_params(trainer.model)
        per = 2 if cfg.optim.name in ("adamw", "lamb") else 0
        trainer.say(f"slimlm: finetune {fcfg.method}: {n_train:,} trainable of {n_all:,} parameters "
                    f"({100 * n_train / max(n_all, 1):.3f}%); optimizer state {per} fp32 moments per trainable "
                    f"parameter = {per * 4 * n_train / 2**20:.2f} MiB")
        last = trainer.fit()
        if trainer.world.main and trainer.step >= trainer.horizon.total_steps:
            if fcfg.new_tokens:
                fold_new_rows(trainer.model)  # the trained rows back into the weights
            for path in method.export(trainer.model, trainer.out, trainer.tokenizer):
                trainer.say(f"slimlm: wrote {path}")
            trainer.say(f"slimlm: optimizer state measured {optimizer_bytes(trainer.optimizer) / 2**20:.2f} MiB")
    finally:
        trainer.close()
    _finish(trainer, last)
    return 0


def cmd_extend_vocab(args: argparse.Namespace) -> int:
    from slimlm.compress.vocab import VOCAB_FILE, extend
    from slimlm.model.hub import load
    from slimlm.model.weights import save_model_dir

    if (args.tokens is None) == (args.tokens_file is None):
        raise SlimLMError("give exactly one of --tokens or --tokens-file")
    if args.tokens is not None:
        tokens = [t for t in args.tokens.split(",")]
    else:
        f = Path(args.tokens_file)
        if not f.is_file():
            raise SlimLMError(f"--tokens-file {f} does not exist")
        tokens = [t for t in f.read_text().splitlines() if t.strip()]
    lm = load(args.src)
    before = lm.model.cfg.vocab_size
    ids = extend(lm, tokens)
    out = save_model_dir(lm.model, args.dst, lm.tokenizer, lm.generation_config)
    (out / VOCAB_FILE).write_text(json.dumps({"source": str(args.src), "tokens": tokens, "ids": ids}, indent=1))
    print(f"wrote {out}: {len(tokens)} new tokens (ids {min(ids)}..{max(ids)}), vocabulary {before} -> "
          f"{lm.model.cfg.vocab_size} rows; prepare data with --tokenizer {out}, then `slimlm finetune` with "
          "finetune.new_tokens = true", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="Minitron width/depth pruning by activation importance",
                       description="Rank heads, KV groups, neurons, channels and layers by their activations on a "
                                   "calibration set and keep the most important ones (Minitron).")
    p.add_argument("src", help="known model name or HF directory")
    p.add_argument("dst", help="output HF directory")
    p.add_argument("--calib", default="python-stdlib", help="corpus name, file, folder or prepared token folder")
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens")
    p.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    p.add_argument("--hidden", type=int, default=None, help="embedding channels to keep")
    p.add_argument("--intermediate", type=int, default=None, help="MLP neurons to keep per layer")
    p.add_argument("--heads", type=int, default=None, help="query heads to keep per layer")
    p.add_argument("--kv-heads", type=int, default=None, help="KV groups to keep per layer")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--layers", type=int, default=None, help="layers to keep (by block importance)")
    g.add_argument("--drop-layers", type=_int_list, default=None, help="comma-separated layer indices to drop")
    p.add_argument("--random-init", action="store_true",
                   help="write the pruned shape with fresh random weights (the from-scratch baseline)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_prune)

    d = sub.add_parser("distill", help="knowledge distillation: a training run with a teacher",
                       description="Train the student (model.init_from) on the data with a [distill] section: "
                                   "teacher, temperature, kl/lm/hidden weights, teacher_until_step (SALT). "
                                   "Override any key with --section.key value.")
    d.add_argument("config", help="TOML or JSON config ([distill] + the `slimlm train` sections)")
    d.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value ...")
    d.set_defaults(func=cmd_distill)

    dc = sub.add_parser("distill-cache", help="write the teacher's top-k logits for a distillation run to disk",
                        description="Replay the run's data loader for train.steps updates, run the teacher once per "
                                    "row and write its top-k logits to distill.topk_cache; `slimlm distill` then "
                                    "reads them instead of running the teacher.")
    dc.add_argument("config", help="the distillation config ([distill] with top_k and topk_cache)")
    dc.add_argument("--processes", type=int, default=1, help="data-parallel processes of the run (rows of every rank)")
    dc.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value ...")
    dc.set_defaults(func=cmd_distill_cache)

    f = sub.add_parser("finetune", help="parameter-efficient fine-tuning (lora, compacter, norm)",
                       description="Fine-tune model.init_from with a [finetune] section (method, rank, alpha, "
                                   "targets, n, bottleneck, save). Override any key with --section.key value.")
    f.add_argument("config", help="TOML or JSON config ([finetune] + the `slimlm train` sections)")
    f.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="--method lora|compacter|norm (= --finetune.method), --out DIR, --section.key value ...")
    f.set_defaults(func=cmd_finetune)

    ev = sub.add_parser("extend-vocab", help="add tokens of a new domain to a model's tokenizer and embedding",
                        description="Add tokens (e.g. a new token domain) to the tokenizer, grow the embedding/head "
                                    "(new rows start at the mean row) and write a new HF directory; fine-tune it "
                                    "with finetune.new_tokens = true to train the new rows with LoRA.")
    ev.add_argument("src", help="known model name or HF directory")
    ev.add_argument("dst", help="output HF directory (+ extended_vocab.json)")
    ev.add_argument("--tokens", default=None, help="comma-separated new tokens")
    ev.add_argument("--tokens-file", default=None, help="a file with one new token per line")
    ev.set_defaults(func=cmd_extend_vocab)

    lr = sub.add_parser("lowrank", help="PELA: replace linear weights by SVD low-rank factors",
                        description="Factor the linear layers (truncated SVD, optionally activation-aware) at a "
                                    "rank or an energy share; recover with `slimlm distill` (distill.lowrank = true).")
    lr.add_argument("src", help="known model name or HF directory")
    lr.add_argument("dst", help="output HF directory (products + lowrank.json)")
    g = lr.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, default=None, help="rank of every factored layer")
    g.add_argument("--energy", type=float, default=None, help="keep this share of the squared singular values")
    lr.add_argument("--targets", default=None, help="comma-separated module names (default: all seven linears)")
    lr.add_argument("--activation-aware", action="store_true", help="weight the SVD by input-channel activations")
    lr.add_argument("--calib", default="python-stdlib", help="corpus, file, folder or prepared token folder")
    lr.add_argument("--calib-tokens", type=int, default=4096)
    lr.add_argument("--seq-len", type=int, default=256)
    lr.add_argument("--threads", type=int, default=None)
    lr.set_defaults(func=cmd_lowrank)

    se = sub.add_parser("select", help="offline data selection with a teacher (MiniPLM, SALT)",
                        description="Score the documents of a prepared folder with the teacher (and a reference) "
                                    "and write the kept ones as a new prepared folder.")
    se.add_argument("data", help="prepared token folder (its train split is scored)")
    se.add_argument("out", help="new prepared folder for the selection")
    se.add_argument("--teacher", default=None, help="known model name or HF directory (not for --method random)")
    se.add_argument("--reference", default=None, help="miniplm: the small reference model")
    se.add_argument("--method", default="miniplm", help="miniplm, salt or random (the baseline)")
    se.add_argument("--seed", type=int, default=0, help="random: the sample's seed")
    se.add_argument("--keep", type=float, default=0.5, help="share of documents kept")
    se.add_argument("--skip-easiest", type=float, default=0.0, help="salt: share of lowest-loss documents dropped")
    se.add_argument("--max-tokens", type=int, default=512, help="tokens scored per document")
    se.add_argument("--threads", type=int, default=None)
    se.set_defaults(func=cmd_select)

    ra = sub.add_parser("rationales", help="distilling step-by-step: teacher rationales for a labelled task",
                        description="Write [label] and [rationale] documents for a BIG-bench multiple-choice task, "
                                    "the rationales generated by the teacher (greedy, batched).")
    ra.add_argument("task", help="BIG-bench task name or a task.json file")
    ra.add_argument("out", help="new folder: OUT/label and OUT/rationale")
    ra.add_argument("--teacher", default="smollm2-135m-instruct")
    ra.add_argument("--n", type=int, default=64, help="examples")
    ra.add_argument("--max-tokens", type=int, default=64, help="tokens per rationale")
    ra.add_argument("--seed", type=int, default=0, help="which examples, when the task has more than --n")
    ra.set_defaults(func=cmd_rationales)

    sk = sub.add_parser("seqkd", help="sequence-level KD data: the teacher's greedy continuations of stdlib text",
                        description="Cut prompts from the stdlib text past the decode benchmark's prompts and write "
                                    "the teacher's greedy continuations (batched engine), one text file each "
                                    "(DistillSpec: distil a draft on the target's own outputs).")
    sk.add_argument("out", help="new folder of .txt documents")
    sk.add_argument("--teacher", default="smollm2-135m-instruct")
    sk.add_argument("--prompts", type=int, default=256)
    sk.add_argument("--prompt-tokens", type=int, default=128)
    sk.add_argument("--max-tokens", type=int, default=64, help="generated tokens per prompt")
    sk.add_argument("--skip-tokens", type=int, default=40_000, help="stdlib tokens skipped (the benchmark's prompts)")
    sk.add_argument("--spacing", type=int, default=None, help="tokens between prompt starts (default: --prompt-tokens)")
    sk.add_argument("--batch", type=int, default=32, help="prompts per engine call")
    sk.add_argument("--threads", type=int, default=None)
    sk.set_defaults(func=cmd_seqkd)

    db = sub.add_parser("draft-bench", help="batch-1 greedy decode with and without a draft model",
                        description="Acceptance rate, tokens per target step and decode tok/s of the target with "
                                    "and without speculative decoding by DRAFT (interleaved repeats, medians).")
    db.add_argument("draft", help="the draft model's HF directory")
    db.add_argument("--target", default="smollm2-135m-instruct")
    db.add_argument("--k", type=int, default=4, help="draft tokens per step")
    db.add_argument("--tree", action="store_true", help="top-2 branching at the first draft position")
    db.add_argument("--prompt-tokens", type=int, default=128)
    db.add_argument("--max-tokens", type=int, default=64)
    db.add_argument("--repeats", type=int, default=3)
    db.add_argument("--dtype", default="float32")
    db.add_argument("--threads", type=int, default=None)
    db.set_defaults(func=cmd_draft_bench)
