"""Bring images to the model's fixed input size and predictions back to the original size.

BUSI images come in many sizes (around 500x600, not square), while the U-Net takes a fixed
square. Two ways to get there:

- ``"letterbox"``: keep the aspect ratio, scale to fit, and pad with zeros, centred. Lesion shape
  (roundness, margin angles, the "taller than wide" sign) is preserved, at the cost of some pixels
  spent on padding.
- ``"stretch"``: plain resize to the target size; every pixel is image, but shapes are distorted
  differently for every image.

Metrics are computed and masks saved at the *original* resolution (a Dice computed at 256x256 is
not the Dice of the delivered mask), so :func:`to_model` returns a :class:`Placement` recording
where the image went, and :func:`to_original` undoes it.

Interpolation: images use ``INTER_AREA`` when shrinking (it averages, so no aliasing of speckle)
and ``INTER_LINEAR`` when enlarging. Masks use nearest neighbour sampled at pixel centres (the
rule of OpenCV's ``INTER_NEAREST_EXACT``, done here in NumPy so any dtype works), which is aligned
with the image resizers; OpenCV's plain ``INTER_NEAREST`` samples pixel corners and shifts masks
by up to half a source pixel against their images. Masks thus stay exactly {0, 1} and aligned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import cv2
import numpy as np

Mode = Literal["letterbox", "stretch"]
MODES: tuple[str, ...] = get_args(Mode)
"""The resize modes, the one list config checks and the CLI read (``resize``, ``--resize``)."""


@dataclass(frozen=True)
class Placement:
    """Where an original image sits inside the model-sized array, enough to undo the resize.

    The original ``(orig_h, orig_w)`` image was resized to ``(inner_h, inner_w)`` and placed with
    its top-left corner at ``(top, left)`` in a ``(size_h, size_w)`` array; the rest is zero
    padding (none in ``"stretch"`` mode, where inner equals size).
    """

    orig_h: int
    orig_w: int
    top: int
    left: int
    inner_h: int
    inner_w: int
    size_h: int
    size_w: int
    mode: str


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size_h = size_w = int(size)
    else:
        try:
            size_h, size_w = (int(s) for s in size)
        except (TypeError, ValueError):
            message = f"size must be an int or a (height, width) pair, got {size!r}"
            raise ValueError(message) from None
    if size_h < 1 or size_w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return size_h, size_w


def placement_for(
    orig_h: int, orig_w: int, size: int | tuple[int, int] = 256, mode: Mode = "letterbox"
) -> Placement:
    """The placement :func:`to_model` uses for an ``(orig_h, orig_w)`` image, without any pixels.

    Letterbox scales by ``min(size_h / orig_h, size_w / orig_w)``, rounds the inner size (at least
    one pixel, so a 1x1000 sliver still maps somewhere) and centres it; odd leftover padding goes
    to the bottom/right.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if orig_h < 1 or orig_w < 1:
        raise ValueError(f"image must have at least one pixel, got shape ({orig_h}, {orig_w})")
    size_h, size_w = _size_hw(size)
    if mode == "stretch":
        return Placement(orig_h, orig_w, 0, 0, size_h, size_w, size_h, size_w, mode)
    scale = min(size_h / orig_h, size_w / orig_w)
    inner_h = min(size_h, max(1, round(orig_h * scale)))
    inner_w = min(size_w, max(1, round(orig_w * scale)))
    top = (size_h - inner_h) // 2
    left = (size_w - inner_w) // 2
    return Placement(orig_h, orig_w, top, left, inner_h, inner_w, size_h, size_w, mode)


def _smooth_interpolation(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    """INTER_AREA when shrinking in both directions (averaging), INTER_LINEAR otherwise."""
    shrinking = dst_hw[0] <= src_hw[0] and dst_hw[1] <= src_hw[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


def _resize(array: np.ndarray, dst_hw: tuple[int, int], interpolation: int) -> np.ndarray:
    """cv2.resize that keeps a trailing channel axis (cv2 drops a singleton one)."""
    if array.shape[:2] == dst_hw:
        return array.copy()
    out = cv2.resize(array, (dst_hw[1], dst_hw[0]), interpolation=interpolation)
    if array.ndim == 3 and out.ndim == 2:
        out = out[..., np.newaxis]
    return out


def _nearest_indices(src: int, dst: int) -> np.ndarray:
    """Source index of each destination pixel, sampling at pixel centres."""
    return np.minimum(((np.arange(dst) + 0.5) * (src / dst)).astype(np.intp), src - 1)


def _resize_nearest(array: np.ndarray, dst_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize that only copies values (any dtype, bool included)."""
    rows = _nearest_indices(array.shape[0], dst_hw[0])
    cols = _nearest_indices(array.shape[1], dst_hw[1])
    return array[rows[:, np.newaxis], cols[np.newaxis, :]]


def _check_array(name: str, array: np.ndarray) -> None:
    if array.ndim not in (2, 3) or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name} must be (H, W) or (H, W, C) with H, W >= 1, got {array.shape}")


def to_model(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    size: int | tuple[int, int] = 256,
    mode: Mode = "letterbox",
) -> tuple[np.ndarray, np.ndarray | None, Placement]:
    """Resize an image (and its mask) to the model's input size.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array, any dtype OpenCV resizes (uint8 for BUSI).
        mask: optional ``(H, W)`` or ``(H, W, 1)`` mask; resized with nearest neighbour so its
            values are only ever copied, never blended (a {0, 1} mask stays {0, 1}).
        size: side of the square model input, or ``(height, width)``.
        mode: ``"letterbox"`` (keep aspect ratio, zero padding) or ``"stretch"``.

    Returns:
        ``(image, mask, placement)``: arrays of shape ``(size_h, size_w[, C])`` with the input
        dtypes (mask None if none was given), and the :class:`Placement` that
        :func:`to_original` needs to undo the resize. Inputs are not modified.
    """
    image = np.asarray(image)
    _check_array("image", image)
    if mask is not None:
        mask = np.asarray(mask)
        _check_array("mask", mask)
        if mask.shape[:2] != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape}")
    placement = placement_for(image.shape[0], image.shape[1], size, mode)
    inner_hw = (placement.inner_h, placement.inner_w)
    out_image = _place(
        _resize(image, inner_hw, _smooth_interpolation(image.shape[:2], inner_hw)), placement
    )
    out_mask = None
    if mask is not None:
        out_mask = _place(_resize_nearest(mask, inner_hw), placement)
    return out_image, out_mask, placement


def _place(inner: np.ndarray, placement: Placement) -> np.ndarray:
    """Put the resized image into a zero array of the model size (no-op copy for stretch)."""
    if inner.shape[:2] == (placement.size_h, placement.size_w):
        return inner
    out = np.zeros((placement.size_h, placement.size_w) + inner.shape[2:], dtype=inner.dtype)
    out[
        placement.top : placement.top + placement.inner_h,
        placement.left : placement.left + placement.inner_w,
    ] = inner
    return out


def to_original(prob_or_mask: np.ndarray, placement: Placement) -> np.ndarray:
    """Map a model-sized probability map or mask back onto the original image grid.

    The letterbox padding is cropped away, then the rest is resized to ``(orig_h, orig_w)``.
    Floating-point input (probabilities) is resized with ``INTER_LINEAR`` (``INTER_AREA`` if it
    has to shrink), so the caller thresholds *at original resolution*: the mask boundary is then
    smooth instead of the blocky upscaled 256x256 staircase, and metrics compare like with like.
    Integer or bool input (already thresholded masks, labels) is resized with nearest neighbour,
    so values are preserved.

    Args:
        prob_or_mask: ``(size_h, size_w)`` or ``(size_h, size_w, C)`` array, e.g. the model's
            ``(S, S, 1)`` sigmoid output.
        placement: the :class:`Placement` returned by :func:`to_model` for this image.

    Returns:
        Array of shape ``(orig_h, orig_w)`` (plus the input's channel axis, if any), same dtype
        (float16 comes back as float32).
    """
    array = np.asarray(prob_or_mask)
    _check_array("prob_or_mask", array)
    if array.shape[:2] != (placement.size_h, placement.size_w):
        raise ValueError(
            f"prob_or_mask has shape {array.shape}, expected ({placement.size_h}, "
            f"{placement.size_w}) as recorded in the placement"
        )
    inner = array[
        placement.top : placement.top + placement.inner_h,
        placement.left : placement.left + placement.inner_w,
    ]
    orig_hw = (placement.orig_h, placement.orig_w)
    if not np.issubdtype(array.dtype, np.floating):
        return _resize_nearest(inner, orig_hw)
    if array.dtype != np.float32 and array.dtype != np.float64:
        inner = inner.astype(np.float32)  # e.g. float16 model output; OpenCV resizes f32/f64
    interpolation = _smooth_interpolation(inner.shape[:2], orig_hw)
    return _resize(np.ascontiguousarray(inner), orig_hw, interpolation)
