"""Scores of the image-level head (:mod:`busi.models.heads`), and the gate it puts on the mask.

Two questions, scored apart because they are asked of different images: *is there a lesion*
(lesion-vs-normal AUC over all images) and *is it malignant* (benign-vs-malignant AUC over the
lesion images, from P(malignant | lesion), so that the normal class does not enter it). Accuracy
and the confusion matrix are of the three-class answer. Each figure comes with a percentile
bootstrap 95% interval over images: BUSI's test part has ~27 normal and ~40 malignant images,
so an AUC moves by a few hundredths with the draw, and a figure without its interval invites
comparisons it cannot carry.

**The gate.** An image whose lesion probability is below ``gate`` gets an empty mask
(:meth:`busi.inference.postprocess.PostProcess.apply`). Gating only ever empties a mask, so its
effect on every image follows from the ungated per-image scores: a gated lesion image scores Dice 0
(a missed lesion), a gated normal image is no false positive. :func:`gate_curve` uses this to
score every threshold without predicting again; :func:`choose_gate` picks one on validation,
or on a cross-validation's out-of-fold predictions (:func:`pool_gate_curves`), where every normal
image of train+val votes (BUSI: ~100, against the 13 of one run's validation part).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from busi.data.splits import is_lesion
from busi.evaluation.scoring import score_image
from busi.models.heads import CLASSES, lesion_probability, malignancy_probability

GATE_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * step, 2) for step in range(20))
"""Lesion-probability thresholds tried on validation (0 = no gate)."""

GATE_TOLERANCE = 0.005
"""Lesion-Dice loss on validation that a gate may cost (the post-processing tie width: below
what ~60 validation lesions resolve)."""

GATE_COLUMNS = ("gate", "lesion_dice", "lesions_gated", "normal_fp", "n_lesion", "n_normal")
"""The columns of a :func:`gate_curve` table (and of ``gate_<part>.csv``)."""

BOOTSTRAP_DRAWS = 2000
"""Bootstrap resamples per interval: the 2.5% and 97.5% percentiles then move by < 0.005 AUC
between seeds on BUSI's test part."""

_SCORED = ("dice", "iou", "precision", "recall", "hd95", "pred_pixels", "empty_pred")


def _empty_prediction(truth_pixels: int) -> dict[str, Any]:
    """The scores of an empty mask on an image with that many truth pixels, as
    :func:`busi.evaluation.scoring.score_image` gives them (one convention for gated and ungated
    masks)."""
    truth = np.zeros((2, 2), np.uint8)
    truth.flat[:truth_pixels] = 1
    scores = score_image(truth, np.zeros_like(truth))
    return {key: scores[key] for key in _SCORED}


def gated(per_image: pd.DataFrame, p_lesion: Sequence[float], gate: float) -> pd.DataFrame:
    """``per_image`` scores (:func:`busi.evaluation.score_tables.score_table`, ungated) as the gate
    at ``gate`` leaves them: a gated image scores as an empty prediction does, a missed lesion on
    a lesion image and a correct "nothing" on an image without one."""
    below = np.asarray(p_lesion, dtype=float) < gate
    if len(below) != len(per_image):
        raise ValueError(f"{len(below)} lesion probabilities for {len(per_image)} images")
    frame = per_image.copy()
    empty_truth = frame["empty_truth"].astype(bool).to_numpy() if "empty_truth" in frame else \
        (frame["label"] == "normal").to_numpy()
    for rows, values in ((below & ~empty_truth, _empty_prediction(1)),
                         (below & empty_truth, _empty_prediction(0))):
        for column, value in values.items():
            if column in frame:
                frame.loc[rows, column] = value
    return frame


def gate_curve(per_image: pd.DataFrame, p_lesion: Sequence[float],
               thresholds: Sequence[float] = GATE_THRESHOLDS) -> pd.DataFrame:
    """Mean lesion Dice and normal-image false positives at each gate threshold."""
    labels = per_image["label"]
    lesion, normal = is_lesion(labels).to_numpy(), (labels == "normal").to_numpy()
    rows = []
    for gate in thresholds:
        frame = gated(per_image, p_lesion, gate)
        rows.append({
            "gate": float(gate),
            "lesion_dice": float(frame.loc[lesion, "dice"].mean()) if lesion.any() else np.nan,
            "lesions_gated": int((np.asarray(p_lesion)[lesion] < gate).sum()),
            "normal_fp": int((~frame.loc[normal, "empty_pred"].astype(bool)).sum()),
            "n_lesion": int(lesion.sum()), "n_normal": int(normal.sum()),
        })
    return pd.DataFrame(rows, columns=list(GATE_COLUMNS))


def choose_gate(curve: pd.DataFrame, tolerance: float = GATE_TOLERANCE) -> float:
    """The gate chosen on a validation :func:`gate_curve`: among thresholds whose lesion Dice
    is within ``tolerance`` of the ungated one, the fewest normal false positives, then the
    lowest threshold (the least gating that reaches them)."""
    ungated = float(curve.loc[curve["gate"] == curve["gate"].min(), "lesion_dice"].iloc[0])
    allowed = curve[curve["lesion_dice"] >= ungated - tolerance]
    if not np.isfinite(ungated) or allowed.empty:  # no lesion to weigh the cost on: no gate
        return 0.0
    best = allowed[allowed["normal_fp"] == allowed["normal_fp"].min()]
    return float(best["gate"].min())


def pool_gate_curves(curves: Sequence[pd.DataFrame], sources: Sequence[Any] = ()) -> pd.DataFrame:
    """One :func:`gate_curve` from curves of disjoint image sets (a cross-validation's folds):
    lesion Dice weighted by each set's lesion images, counts summed, which is the curve of all
    the images together. ``sources`` names the curves in errors (e.g. their files).

    Raises:
        ValueError: no curves, a table that is not a gate curve, or curves of other thresholds
            than the first.
    """
    if not curves:
        raise ValueError("no gate curves to pool")
    names = list(sources) or [f"curve {k}" for k in range(len(curves))]
    for curve, name in zip(curves, names, strict=True):
        missing = [column for column in GATE_COLUMNS if column not in curve]
        if missing:
            raise ValueError(f"{name}: not a gate curve (no {missing} columns)")
        if not np.array_equal(curve["gate"].to_numpy(), curves[0]["gate"].to_numpy()):
            raise ValueError(f"{name}: other gate thresholds than {names[0]}")
        if (curve["lesion_dice"].isna() & (curve["n_lesion"] > 0)).any():
            raise ValueError(f"{name}: no lesion Dice where it counts lesion images")
    gates = curves[0]["gate"].to_numpy()
    n_lesion = sum(curve["n_lesion"].to_numpy() for curve in curves)
    dice = sum(curve["lesion_dice"].fillna(0.0).to_numpy() * curve["n_lesion"].to_numpy()
               for curve in curves)  # NaN only where no lesion image weighs it
    with np.errstate(invalid="ignore", divide="ignore"):
        lesion_dice = np.where(n_lesion > 0, dice / np.maximum(n_lesion, 1), np.nan)
    return pd.DataFrame({
        "gate": gates.astype(float), "lesion_dice": lesion_dice,
        **{column: sum(curve[column].to_numpy() for curve in curves).astype(int)
           for column in ("lesions_gated", "normal_fp")},
        "n_lesion": n_lesion.astype(int),
        "n_normal": sum(curve["n_normal"].to_numpy() for curve in curves).astype(int),
    })


def _interval(values: list[float]) -> list[float]:
    finite = np.asarray([v for v in values if np.isfinite(v)])
    if not len(finite):
        return [float("nan"), float("nan")]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def _auc(truth: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(truth, score)) if len(np.unique(truth)) == 2 else float("nan")


def _figures(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    truth = np.array([CLASSES.index(label) for label in labels])
    lesion = truth > 0
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(truth, predicted, labels=range(len(CLASSES)))
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = matrix / matrix.sum(axis=1, keepdims=True)
    return {
        "lesion_vs_normal_auc": _auc(lesion.astype(int), lesion_probability(probabilities)),
        "benign_vs_malignant_auc": _auc((truth[lesion] == 2).astype(int),
                                        malignancy_probability(probabilities[lesion])),
        "accuracy": float((predicted == truth).mean()),
        "confusion": matrix, "confusion_rates": rates,
    }


def classification_summary(labels: Sequence[str], probabilities: np.ndarray,
                           draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> dict[str, Any]:
    """AUCs, accuracy and confusion matrix of head outputs (N, 3) against the images' labels,
    each with a percentile bootstrap 95% interval over images (``draws`` resamples).

    The confusion matrix is counted (rows: truth, columns: answer, in :data:`CLASSES` order);
    its interval is of each row-normalised rate. A figure undefined on the images given (no
    normal image: no lesion-vs-normal AUC) is NaN, as are resamples where it is undefined.
    """
    labels = np.asarray(labels, dtype=str)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(labels), len(CLASSES)):
        raise ValueError(f"probabilities of shape {probabilities.shape} for {len(labels)} "
                         f"images; expected ({len(labels)}, {len(CLASSES)})")
    unknown = sorted(set(labels) - set(CLASSES))
    if unknown:
        raise ValueError(f"labels {unknown} are not among {list(CLASSES)}")
    point = _figures(labels, probabilities)
    rng = np.random.default_rng(seed)
    samples: dict[str, list] = {key: [] for key in point}
    for _ in range(draws):
        pick = rng.integers(0, len(labels), len(labels))
        with np.errstate(invalid="ignore", divide="ignore"):
            figures = _figures(labels[pick], probabilities[pick])
        for key, value in figures.items():
            samples[key].append(value)
    summary: dict[str, Any] = {"n": int(len(labels)), "classes": list(CLASSES),
                               "bootstrap_draws": draws, "interval": "percentile 95%"}
    for key in ("lesion_vs_normal_auc", "benign_vs_malignant_auc", "accuracy"):
        summary[key] = point[key]
        summary[f"{key}_ci"] = _interval(samples[key])
    summary["confusion"] = point["confusion"].tolist()
    stacked = np.stack(samples["confusion_rates"])
    with warnings.catch_warnings():  # a class absent from every resample: NaN, as documented
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        summary["confusion_rates"] = np.round(point["confusion_rates"], 4).tolist()
        summary["confusion_rates_ci"] = np.stack([
            np.nanpercentile(stacked, 2.5, axis=0), np.nanpercentile(stacked, 97.5, axis=0),
        ], axis=-1).round(4).tolist()
    return summary


def roc_points(labels: Sequence[str], probabilities: np.ndarray) -> dict[str, pd.DataFrame]:
    """ROC curves of the two questions: ``{"lesion_vs_normal": ..., "benign_vs_malignant":
    ...}``, each a table of false- and true-positive rates (for the plots)."""
    labels = np.asarray(labels, dtype=str)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    lesion = labels != "normal"
    curves = {}
    pairs = {
        "lesion_vs_normal": (lesion.astype(int), lesion_probability(probabilities)),
        "benign_vs_malignant": ((labels[lesion] == "malignant").astype(int),
                                malignancy_probability(probabilities[lesion])),
    }
    for name, (truth, score) in pairs.items():
        if len(np.unique(truth)) == 2:
            fpr, tpr, _ = roc_curve(truth, score)
            curves[name] = pd.DataFrame({"fpr": fpr, "tpr": tpr})
    return curves


__all__ = ["GATE_COLUMNS", "GATE_THRESHOLDS", "choose_gate", "classification_summary",
           "gate_curve", "gated", "pool_gate_curves", "roc_points"]
