"""Post-processing: from a probability map to the delivered mask, and how its settings are chosen.

:class:`PostProcess` holds the settings (threshold, flip TTA, small-component removal, keep the
largest component) and their defaults, once: evaluation, ``busi predict``, the run's figures and
published sidecars all read and write it, so a mask scored and a mask delivered come from the
same rule. Its dict form (:meth:`PostProcess.to_dict`) is what ``postprocess.json``, the
``postprocess`` entry of ``summary.json`` and weight sidecars hold.

**The settings are chosen on validation only.** :func:`postprocess_grid` scores every candidate
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

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pandas as pd

from busi.data.masks import load_truths
from busi.data.splits import is_lesion

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


@dataclass(frozen=True)
class PostProcess:
    """How a probability map becomes a mask; the defaults are what an unevaluated model gets.

    Attributes:
        threshold: a pixel is lesion if its probability is strictly greater (as in
            segmentation-models' metrics); in [0, 1].
        tta: predict the mirrored image too and average the maps. It acts at prediction time
            (:func:`busi.inference.predict_images`), so :meth:`apply` does not see it.
        min_component_fraction: connected components (8-connected) smaller than this fraction
            of the image's area are removed (isolated false-positive specks, mostly on normal
            images); in [0, 1), 0 keeps every component.
        keep_largest: keep only the largest remaining component (the first of equal largest
            ones). Most BUSI images show one lesion; this trades the rare second lesion for fewer
            false positives, so it is only used if validation says so.
        gate: an image whose lesion probability (from the model's image-level head,
            :mod:`busi.heads`) is below this gets an empty mask; in [0, 1], 0 is no gate. Chosen
            on validation by :func:`busi.classification.choose_gate`.
    """

    threshold: float = 0.5
    tta: bool = False
    min_component_fraction: float = 0.0
    keep_largest: bool = False
    gate: float = 0.0

    def __post_init__(self) -> None:
        # the types JSON gives back are the types written: 1 and 1.0 are one threshold
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "tta", bool(self.tta))
        object.__setattr__(self, "min_component_fraction", float(self.min_component_fraction))
        object.__setattr__(self, "keep_largest", bool(self.keep_largest))
        object.__setattr__(self, "gate", float(self.gate))
        if not 0.0 <= self.gate <= 1.0:
            raise ValueError(f"gate must be in [0, 1], got {self.gate}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.min_component_fraction < 1.0:
            raise ValueError(
                f"min_component_fraction must be in [0, 1), got {self.min_component_fraction}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The keys of the dict form, in the order files hold them."""
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def required_keys(cls) -> tuple[str, ...]:
        """The keys a saved choice must hold: all but ``gate``, which records made before the
        image-level head lack (no gate, the default)."""
        return tuple(key for key in cls.keys() if key != "gate")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> PostProcess:
        """The settings in ``postprocess.json``, a summary's ``postprocess`` or a sidecar: other
        keys there (the weights' SHA-1, validation scores, ...) are ignored, missing ones take
        the defaults; None is the defaults."""
        values = values or {}
        return cls(**{key: values[key] for key in cls.keys() if key in values})

    def to_dict(self) -> dict[str, Any]:
        """``{"threshold", "tta", "min_component_fraction", "keep_largest"}``, as files hold it,
        and ``gate`` when one is set: the records of models without the image-level head stay
        as they were, and compare equal to those written before the gate existed."""
        values = dataclasses.asdict(self)
        if not self.gate:
            del values["gate"]
        return values

    def override(self, **changes: Any) -> PostProcess:
        """A copy with the settings given changed; None leaves a setting as it is (an option
        the user did not set keeps the value chosen on validation)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def apply(self, prob: np.ndarray, lesion_probability: float | None = None) -> np.ndarray:
        """uint8 ``(H, W)`` mask in {0, 1} of a ``(H, W)`` or ``(H, W, 1)`` probability map (a
        {0, 1} mask works too); with a ``gate``, empty when the image's ``lesion_probability``
        (required then) is below it."""
        prob = np.asarray(prob)
        if prob.ndim == 3 and prob.shape[-1] == 1:
            prob = prob[..., 0]
        if prob.ndim != 2:
            raise ValueError(f"prob must be (H, W) or (H, W, 1), got shape {prob.shape}")
        if self.gate > 0:
            if lesion_probability is None:
                raise ValueError(f"gate {self.gate} set, but no lesion probability given: the "
                                 "gate needs a model with the image-level head")
            if lesion_probability < self.gate:
                return np.zeros(prob.shape, np.uint8)
        mask = (prob > self.threshold).astype(np.uint8)
        if (self.min_component_fraction > 0 or self.keep_largest) and mask.any():
            count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            areas = stats[1:, cv2.CC_STAT_AREA]
            keep = areas >= self.min_component_fraction * mask.size
            if self.keep_largest and keep.any():
                largest = int(np.argmax(np.where(keep, areas, -1)))
                keep = np.zeros_like(keep)
                keep[largest] = True
            lookup = np.zeros(count, np.uint8)
            lookup[1:] = keep
            mask = lookup[labels]
        return mask


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
            (:func:`busi.inference.predict_probabilities`).
        probs_tta: flip-TTA maps of the same rows; None leaves TTA out of the search.
        thresholds, component_rules: the candidates (see the module defaults).
        truths: the rows' masks if already loaded.

    Returns:
        One row per candidate (:data:`GRID_COLUMNS`): ``tta``, ``threshold``,
        ``min_component_fraction``, ``keep_largest``, ``lesion_dice`` (mean over lesion images),
        ``normal_fp_rate`` (NaN without normal images), ``n_lesion``, ``n_normal``.
    """
    from busi.scoring import dice

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
    "PostProcess", "check_lengths", "postprocess_grid", "select_postprocess",
]
