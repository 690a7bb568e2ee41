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

import numpy as np
import pandas as pd
import tensorflow as tf  # safe: importing busi.data.* has already run busi's Keras guard

from busi.data.arrays import (  # noqa: F401  (re-exported: callers import them from here)
    Arrays,
    _check_table,
    _checked_cache,
    load_arrays,
)
from busi.data.augment import AugmentConfig, augment
from busi.data.geometry import Mode
from busi.errors import DataError


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
