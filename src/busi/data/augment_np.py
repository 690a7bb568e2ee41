"""Random augmentation of (image, mask) pairs in NumPy and OpenCV: busi.data.augment without
TensorFlow, for the Keras 3 backends (jax, torch) and any data loader.

Same transforms, same formulas, same order of draws as :mod:`busi.data.augment` (see there for
why each is done): horizontal (and optional vertical) flip, one affine transform (rotation,
scale, shift) applied to the image bilinearly and to the mask by nearest neighbour at the same
coordinates with 0 moved in from outside, then gain, contrast around the scan's mean (black
stays black), gamma, multiplicative speckle, clipped to [0, 255].

Reproducibility without stateless TF ops: every draw comes from
``np.random.default_rng((seed, epoch, index))``, a pure function of the run's augmentation seed,
the epoch and the row, so the augmented data is the same whichever worker thread or process
handles a row, and a resumed run (epoch known) continues the sequence. The numbers differ from
the TF pipeline's (another generator), the distribution does not.

The warp is ``cv2.warpAffine`` with ``WARP_INVERSE_MAP`` and the matrix that
``ImageProjectiveTransformV3`` gets in the TF version (output pixel -> input pixel, pixel i at
coordinate i): on the same parameters it matches TF's warp to 0.005 gray levels (cv2 uses
1/32-pixel fixed-point interpolation) with identical masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from busi.data.augment_config import AugmentConfig


@dataclass(frozen=True)
class Draw:
    """One element's random draws (also what a test feeds both implementations)."""

    flip_h: bool = False
    flip_v: bool = False
    theta: float = 0.0  # radians
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)  # fraction of width, height
    brightness: float = 1.0
    contrast: float = 1.0
    gamma: float = 1.0
    speckle_std: float = 0.0
    noise_seed: int = 0


def draw(rng: np.random.Generator, config: AugmentConfig) -> Draw:
    """The draws of one element, in the TF version's order of sub-seeds."""
    flip_h = bool(rng.uniform() < 0.5) if config.flip_horizontal else False
    flip_v = bool(rng.uniform() < 0.5) if config.flip_vertical else False
    theta, scale, shift = 0.0, 1.0, (0.0, 0.0)
    if config.affine:
        theta = rng.uniform(-1.0, 1.0) * config.max_rotation_deg * math.pi / 180.0
        scale = rng.uniform(*config.scale_range)
        shift = tuple(rng.uniform(-config.max_shift, config.max_shift, 2))
    brightness = contrast = gamma = 1.0
    if config.intensity:
        brightness = rng.uniform(*config.brightness_range)
        contrast = rng.uniform(*config.contrast_range)
        low, high = (math.log(g) for g in config.gamma_range)
        gamma = math.exp(rng.uniform(low, high))
    std = rng.uniform(0.0, config.max_speckle_std) if config.speckle else 0.0
    return Draw(flip_h, flip_v, float(theta), float(scale), (float(shift[0]), float(shift[1])),
                float(brightness), float(contrast), float(gamma), float(std),
                int(rng.integers(2**31)))


def inverse_matrix(d: Draw, height: int, width: int) -> np.ndarray:
    """2x3 matrix mapping output pixel (x, y) to input pixel: busi.data.augment's 8 parameters."""
    h, w = float(height), float(width)
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    tx, ty = d.shift[0] * w, d.shift[1] * h
    cos, sin = math.cos(d.theta) / d.scale, math.sin(d.theta) / d.scale
    a0, a1, a3, a4 = cos, sin, -sin, cos
    a2 = cx - a0 * (cx + tx) - a1 * (cy + ty)
    a5 = cy - a3 * (cx + tx) - a4 * (cy + ty)
    if d.flip_h:
        a0, a1, a2 = -a0, -a1, -a2 + (w - 1.0)
    if d.flip_v:
        a3, a4, a5 = -a3, -a4, -a5 + (h - 1.0)
    return np.array([[a0, a1, a2], [a3, a4, a5]], dtype=np.float64)


def _warp(array: np.ndarray, matrix: np.ndarray, interpolation: int) -> np.ndarray:
    height, width = array.shape[:2]
    out = cv2.warpAffine(array, matrix, (width, height),
                         flags=interpolation | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.reshape(array.shape)  # cv2 drops a trailing channel axis of 1


def _intensity(image: np.ndarray, d: Draw, config: AugmentConfig) -> np.ndarray:
    if config.intensity:
        image = np.clip(image * np.float32(d.brightness), 0.0, 255.0)
        inside = image > 0
        mean = image.sum(dtype=np.float32) / max(float(inside.sum()), 1.0)
        stretched = np.clip(mean + np.float32(d.contrast) * (image - mean), 0.0, 255.0)
        image = np.where(inside, stretched, np.float32(0.0))
        image = 255.0 * np.power(image / 255.0, np.float32(d.gamma))
    if config.speckle and d.speckle_std > 0:
        noise = np.random.default_rng(d.noise_seed).standard_normal(image.shape, np.float32)
        image = image * np.maximum(1.0 + np.float32(d.speckle_std) * noise, 0.0)
    return np.clip(image, 0.0, 255.0).astype(np.float32)


def apply(image: np.ndarray, mask: np.ndarray, d: Draw,
          config: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image, dtype=np.float32)
    if config.geometric:
        matrix = inverse_matrix(d, *image.shape[:2])
        image = _warp(image, matrix, cv2.INTER_LINEAR)
        mask = _warp(np.asarray(mask), matrix, cv2.INTER_NEAREST)
    return _intensity(image, d, config), mask


def augment(image: np.ndarray, mask: np.ndarray, seed: int, epoch: int, index: int,
            config: AugmentConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Augment one (H, W, C) image in [0, 255] and its (H, W, 1) mask; a pure function of
    (seed, epoch, index). Returns float32 image, mask in its dtype."""
    config = AugmentConfig() if config is None else config
    rng = np.random.default_rng((seed, epoch, index))
    return apply(image, mask, draw(rng, config), config)
