"""Batches for ``model.fit`` without tf.data: a ``keras.utils.PyDataset`` (Keras 3, any backend)
or ``tf_keras.utils.Sequence`` (tf-keras), one class for both.

What :func:`busi.data.pipeline.make_dataset` does with tf.data, on the same cached arrays:
rows shuffled every epoch (``default_rng((shuffle_seed, epoch))``), each training row augmented
by :mod:`busi.data.augment_np` with draws that are a pure function of (seed, epoch, row), gray
replicated to 3 channels, float32 out, image-level targets travelling with their row. Batches
are built in ``__getitem__``, so Keras' workers (threads: OpenCV releases the GIL) prepare
them in parallel, and batch ``i`` of epoch ``e`` is the same whichever worker made it.

On tf-keras training keeps tf.data (:mod:`busi.data.pipeline`), so its runs are unchanged; the
Keras 3 backends use these, and on jax/torch they keep TensorFlow out of the process.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from busi import _keras
from busi.data import augment_np
from busi.data.augment_config import AugmentConfig
from busi.models import backend

_CLASSES: dict[str, type] = {}


def _base() -> type:
    keras = _keras.keras()
    return keras.utils.PyDataset if backend.is_keras3() else keras.utils.Sequence


def batches_class() -> type:
    """The batches class on the backend's Keras base (made once per backend)."""
    name = backend.name()
    if name not in _CLASSES:
        base = _base()

        class Batches(base):  # type: ignore[misc, valid-type]
            def __init__(self, images: np.ndarray, masks: np.ndarray, *, batch_size: int,
                         training: bool = False, shuffle: bool | None = None,
                         augment_config: AugmentConfig | None = None, seed: int = 0,
                         labels: np.ndarray | None = None, drop_remainder: bool = False,
                         epoch: int = 0, workers: int = 1, steps: int | None = None):
                if backend.is_keras3():  # Sequence (tf-keras) takes its workers in fit()
                    super().__init__(workers=workers, use_multiprocessing=False)
                else:
                    super().__init__()
                self.images, self.masks, self.labels = images, masks, labels
                self.batch_size, self.training = batch_size, training
                self.shuffle = training if shuffle is None else shuffle
                self.config = (augment_config or AugmentConfig()) if training else None
                self.shuffle_seed, self.augment_seed = _split_seed(seed)
                self.drop_remainder = drop_remainder
                self.epoch = epoch
                self.steps = steps
                self._orders: dict[int, np.ndarray] = {}

            def _order(self, data_epoch: int) -> np.ndarray:
                if not self.shuffle:
                    return np.arange(len(self.images))
                if data_epoch not in self._orders:  # a few per epoch at most
                    self._orders = {data_epoch: np.random.default_rng(
                        (self.shuffle_seed, data_epoch)).permutation(len(self.images)),
                        **{k: v for k, v in self._orders.items() if k >= data_epoch - 1}}
                return self._orders[data_epoch]

            def passes(self) -> int:
                """Batches in one pass over the rows."""
                rows = len(self.images)
                return rows // self.batch_size if self.drop_remainder else math.ceil(
                    rows / self.batch_size)

            def __len__(self) -> int:
                return self.steps or self.passes()

            def __getitem__(self, index: int) -> tuple:
                if not 0 <= index < len(self):
                    raise IndexError(index)
                # with `steps` (epochs shorter or longer than the data) batches run on across
                # passes over the rows, each pass shuffled and augmented as an epoch of its own
                position = self.epoch * len(self) + index if self.steps else index
                data_epoch, position = divmod(position, self.passes()) if self.steps else (
                    self.epoch, index)
                start = position * self.batch_size
                rows = self._order(data_epoch)[start:start + self.batch_size]
                images, masks = [], []
                for row in rows:
                    image, mask = self.images[row], self.masks[row]
                    if self.config is not None:
                        image, mask = augment_np.augment(image, mask, self.augment_seed,
                                                         data_epoch, int(row), self.config)
                    images.append(image)
                    masks.append(mask)
                x = np.stack(images).astype(np.float32)
                if x.shape[-1] == 1:
                    x = np.repeat(x, 3, axis=-1)
                y = np.stack(masks).astype(np.float32)
                if self.labels is None:
                    return x, y
                return x, (y, self.labels[rows])

            def on_epoch_end(self) -> None:
                self.epoch += 1

        _CLASSES[name] = Batches
    return _CLASSES[name]


def _split_seed(seed: int) -> tuple[int, int]:
    shuffle_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint32)
    return int(shuffle_seed), int(augment_seed)


def make_batches(images: np.ndarray, masks: np.ndarray, **options: Any) -> Any:
    """Batches of ``(image float32 [B, H, W, 3], mask float32 [B, H, W, 1])`` (see module)."""
    return batches_class()(images, masks, **options)


def take(data: Any, count: int):
    """The first ``count`` batches of a dataset: tf.data's ``take`` for PyDataset/Sequence too
    (PreciseValidation's calibration batches)."""
    if hasattr(data, "take"):  # tf.data.Dataset
        yield from data.take(count)
        return
    for index in range(min(count, len(data))):
        yield data[index]
