"""Reading BUSI images and masks, whatever way each file happens to be stored.

BUSI masks come as 1-bit, 8-bit gray, RGB and RGBA PNGs (the RGBA ones have an opaque alpha
channel that must not be read as lesion), and 17 images have two or three masks
(``X_mask.png``, ``X_mask_1.png``, ...). Everything is reduced here to one convention: images are
8-bit grayscale, masks are {0, 1} uint8 at the image's own resolution, and several masks are merged
by logical OR (never by adding uint8 arrays, which wraps around).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from busi.errors import DataError


def _read_unchanged(path: str | os.PathLike) -> np.ndarray:
    data = np.fromfile(str(path), dtype=np.uint8) if os.path.isfile(path) else None
    if data is None:
        raise DataError(f"{path}: file not found")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise DataError(f"{path}: not a readable image (empty, truncated or not PNG/JPEG/BMP)")
    return image


def _to_uint8(image: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    raise DataError(f"{path}: unsupported pixel type {image.dtype}")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as 8-bit grayscale ``(H, W)``.

    Colour images (BUSI has 16, some with coloured annotation overlays) are converted with the
    usual luma weights; an alpha channel is dropped. Gray images stored as 1 or 3 channels give
    identical arrays, so content hashes do not depend on storage.
    """
    image = _to_uint8(_read_unchanged(path), path)
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] in (3, 4):
        colour = image[..., :3]
        if np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(
            colour[..., 0], colour[..., 2]
        ):
            return np.ascontiguousarray(colour[..., 0])
        return cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
    if image.ndim == 3 and image.shape[2] == 1:
        return image[..., 0]
    raise DataError(f"{path}: unsupported image layout {image.shape}")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read one mask as uint8 ``(H, W)`` in {0, 1}: a pixel is lesion if any colour channel is set.

    Thresholding at half range makes 1-bit (read as 0/255), 8-bit and colour masks agree and
    tolerates resampling artefacts; in RGBA masks only opaque pixels count.
    """
    mask = _to_uint8(_read_unchanged(path), path)
    if mask.ndim == 2:
        return (mask >= 128).astype(np.uint8)
    if mask.ndim == 3 and mask.shape[2] in (1, 3, 4):
        on = (mask[..., : min(3, mask.shape[2])] >= 128).any(axis=2)
        if mask.shape[2] == 4:
            on &= mask[..., 3] >= 128
        return on.astype(np.uint8)
    raise DataError(f"{path}: unsupported mask layout {mask.shape}")


def merge_masks(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """Merge all masks of one image by logical OR at full resolution, giving {0, 1} uint8."""
    if not paths:
        raise DataError("merge_masks: no mask paths given")
    merged: np.ndarray | None = None
    for path in paths:
        mask = read_mask(path)
        if merged is None:
            merged = mask
        elif mask.shape != merged.shape:
            raise DataError(
                f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from "
                f"{paths[0]} ({merged.shape[1]}x{merged.shape[0]})"
            )
        else:
            merged |= mask
    assert merged is not None
    return merged


def load_example(row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Image and merged mask of one index row, both at the image's original size.

    Raises DataError naming the files when the mask and the image sizes differ.
    """
    image = read_image(row["image_path"])
    mask = merge_masks(list(row["mask_paths"]))
    if mask.shape != image.shape:
        raise DataError(
            f"{row['mask_paths'][0]}: mask size {mask.shape[1]}x{mask.shape[0]} differs from "
            f"image {row['image_path']} ({image.shape[1]}x{image.shape[0]})"
        )
    return image, mask


def load_truths(table: Any) -> list[np.ndarray]:
    """Merged ground-truth masks of index rows (a DataFrame), at original size ({0, 1} uint8):
    what predictions are scored against."""
    return [load_example(row)[1] for row in table.to_dict("records")]
