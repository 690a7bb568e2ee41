"""busi.evaluation.scoring against hand-computed tiny masks and independent brute-force
references."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

from busi.evaluation import scoring

NAN = float("nan")


def grid(text: str) -> np.ndarray:
    """A mask from rows of '0'/'1' separated by spaces, e.g. '110 010 000'."""
    return np.array([[int(c) for c in row] for row in text.split()], dtype=np.uint8)


# truth, pred, dice, iou, precision, recall, hd95 (computed by hand)
CASES = [
    pytest.param("000 000 000", "000 000 000", 1.0, 1.0, 1.0, 1.0, 0.0, id="both-empty"),
    pytest.param("000 000 000", "010 000 000", 0.0, 0.0, 0.0, NAN, NAN, id="false-positive"),
    pytest.param("000 010 000", "000 000 000", 0.0, 0.0, NAN, 0.0, NAN, id="missed"),
    pytest.param("110 110 000", "110 110 000", 1.0, 1.0, 1.0, 1.0, 0.0, id="identical"),
    # TP=2 FP=1 FN=2: dice 4/7, iou 2/5, precision 2/3, recall 2/4
    pytest.param("110 110 000", "110 001 000", 4 / 7, 2 / 5, 2 / 3, 1 / 2, 1.0, id="partial"),
    # disjoint single pixels (0,0) and (2,2): distance sqrt(8) both ways
    pytest.param("100 000 000", "000 000 001", 0.0, 0.0, 0.0, 0.0, math.sqrt(8), id="disjoint"),
    # 4x4: truth a 2x2 square, prediction the full image. TP=4, FP=12. Every pixel of the
    # 2x2 square is boundary; its distances to the image border ring are 1,1,1,1; the 12
    # border pixels are at 1 (8 of them) or sqrt(2) (4 corners) from the square.
    pytest.param("0000 0110 0110 0000", "1111 1111 1111 1111", 0.4, 0.25, 0.25, 1.0,
                 math.sqrt(2), id="4x4-inside"),
]


@pytest.mark.parametrize("truth, pred, d, j, p, r, h", CASES)
def test_hand_computed(truth, pred, d, j, p, r, h):
    t, q = grid(truth), grid(pred)
    got = [scoring.dice(t, q), scoring.iou(t, q), scoring.precision(t, q),
           scoring.recall(t, q), scoring.hd95(t, q)]
    np.testing.assert_allclose(got, [d, j, p, r, h], equal_nan=True)


def test_4x4_hd95_percentile_of_pooled_distances():
    # 4 distances 1 (square -> ring) + 8 at 1 + 4 at sqrt(2): 95th percentile (linear) over
    # 16 values sorted [1]*12 + [sqrt2]*4 is sqrt(2).
    truth, pred = grid("0000 0110 0110 0000"), np.ones((4, 4))
    assert scoring.hd95(truth, pred) == pytest.approx(math.sqrt(2))


def test_binarised_above_zero_and_any_dtype():
    truth = np.array([[0, 255], [0, 0]], dtype=np.uint8)
    pred = np.array([[0.0, 0.2], [-1.0, 0.0]])
    assert scoring.dice(truth, pred) == 1.0
    assert scoring.dice(truth.astype(bool), pred > 0) == 1.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        scoring.dice(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="shape"):
        scoring.score_image(np.zeros((3, 3)), np.zeros((4, 3)))


def boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixel coordinates, by looking at the 4 neighbours (outside the image = 0)."""
    padded = np.pad(mask, 1)
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return np.argwhere(mask & ~inner)


def brute_force_hd95(truth: np.ndarray, pred: np.ndarray) -> float:
    distances = cdist(boundary(truth), boundary(pred))
    return float(np.percentile(np.concatenate([distances.min(1), distances.min(0)]), 95))


@pytest.mark.parametrize("seed", range(8))
def test_hd95_and_overlap_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(5, 16, size=2))
    # speckled masks: many components and holes, the hard case for boundary extraction
    truth = rng.random(shape) < rng.uniform(0.2, 0.7)
    pred = rng.random(shape) < rng.uniform(0.2, 0.7)
    truth[0, 0] = pred[-1, -1] = True  # never empty
    assert scoring.hd95(truth, pred) == pytest.approx(brute_force_hd95(truth, pred))
    tp = np.sum(truth & pred)
    assert scoring.dice(truth, pred) == pytest.approx(2 * tp / (truth.sum() + pred.sum()))
    assert scoring.iou(truth, pred) == pytest.approx(tp / np.sum(truth | pred))
    assert scoring.precision(truth, pred) == pytest.approx(tp / pred.sum())
    assert scoring.recall(truth, pred) == pytest.approx(tp / truth.sum())


def test_hd95_solid_blobs_against_brute_force():
    # solid shapes: a disc and a shifted rectangle, so interiors are not boundary
    yy, xx = np.mgrid[:20, :24]
    truth = (yy - 9) ** 2 + (xx - 10) ** 2 <= 36
    pred = np.zeros_like(truth)
    pred[5:16, 8:20] = True
    assert scoring.hd95(truth, pred) == pytest.approx(brute_force_hd95(truth, pred))
    assert scoring.hd95(truth, pred) > 1.0


def test_score_image_fields():
    scores = scoring.score_image(grid("110 110 000"), grid("110 001 000"))
    assert set(scoring.METRICS) <= set(scores)
    assert scores["truth_pixels"] == 4 and scores["pred_pixels"] == 3
    assert scores["empty_truth"] is False and scores["empty_pred"] is False
    assert scores["dice"] == pytest.approx(4 / 7)
    empty = scoring.score_image(np.zeros((3, 3)), np.zeros((3, 3)))
    assert empty["empty_truth"] is True and empty["dice"] == 1.0 and empty["hd95"] == 0.0


def test_metric_stats_counts_and_skips_nan():
    rows = [
        scoring.score_image(grid("110 110 000"), grid("110 110 000")),  # perfect
        scoring.score_image(grid("000 010 000"), np.zeros((3, 3))),  # missed
        scoring.score_image(np.zeros((3, 3)), grid("010 000 000")),  # false positive
        scoring.score_image(np.zeros((3, 3)), np.zeros((3, 3))),  # correct normal
    ]
    summary = scoring.metric_stats(pd.DataFrame(rows))
    assert summary["n_images"] == 4
    assert summary["n_empty_truth"] == 2
    assert summary["n_missed"] == 1
    assert summary["n_false_positive"] == 1
    assert summary["dice_mean"] == pytest.approx(0.5)
    assert summary["hd95_n"] == 2 and summary["hd95_mean"] == 0.0
    assert summary["recall_n"] == 3 and summary["recall_mean"] == pytest.approx(2 / 3)
