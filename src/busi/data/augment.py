"""Random augmentation of (image, mask) pairs for training, in TensorFlow ops.

Every random draw is *stateless*: it is a pure function of the ``seed`` argument, so a tf.data
pipeline that hands each element its own seed gives the same augmented data on every run, even
with a parallel ``map``. (Stateful ``tf.random.uniform`` or Keras preprocessing layers would
depend on which thread ran first.)

What is done, and why:

- Horizontal flip: left/right is arbitrary in breast ultrasound. Vertical flip is off by default,
  because the transducer is always at the top (near field, skin and fat layers above the lesion,
  posterior acoustic shadowing or enhancement below it), so upside-down images never occur.
- One affine transform (rotation, scale, shift, and the flips) applied to the image with bilinear
  and to the mask with nearest-neighbour sampling at the *same* coordinates, so they stay
  aligned and the mask stays {0, 1}. Areas moved in from outside are filled with 0, like the
  letterbox padding of :mod:`busi.data.geometry`.
- Intensity changes on the image only: gain ("brightness", multiplicative like the scanner's gain
  knob, so black padding stays black), contrast around the image mean, gamma, and
  multiplicative per-pixel noise resembling speckle. The image is clipped to [0, 255].

Only the training set is augmented (see :func:`busi.data.pipeline.make_dataset`).
"""

from __future__ import annotations

import math

import tensorflow as tf  # safe: importing busi.data.* has already run busi's Keras guard

from busi.data.augment_config import AugmentConfig

_N_SEEDS = 10


def _uniform(seed: tf.Tensor, low: float, high: float, shape: tuple[int, ...] = ()) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high, dtype=tf.float32)


def _inverse_transform(
    seeds: tf.Tensor, height: tf.Tensor, width: tf.Tensor, config: AugmentConfig
) -> tf.Tensor:
    """The 8 ImageProjectiveTransform parameters mapping output pixels to input pixels.

    Forward: flip about the centre, then ``p' = c + s * R(theta) (p - c) + t``. The op needs the
    inverse, ``p = c + R(-theta) (p' - c - t) / s``, followed by the inverse (same) flip.
    Pixel ``i`` sits at coordinate ``i``, so the centre is ``(size - 1) / 2``.
    """
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    if config.affine:
        theta = _uniform(seeds[2], -1.0, 1.0) * (config.max_rotation_deg * math.pi / 180.0)
        scale = _uniform(seeds[3], *config.scale_range)
        shift = _uniform(seeds[4], -config.max_shift, config.max_shift, (2,))
        tx, ty = shift[0] * w, shift[1] * h
    else:
        theta, scale = tf.constant(0.0), tf.constant(1.0)
        tx, ty = tf.constant(0.0), tf.constant(0.0)
    cos, sin = tf.cos(theta) / scale, tf.sin(theta) / scale
    a0, a1, a3, a4 = cos, sin, -sin, cos
    a2 = cx - a0 * (cx + tx) - a1 * (cy + ty)
    a5 = cy - a3 * (cx + tx) - a4 * (cy + ty)
    if config.flip_horizontal:  # x_in = (w - 1) - x
        flip = _uniform(seeds[0], 0.0, 1.0) < 0.5
        a0, a1, a2 = (tf.where(flip, -v, v) for v in (a0, a1, a2))
        a2 = tf.where(flip, a2 + (w - 1.0), a2)
    if config.flip_vertical:  # y_in = (h - 1) - y
        flip = _uniform(seeds[1], 0.0, 1.0) < 0.5
        a3, a4, a5 = (tf.where(flip, -v, v) for v in (a3, a4, a5))
        a5 = tf.where(flip, a5 + (h - 1.0), a5)
    zero = tf.constant(0.0)
    return tf.stack([a0, a1, a2, a3, a4, a5, zero, zero])[tf.newaxis, :]


def _warp(array: tf.Tensor, transform: tf.Tensor, interpolation: str) -> tf.Tensor:
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=array[tf.newaxis],
        transforms=transform,
        output_shape=tf.shape(array)[:2],
        fill_value=tf.constant(0.0),
        interpolation=interpolation,
        fill_mode="CONSTANT",
    )
    return out[0]


def _intensity(image: tf.Tensor, seeds: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    if config.intensity:
        image = tf.clip_by_value(image * _uniform(seeds[5], *config.brightness_range), 0.0, 255.0)
        # Contrast around the mean of the scan itself; black pixels (letterbox padding, areas
        # moved in by the affine transform) stay black, as they are at evaluation time.
        inside = image > 0
        count = tf.maximum(tf.reduce_sum(tf.cast(inside, tf.float32)), 1.0)
        mean = tf.reduce_sum(image) / count
        contrast = _uniform(seeds[6], *config.contrast_range)
        stretched = tf.clip_by_value(mean + contrast * (image - mean), 0.0, 255.0)
        image = tf.where(inside, stretched, 0.0)
        low, high = (math.log(g) for g in config.gamma_range)
        gamma = tf.exp(_uniform(seeds[7], low, high))
        image = 255.0 * tf.pow(image / 255.0, gamma)
    if config.speckle and config.max_speckle_std > 0:
        std = _uniform(seeds[8], 0.0, config.max_speckle_std)
        noise = tf.random.stateless_normal(tf.shape(image), seeds[9], dtype=tf.float32)
        image = image * tf.maximum(1.0 + std * noise, 0.0)
    return tf.clip_by_value(image, 0.0, 255.0)


def augment(
    image: tf.Tensor,
    mask: tf.Tensor,
    seed: tf.Tensor,
    config: AugmentConfig | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Augment one (image, mask) pair; the result depends only on the inputs and ``seed``.

    Args:
        image: ``(H, W, C)`` image with values in [0, 255] (uint8 or float).
        mask: ``(H, W, 1)`` mask with values in {0, 1} (any numeric dtype).
        seed: shape ``[2]`` integer tensor, e.g. from ``tf.data.Dataset.random(...).batch(2)``;
            independent sub-seeds for each random draw are split from it.
        config: strengths and on/off switches; ``AugmentConfig()`` if None.

    Returns:
        ``(image float32 (H, W, C) in [0, 255], mask (H, W, 1) in {0, 1}, the mask's dtype)``.
    """
    config = AugmentConfig() if config is None else config
    image = tf.cast(tf.convert_to_tensor(image), tf.float32)
    mask = tf.convert_to_tensor(mask)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=_N_SEEDS)
    if config.geometric:
        shape = tf.shape(image)
        transform = _inverse_transform(seeds, shape[0], shape[1], config)
        image = _warp(image, transform, "BILINEAR")
        warped = _warp(tf.cast(mask, tf.float32), transform, "NEAREST")
        mask = tf.cast(warped, mask.dtype)
    image = _intensity(image, seeds, config)
    return image, mask
