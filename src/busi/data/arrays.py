"""Index rows -> model-size arrays, decoded once up front: what every input pipeline feeds from
(tf.data on tf-keras, :mod:`busi.data.batches` on Keras 3), kept free of TensorFlow so that the
jax and torch backends can train without it.

Decoding PNGs and resizing them is the slow part, and it gives the same result every epoch (BUSI
at 256x256 gray is about 50 MB).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from busi.data.geometry import Mode, Placement, placement_for, to_model
from busi.data.masks import load_example
from busi.errors import DataError

Arrays = tuple[np.ndarray, np.ndarray, list[Placement]]
_REQUIRED_COLUMNS = ("image_path", "mask_paths")


def decode_workers() -> int:
    """Threads for decoding: cv2 releases the GIL, so one per available core (at least 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(2, min(cores, 16))


def _check_table(table: pd.DataFrame) -> None:
    missing = [c for c in _REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"index table lacks column(s) {missing}; build it with busi.data.index()")


def load_arrays(
    table: pd.DataFrame, size: int | tuple[int, int] = 256, mode: Mode = "letterbox"
) -> Arrays:
    """Decode every row of an index table and resize it to the model size, in table order.

    Args:
        table: index rows (columns ``image_path`` and ``mask_paths`` at least), e.g. the
            training rows of a split.
        size: model input side, or ``(height, width)``.
        mode: ``"letterbox"`` or ``"stretch"`` (see :mod:`busi.data.geometry`).

    Returns:
        ``(images, masks, placements)``: uint8 ``[N, H, W, 1]`` gray images, uint8
        ``[N, H, W, 1]`` masks in {0, 1}, and one :class:`Placement` per row, needed to bring
        predictions back to the original resolution.

    Raises:
        DataError: naming the file, for unreadable images or masks of the wrong size.
    """
    _check_table(table)
    rows = table[list(_REQUIRED_COLUMNS)].to_dict("records")
    model = placement_for(1, 1, size, mode)  # validates size and mode before any decoding
    shape = (len(rows), model.size_h, model.size_w, 1)
    images = np.zeros(shape, np.uint8)
    masks = np.zeros(shape, np.uint8)
    placements: list[Placement | None] = [None] * len(rows)

    def work(i: int) -> None:
        image, mask = load_example(rows[i])
        image, mask, placements[i] = to_model(image, mask, size=size, mode=mode)
        images[i, ..., 0] = image
        masks[i, ..., 0] = mask

    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        for _ in pool.map(work, range(len(rows))):  # iterating re-raises a worker's error
            pass
    return images, masks, placements  # type: ignore[return-value]


def _checked_cache(
    cache_arrays: Arrays | tuple[np.ndarray, np.ndarray],
    rows: int,
    size: int | tuple[int, int],
    mode: Mode,
) -> tuple[np.ndarray, np.ndarray]:
    """The cached arrays, if they can belong to this table, size and mode (else ValueError)."""
    images, masks = np.asarray(cache_arrays[0]), np.asarray(cache_arrays[1])
    model = placement_for(1, 1, size, mode)
    hw = (model.size_h, model.size_w)
    if len(images) != rows or len(masks) != rows:
        raise ValueError(
            f"cache_arrays hold {len(images)} images and {len(masks)} masks for a table of "
            f"{rows} rows; pass load_arrays() of this very table"
        )
    if images.ndim != 4 or images.shape[1:3] != hw or masks.shape[1:] != (*hw, 1):
        raise ValueError(
            f"cache_arrays have images {images.shape[1:]} and masks {masks.shape[1:]}, expected "
            f"{(*hw, 1)} for size={size!r}; pass load_arrays() with the same size"
        )
    return images, masks
