"""How post-processing is chosen: on validation images only.

:func:`postprocess_grid` scores every candidate :class:`~busi.inference.postprocess.PostProcess`
on the validation images and :func:`select_postprocess` applies the rule; the test images are
then scored once with the choice. Picking any of them on test (a per-image "best threshold",
"maximum IoU") is the classic way BUSI numbers get inflated.

Selection rule: the candidate with the highest mean Dice over the validation *lesion* images
wins; candidates within ``tolerance`` (0.005 Dice by default, below what ~60 validation lesions
can resolve) count as tied, and among them the one with the lowest false-positive rate on the
validation *normal* images wins, then the simplest (no TTA, no component filtering, threshold
nearest 0.5). The simplicity tie-break keeps a small validation set from steering the settings on
noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from busi.data.masks import load_truths
from busi.data.splits import is_lesion
from busi.evaluation.scoring import dice
from busi.inference.postprocess import PostProcess

#: Thresholds tried on validation.
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Connected-component rules tried on validation, simplest first. ``min_component_fraction`` is a
#: fraction of the image's area (0.001 of a 500x600 image is 300 pixels, a ~17x17 speck), so the
#: rule means the same on images of any size.
DEFAULT_COMPONENT_RULES: tuple[dict[str, Any], ...] = (
    {"min_component_fraction": 0.0, "keep_largest": False},
    {"min_component_fraction": 0.001, "keep_largest": False},
    {"min_component_fraction": 0.005, "keep_largest": False},
    {"min_component_fraction": 0.0, "keep_largest": True},
)
#: Mean-Dice differences below this count as ties when choosing post-processing.
DEFAULT_TOLERANCE = 0.005
SELECTION_RULE = (
    "highest mean Dice over the validation lesion images (benign + malignant); candidates within "
    "{tolerance} of the best are tied and the lowest false-positive rate on validation normal "
    "images wins, then the simplest (no TTA, no component filtering, threshold nearest 0.5)"
)
GRID_COLUMNS = ["tta", "threshold", "min_component_fraction", "keep_largest", "lesion_dice",
                "normal_fp_rate", "n_lesion", "n_normal"]


def check_lengths(table: pd.DataFrame, probs: Sequence, truths: Sequence | None) -> None:
    """One probability map (and truth mask, if given) per index row, or a ValueError."""
    if len(probs) != len(table):
        raise ValueError(f"{len(probs)} probability maps for a table of {len(table)} rows")
    if truths is not None and len(truths) != len(table):
        raise ValueError(f"{len(truths)} truth masks for a table of {len(table)} rows")


def postprocess_grid(
    val_table: pd.DataFrame,
    probs: Sequence[np.ndarray],
    probs_tta: Sequence[np.ndarray] | None = None,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    component_rules: Iterable[Mapping[str, Any]] = DEFAULT_COMPONENT_RULES,
    truths: Sequence[np.ndarray] | None = None,
) -> pd.DataFrame:
    """Score every post-processing candidate on the validation images.

    Only Dice (lesion images) and "any pixel predicted" (normal images) are needed here, so the
    costlier hd95 of the full scoring is skipped; the Dice of a non-empty truth has no empty-mask
    convention to get wrong.

    Args:
        val_table: the validation index rows, never test rows.
        probs: plain probability maps of those rows
            (:func:`busi.inference.predictor.predict_probabilities`).
        probs_tta: flip-TTA maps of the same rows; None leaves TTA out of the search.
        thresholds, component_rules: the candidates (see the module defaults).
        truths: the rows' masks if already loaded.

    Returns:
        One row per candidate (:data:`GRID_COLUMNS`): ``tta``, ``threshold``,
        ``min_component_fraction``, ``keep_largest``, ``lesion_dice`` (mean over lesion images),
        ``normal_fp_rate`` (NaN without normal images), ``n_lesion``, ``n_normal``.
    """
    check_lengths(val_table, probs, truths)
    if probs_tta is not None:
        check_lengths(val_table, probs_tta, None)
    truths = load_truths(val_table) if truths is None else truths
    lesion_rows = is_lesion(val_table["label"]).to_numpy()
    is_normal = (val_table["label"] == "normal").to_numpy()
    if not lesion_rows.any():
        raise ValueError("the validation images contain no lesion image to choose a threshold on")
    variants = {False: probs} if probs_tta is None else {False: probs, True: probs_tta}
    thresholds = list(thresholds)
    component_rules = [dict(rule) for rule in component_rules]
    records = []
    for tta, maps in variants.items():
        for threshold in thresholds:
            for rule in component_rules:
                candidate = PostProcess.from_dict({**rule, "threshold": threshold, "tta": tta})
                dices, false_positives = [], []
                for i, (prob, truth) in enumerate(zip(maps, truths, strict=True)):
                    if not (lesion_rows[i] or is_normal[i]):
                        continue
                    pred = candidate.apply(prob)
                    if lesion_rows[i]:
                        dices.append(dice(truth, pred))
                    else:
                        false_positives.append(bool(pred.any()))
                records.append({
                    **candidate.to_dict(),
                    "lesion_dice": float(np.mean(dices)),
                    "normal_fp_rate": float(np.mean(false_positives)) if false_positives
                    else math.nan,
                    "n_lesion": len(dices),
                    "n_normal": len(false_positives),
                })
    return pd.DataFrame.from_records(records, columns=GRID_COLUMNS)


def select_postprocess(grid: pd.DataFrame, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Apply the selection rule (module docstring) to a :func:`postprocess_grid` table.

    Returns:
        The chosen ``threshold``, ``tta``, ``min_component_fraction``, ``keep_largest`` (read it
        with :meth:`PostProcess.from_dict`), its validation ``val_lesion_dice`` and
        ``val_normal_fp_rate`` (None without normals), the validation counts and the rule in
        words: the content of ``postprocess.json`` but for the weights it was chosen for.
    """
    if grid.empty:
        raise ValueError("no post-processing candidates to choose from")
    best = grid["lesion_dice"].max()
    tied = grid[grid["lesion_dice"] >= best - tolerance].copy()
    tied["_fp"] = tied["normal_fp_rate"].fillna(0.0)
    tied["_filtering"] = (tied["min_component_fraction"] > 0) | tied["keep_largest"]
    tied["_distance"] = (tied["threshold"] - 0.5).abs().round(9)
    tied["_minus_dice"] = -tied["lesion_dice"]
    order = ["_fp", "tta", "_filtering", "_distance", "_minus_dice"]
    chosen = tied.sort_values(order, kind="mergesort").iloc[0]
    fp_rate = chosen["normal_fp_rate"]
    return {
        "threshold": float(chosen["threshold"]),
        "tta": bool(chosen["tta"]),
        "min_component_fraction": float(chosen["min_component_fraction"]),
        "keep_largest": bool(chosen["keep_largest"]),
        "val_lesion_dice": float(chosen["lesion_dice"]),
        "val_normal_fp_rate": None if pd.isna(fp_rate) else float(fp_rate),
        "n_val_lesion": int(chosen["n_lesion"]),
        "n_val_normal": int(chosen["n_normal"]),
        "rule": SELECTION_RULE.format(tolerance=tolerance),
    }


__all__ = [
    "DEFAULT_COMPONENT_RULES", "DEFAULT_THRESHOLDS", "DEFAULT_TOLERANCE", "GRID_COLUMNS",
    "check_lengths", "postprocess_grid", "select_postprocess",
]
