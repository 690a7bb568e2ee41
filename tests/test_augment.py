"""Augmentation: masks stay binary and aligned with the image, seeds decide everything."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from busi.data.augment import AugmentConfig, augment

SIZE = 64
GEOMETRY_ONLY = AugmentConfig(intensity=False, speckle=False)
NOTHING = AugmentConfig(
    flip_horizontal=False, flip_vertical=False, affine=False, intensity=False, speckle=False
)


def square_pair() -> tuple[np.ndarray, np.ndarray]:
    """A bright square (200) on a dark background (20), and its mask."""
    mask = np.zeros((SIZE, SIZE, 1), np.uint8)
    mask[20:44, 24:40] = 1
    image = np.where(mask > 0, 200, 20).astype(np.uint8)
    return image, mask


def asymmetric_pair() -> tuple[np.ndarray, np.ndarray]:
    """An L-shaped lesion in the upper left, so flips of either kind are recognisable."""
    mask = np.zeros((SIZE, SIZE, 1), np.uint8)
    mask[5:30, 5:12] = 1
    mask[23:30, 5:25] = 1
    return (mask * 255).astype(np.uint8), mask


def run(image, mask, seed, config=None) -> tuple[np.ndarray, np.ndarray]:
    out_image, out_mask = augment(image, mask, tf.constant(seed, tf.int64), config)
    return out_image.numpy(), out_mask.numpy()


SEEDS = [(0, i) for i in range(12)]


@pytest.mark.parametrize("config", [AugmentConfig(), GEOMETRY_ONLY])
def test_values_and_shapes_stay_valid(config: AugmentConfig) -> None:
    image, mask = square_pair()
    for seed in SEEDS:
        out_image, out_mask = run(image, mask, seed, config)
        assert out_image.shape == image.shape and out_image.dtype == np.float32
        assert out_mask.shape == mask.shape and out_mask.dtype == np.uint8
        assert set(np.unique(out_mask)) <= {0, 1}
        assert out_image.min() >= 0.0 and out_image.max() <= 255.0


def test_float_masks_also_stay_exactly_binary() -> None:
    image, mask = square_pair()
    _, out_mask = run(image.astype(np.float32), mask.astype(np.float32), (3, 4))
    assert out_mask.dtype == np.float32 and set(np.unique(out_mask)) <= {0.0, 1.0}


def test_same_seed_same_output_different_seed_different_output() -> None:
    image, mask = square_pair()
    first = run(image, mask, (7, 11))
    again = run(image, mask, (7, 11))
    other = run(image, mask, (7, 12))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("config", [AugmentConfig(), GEOMETRY_ONLY])
def test_image_and_mask_move_together(config: AugmentConfig) -> None:
    image, mask = square_pair()
    moved = 0
    for seed in SEEDS:
        out_image, out_mask = run(image, mask, seed, config)
        inside = out_mask[..., 0] > 0
        assert inside.sum() > 0.7 * mask.sum()
        assert out_image[..., 0][inside].mean() > 120  # still on the bright square
        assert out_image[..., 0][~inside].mean() < 60
        moved += not np.array_equal(out_mask, mask)
    assert moved >= len(SEEDS) - 2  # the geometry really was changed


def test_geometric_changes_stay_within_the_configured_ranges() -> None:
    image, mask = square_pair()
    config = dataclasses.replace(GEOMETRY_ONLY, flip_horizontal=False)
    centre = np.argwhere(mask[..., 0]).mean(axis=0)
    for seed in SEEDS:
        _, out_mask = run(image, mask, seed, config)
        # Rotation and scale act about the image centre, close to the square's centre, so the
        # centroid moves by the shift (+-10 %) only; the area changes by the scale squared.
        shift = np.abs(np.argwhere(out_mask[..., 0]).mean(axis=0) - centre)
        assert np.all(shift <= 0.1 * SIZE + 1.5)
        area = out_mask.sum() / mask.sum()
        assert 0.9**2 - 0.08 <= area <= 1.1**2 + 0.08


def test_horizontal_flip_only_flips_left_right_never_upside_down() -> None:
    image, mask = asymmetric_pair()
    config = dataclasses.replace(NOTHING, flip_horizontal=True)
    outcomes = set()
    for seed in SEEDS:
        out_image, out_mask = run(image, mask, seed, config)
        if np.array_equal(out_mask, mask):
            outcomes.add("same")
            assert np.allclose(out_image, image)
        else:
            assert np.array_equal(out_mask, mask[:, ::-1])
            assert np.allclose(out_image, image[:, ::-1], atol=1e-3)
            outcomes.add("flipped")
    assert outcomes == {"same", "flipped"}


def test_vertical_flip_is_off_by_default_and_available() -> None:
    assert AugmentConfig().flip_vertical is False
    image, mask = asymmetric_pair()
    config = dataclasses.replace(NOTHING, flip_vertical=True)
    flipped = [np.array_equal(run(image, mask, s, config)[1], mask[::-1]) for s in SEEDS]
    assert any(flipped) and not all(flipped)


def test_everything_disabled_is_the_identity() -> None:
    image, mask = square_pair()
    out_image, out_mask = run(image, mask, (1, 2), NOTHING)
    assert np.array_equal(out_image, image.astype(np.float32))
    assert np.array_equal(out_mask, mask)


def test_intensity_changes_touch_the_image_only() -> None:
    image, mask = square_pair()
    config = dataclasses.replace(NOTHING, intensity=True, speckle=True)
    out_image, out_mask = run(image, mask, (5, 5), config)
    assert np.array_equal(out_mask, mask)
    assert not np.allclose(out_image, image)


def test_runs_inside_a_parallel_dataset_map() -> None:
    image, mask = square_pair()
    seeds = tf.data.Dataset.random(seed=3).batch(2)
    pairs = tf.data.Dataset.from_tensors((image, mask)).repeat(4)
    dataset = tf.data.Dataset.zip((pairs, seeds)).map(
        lambda pair, seed: augment(pair[0], pair[1], seed), num_parallel_calls=2
    )
    masks = [m.numpy() for _, m in dataset]
    assert len(masks) == 4 and all(set(np.unique(m)) <= {0, 1} for m in masks)


@pytest.mark.parametrize(
    "changes",
    [
        {"scale_range": (1.1, 0.9)},
        {"gamma_range": (0.0, 1.2)},
        {"max_rotation_deg": -1},
        {"max_shift": 1.0},
        {"max_speckle_std": -0.1},
    ],
)
def test_bad_config_raises(changes: dict) -> None:
    with pytest.raises(ValueError):
        AugmentConfig(**changes)


def test_black_padding_stays_black_under_intensity_changes():
    import numpy as np
    import tensorflow as tf

    from busi.data.augment import AugmentConfig, augment

    image = np.zeros((32, 32, 1), np.float32)
    image[8:24] = 120.0  # a letterboxed scan: black bands above and below
    image[12:16, 4:10] = 30.0
    mask = np.zeros((32, 32, 1), np.float32)
    config = AugmentConfig(flip_horizontal=False, affine=False, speckle=False,
                           contrast_range=(0.5, 0.6))
    for seed in range(5):
        out, _ = augment(tf.constant(image), tf.constant(mask), tf.constant([seed, 7]), config)
        out = out.numpy()
        assert out[:8].max() == 0 and out[24:].max() == 0
        assert out[8:24].min() > 0
