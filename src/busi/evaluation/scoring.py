"""Per-image segmentation metrics in NumPy/SciPy: the numbers busi reports come from here.

Metrics are computed per image, on binary masks at the image's original resolution (predictions
are resized back before scoring), then averaged over images, so a large lesion does not outweigh
many small ones as pooled pixel counts would. They are independent of TensorFlow, so the Keras
training metrics (:mod:`busi.models.losses`) cannot leak into the reported results.

Inputs are arrays of the same shape, binarised as ``> 0`` (threshold probability maps first).
With TP, FP, FN the pixel counts of true positives, false positives and false negatives::

    dice = 2 TP / (2 TP + FP + FN)    iou = TP / (TP + FP + FN)
    precision = TP / (TP + FP)        recall = TP / (TP + FN)
    hd95 = 95th percentile of the distances (in pixels) from each boundary pixel of one mask to
           the nearest boundary pixel of the other, both directions pooled (as MedPy's hd95)

Empty masks (BUSI's "normal" images have an empty truth), the convention:

============================  ======  =====  =========  ======  ====
case                          dice    iou    precision  recall  hd95
============================  ======  =====  =========  ======  ====
both empty (correct "none")   1.0     1.0    1.0        1.0     0.0
truth empty, prediction not   0.0     0.0    0.0        NaN     NaN
prediction empty, truth not   0.0     0.0    NaN        0.0     NaN
============================  ======  =====  =========  ======  ====

A ratio with nothing to count is NaN (recall with no lesion, precision with no prediction), and
so is a distance to an empty mask (it would be infinite); averages skip NaN with ``nanmean``,
and :func:`metric_stats` counts missed lesions and false alarms separately so they are not lost.
This follows segmentation-models (an empty prediction of an empty truth scores 1) rather than
nnU-Net (NaN), so that "normal" images reward a model for predicting nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import ndimage


def _binarize(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(
            f"truth and prediction masks differ in shape: {truth.shape} vs {pred.shape} "
            "(resize the prediction to the image's original size first)"
        )
    return truth > 0, pred > 0


def _counts(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    truth, pred = _binarize(truth, pred)
    tp = int(np.count_nonzero(truth & pred))
    return tp, int(np.count_nonzero(pred & ~truth)), int(np.count_nonzero(truth & ~pred))


def _ratio(numerator: int, denominator: int, both_empty: bool) -> float:
    if both_empty:
        return 1.0
    return numerator / denominator if denominator else float("nan")


def dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Dice coefficient 2TP / (2TP + FP + FN); 1.0 if both masks are empty."""
    tp, fp, fn = _counts(truth, pred)
    return _ratio(2 * tp, 2 * tp + fp + fn, tp + fp + fn == 0)


def iou(truth: np.ndarray, pred: np.ndarray) -> float:
    """Intersection over union (Jaccard) TP / (TP + FP + FN); 1.0 if both masks are empty."""
    tp, fp, fn = _counts(truth, pred)
    return _ratio(tp, tp + fp + fn, tp + fp + fn == 0)


def precision(truth: np.ndarray, pred: np.ndarray) -> float:
    """TP / (TP + FP); NaN for an empty prediction of a lesion, 1.0 if both are empty."""
    tp, fp, fn = _counts(truth, pred)
    return _ratio(tp, tp + fp, tp + fp + fn == 0)


def recall(truth: np.ndarray, pred: np.ndarray) -> float:
    """Sensitivity TP / (TP + FN); NaN if the truth is empty but not the prediction."""
    tp, fp, fn = _counts(truth, pred)
    return _ratio(tp, tp + fn, tp + fp + fn == 0)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels: in the mask with a 4-neighbour outside it (or outside the image)."""
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1))


def hd95(truth: np.ndarray, pred: np.ndarray) -> float:
    """95th percentile symmetric Hausdorff distance between the mask boundaries, in pixels.

    0.0 if both masks are empty, NaN if only one is (the distance would be infinite).
    """
    truth, pred = _binarize(truth, pred)
    if not truth.any() and not pred.any():
        return 0.0
    if not truth.any() or not pred.any():
        return float("nan")
    truth_surface, pred_surface = _surface(truth), _surface(pred)
    # Distance of every pixel to the nearest boundary pixel of the other mask.
    to_pred = ndimage.distance_transform_edt(~pred_surface)
    to_truth = ndimage.distance_transform_edt(~truth_surface)
    distances = np.concatenate([to_pred[truth_surface], to_truth[pred_surface]])
    return float(np.percentile(distances, 95))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "dice": dice,
    "iou": iou,
    "precision": precision,
    "recall": recall,
    "hd95": hd95,
}
"""Metric name -> function(truth, pred) -> float; the columns of a per-image score table."""


def score_image(truth: np.ndarray, pred: np.ndarray) -> dict[str, float | int | bool]:
    """All :data:`METRICS` of one image, plus pixel counts and whether truth/prediction are empty.

    ``empty_truth`` marks BUSI's "normal" images; ``empty_pred`` with a non-empty truth is a
    missed lesion (its hd95 is NaN).
    """
    truth_mask, pred_mask = _binarize(truth, pred)
    scores: dict[str, float | int | bool] = {
        name: metric(truth_mask, pred_mask) for name, metric in METRICS.items()
    }
    scores["truth_pixels"] = int(np.count_nonzero(truth_mask))
    scores["pred_pixels"] = int(np.count_nonzero(pred_mask))
    scores["empty_truth"] = scores["truth_pixels"] == 0
    scores["empty_pred"] = scores["pred_pixels"] == 0
    return scores


def metric_stats(table: pd.DataFrame) -> dict[str, float | int]:
    """Mean, median and std (NaN skipped) of each metric column of a per-image table, and counts:
    the statistics :func:`busi.evaluation.score_tables.summarize` reports per class.

    Args:
        table: one row per image with the columns of :func:`score_image`.

    Returns:
        ``{"<metric>_mean", "<metric>_median", "<metric>_std", "<metric>_n"}`` for each metric
        present (``_n`` = images where it is defined), and ``n_images``, ``n_empty_truth``,
        ``n_missed`` (lesion, empty prediction) and ``n_false_positive`` (no lesion, something
        predicted). Missed lesions have hd95 NaN, so read ``hd95_mean`` with ``n_missed``.
    """
    summary: dict[str, float | int] = {"n_images": len(table)}
    for name in METRICS:
        if name not in table:
            continue
        values = table[name].astype(float)
        summary[f"{name}_mean"] = float(values.mean())  # pandas skips NaN
        summary[f"{name}_median"] = float(values.median())
        summary[f"{name}_std"] = float(values.std())
        summary[f"{name}_n"] = int(values.notna().sum())
    if {"truth_pixels", "pred_pixels"} <= set(table.columns):
        lesion = table["truth_pixels"] > 0
        predicted = table["pred_pixels"] > 0
        summary["n_empty_truth"] = int((~lesion).sum())
        summary["n_missed"] = int((lesion & ~predicted).sum())
        summary["n_false_positive"] = int((~lesion & predicted).sum())
    return summary
