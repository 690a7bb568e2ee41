"""Would a gate that also reads the mask keep normal images cleaner than the head alone?

Out of fold, on a ``busi cv`` folder of a head config: each fold's model predicts its own
validation part (images it never trained on) with the post-processing its evaluation chose; per
image we keep the head's lesion probability and what the mask says (its largest probability, the
mean probability inside it, its area). A logistic regression of "lesion image" on those is fitted
on two folds' images and scores the third's (cross-fitted, so no image is scored by a fit that
saw it). For each score, gates that put 80-97% of the normal images below them show how many
normal images keep a mask and what lesion Dice the gating costs
(:func:`busi.evaluation.classification.gate_curve`: a gated lesion image scores Dice 0).

    python tools/gate_mask_features.py runs/lite0-40ep-head-cpu-cv   # ~1.5 min on 2 cores

Prints the two tables; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from busi.data.masks import load_truths
from busi.data.run_parts import run_parts, with_data
from busi.evaluation.classification import gate_curve
from busi.evaluation.scoring import dice
from busi.inference.predictor import predict_table
from busi.inference.run_models import open_run_model
from busi.models import heads
from busi.runs.folder import RunFolder

NORMAL_QUANTILES = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97)
"""Gates placed at these quantiles of the normal images' scores (the same share of normal images
below the gate for both scores, so the rows compare like with like)."""


def fold_features(run: RunFolder) -> pd.DataFrame:
    """One row per validation image of a fold run: label, Dice of the ungated mask, the head's
    lesion probability and the mask's features."""
    config = with_data(run, None, None)
    rows = run_parts(run, config)["val"]
    model = open_run_model(run)
    post = model.settings.record.postprocess.override(gate=0.0)
    probs, labels = predict_table(model, rows, config.image_size, config.resize,
                                  config.batch_size, post.tta, desc=run.root.name)
    records = []
    for prob, truth, label, p_lesion in zip(probs, load_truths(rows), rows["label"],
                                            heads.lesion_probability(labels), strict=True):
        mask = post.apply(prob).astype(bool)
        records.append({
            "fold": run.root.name, "label": label, "lesion": label != "normal",
            "dice": dice(truth, mask) if truth.any() else np.nan, "empty_pred": not mask.any(),
            "p_lesion": float(p_lesion), "max_prob": float(prob.max()),
            "mean_prob_in_mask": float(prob[mask].mean()) if mask.any() else 0.0,
            "log_area": float(np.log(mask.mean() + 1e-4)),
        })
    return pd.DataFrame(records)


def cross_fitted(frame: pd.DataFrame) -> np.ndarray:
    """P(lesion image) from the head's logit and the mask's features, each fold's images scored
    by a fit on the other folds'."""
    p = frame["p_lesion"].clip(1e-6, 1 - 1e-6)
    features = np.column_stack([np.log(p / (1 - p)), frame["max_prob"],
                                frame["mean_prob_in_mask"], frame["log_area"]])
    target = frame["lesion"].to_numpy(int)
    score = np.zeros(len(frame))
    for fold in frame["fold"].unique():
        held = (frame["fold"] == fold).to_numpy()
        fit = LogisticRegression(max_iter=1000).fit(features[~held], target[~held])
        score[held] = fit.predict_proba(features[held])[:, 1]
    return score


def curve(frame: pd.DataFrame, score: np.ndarray) -> pd.DataFrame:
    """Normal images masked and lesion Dice lost at gates on ``score`` placed at
    :data:`NORMAL_QUANTILES` of the normal images' scores."""
    normal = ~frame["lesion"].to_numpy()
    gates = [float(np.quantile(score[normal], quantile)) for quantile in NORMAL_QUANTILES]
    table = gate_curve(frame, score, gates)
    ungated = frame.loc[frame["lesion"], "dice"].mean()
    return pd.DataFrame({"normal share below": NORMAL_QUANTILES, "gate": table["gate"].round(4),
                         "normal images masked": table["normal_fp"],
                         "lesion Dice cost": (ungated - table["lesion_dice"]).round(4)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cv_folder", type=Path, help="runs/NAME-cv of a head config")
    args = parser.parse_args(argv)
    folds = sorted(path.parent for path in args.cv_folder.glob("*-fold*/best.h5"))
    if not folds:
        print(f"{args.cv_folder}: no fold runs with best.h5", file=sys.stderr)
        return 2
    frame = pd.concat([fold_features(RunFolder(fold)) for fold in folds], ignore_index=True)
    combined = cross_fitted(frame)
    lesion = frame["lesion"].to_numpy(int)
    print(f"{len(frame)} out-of-fold images ({lesion.sum()} lesion, {len(frame) - lesion.sum()} "
          f"normal; {int((~frame['lesion'] & ~frame['empty_pred']).sum())} normal images masked "
          "ungated)")
    for name, score in (("head alone", frame["p_lesion"].to_numpy()),
                        ("head + mask features", combined)):
        print(f"\n{name}: lesion-vs-normal AUC {roc_auc_score(lesion, score):.3f}")
        print(curve(frame, score).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
