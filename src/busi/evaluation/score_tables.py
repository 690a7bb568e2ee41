"""Per-image score tables and their summaries: the figures busi reports, from probability maps
and the truth masks, whoever asks for them.

Apart from run-folder evaluation (:mod:`busi.evaluation.evaluator`, which chooses post-processing on
a run's validation images and writes its results) because a published model scored from its
sidecar (:mod:`busi.evaluation.published`) and the tools score with the same tables and summaries,
and need no run folder for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from busi.data.geometry import Mode
from busi.data.masks import load_truths
from busi.data.splits import LESION_CLASSES, is_lesion
from busi.evaluation import scoring
from busi.evaluation.classification import classification_summary
from busi.evaluation.postprocess_choice import check_lengths
from busi.evaluation.scoring import score_image
from busi.inference.postprocess import PostProcess
from busi.inference.predictor import ImageSize, predict_table
from busi.models import heads

#: Columns of the per-image table.
PER_IMAGE_COLUMNS = [
    "id", "label", "dice", "iou", "precision", "recall", "hd95", "truth_pixels", "pred_pixels",
    "empty_truth", "empty_pred",
]


def score_table(
    table: pd.DataFrame,
    probs: Sequence[np.ndarray],
    postprocess: PostProcess | None = None,
    truths: Sequence[np.ndarray] | None = None,
    labels: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per-image scores of probability maps (or binary masks) against the index rows' masks.

    Args:
        table: index rows (``id``, ``label``, ``image_path``, ``mask_paths``).
        probs: one map per row, at the image's original size
            (:func:`busi.inference.predictor.predict_probabilities`).
        postprocess: how the maps become masks; default :class:`PostProcess`'s defaults.
        truths: the rows' masks if already loaded (:func:`busi.data.masks.load_truths`), to
            avoid re-reading.
        labels: the image-level probabilities ``(N, 3)`` of a model with the head
            (:func:`busi.inference.predictor.predict_table`): the gate of ``postprocess`` reads
            them, and the table gets their columns (``p_normal`` ... ``p_lesion``).

    Returns:
        One row per image with columns :data:`PER_IMAGE_COLUMNS`; conventions for empty masks
        are those of :func:`busi.evaluation.scoring.score_image`. ``empty_pred`` on a lesion image
        is a missed lesion.
    """
    postprocess = postprocess or PostProcess()
    check_lengths(table, probs, truths)
    truths = load_truths(table) if truths is None else truths
    lesion_probs: Sequence[float | None] = [None] * len(table)
    if labels is not None:
        if len(labels) != len(table):
            raise ValueError(f"{len(labels)} image-level predictions for {len(table)} rows")
        lesion_probs = list(heads.lesion_probability(labels))
    records = []
    for row, prob, truth, lesion in zip(table.to_dict("records"), probs, truths, lesion_probs,
                                        strict=True):
        pred = postprocess.apply(prob, lesion)
        if pred.shape != truth.shape:
            raise ValueError(
                f"{row['id']}: prediction of shape {pred.shape} for a mask of shape {truth.shape};"
                " probabilities must be at the original size (predict_probabilities)"
            )
        scores = score_image(truth, pred)
        record = {"id": row["id"], "label": row["label"]}
        record.update({key: scores[key] for key in PER_IMAGE_COLUMNS[2:]})
        records.append(record)
    frame = pd.DataFrame.from_records(records, columns=PER_IMAGE_COLUMNS)
    frame = frame.astype({"empty_truth": bool, "empty_pred": bool})
    if labels is not None:
        probabilities = heads.probability_table(frame["id"], labels).drop(columns="image")
        frame = pd.concat([frame, probabilities.rename(columns={"class": "predicted_class"})],
                          axis=1)
    return frame


def _lesion_summary(frame: pd.DataFrame) -> dict[str, Any]:
    stats = scoring.metric_stats(frame)  # NaN-skipping mean/median/std, counts
    return {
        "n": int(len(frame)),
        "dice_mean": stats["dice_mean"],
        "dice_median": stats["dice_median"],
        "dice_std": stats["dice_std"],
        "iou_mean": stats["iou_mean"],
        "iou_median": stats["iou_median"],
        "precision_mean": stats["precision_mean"],
        "recall_mean": stats["recall_mean"],
        "hd95_median": stats["hd95_median"],
        "hd95_undefined": int(len(frame) - stats["hd95_n"]),
        "missed": int(frame["empty_pred"].astype(bool).sum()),
    }


def summarize(per_image: pd.DataFrame) -> dict[str, Any]:
    """Summary of a :func:`score_table` table, lesion images and normal images apart.

    Returns:
        ``{"lesion": ..., "benign": ..., "malignant": ..., "normal": ...}`` (classes without
        images are left out, ``"lesion"`` is always there: every image that is not normal,
        including a user's unlabelled "lesion" images). Lesion entries hold ``n``, Dice
        mean/median/std, IoU mean/median, mean precision and recall, hd95 median, each over the
        images where the value is finite (NaN if none; ``hd95_undefined`` counts the others), and
        ``missed``, the lesion images with an empty prediction (they count as Dice 0). The normal
        entry holds ``n``, ``false_positives`` (images with any predicted pixel) and
        ``false_positive_rate``; normal images never enter the lesion figures.
    """
    labels = per_image["label"]
    lesion = per_image[is_lesion(labels)]
    summary: dict[str, Any] = {"lesion": _lesion_summary(lesion)}
    for label in LESION_CLASSES:
        if (labels == label).any():
            summary[label] = _lesion_summary(per_image[labels == label])
    if "p_normal" in per_image and labels.isin(heads.CLASSES).all():
        probabilities = per_image[[f"p_{name}" for name in heads.CLASSES]].to_numpy()
        summary["classification"] = classification_summary(labels, probabilities)
    normal = per_image[labels == "normal"]
    if len(normal):
        false_positives = int((~normal["empty_pred"].astype(bool)).sum())
        summary["normal"] = {
            "n": int(len(normal)),
            "false_positives": false_positives,
            "false_positive_rate": false_positives / len(normal),
        }
    return summary


def evaluate_model(
    model: Any,
    table: pd.DataFrame,
    postprocess: PostProcess | None = None,
    image_size: ImageSize | None = None,
    resize: Mode = "letterbox",
    batch_size: int = 8,
    desc: str = "predicting",
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Predict, post-process, score and summarise the images of ``table``.

    Args:
        model: what :func:`busi.inference.predictor.load` returns, or a Keras model or callable (see
            :func:`busi.inference.predictor.predict_images`).
        table: index rows to evaluate.
        postprocess: the settings (e.g. ``PostProcess.from_dict`` of ``postprocess.json``);
            default :class:`PostProcess`'s defaults.
        image_size, resize, batch_size: see :func:`busi.inference.predictor.predict_images`.
        desc: label of the progress bar.

    Returns:
        ``(per_image, summary)`` from :func:`score_table` and :func:`summarize`.
    """
    postprocess = postprocess or PostProcess()
    probs, labels = predict_table(model, table, image_size, resize, batch_size,
                                  tta=postprocess.tta, desc=desc)
    per_image = score_table(table, probs, postprocess, labels=labels)
    return per_image, summarize(per_image)


def summary_record(
    model_path: Path, sha1: str, post: PostProcess, size: Any, mode: str
) -> dict[str, Any]:
    """The head of a ``summary.json`` (weights, input, post-processing, what the figures mean),
    with empty ``splits``: one form for ``busi evaluate`` and the tools that score a published
    model without its run folder."""
    return {
        "model": model_path.name,
        "model_sha1": sha1,
        "image_size": size,
        "resize": mode,
        "postprocess": post.to_dict(),
        "lesion_classes": list(LESION_CLASSES),
        "note": "metrics per image at original resolution; lesion figures over benign + "
                "malignant; normal images only as false-positive rate; post-processing chosen "
                "on val; null = undefined (e.g. hd95 of an empty prediction)",
        "splits": {},
    }


__all__ = ["PER_IMAGE_COLUMNS", "evaluate_model", "score_table", "summarize", "summary_record"]
