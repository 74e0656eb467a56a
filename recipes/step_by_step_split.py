"""Split a BIG-bench multiple-choice task into disjoint train / test task.json files for the
distilling step-by-step recipe (recipes/step-by-step-smollm2.toml):

    python recipes/step_by_step_split.py TASK OUT [--train 64] [--test 100] [--seed 0]

OUT/train.json: the examples the teacher explains (`slimlm rationales OUT/train.json ...`);
OUT/test.json: held-out examples whose task_prefix carries the "[label] " marker the label
documents were trained with, so `slimlm eval mc --task-json OUT/test.json` asks the fine-tuned
student the way it was taught (the base model gets the same prompt).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from slimlm.eval.data import bigbench_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task")
    p.add_argument("out")
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    task = json.loads(bigbench_task(a.task).read_text(encoding="utf-8"))
    examples = [ex for ex in task["examples"] if ex.get("target_scores") and len(ex["target_scores"]) > 1]
    if a.train + a.test > len(examples):
        raise SystemExit(f"{a.task} has {len(examples)} multiple-choice examples, fewer than {a.train} + {a.test}")
    random.Random(a.seed).shuffle(examples)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps({**task, "examples": examples[: a.train]}))
    test = {**task, "examples": examples[a.train : a.train + a.test],
            "task_prefix": "[label] " + task.get("task_prefix", "")}
    (out / "test.json").write_text(json.dumps(test))
    print(f"wrote {out}/train.json ({a.train}) and {out}/test.json ({a.test}) of {len(examples)} examples")


if __name__ == "__main__":
    main()
