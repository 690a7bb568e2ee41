"""The tf.data input pipeline: index rows -> cached model-size arrays -> batches for Keras.

Decoding PNGs and resizing them is the slow part, and it gives the same result every epoch, so it
is done once, up front, by :func:`load_arrays` (BUSI at 256x256 gray is about 50 MB) and the
arrays are fed to tf.data from memory. Only the cheap, random part (augmentation) runs per epoch.

Normalisation for the encoder (ImageNet mean/std or whatever the backbone wants) is *not* done
here: the model's first layer does it (busi.models.architectures, "Input convention"), so a saved
model is self-contained and this pipeline is the same for every encoder. Images leave the pipeline
as float32 in [0, 255] with the gray channel replicated to 3, masks as float32 {0, 1}.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import tensorflow as tf  # safe: importing busi.data.* has already run busi's Keras guard

from busi.data.augment import AugmentConfig, augment
from busi.data.geometry import Mode, Placement, placement_for, to_model
from busi.data.masks import load_example
from busi.errors import DataError

Arrays = tuple[np.ndarray, np.ndarray, list[Placement]]
_REQUIRED_COLUMNS = ("image_path", "mask_paths")


def _workers() -> int:
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

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
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


def _split_seed(seed: int) -> tuple[int, int]:
    """Two independent seeds (shuffle order, augmentation draws) from one user seed."""
    shuffle_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint32)
    return int(shuffle_seed) >> 1, int(augment_seed) >> 1  # TF seeds are signed int64 anyway


def _to_model_input(image: tf.Tensor, mask: tf.Tensor,
                    label: tf.Tensor | None = None) -> tuple:
    """float32 images with 3 channels, float32 masks: done on whole batches, after augmenting
    (augmenting one gray channel is a third of the work). With image-level targets the model's
    targets are the pair ``(mask, label)``, in the order of its outputs."""
    image = tf.cast(image, tf.float32)
    if image.shape[-1] == 1:
        image = tf.repeat(image, 3, axis=-1)
    if label is None:
        return image, tf.cast(mask, tf.float32)
    return image, (tf.cast(mask, tf.float32), label)


def make_dataset(
    table: pd.DataFrame,
    *,
    size: int | tuple[int, int] = 256,
    mode: Mode = "letterbox",
    batch_size: int = 8,
    training: bool = False,
    augment_config: AugmentConfig | None = None,
    seed: int = 0,
    shuffle: bool | None = None,
    cache_arrays: Arrays | tuple[np.ndarray, np.ndarray] | None = None,
    drop_remainder: bool = False,
    labels: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Batches of ``(image, mask)`` for ``model.fit`` / ``model.predict``.

    With ``training=True`` the order is shuffled every epoch and each element is augmented with
    its own stateless seed (from ``Dataset.random(..., rerandomize_each_iteration=True)``), so
    the epoch sequence is reproducible under ``seed`` despite the parallel ``map``. Augment only
    the training rows of a split: the split is made first, on un-augmented data.

    With ``training=False`` (the default) the rows come out exactly as given, in table order, and
    the last partial batch is kept, so every image is evaluated and predictions line up with
    ``table`` row by row.

    Encoder normalisation is not done here; the model's first layer does it.

    Args:
        table: index rows to serve.
        size: model input side, or ``(height, width)``.
        mode: ``"letterbox"`` or ``"stretch"``.
        batch_size: images per batch (the last batch may be smaller).
        training: shuffle and augment.
        augment_config: augmentation strengths (training only); ``AugmentConfig()`` if None.
        seed: seed of the shuffle order and of the augmentation draws.
        shuffle: override the shuffling (default: same as ``training``).
        cache_arrays: the result of :func:`load_arrays` for this ``table``, size and mode, to
            reuse arrays already decoded (e.g. by the throughput benchmark, or across folds).
        drop_remainder: leave out the last partial batch. For training under several replicas:
            a batch smaller than the replica count leaves a replica an empty batch, which
            BatchNorm rejects. Shuffled every epoch, every image is still seen.
        labels: image-level targets, one row per table row
        (:func:`busi.models.heads.label_targets`),
            for a model with the image head; they travel with their image through shuffling.

    Returns:
        A dataset of ``(image float32 [B, H, W, 3] in [0, 255], mask float32 [B, H, W, 1] in
        {0, 1})``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if augment_config is not None and not training:
        raise ValueError(
            "augment_config given with training=False: only training data is augmented"
        )
    if len(table) == 0:
        raise DataError("make_dataset: the table has no rows")
    if cache_arrays is None:
        images, masks, _ = load_arrays(table, size=size, mode=mode)
    else:
        images, masks = _checked_cache(cache_arrays, len(table), size, mode)
    shuffle = training if shuffle is None else shuffle
    shuffle_seed, augment_seed = _split_seed(seed)
    autotune = tf.data.AUTOTUNE

    if labels is not None and len(labels) != len(images):
        raise ValueError(f"make_dataset: {len(labels)} label rows for {len(images)} images")
    columns = (images, masks) if labels is None else (images, masks, labels)
    dataset = tf.data.Dataset.from_tensor_slices(columns)
    if shuffle:
        dataset = dataset.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    if training:
        config = AugmentConfig() if augment_config is None else augment_config
        seeds = tf.data.Dataset.random(seed=augment_seed, rerandomize_each_iteration=True).batch(2)
        dataset = tf.data.Dataset.zip((dataset, seeds)).map(
            lambda row, element_seed: (*augment(row[0], row[1], element_seed, config), *row[2:]),
            num_parallel_calls=autotune,
            deterministic=True,
        )
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    dataset = dataset.map(lambda *row: _to_model_input(*row), num_parallel_calls=autotune,
                          deterministic=True)
    return dataset.prefetch(autotune)
