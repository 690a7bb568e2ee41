"""Figures for notebooks and run folders: samples, overlays, training curves, worst cases.

Figures are built with :class:`matplotlib.figure.Figure` directly, not ``pyplot``: no GUI
backend is needed (headless servers, CI), nothing accumulates in pyplot's global figure list
when many figures are made, and Jupyter still displays a returned Figure. Every function returns
its Figure and, given ``path``, also saves it (atomically, format from the suffix).

Colours: ground truth green, prediction red, drawn as contours so the echo texture under both
stays visible.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from busi.data.masks import load_example
from busi.data.splits import is_lesion
from busi.inference.postprocess import PostProcess
from busi.models.losses import METRIC_NAMES
from busi.utils.atomic import atomic_path

TRUTH_COLOUR = "lime"
PRED_COLOUR = "red"
CURVE_METRICS = ("loss", *METRIC_NAMES)

Preds = Sequence[np.ndarray] | Mapping[str, np.ndarray]


def save(figure: Figure, path: str | os.PathLike | None, dpi: int = 120) -> Figure:
    """Save ``figure`` to ``path`` atomically (no-op for None) and return it."""
    if path is not None:
        path = Path(path)
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi,
                           bbox_inches="tight")
    return figure


def _grid(count: int, ncols: int, cell: float = 3.0) -> tuple[Figure, list[Axes]]:
    ncols = max(1, min(ncols, count))
    nrows = max(1, math.ceil(count / ncols))
    figure = Figure(figsize=(cell * ncols, cell * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[count:]:
        ax.set_axis_off()
    return figure, axes[:count]


def _contour(ax: Axes, mask: np.ndarray | None, colour: str) -> None:
    if mask is None:
        return
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.any():  # matplotlib warns about contours of a constant array
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=1.2)


def draw(ax: Axes, image: np.ndarray, truth: np.ndarray | None = None,
         pred: np.ndarray | None = None, title: str | None = None) -> Axes:
    """Draw a gray image with truth (green) and prediction (red) contours on ``ax``."""
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    _contour(ax, truth, TRUTH_COLOUR)
    _contour(ax, pred, PRED_COLOUR)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def overlay(image: np.ndarray, truth: np.ndarray | None = None, pred: np.ndarray | None = None,
            title: str | None = None, path: str | os.PathLike | None = None) -> Figure:
    """One image with its ground truth (green) and/or prediction (red) contours."""
    figure = Figure(figsize=(4, 4), layout="constrained")
    draw(figure.subplots(), image, truth, pred, title)
    return save(figure, path)


def _binary(pred: np.ndarray, threshold: float) -> np.ndarray:
    """Masks pass through; probability maps are thresholded like evaluation does."""
    return PostProcess(threshold=threshold).apply(pred)


def _by_id(table: pd.DataFrame, preds: Preds) -> Mapping[str, np.ndarray]:
    if isinstance(preds, Mapping):
        return preds
    if len(preds) != len(table):
        raise ValueError(f"{len(preds)} predictions for a table of {len(table)} rows")
    return dict(zip(table["id"], preds, strict=True))


def sample_grid(table: pd.DataFrame, n: int = 8, seed: int = 0, ncols: int = 4,
                path: str | os.PathLike | None = None) -> Figure:
    """``n`` images drawn at random (seeded) with their merged mask contours; title id + label."""
    if len(table) == 0:
        raise ValueError("sample_grid: the table has no rows")
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(table), size=min(n, len(table)), replace=False))
    rows = table.iloc[picks].to_dict("records")
    figure, axes = _grid(len(rows), ncols)
    for ax, row in zip(axes, rows, strict=True):
        image, mask = load_example(row)
        draw(ax, image, truth=mask, title=f"{row['id']} ({row['label']})")
    return save(figure, path)


def overlays(table: pd.DataFrame, preds: Preds, ids: Sequence[str] | None = None,
             ncols: int = 4, threshold: float = PostProcess.threshold,
             titles: Mapping[str, str] | None = None,
             path: str | os.PathLike | None = None) -> Figure:
    """Images of ``table`` with truth (green) and prediction (red) contours.

    Args:
        table: index rows.
        preds: masks or probability maps at original size, aligned with ``table``'s rows or
            keyed by id; probabilities are thresholded at ``threshold``.
        ids: which images, in this order; default all rows (keep it to a dozen or so).
        titles: optional title per id; default "id (label)".
    """
    by_id = _by_id(table, preds)
    rows = table.set_index("id", drop=False)
    ids = list(rows.index if ids is None else ids)
    missing = [i for i in ids if i not in rows.index or i not in by_id]
    if missing:
        raise ValueError(f"no image or prediction for id(s) {missing[:5]}")
    if not ids:
        raise ValueError("overlays: no images to show")
    figure, axes = _grid(len(ids), ncols)
    for ax, image_id in zip(axes, ids, strict=True):
        row = rows.loc[image_id]
        image, mask = load_example(row)
        title = (titles or {}).get(image_id, f"{image_id} ({row['label']})")
        draw(ax, image, mask, _binary(by_id[image_id], threshold), title)
    return save(figure, path)


def training_curves(history: pd.DataFrame | str | os.PathLike,
                    path: str | os.PathLike | None = None, kept: int | None = None) -> Figure:
    """Loss, IoU and F1 (Dice) per epoch, training vs validation, from ``history.csv``.

    The dashed line marks the epoch of ``best.h5``: ``kept`` if given (a run with ``keep:
    last``), else the epoch with the best ``val_iou_score``.
    """
    frame = history if isinstance(history, pd.DataFrame) else pd.read_csv(history)
    metrics = [m for m in CURVE_METRICS if m in frame or f"val_{m}" in frame]
    if frame.empty or not metrics:
        raise ValueError(f"history has none of the columns {list(CURVE_METRICS)} (or no rows)")
    epochs = frame["epoch"] if "epoch" in frame else pd.Series(range(1, len(frame) + 1))
    best = kept
    if best is None and "val_iou_score" in frame and frame["val_iou_score"].notna().any():
        best = epochs.iloc[int(np.nanargmax(frame["val_iou_score"].to_numpy(float)))]
    figure = Figure(figsize=(4.2 * len(metrics), 3.4), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        for column, label in ((metric, "train"), (f"val_{metric}", "val")):
            if column in frame:
                ax.plot(epochs, frame[column], marker=".", label=label)
        if best is not None:
            ax.axvline(best, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        if len(epochs) == 1:  # a single point would get a range of 0.96 to 1.04
            ax.set_xlim(epochs.iloc[0] - 1, epochs.iloc[0] + 1)
        ax.grid(alpha=0.3)
        ax.legend()
    return save(figure, path)


def worst_cases(per_image: pd.DataFrame, table: pd.DataFrame, preds: Preds, n: int = 6,
                ncols: int = 3, threshold: float = PostProcess.threshold,
                path: str | os.PathLike | None = None) -> Figure:
    """The ``n`` lesion images with the lowest Dice, with truth and prediction contours.

    Looking at the failures (missed lesions, shadows taken for lesions) says more about a model
    than its mean Dice. Normal images are left out: their Dice is 1 or 0 by convention.

    Args:
        per_image: the table of :func:`busi.evaluation.score_tables.score_table` for these
        predictions. table: index rows of the same images.
        preds: as for :func:`overlays`.
    """
    lesions = per_image[is_lesion(per_image["label"])]
    worst = lesions.sort_values("dice", kind="mergesort").head(n)
    if worst.empty:
        raise ValueError("worst_cases: no lesion images in per_image")
    titles = {
        row.id: f"{row.id} ({row.label})\nDice {row.dice:.2f}"
        for row in worst.itertuples(index=False)
    }
    return overlays(table, preds, ids=list(worst["id"]), ncols=ncols, threshold=threshold,
                    titles=titles, path=path)


__all__ = ["draw", "overlay", "overlays", "sample_grid", "save", "training_curves",
           "worst_cases"]


def side_by_side(table: pd.DataFrame, predictions: Mapping[str, Preds], ids: Sequence[str],
                 threshold: float = PostProcess.threshold,
                 scores: Mapping[str, Mapping[str, float]] | None = None,
                 path: str | os.PathLike | None = None) -> Figure:
    """One row per image, one column per model: truth (green) and each model's prediction (red),
    so two models' failures on the same image can be told apart (a BUSI model and a joint model
    on BUS-BRA, say).

    Args:
        table: index rows holding ``ids``.
        predictions: ``{model name: preds}``, preds as for :func:`overlays`.
        ids: the images, in this order.
        scores: optional ``{model name: {id: Dice}}`` added to the titles.
    """
    rows = table.set_index("id", drop=False)
    by_model = {name: _by_id(table, preds) for name, preds in predictions.items()}
    missing = [i for i in ids if i not in rows.index
               or any(i not in preds for preds in by_model.values())]
    if missing:
        raise ValueError(f"no image or prediction for id(s) {missing[:5]}")
    if not ids or not by_model:
        raise ValueError("side_by_side: no images or no models to show")
    figure = Figure(figsize=(3.0 * len(by_model), 3.0 * len(ids)), layout="constrained")
    axes = figure.subplots(len(ids), len(by_model), squeeze=False)
    for row_axes, image_id in zip(axes, ids, strict=True):
        image, mask = load_example(rows.loc[image_id])
        for ax, (name, preds) in zip(row_axes, by_model.items(), strict=True):
            score = (scores or {}).get(name, {}).get(image_id)
            title = f"{name}: {image_id}" + ("" if score is None else f", Dice {score:.2f}")
            draw(ax, image, mask, _binary(preds[image_id], threshold), title)
    return save(figure, path)


def gate_curves(curves: Mapping[str, pd.DataFrame], chosen: float | None = None,
                path: str | os.PathLike | None = None) -> Figure:
    """Lesion Dice and normal-image false positives across gate thresholds
    (:func:`busi.evaluation.classification.gate_curve`), one line per part (``{"val": ..., "test":
    ...}``), the chosen threshold marked: what the gate costs in Dice for what it saves."""
    figure = Figure(figsize=(9, 3.5), layout="constrained")
    dice_ax, fp_ax = figure.subplots(1, 2)
    for part, curve in curves.items():
        dice_ax.plot(curve["gate"], curve["lesion_dice"], marker=".", label=part)
        fp_ax.plot(curve["gate"], curve["normal_fp"] / curve["n_normal"].clip(lower=1),
                   marker=".", label=part)
    for ax, title in ((dice_ax, "lesion Dice (mean)"), (fp_ax, "normal images masked")):
        if chosen is not None:
            ax.axvline(chosen, color="grey", linestyle="--", label=f"chosen {chosen:g}")
        ax.set_xlabel("gate: lesion probability threshold")
        ax.set_title(title)
        ax.legend()
    return save(figure, path)


def roc_curves(curves: Mapping[str, pd.DataFrame], aucs: Mapping[str, float] | None = None,
               path: str | os.PathLike | None = None) -> Figure:
    """ROC curves of the image-level head (:func:`busi.evaluation.classification.roc_points`):
    lesion vs normal and benign vs malignant, side by side, AUCs in the titles."""
    figure, axes = _grid(max(1, len(curves)), 2, cell=3.6)
    for ax, (name, curve) in zip(axes, curves.items(), strict=False):
        ax.plot(curve["fpr"], curve["tpr"], color="tab:blue")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        auc = (aucs or {}).get(name)
        ax.set_title(name.replace("_", " ") + (f" (AUC {auc:.3f})" if auc is not None else ""))
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_aspect("equal")
    return save(figure, path)
