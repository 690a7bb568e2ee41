"""Devices and numeric precision of a training run.

On a GPU, memory growth is switched on and ``mixed_precision="auto"`` trains in float16; with
several GPUs (or the devices a config names) the model is replicated with
``tf.distribute.MirroredStrategy`` (the batch size is the global batch). On a CPU, "auto" keeps
float32, the precision results are reported in; ``mixed_bfloat16`` is an opt-in on CPUs with
bf16 units (1.6x faster training of the ResNet34 U-Net on this project's Zen 5 machine,
``benchmarks/speed.py``). Apart from training, so that benchmarks and tests set up a device the
way a run does without importing the training loop.

On the Keras 3 backends jax and torch nothing here imports TensorFlow: their GPUs are listed by
their own packages, and there is no replication (a config refuses ``devices`` there).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from busi import _keras
from busi.models import backend


def _tf() -> Any:
    import tensorflow as tf  # TensorFlow backends only: jax/torch must not import it

    return tf


def configure_devices() -> list[str]:
    """Switch on GPU memory growth (so TensorFlow does not grab all GPU memory); list GPUs."""
    if not backend.uses_tensorflow():
        return backend.gpu_names()
    tf = _tf()
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # GPUs already initialised: the setting cannot change any more
            pass
    return [gpu.name for gpu in gpus]


class _NoStrategy:
    """Keras 3 on jax/torch: one device, nothing to replicate (``strategy.scope()`` is a no-op)."""

    def scope(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def distribution_strategy(devices: Sequence[str] | None = None) -> Any:
    """MirroredStrategy over several GPUs (or the given devices), else the default strategy; on
    jax/torch an object whose ``scope()`` does nothing."""
    if not backend.uses_tensorflow():
        if devices:
            raise ValueError(f"devices {list(devices)}: replication needs tf.distribute (backend "
                             f"tf-keras), not backend {backend.name()}")
        return _NoStrategy()
    tf = _tf()
    if devices:
        return tf.distribute.MirroredStrategy(devices=list(devices))
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def precision_policy(name: str) -> str:
    """The Keras mixed-precision policy for a config value ("auto" picks by device)."""
    if name == "auto":
        return "mixed_float16" if backend.gpu_names() else "float32"
    return name


def make_deterministic() -> None:
    """Ask the backend for deterministic kernels (``deterministic: true``). On jax the CPU is
    deterministic already; on a GPU jax needs ``XLA_FLAGS=--xla_gpu_deterministic_ops=true``
    before it starts, which only the user's environment can set."""
    if backend.uses_tensorflow():
        _tf().config.experimental.enable_op_determinism()
    elif backend.name() == "torch":
        import torch  # torch backend only

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' condition
        torch.use_deterministic_algorithms(True)


@contextmanager
def global_policy(policy: str) -> Iterator[None]:
    """Keras' global precision policy set to ``policy`` for a block, then put back, so that a
    mixed-precision run does not leak its policy into models built after it (notebooks, tests).
    """
    keras = _keras.keras()
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


