"""Resizing to the model size and back: shapes, aspect ratio, binary masks, round trips."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from busi.data.geometry import Placement, placement_for, to_model, to_original


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def blob(height: int, width: int) -> np.ndarray:
    """An off-centre ellipse covering a good part of the image, {0, 1} uint8."""
    mask = np.zeros((height, width), np.uint8)
    centre = (int(width * 0.45), int(height * 0.55))
    cv2.ellipse(mask, centre, (max(1, width // 4), max(1, height // 5)), 20, 0, 360, 1, -1)
    return mask


SHAPES = [(450, 600), (600, 450), (37, 91), (91, 37), (257, 255), (512, 512)]


@pytest.mark.parametrize("mode", ["letterbox", "stretch"])
@pytest.mark.parametrize("shape", SHAPES)
def test_mask_round_trip_recovers_the_mask(shape: tuple[int, int], mode: str) -> None:
    mask = blob(*shape)
    image = (mask * 200 + 30).astype(np.uint8)
    _, small, placement = to_model(image, mask, size=128, mode=mode)
    back = to_original(small, placement)
    assert back.shape == shape and back.dtype == np.uint8
    assert set(np.unique(back)) <= {0, 1}
    assert dice(back, mask) > 0.97


@pytest.mark.parametrize("mode", ["letterbox", "stretch"])
@pytest.mark.parametrize("shape", SHAPES)
def test_probabilities_are_interpolated_and_thresholded_at_original_size(
    shape: tuple[int, int], mode: str
) -> None:
    mask = blob(*shape)
    _, small, placement = to_model(mask, mask, size=128, mode=mode)
    prob = small.astype(np.float32)[..., np.newaxis]  # (S, S, 1) like the model's output
    back = to_original(prob, placement)
    assert back.shape == (*shape, 1) and back.dtype == np.float32
    assert dice(back[..., 0] > 0.5, mask) > 0.97
    if shape[0] > 128:  # enlarged: linear interpolation leaves soft edges to threshold
        assert np.any((back > 0.05) & (back < 0.95))


def test_letterbox_keeps_aspect_ratio_and_centres_with_zero_padding() -> None:
    image = np.full((450, 600), 255, np.uint8)
    out, _, placement = to_model(image, size=256, mode="letterbox")
    assert placement == Placement(450, 600, 32, 0, 192, 256, 256, 256, "letterbox")
    assert out.shape == (256, 256)
    assert np.all(out[32:224] == 255)
    assert np.all(out[:32] == 0) and np.all(out[224:] == 0)

    tall, _, placement = to_model(np.full((91, 37), 255, np.uint8), size=64)
    assert placement.inner_h == 64 and placement.inner_w == round(37 * 64 / 91)
    rows, cols = np.nonzero(tall)
    assert abs(cols.min() - (63 - cols.max())) <= 1  # centred left/right
    assert abs((cols.max() - cols.min() + 1) / 64 - 37 / 91) < 1 / 64


def test_stretch_fills_the_whole_target() -> None:
    image = np.full((37, 91), 255, np.uint8)
    out, mask, placement = to_model(
        image, np.ones((37, 91), np.uint8), size=(48, 80), mode="stretch"
    )
    assert out.shape == (48, 80) and mask.shape == (48, 80)
    assert np.all(out == 255) and np.all(mask == 1)
    assert (placement.top, placement.left, placement.inner_h, placement.inner_w) == (0, 0, 48, 80)


@pytest.mark.parametrize("shape", [(1, 1), (1, 500), (500, 1), (2, 3), (3, 700)])
@pytest.mark.parametrize("mode", ["letterbox", "stretch"])
def test_degenerate_sizes_still_map_and_come_back(shape: tuple[int, int], mode: str) -> None:
    image = np.full(shape, 200, np.uint8)
    mask = np.ones(shape, np.uint8)
    out, small, placement = to_model(image, mask, size=32, mode=mode)
    assert out.shape == (32, 32) and small.shape == (32, 32)
    assert placement.inner_h >= 1 and placement.inner_w >= 1
    assert small.sum() == placement.inner_h * placement.inner_w  # the whole inner area is mask
    assert np.array_equal(to_original(small, placement), mask)
    assert to_original(small.astype(np.float32), placement).shape == shape


def test_masks_stay_binary_and_aligned_with_their_images() -> None:
    rng = np.random.default_rng(0)
    mask = (cv2.resize(rng.random((9, 13)), (91, 37)) > 0.5).astype(np.uint8)
    image = mask * 255
    out, small, _ = to_model(image, mask, size=64)
    assert set(np.unique(small)) <= {0, 1}
    assert dice(out > 127, small) > 0.95


def test_colour_images_keep_their_channels_and_inputs_are_not_modified() -> None:
    image = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    mask = blob(50, 70)
    image_before, mask_before = image.copy(), mask.copy()
    out, _, _ = to_model(image, mask, size=32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(image, image_before) and np.array_equal(mask, mask_before)


def test_placement_for_matches_to_model() -> None:
    _, _, placement = to_model(np.zeros((91, 37), np.uint8), size=(64, 48))
    assert placement == placement_for(91, 37, (64, 48), "letterbox")


@pytest.mark.parametrize(
    "call",
    [
        lambda: to_model(np.zeros((10, 10), np.uint8), mode="crop"),
        lambda: to_model(np.zeros((10, 10), np.uint8), np.zeros((10, 11), np.uint8)),
        lambda: to_model(np.zeros((0, 10), np.uint8)),
        lambda: to_model(np.zeros((10, 10), np.uint8), size=0),
        lambda: to_model(np.zeros(10, np.uint8)),
        lambda: to_original(np.zeros((32, 32)), placement_for(10, 10, 64)),
    ],
)
def test_bad_input_raises_value_error(call) -> None:
    with pytest.raises(ValueError):
        call()
