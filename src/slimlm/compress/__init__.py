"""Model compression: passes that take a model and return a smaller or cheaper one.

    calib.py        calibration token windows from any corpus, file, folder or prepared token folder
    importance.py   Minitron activation importance of heads, KV groups, neurons, channels and layers
    prune.py        width + depth pruning to target sizes (PruneConfig), HF-loadable output
    distill.py      knowledge distillation objective (KL with temperature, hidden-state loss) for the trainer
    run_config.py   a `slimlm train` config plus one section of this package ([distill], [finetune])
    adapters/       parameter-efficient fine-tuning methods by name (lora, compacter, norm)
    lowrank.py      PELA: linear weights replaced by SVD low-rank factors
    select.py       MiniPLM difference sampling and SALT learnable-example selection
    rationale.py    distilling step-by-step: teacher rationales as a second target
    draft_bench.py  a draft model's acceptance and decode speed-up with the target
    cli.py          `slimlm prune | distill | finetune | lowrank | select | rationales | draft-bench`
"""
