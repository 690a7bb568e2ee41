"""Devices and numeric precision of a training run.

On a GPU, memory growth is switched on and ``mixed_precision="auto"`` trains in float16; with
several GPUs (or the devices a config names) the model is replicated with
``tf.distribute.MirroredStrategy`` (the batch size is the global batch). On a CPU, "auto" keeps
float32, the precision results are reported in; ``mixed_bfloat16`` is an opt-in on CPUs with
bf16 units (1.6x faster training of the ResNet34 U-Net on this project's Zen 5 machine,
``benchmarks/speed.py``). Apart from training, so that benchmarks and tests set up a device the
way a run does without importing the training loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import tensorflow as tf

from busi import _keras

keras = _keras.keras()


def configure_devices() -> list[str]:
    """Switch on GPU memory growth (so TensorFlow does not grab all GPU memory); list GPUs."""
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # GPUs already initialised: the setting cannot change any more
            pass
    return [gpu.name for gpu in gpus]


def distribution_strategy(devices: Sequence[str] | None = None) -> tf.distribute.Strategy:
    """MirroredStrategy over several GPUs (or the given devices), else the default strategy."""
    if devices:
        return tf.distribute.MirroredStrategy(devices=list(devices))
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def precision_policy(name: str) -> str:
    """The Keras mixed-precision policy for a config value ("auto" picks by device)."""
    if name == "auto":
        return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    return name


@contextmanager
def global_policy(policy: str) -> Iterator[None]:
    """Keras' global precision policy set to ``policy`` for a block, then put back, so that a
    mixed-precision run does not leak its policy into models built after it (notebooks, tests).
    """
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


