"""Model compression: passes that take a model and return a smaller or cheaper one.

    calib.py       calibration token windows from any corpus, file, folder or prepared token folder
    importance.py  Minitron activation importance of heads, KV groups, neurons, channels and layers
    prune.py       width + depth pruning to target sizes (PruneConfig), HF-loadable output
    distill.py     knowledge distillation objective (KL with temperature, hidden-state loss) for the trainer
    adapters/      parameter-efficient fine-tuning methods by name (lora, compacter, norm)
    lowrank.py     PELA: linear weights replaced by SVD low-rank factors
    miniplm.py     MiniPLM difference sampling: teacher-vs-reference log-likelihood gap selection
    cli.py         `slimlm prune`, `slimlm distill`, `slimlm finetune`, `slimlm lowrank`, `slimlm select`
"""
