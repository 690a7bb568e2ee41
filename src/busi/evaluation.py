"""Evaluation of a trained model the way published BUSI results should be compared.

The protocol, and why:

- **Original resolution.** The model sees a 256x256 letterboxed (or stretched) copy, but the
  delivered mask is at the image's own size, so probabilities are mapped back with
  :func:`busi.data.geometry.to_original` and thresholded *there*; every metric is computed per
  image at original resolution (:func:`busi.scoring.score_image`).
- **Post-processing is chosen on validation only.** The threshold, flip test-time augmentation
  (TTA) and small-component removal are picked on the validation images
  (:func:`postprocess_grid`, :func:`select_postprocess`); the test images are scored once with
  the chosen settings. Picking any of them on test (a per-image "best threshold", "maximum IoU")
  is the classic way BUSI numbers get inflated.
- **Lesion figures as published; normal images apart.** Dice, IoU, ... are averaged over the
  lesion images (benign + malignant) and per class. Normal images have no lesion, so a Dice of 1
  for "predicted nothing" would flatter the mean; they are reported separately as a
  false-positive rate (fraction of normal images with any predicted pixel).

Selection rule (:func:`select_postprocess`): the candidate with the highest mean Dice over the
validation *lesion* images wins; candidates within ``tolerance`` (0.005 Dice by default, below
what ~60 validation lesions can resolve) count as tied, and among them the one with the lowest
false-positive rate on the validation *normal* images wins, then the simplest (no TTA, no
component filtering, threshold nearest 0.5). The simplicity tie-break keeps a small validation
set from steering the settings on noise.

The run-level entry point :func:`evaluate` reads a run folder and writes ``evaluation/``;
:func:`evaluate_model` is the lower level shared by the CLI, notebooks and tests.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from busi import progress
from busi.atomic import atomic_write_text
from busi.data.geometry import Mode, to_model, to_original
from busi.data.masks import load_example, read_image
from busi.data.splits import LESION_CLASSES, is_lesion

log = logging.getLogger(__name__)

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
#: The keys of a post-processing choice that change predictions (postprocess.json holds more).
POSTPROCESS_KEYS = ("threshold", "tta", "min_component_fraction", "keep_largest")
#: Columns of the per-image table.
PER_IMAGE_COLUMNS = [
    "id", "label", "dice", "iou", "precision", "recall", "hd95", "truth_pixels", "pred_pixels",
    "empty_truth", "empty_pred",
]
SELECTION_RULE = (
    "highest mean Dice over the validation lesion images (benign + malignant); candidates within "
    "{tolerance} of the best are tied and the lowest false-positive rate on validation normal "
    "images wins, then the simplest (no TTA, no component filtering, threshold nearest 0.5)"
)


# --------------------------------------------------------------------------- prediction


def model_input_size(model: Any) -> tuple[int, int] | None:
    """``(height, width)`` of a Keras model's fixed input, or None if it has none (or no model)."""
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, list):  # several inputs: not a busi model
        return None
    if shape is None or len(shape) != 4 or shape[1] is None or shape[2] is None:
        return None
    return int(shape[1]), int(shape[2])


def _resolve_size(model: Any, size: int | tuple[int, int] | None) -> int | tuple[int, int]:
    if size is not None:
        return size
    fixed = model_input_size(model)
    if fixed is None:
        raise ValueError(
            "the model has no fixed input size (or is a plain callable): pass size=, the side "
            "the model was trained at"
        )
    return fixed


def _forward(model: Any, batch: np.ndarray) -> np.ndarray:
    """Probabilities ``(B, H, W)`` for a float32 ``(B, H, W, 3)`` batch.

    Keras models go through ``predict_on_batch`` (no progress bar, no per-call retracing); any
    other callable (a fake model in tests, a TF SavedModel signature) is simply called.
    """
    if hasattr(model, "predict_on_batch"):
        out = model.predict_on_batch(batch)
    else:
        out = model(batch)
    out = np.asarray(out, dtype=np.float32)  # float16 output of mixed-precision models, too
    if out.ndim == 4 and out.shape[-1] == 1:
        out = out[..., 0]
    if out.shape != batch.shape[:3]:
        raise ValueError(
            f"the model returned shape {out.shape} for a batch of shape {batch.shape}; expected "
            "one sigmoid channel per pixel, (B, H, W, 1)"
        )
    return out


def _model_batch(images: Sequence[np.ndarray], size: int | tuple[int, int], mode: Mode):
    """Gray images -> float32 ``(B, S, S, 3)`` in [0, 255] (the model input convention)."""
    resized, placements = [], []
    for image in images:
        array, _, placement = to_model(image, size=size, mode=mode)
        resized.append(array)
        placements.append(placement)
    batch = np.stack(resized).astype(np.float32)
    return np.repeat(batch[..., np.newaxis], 3, axis=-1), placements


def predict_images(
    model: Any,
    images: Sequence[np.ndarray],
    size: int | tuple[int, int] | None = None,
    mode: Mode = "letterbox",
    batch_size: int = 8,
    tta: bool = False,
) -> list[np.ndarray]:
    """Probability maps of gray images, each at its image's original size.

    This is the one prediction path of busi (evaluation and :func:`busi.prediction.predict` both
    use it), so delivered masks and scored masks cannot differ.

    Args:
        model: a Keras model (fixed input size, [0, 255] float input, sigmoid output) or any
            callable mapping a float32 ``(B, H, W, 3)`` batch to ``(B, H, W, 1)`` probabilities.
        images: uint8 gray ``(H, W)`` images of any sizes.
        size: model input side or ``(height, width)``; default the model's input size.
        mode: ``"letterbox"`` or ``"stretch"``, as the model was trained.
        batch_size: images per forward pass (TTA doubles the pass).
        tta: also predict the horizontally mirrored image and average the two maps. Mirroring
            is done on the original image (then resized), so the letterbox padding, which is one
            pixel off-centre for odd margins, is identical in both passes.

    Returns:
        One float32 ``(H, W)`` array per image, values in [0, 1].
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = _resolve_size(model, size)
    probs: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        chunk = [np.asarray(image) for image in images[start : start + batch_size]]
        for image in chunk:
            if image.ndim != 2:
                raise ValueError(f"images must be gray (H, W) arrays, got shape {image.shape}")
        if tta:
            chunk = chunk + [image[:, ::-1] for image in chunk]
        batch, placements = _model_batch(chunk, size, mode)
        out = _forward(model, batch)
        maps = [to_original(o, p) for o, p in zip(out, placements, strict=True)]
        if tta:
            half = len(maps) // 2
            maps = [(a + b[:, ::-1]) / 2.0 for a, b in zip(maps[:half], maps[half:], strict=True)]
        probs.extend(np.ascontiguousarray(m, dtype=np.float32) for m in maps)
    return probs


def predict_probabilities(
    model: Any,
    table: pd.DataFrame,
    size: int | tuple[int, int] | None = None,
    mode: Mode = "letterbox",
    batch_size: int = 8,
    tta: bool = False,
    desc: str = "predicting",
) -> list[np.ndarray]:
    """Probability maps of the images of index rows, in row order, at each image's original size.

    See :func:`predict_images` for the arguments; ``desc`` labels the progress bar
    (:mod:`busi.progress`). Images are decoded per batch, so a whole split is never held in
    memory at model size.
    """
    rows = table.to_dict("records")
    probs: list[np.ndarray] = []
    with progress.bar(total=len(rows), desc=desc + (" (with flips)" if tta else "")) as shown:
        for start in range(0, len(rows), batch_size):
            images = [read_image(row["image_path"]) for row in rows[start : start + batch_size]]
            probs.extend(predict_images(model, images, size, mode, batch_size, tta))
            shown.update(len(images))
    return probs


# ------------------------------------------------------------------------ post-processing


def postprocess(
    prob: np.ndarray,
    threshold: float = 0.5,
    min_component_fraction: float = 0.0,
    keep_largest: bool = False,
) -> np.ndarray:
    """Binary mask from a probability map.

    A pixel is lesion if its probability is strictly greater than ``threshold`` (as in
    segmentation-models' metrics). Then, optionally, connected components (8-connected) smaller
    than ``min_component_fraction`` of the image's area are removed (isolated false-positive
    specks, mostly on normal images), and with ``keep_largest`` only the largest remaining
    component is kept (most BUSI images show one lesion; this trades the rare second lesion for
    fewer false positives, so it is only used if validation says so).

    Args:
        prob: ``(H, W)`` or ``(H, W, 1)`` probabilities (a {0, 1} mask works too).
        threshold: in [0, 1].
        min_component_fraction: in [0, 1); 0 keeps every component.
        keep_largest: keep one component only (the first of equal largest ones).

    Returns:
        uint8 ``(H, W)`` mask in {0, 1}.
    """
    prob = np.asarray(prob)
    if prob.ndim == 3 and prob.shape[-1] == 1:
        prob = prob[..., 0]
    if prob.ndim != 2:
        raise ValueError(f"prob must be (H, W) or (H, W, 1), got shape {prob.shape}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if not 0.0 <= min_component_fraction < 1.0:
        raise ValueError(f"min_component_fraction must be in [0, 1), got {min_component_fraction}")
    mask = (prob > threshold).astype(np.uint8)
    if (min_component_fraction > 0 or keep_largest) and mask.any():
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        areas = stats[1:, cv2.CC_STAT_AREA]
        keep = areas >= min_component_fraction * mask.size
        if keep_largest and keep.any():
            largest = int(np.argmax(np.where(keep, areas, -1)))
            keep = np.zeros_like(keep)
            keep[largest] = True
        lookup = np.zeros(count, np.uint8)
        lookup[1:] = keep
        mask = lookup[labels]
    return mask


def postprocess_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`postprocess` arguments in a post-processing choice (``postprocess.json``)."""
    return {
        "threshold": float(params.get("threshold", 0.5)),
        "min_component_fraction": float(params.get("min_component_fraction", 0.0)),
        "keep_largest": bool(params.get("keep_largest", False)),
    }


# ------------------------------------------------------------------------------- scoring


def load_truths(table: pd.DataFrame) -> list[np.ndarray]:
    """Merged ground-truth masks of index rows, at original size ({0, 1} uint8)."""
    return [load_example(row)[1] for row in table.to_dict("records")]


def _check_lengths(table: pd.DataFrame, probs: Sequence, truths: Sequence | None) -> None:
    if len(probs) != len(table):
        raise ValueError(f"{len(probs)} probability maps for a table of {len(table)} rows")
    if truths is not None and len(truths) != len(table):
        raise ValueError(f"{len(truths)} truth masks for a table of {len(table)} rows")


def score_table(
    table: pd.DataFrame,
    probs: Sequence[np.ndarray],
    threshold: float = 0.5,
    min_component_fraction: float = 0.0,
    keep_largest: bool = False,
    truths: Sequence[np.ndarray] | None = None,
) -> pd.DataFrame:
    """Per-image scores of probability maps (or binary masks) against the index rows' masks.

    Args:
        table: index rows (``id``, ``label``, ``image_path``, ``mask_paths``).
        probs: one map per row, at the image's original size (see :func:`predict_probabilities`).
        threshold, min_component_fraction, keep_largest: see :func:`postprocess`.
        truths: the rows' masks if already loaded (:func:`load_truths`), to avoid re-reading.

    Returns:
        One row per image with columns :data:`PER_IMAGE_COLUMNS`; conventions for empty masks
        are those of :func:`busi.scoring.score_image`. ``empty_pred`` on a lesion image is a
        missed lesion.
    """
    from busi.scoring import score_image

    _check_lengths(table, probs, truths)
    truths = load_truths(table) if truths is None else truths
    records = []
    for row, prob, truth in zip(table.to_dict("records"), probs, truths, strict=True):
        pred = postprocess(prob, threshold, min_component_fraction, keep_largest)
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
    return frame.astype({"empty_truth": bool, "empty_pred": bool})


# ------------------------------------------------------------- choosing on validation


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
        probs: plain probability maps of those rows (:func:`predict_probabilities`).
        probs_tta: flip-TTA maps of the same rows; None leaves TTA out of the search.
        thresholds, component_rules: the candidates (see the module defaults).
        truths: the rows' masks if already loaded.

    Returns:
        One row per candidate: ``tta``, ``threshold``, ``min_component_fraction``,
        ``keep_largest``, ``lesion_dice`` (mean over lesion images), ``normal_fp_rate``
        (NaN without normal images), ``n_lesion``, ``n_normal``.
    """
    from busi.scoring import dice

    _check_lengths(val_table, probs, truths)
    if probs_tta is not None:
        _check_lengths(val_table, probs_tta, None)
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
                kwargs = postprocess_kwargs({**rule, "threshold": threshold})
                dices, false_positives = [], []
                for i, (prob, truth) in enumerate(zip(maps, truths, strict=True)):
                    if not (lesion_rows[i] or is_normal[i]):
                        continue
                    pred = postprocess(prob, **kwargs)
                    if lesion_rows[i]:
                        dices.append(dice(truth, pred))
                    else:
                        false_positives.append(bool(pred.any()))
                records.append({
                    "tta": tta,
                    **kwargs,
                    "lesion_dice": float(np.mean(dices)),
                    "normal_fp_rate": float(np.mean(false_positives)) if false_positives
                    else math.nan,
                    "n_lesion": len(dices),
                    "n_normal": len(false_positives),
                })
    columns = ["tta", "threshold", "min_component_fraction", "keep_largest", "lesion_dice",
               "normal_fp_rate", "n_lesion", "n_normal"]
    return pd.DataFrame.from_records(records, columns=columns)


def select_postprocess(grid: pd.DataFrame, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Apply the selection rule (module docstring) to a :func:`postprocess_grid` table.

    Returns:
        The chosen ``threshold``, ``tta``, ``min_component_fraction``, ``keep_largest``, its
        validation ``val_lesion_dice`` and ``val_normal_fp_rate`` (None without normals), the
        validation counts and the rule in words.
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


def choose_postprocess(
    model: Any,
    val_table: pd.DataFrame,
    size: int | tuple[int, int] | None = None,
    mode: Mode = "letterbox",
    batch_size: int = 8,
    try_tta: bool = True,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    component_rules: Iterable[Mapping[str, Any]] = DEFAULT_COMPONENT_RULES,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Choose threshold, flip TTA and component filtering on validation images only.

    It is given the validation rows and nothing else, so test images cannot influence it.
    See :func:`select_postprocess` for the returned dict.
    """
    probs = predict_probabilities(model, val_table, size, mode, batch_size, tta=False)
    probs_tta = (
        predict_probabilities(model, val_table, size, mode, batch_size, tta=True)
        if try_tta else None
    )
    grid = postprocess_grid(val_table, probs, probs_tta, thresholds, component_rules)
    return select_postprocess(grid, tolerance)


# ----------------------------------------------------------------------------- summaries


def _lesion_summary(frame: pd.DataFrame) -> dict[str, Any]:
    from busi import scoring

    stats = scoring.summarize(frame)  # NaN-skipping mean/median/std, counts
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
    postprocess_params: Mapping[str, Any] | None = None,
    size: int | tuple[int, int] | None = None,
    mode: Mode = "letterbox",
    batch_size: int = 8,
    desc: str = "predicting",
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Predict, post-process, score and summarise the images of ``table``.

    Args:
        model: Keras model or callable (see :func:`predict_images`).
        table: index rows to evaluate.
        postprocess_params: ``threshold``, ``tta``, ``min_component_fraction``, ``keep_largest``
            (e.g. from :func:`choose_postprocess` or ``postprocess.json``); missing keys take
            :func:`postprocess`'s defaults, no TTA.
        size, mode, batch_size: see :func:`predict_images`.
        desc: label of the progress bar.

    Returns:
        ``(per_image, summary)`` from :func:`score_table` and :func:`summarize`.
    """
    params = dict(postprocess_params or {})
    probs = predict_probabilities(model, table, size, mode, batch_size,
                                  tta=bool(params.get("tta", False)), desc=desc)
    per_image = score_table(table, probs, **postprocess_kwargs(params))
    return per_image, summarize(per_image)


# ---------------------------------------------------------------------- run folders


def file_sha1(path: str | os.PathLike) -> str:
    """SHA-1 of a file, to tie ``postprocess.json`` to the exact weights it was chosen for."""
    from busi.runs import file_digest

    return file_digest(path, "sha1")


def evaluation_dir(
    run_dir: str | os.PathLike, model_path: str | os.PathLike | None = None,
    dataset: str | None = None,
) -> Path:
    """Where the evaluation of a model goes: ``evaluation/`` for the run's ``best.h5``,
    ``evaluation/<model stem>/`` for any other weights (so evaluating ``last.h5`` does not
    overwrite the results of ``best.h5``).

    ``dataset``: results on a dataset other than the run's first go to ``evaluation-<name>/``
    (the other datasets of a joint run, or a dataset the run never saw); None is the run's first
    dataset, whose folder also holds the post-processing chosen on validation.
    """
    root = Path(run_dir) / ("evaluation" if dataset is None else f"evaluation-{dataset}")
    best = Path(run_dir) / "best.h5"
    if model_path is None or Path(model_path).resolve() == best.resolve():
        return root
    return root / Path(model_path).stem


def _json_ready(value: Any) -> Any:
    """NaN and infinities become null: strict JSON has no NaN."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value


def _write_json(path: Path, values: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(_json_ready(values), indent=2) + "\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); delete it to recompute") from error
    return values if isinstance(values, dict) else None


def postprocess_for(model_path: str | os.PathLike) -> dict[str, Any] | None:
    """The post-processing :func:`evaluate` chose for these weights, or None.

    Looks for the sidecar ``<stem>.json`` of published weights (:mod:`busi.publish`), then
    ``evaluation/postprocess.json`` and ``evaluation/<stem>/postprocess.json`` beside the model
    file, and returns the one recorded for this very file (same SHA-1): settings chosen for other
    weights (e.g. before training resumed) are ignored with a warning. An export
    (``X.int8.tflite``, ``X.bf16.onnx``) is found in the ``exports`` of its weights' sidecar
    ``X.json``, so it keeps the threshold and TTA chosen for them.
    """
    model_path = Path(model_path)
    run_dir = model_path.parent
    names = model_path.name.split(".")
    sidecars = [model_path.with_name(".".join(names[:end]) + ".json")
                for end in range(len(names) - 1, 0, -1)]  # X.int8.json, then X.json
    candidates = [*sidecars,
                  evaluation_dir(run_dir, model_path) / "postprocess.json",
                  run_dir / "evaluation" / "postprocess.json"]
    found = [path for path in dict.fromkeys(candidates) if path.is_file()]
    if not found:
        return None
    sha1 = file_sha1(model_path)
    for path in found:
        values = _read_json(path)
        exported = (values or {}).get("exports", {}).values()  # files made by publish_export
        if values and (values.get("model_sha1") == sha1 or sha1 in exported):
            return values
    log.warning("%s was chosen for other weights than %s; not used", found[0], model_path)
    return None


def summary_for(
    run_dir: str | os.PathLike, model_path: str | os.PathLike | None = None,
    dataset: str | None = None,
) -> dict[str, Any] | None:
    """The ``summary.json`` of these weights (default the run's ``best.h5``), or None if they
    have not been evaluated, or the summary was made for earlier weights (training went on).
    ``dataset``: as in :func:`evaluation_dir`."""
    model_path = Path(model_path) if model_path is not None else Path(run_dir) / "best.h5"
    summary = _read_json(evaluation_dir(run_dir, model_path, dataset) / "summary.json")
    if summary is None or summary.get("model_sha1") != file_sha1(model_path):
        return None
    return summary


def _summary_record(
    model_path: Path, sha1: str, params: Mapping[str, Any], size: Any, mode: str
) -> dict[str, Any]:
    return {
        "model": model_path.name,
        "model_sha1": sha1,
        "image_size": size,
        "resize": mode,
        "postprocess": {key: params[key] for key in POSTPROCESS_KEYS},
        "lesion_classes": list(LESION_CLASSES),
        "note": "metrics per image at original resolution; lesion figures over benign + "
                "malignant; normal images only as false-positive rate; post-processing chosen "
                "on val; null = undefined (e.g. hd95 of an empty prediction)",
        "splits": {},
    }


def evaluate(
    run_dir: str | os.PathLike,
    split: str = "test",
    model_path: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    batch_size: int | None = None,
    rechoose: bool = False,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run's model on one part of its split, with post-processing chosen on val.

    Reads ``config.json`` (image size, resize mode, dataset) and ``split.csv`` of the run, takes
    the same images training used (:func:`busi.training.prepare_data`, which also checks the
    dataset fingerprint against ``env.json``), and loads ``best.h5`` unless ``model_path`` is
    given. Post-processing is chosen on the validation images and saved as
    ``postprocess.json`` (plus the whole candidate table, ``postprocess_grid.csv``); a saved
    choice is reused if it was made for the same weights (SHA-1) and ``rechoose`` is False.

    Writes (atomically) into :func:`evaluation_dir`: ``per_image_val.csv``,
    ``per_image_<split>.csv`` and ``summary.json`` (summaries of the evaluated parts; parts
    evaluated earlier with the same weights and post-processing are kept).

    Args:
        run_dir: the run folder.
        split: "test" (default), "val" or "train".
        model_path: weights to evaluate; default the run's ``best.h5``.
        data: dataset root, if not where the run's config says.
        batch_size: prediction batch size; default the run's.
        rechoose: choose post-processing again even if a matching choice is saved.
        dataset: which dataset's results to return (default the run's first). A joint run
            chooses post-processing on all its val parts together and writes each dataset's
            results apart (:func:`evaluation_dir`). A dataset the run was not trained on is
            evaluated with :func:`busi.cross_dataset.evaluate_dataset` (``split`` "all" or
            "test"; ``data`` is then that dataset's folder).

    Returns:
        The content of ``summary.json``: model, post-processing, dataset, and per part the
        :func:`summarize` dict.
    """
    from busi.runs import RunFolder

    run = RunFolder(Path(run_dir))
    if not run.config.is_file():
        raise FileNotFoundError(f"{run.config}: not a run folder (no config.json)")
    with run.lock("evaluation"):  # one writer: not while the run trains or is published
        return _evaluate(run, split, model_path, data, batch_size, rechoose, dataset)


def _evaluate(
    run: Any, split: str, model_path: str | os.PathLike | None,
    data: str | os.PathLike | None, batch_size: int | None, rechoose: bool,
    dataset: str | None,
) -> dict[str, Any]:
    """:func:`evaluate` with the run folder's lock held."""
    from busi import weights
    from busi.config import TrainConfig
    from busi.training import prepare_data

    config = TrainConfig.load(run.config)
    if dataset is not None and dataset not in config.datasets:
        from busi.cross_dataset import evaluate_dataset

        return evaluate_dataset(run.root, dataset, split, model_path, data, batch_size)
    if split not in ("train", "val", "test"):
        hint = (" ('all' scores a whole dataset the run did not train on: give it with "
                "--dataset)" if split == "all" else "")
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}{hint}")
    if data is not None:  # the folder of the dataset asked for (default the run's first)
        name = dataset or config.datasets[0]
        config = config.replace(data_paths={**config.data_paths, name: str(data)})
    model_path = Path(model_path) if model_path is not None else run.best
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: model file not found")
    parts = prepare_data(config, run)
    size, mode = config.image_size, config.resize
    batch_size = batch_size or config.batch_size
    out_dir = evaluation_dir(run.root, model_path)
    sha1 = file_sha1(model_path)
    model = weights.load_for_inference(model_path)

    val_table = parts["val"]
    val_truths = load_truths(val_table)
    saved = None if rechoose else _read_json(out_dir / "postprocess.json")
    if saved is not None and not set(POSTPROCESS_KEYS) <= set(saved):
        raise ValueError(
            f"{out_dir / 'postprocess.json'}: lacks some of {list(POSTPROCESS_KEYS)}; fix it or "
            "delete it to choose again"
        )
    if saved is not None and saved.get("model_sha1") != sha1:
        log.info("%s was chosen for other weights; choosing again", out_dir / "postprocess.json")
        saved = None
    variants = (False, True) if saved is None else (bool(saved["tta"]),)
    val_probs = {
        tta: predict_probabilities(model, val_table, size, mode, batch_size, tta, desc="val")
        for tta in variants
    }
    if saved is None:
        grid = postprocess_grid(val_table, val_probs[False], val_probs[True], truths=val_truths)
        params = {
            **select_postprocess(grid),
            "chosen_on": "val", "model": model_path.name, "model_sha1": sha1,
            "image_size": size, "resize": mode,
        }
        atomic_write_text(out_dir / "postprocess_grid.csv", grid.to_csv(index=False))
        _write_json(out_dir / "postprocess.json", params)
        log.info("post-processing chosen on val: %s", {k: params[k] for k in POSTPROCESS_KEYS})
    else:
        params = saved

    kwargs = postprocess_kwargs(params)
    per_image = {"val": score_table(val_table, val_probs[bool(params["tta"])], **kwargs,
                                    truths=val_truths)}
    if split != "val":
        per_image[split], _ = evaluate_model(model, parts[split], params, size, mode, batch_size,
                                             desc=split)

    # Each dataset of a joint run is reported apart (never one pooled figure that hides one);
    # the first goes to evaluation/, the others to evaluation-<name>/.
    records = {}
    for position, name in enumerate(config.datasets):
        folder = evaluation_dir(run.root, model_path, None if position == 0 else name)
        frames = per_image
        if len(config.datasets) > 1:
            frames = {part: frame[frame["id"].isin(_ids_of(parts[part], name))]
                      .reset_index(drop=True) for part, frame in per_image.items()}
        records[name] = _write_summary(folder, frames, model_path, sha1, params, size, mode,
                                       name)
    return records[dataset or config.datasets[0]]


def _ids_of(rows: pd.DataFrame, dataset: str) -> pd.Series:
    return rows.loc[rows["dataset"] == dataset, "id"]


def _write_summary(
    out_dir: Path, per_image: Mapping[str, pd.DataFrame], model_path: Path, sha1: str,
    params: Mapping[str, Any], size: Any, mode: str, dataset: str,
) -> dict[str, Any]:
    """Write ``per_image_<part>.csv`` and ``summary.json`` into ``out_dir``; parts evaluated
    earlier with the same weights and post-processing are kept in the summary."""
    record = _summary_record(model_path, sha1, params, size, mode)
    record["dataset"] = dataset
    previous = _read_json(out_dir / "summary.json")
    if previous and all(previous.get(k) == record[k] for k in ("model_sha1", "postprocess")):
        record["splits"].update(previous.get("splits", {}))
    for name, frame in per_image.items():
        atomic_write_text(out_dir / f"per_image_{name}.csv", frame.to_csv(index=False))
        record["splits"][name] = summarize(frame)
    record = _json_ready(record)
    _write_json(out_dir / "summary.json", record)
    return record


__all__ = [
    "DEFAULT_COMPONENT_RULES", "DEFAULT_THRESHOLDS", "choose_postprocess", "evaluate",
    "evaluate_model", "evaluation_dir", "file_sha1", "load_truths", "model_input_size",
    "postprocess", "postprocess_for",
    "postprocess_grid", "predict_images", "predict_probabilities", "score_table",
    "select_postprocess", "summarize",
]
