"""Figures: built without a display, returned, saved as PNG when asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from busi.data.masks import load_example
from busi.evaluation import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def titles(figure: Figure) -> list[str]:
    return [ax.get_title() for ax in figure.axes if ax.get_title()]


def shown_ids(figure: Figure) -> list[str]:
    """Image ids from titles "id (label)" (ids themselves look like "benign (3)")."""
    return [title.split("\n")[0].rsplit(" (", 1)[0] for title in titles(figure)]


@pytest.fixture(scope="module")
def truths(busi_table: pd.DataFrame) -> list[np.ndarray]:
    return [load_example(row)[1] for row in busi_table.to_dict("records")]


def test_sample_grid_shows_n_images_with_ids(busi_table: pd.DataFrame, tmp_path: Path) -> None:
    path = tmp_path / "figures" / "samples.png"
    figure = plots.sample_grid(busi_table, n=6, seed=1, path=path)
    assert isinstance(figure, Figure) and is_png(path)
    shown = titles(figure)
    assert len(shown) == 6
    ids = set(busi_table["id"])
    assert set(shown_ids(figure)) <= ids
    assert titles(plots.sample_grid(busi_table, n=6, seed=1)) == shown  # seeded
    assert not list(path.parent.glob(".*"))  # no temporary file left


def test_overlay_draws_truth_and_prediction(busi_table: pd.DataFrame, truths) -> None:
    row = busi_table.iloc[0]
    image, _ = load_example(row)
    truth = truths[0]
    figure = plots.overlay(image, truth=truth, pred=np.roll(truth, 3, axis=1), title="x")
    ax = figure.axes[0]
    assert len(ax.images) == 1
    colours = {tuple(np.round(c.get_edgecolor()[0][:3], 2)) for c in ax.collections}
    assert colours == {(0.0, 1.0, 0.0), (1.0, 0.0, 0.0)}  # lime truth, red prediction
    empty = plots.overlay(image, truth=np.zeros_like(truth))  # no warning, no contour
    assert not empty.axes[0].collections


def test_overlays_accepts_probabilities_aligned_or_by_id(
    busi_table: pd.DataFrame, truths, tmp_path: Path
) -> None:
    probs = [t.astype(np.float32) * 0.8 for t in truths]
    ids = list(busi_table["id"].iloc[[2, 0]])
    figure = plots.overlays(busi_table, probs, ids=ids, path=tmp_path / "o.png")
    assert shown_ids(figure) == ids and is_png(tmp_path / "o.png")
    by_id = dict(zip(busi_table["id"], probs, strict=True))
    assert titles(plots.overlays(busi_table, by_id, ids=ids)) == titles(figure)
    with pytest.raises(ValueError, match="predictions"):
        plots.overlays(busi_table, probs[:2])
    with pytest.raises(ValueError, match="no image"):
        plots.overlays(busi_table, probs, ids=["nope"])


def test_training_curves_from_csv(tmp_path: Path) -> None:
    history = pd.DataFrame({
        "epoch": [1, 2, 3], "loss": [1.0, 0.8, 0.7], "iou_score": [0.2, 0.4, 0.5],
        "f1-score": [0.3, 0.5, 0.6], "val_loss": [1.1, 0.9, 0.95],
        "val_iou_score": [0.1, 0.35, 0.3], "val_f1-score": [0.2, 0.45, 0.4],
        "lr": [1e-4] * 3, "seconds": [1.0] * 3,
    })
    csv = tmp_path / "history.csv"
    history.to_csv(csv, index=False)
    figure = plots.training_curves(csv, path=tmp_path / "curves.png")
    assert titles(figure) == ["loss", "iou_score", "f1-score"] and is_png(tmp_path / "curves.png")
    lines = figure.axes[1].get_lines()
    assert [list(line.get_ydata()) for line in lines[:2]] == [[0.2, 0.4, 0.5], [0.1, 0.35, 0.3]]
    assert list(lines[2].get_xdata()) == [2, 2]  # best val_iou_score: epoch 2, as in history.csv
    with pytest.raises(ValueError, match="columns"):
        plots.training_curves(pd.DataFrame({"epoch": [1]}))


def test_curves_of_one_epoch_have_whole_epoch_ticks() -> None:
    figure = plots.training_curves(pd.DataFrame({"epoch": [1], "loss": [0.5], "val_loss": [0.6]}))
    ax = figure.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [tick for tick in ax.get_xticks() if lo <= tick <= hi]
    assert 1 in ticks and all(float(tick).is_integer() for tick in ticks), ticks


def test_worst_cases_shows_lowest_dice_lesions(
    busi_table: pd.DataFrame, truths, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    per_image = busi_table[["id", "label"]].assign(dice=rng.random(len(busi_table)))
    per_image.loc[per_image["label"] == "normal", "dice"] = 0.0  # must be ignored
    lesions = per_image[per_image["label"] != "normal"].sort_values("dice")
    figure = plots.worst_cases(per_image, busi_table, truths, n=4, path=tmp_path / "w.png")
    assert shown_ids(figure) == list(lesions["id"].head(4)) and is_png(tmp_path / "w.png")
    assert f"Dice {lesions['dice'].iloc[0]:.2f}" in titles(figure)[0]


def test_side_by_side_has_a_row_per_image_and_a_column_per_model(
    busi_table: pd.DataFrame, truths, tmp_path: Path
) -> None:
    empty = [np.zeros_like(t) for t in truths]
    ids = list(busi_table["id"].iloc[[3, 1]])
    figure = plots.side_by_side(busi_table, {"A": truths, "B": empty}, ids,
                                scores={"A": {ids[0]: 1.0}}, path=tmp_path / "s.png")
    assert is_png(tmp_path / "s.png")
    assert titles(figure) == [f"A: {ids[0]}, Dice 1.00", f"B: {ids[0]}", f"A: {ids[1]}",
                              f"B: {ids[1]}"]
    red = [[c for c in ax.collections if tuple(c.get_edgecolor()[0][:3]) == (1.0, 0.0, 0.0)]
           for ax in figure.axes]
    assert [len(r) > 0 for r in red] == [True, False, True, False]  # B predicted nothing
    with pytest.raises(ValueError, match="no image or prediction"):
        plots.side_by_side(busi_table, {"A": {ids[0]: truths[3]}}, ids)
