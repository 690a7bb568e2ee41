"""Score averages of several models' probability maps on their shared split (a what-if check).

Each argument is a weights file inside a run folder (``runs/NAME/best.h5``); all runs must share
one split. Probabilities are averaged per image at the original resolution, post-processing is
chosen on validation as ``busi evaluate`` does, and the test lesion scores are printed for every
single model and every combination of two or more. Nothing is written.

    BUSI_DATA=/path/to/BUSI python tools/ensemble_eval.py runs/a/best.h5 runs/b/best.h5 ...
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

import busi  # noqa: F401  (sets up Keras before TensorFlow is touched)
from busi.data.masks import load_truths
from busi.data.run_parts import run_parts
from busi.evaluation.postprocess_choice import postprocess_grid, select_postprocess
from busi.evaluation.score_tables import score_table, summarize
from busi.inference.postprocess import PostProcess
from busi.inference.predictor import predict_probabilities
from busi.inference.run_models import open_run_model
from busi.runs.folder import RunFolder


def _probabilities(model_path: Path, parts: dict) -> dict:
    run = RunFolder(model_path.parent)
    config = run.load_config()
    model = open_run_model(run, model_path)
    return {(split, tta): predict_probabilities(model, parts[split], config.image_size,
                                                config.resize, config.batch_size, tta)
            for split in ("val", "test") for tta in (False, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+", type=Path)
    parser.add_argument("--max-members", type=int, default=3)
    args = parser.parse_args()
    runs = [RunFolder(path.parent) for path in args.weights]
    splits = {run.root: run.split.read_bytes() for run in runs}
    if len(set(splits.values())) != 1:
        raise SystemExit(f"the runs do not share one split.csv: {sorted(map(str, splits))}")
    parts = run_parts(runs[0])
    truths = {split: load_truths(parts[split]) for split in ("val", "test")}
    probs = {path: _probabilities(path, parts) for path in args.weights}

    def mean(members, split, tta):
        per_model = [probs[m][(split, tta)] for m in members]
        return [np.mean(maps, axis=0) for maps in zip(*per_model, strict=True)]

    print("members | val lesion Dice | test lesion Dice mean / median | missed | normal FP")
    for size in range(1, min(args.max_members, len(args.weights)) + 1):
        for members in itertools.combinations(args.weights, size):
            grid = postprocess_grid(parts["val"], mean(members, "val", False),
                                    mean(members, "val", True), truths=truths["val"])
            post = PostProcess.from_dict(select_postprocess(grid))
            scores = {split: summarize(score_table(
                parts[split], mean(members, split, post.tta), post, truths=truths[split]))
                for split in ("val", "test")}
            test = scores["test"]["lesion"]
            print(f"{' + '.join(map(str, members))} | {scores['val']['lesion']['dice_mean']:.3f} | "
                  f"{test['dice_mean']:.3f} / {test['dice_median']:.3f} | {test['missed']} | "
                  f"{scores['test']['normal']['false_positives']}", flush=True)


if __name__ == "__main__":
    main()
