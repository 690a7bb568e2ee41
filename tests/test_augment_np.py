"""The NumPy/OpenCV augmentation and batches the Keras 3 backends train with: the same transforms
as the tf.data pipeline on the same draws, and batches that depend only on (seed, epoch, row)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from busi.data import augment_np
from busi.data.augment_config import AugmentConfig
from busi.data.batches import make_batches, take
from busi.models import backend

if backend.missing(backend.DEFAULT) and backend.installed():
    # no tf-keras in this environment: the batches take their base class from Keras 3
    backend.use(backend.installed()[0])

WARP_TOLERANCE = 0.05
"""Gray levels: cv2 interpolates at 1/32 pixel in fixed point, TensorFlow in float."""


def _scan(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    image = np.clip(rng.normal(110, 40, (size, size, 1)), 0, 255).astype(np.float32)
    image = cv2.GaussianBlur(image, (0, 0), 2)[..., None]
    image[: size // 10] = 0  # a black band, as letterboxing leaves
    mask = np.zeros((size, size, 1), np.uint8)
    cv2.ellipse(mask, (size // 2, size // 2), (size // 5, size // 8), 20, 0, 360, 1, -1)
    return image, mask


def test_the_warp_and_intensity_match_tensorflow_on_the_same_draws(monkeypatch):
    tf = pytest.importorskip("tensorflow")
    from busi.data import augment as tf_augment  # TensorFlow's version: only this test needs it

    image, mask = _scan()
    config = AugmentConfig(flip_vertical=True, speckle=False)  # speckle: another generator
    for index in range(8):
        draw = augment_np.draw(np.random.default_rng((0, 0, index)), config)
        ours_image, ours_mask = augment_np.apply(image, mask, draw, config)
        matrix = augment_np.inverse_matrix(draw, *image.shape[:2])
        transform = tf.constant([[*matrix[0], *matrix[1], 0.0, 0.0]], tf.float32)
        warped = tf_augment._warp(tf.constant(image), transform, "BILINEAR")
        their_mask = tf.cast(tf_augment._warp(tf.cast(mask, tf.float32), transform, "NEAREST"),
                             tf.uint8).numpy()
        draws = {5: draw.brightness, 6: draw.contrast, 7: math.log(draw.gamma)}
        monkeypatch.setattr(tf_augment, "_uniform", lambda seed, low, high, shape=(), d=draws:
                            tf.constant(d[seed], tf.float32))
        their_image = tf_augment._intensity(warped, list(range(10)), config).numpy()
        np.testing.assert_array_equal(ours_mask, their_mask)
        assert np.abs(ours_image - their_image).max() < WARP_TOLERANCE


def _data(rows: int = 10, size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (rows, size, size, 1), dtype=np.uint8)
    masks = (rng.random((rows, size, size, 1)) > 0.5).astype(np.uint8)
    labels = np.arange(rows, dtype=np.float32)[:, None]
    return images, masks, labels


def test_training_batches_depend_only_on_seed_epoch_and_row():
    images, masks, labels = _data()
    options = {"batch_size": 4, "training": True, "seed": 3, "labels": labels}
    first = make_batches(images, masks, **options)
    again = make_batches(images, masks, **options)
    for index in range(len(first)):
        (x1, (y1, l1)), (x2, (y2, l2)) = first[index], again[index]
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(l1, l2)
    assert first[0][0].shape[-1] == 3 and first[0][0].dtype == np.float32
    seen = np.concatenate([first[i][1][1][:, 0] for i in range(len(first))])
    assert sorted(seen.tolist()) == labels[:, 0].tolist()  # every row once, labels with it
    later = make_batches(images, masks, epoch=1, **options)
    first.on_epoch_end()  # the next epoch: the same as a batches object made for it
    np.testing.assert_array_equal(first[0][0], later[0][0])
    with pytest.raises(IndexError):
        first[len(first)]


def test_evaluation_batches_keep_the_rows_in_order_and_take_stops():
    images, masks, _ = _data()
    batches = make_batches(images, masks, batch_size=4)
    assert len(batches) == math.ceil(len(images) / 4)
    np.testing.assert_array_equal(batches[0][1], masks[:4].astype(np.float32))
    np.testing.assert_array_equal(batches[0][0][..., :1], images[:4].astype(np.float32))
    assert len(list(take(batches, 2))) == 2
    assert len(list(take(batches, 99))) == len(batches)


def test_epochs_of_fixed_steps_run_on_across_passes_over_the_rows():
    """``steps_per_epoch`` unlike the data: batch i of epoch e is the (e * steps + i)-th of an
    endless sequence of shuffled passes, the same whichever epoch object makes it."""
    images, masks, labels = _data(rows=8)
    options = {"batch_size": 4, "training": True, "seed": 5, "labels": labels}
    endless = make_batches(images, masks, steps=3, **options)
    passes = [make_batches(images, masks, epoch=e, **options) for e in range(3)]
    for epoch in range(2):
        run = make_batches(images, masks, steps=3, epoch=epoch, **options)
        for index in range(3):
            data_epoch, position = divmod(epoch * 3 + index, 2)
            np.testing.assert_array_equal(run[index][0], passes[data_epoch][position][0])
    endless.on_epoch_end()
    np.testing.assert_array_equal(endless[0][0], passes[1][1][0])
