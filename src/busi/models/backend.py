"""Which Keras busi runs on: tf-keras (Keras 2, the default) or Keras 3 on TensorFlow, JAX or
PyTorch, chosen by one name (the config's ``backend``; ``BUSI_BACKEND`` in the environment).

The builders, losses and callbacks ask :func:`busi._keras.keras` for their Keras and
:func:`ops` for their tensor ops, so one copy of the model code serves both Kerases. Keras 3
reads its backend once, when ``keras`` is first imported, so :func:`use` must run before
anything imports it: training calls it first thing with the config's choice. On ``jax`` and
``torch`` nothing here imports TensorFlow.

tf-keras stays the default because segmentation-models' encoders and losses need it, and
because existing runs and published results were made with it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType, SimpleNamespace
from typing import Any

NAMES = ("tf-keras", "tensorflow", "jax", "torch")
"""Values of ``backend``: "tf-keras" is Keras 2 (tf_keras) on TensorFlow; the others are Keras 3
with that backend."""
DEFAULT = "tf-keras"
ENV = "BUSI_BACKEND"

PACKAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "tf-keras": (("tensorflow", "tensorflow"), ("tf_keras", "tf-keras")),
    "tensorflow": (("tensorflow", "tensorflow"), ("keras", "keras>=3")),
    "jax": (("jax", "jax[cpu]"), ("keras", "keras>=3")),
    "torch": (("torch", "torch"), ("keras", "keras>=3")),
}
"""Backend -> (module it imports, pip requirement that provides it) for each package it needs."""

_chosen: str | None = None
_handed_out: str | None = None
"""The backend whose Keras busi has given out in this process (modules hold on to it)."""


class BackendError(ValueError):
    """A backend that is unknown, not installed, or not the one this process already uses."""


def installed() -> list[str]:
    """The backends whose packages this Python environment has (found, not imported)."""
    return [name for name in NAMES if not missing(name)]


def missing(name: str) -> list[str]:
    """pip requirements ``name`` needs that are not installed."""
    return [pip for module, pip in PACKAGES[name] if importlib.util.find_spec(module) is None]


def check(name: str) -> str:
    """``name`` if it is a backend whose packages are installed; else an error that names the
    installed backends, or the pip command that installs the missing packages."""
    if name not in NAMES:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(NAMES)} "
                           f"(installed here: {', '.join(installed()) or 'none'})")
    needed = missing(name)
    if needed:
        quoted = " ".join(f"'{pip}'" for pip in needed)
        raise BackendError(f"backend {name!r} needs {', '.join(needed)}, not installed in "
                           f"{sys.executable}: run `{sys.executable} -m pip install {quoted}` "
                           f"(installed backends: {', '.join(installed()) or 'none'})")
    return name


def use(name: str) -> str:
    """Choose the backend of this process, before anything imports Keras; an error once another
    one is in use (Keras 3 cannot change its backend after it is imported)."""
    global _chosen
    check(name)
    keras3 = sys.modules.get("keras")
    if name != "tf-keras" and keras3 is not None and hasattr(keras3, "backend"):
        loaded = keras3.backend.backend()
        if loaded != name:
            raise BackendError(f"backend {name!r} asked for, but Keras 3 was already imported "
                               f"with backend {loaded!r} in this process; start a new Python "
                               f"process, or set {ENV}={name} before anything imports keras")
    current = _chosen or _handed_out
    if current is not None and current != name:
        raise BackendError(f"busi already runs on backend {current!r} in this process; start a "
                           f"new Python process for backend {name!r}")
    _chosen = name
    os.environ[ENV] = name
    if name != "tf-keras":
        os.environ["KERAS_BACKEND"] = name
    return name


def handed_out(chosen: str) -> None:
    """Note that busi's modules now hold ``chosen``'s Keras: a later :func:`use` of another
    backend is refused rather than leaving them on the wrong Keras."""
    global _handed_out
    _handed_out = chosen


def name() -> str:
    """The backend in use: :func:`use`'s choice, else ``$BUSI_BACKEND``, else tf-keras."""
    chosen = _chosen or os.environ.get(ENV) or DEFAULT
    if chosen not in NAMES:
        raise BackendError(f"{ENV}={chosen!r} is no backend: choose one of {', '.join(NAMES)}")
    return chosen


def is_keras3() -> bool:
    """Whether busi runs on Keras 3 (any backend but tf-keras)."""
    return name() != "tf-keras"


def uses_tensorflow() -> bool:
    """Whether the backend is TensorFlow's (tf-keras, or Keras 3 on tensorflow)."""
    return name() in ("tf-keras", "tensorflow")


def keras3() -> ModuleType:
    """Keras 3's ``keras``, on the chosen backend (imports no TensorFlow on jax/torch)."""
    chosen = name()
    if _handed_out == chosen and "keras" in sys.modules:
        return sys.modules["keras"]  # checked when first handed out; losses ask on every call
    check(chosen)
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = chosen
    module = importlib.import_module("keras")
    handed_out(chosen)
    loaded = module.backend.backend()
    if loaded != chosen:
        raise BackendError(f"busi backend {chosen!r}, but Keras 3 runs on {loaded!r}: keras was "
                           f"imported before busi chose (set {ENV} or KERAS_BACKEND first)")
    return module


def ops() -> Any:
    """Tensor ops under Keras 3's names (``keras.ops``); on tf-keras the same names mapped to
    TensorFlow, so a loss or metric is written once for both Kerases."""
    if is_keras3():
        return keras3().ops
    return _tf_ops()


_TF_OPS: Any = None


def _tf_ops() -> Any:
    global _TF_OPS
    if _TF_OPS is None:
        import tensorflow as tf  # tf-keras only: jax/torch must not import TensorFlow

        _TF_OPS = SimpleNamespace(
            cast=tf.cast, convert_to_tensor=tf.convert_to_tensor,
            sum=tf.reduce_sum, mean=tf.reduce_mean, max=tf.reduce_max,
            clip=tf.clip_by_value, log=tf.math.log, exp=tf.exp, power=tf.pow,
            where=tf.where, maximum=tf.maximum, minimum=tf.minimum,
            argmax=lambda x, axis=-1: tf.argmax(x, axis=axis),
            equal=tf.equal, greater=tf.greater,
        )
    return _TF_OPS


def get_value(variable: Any) -> float:
    """A scalar variable's value (the optimizer's learning rate) on either Keras."""
    if is_keras3():
        return float(keras3().ops.convert_to_numpy(variable))
    import tf_keras  # tf-keras only: jax/torch must not import TensorFlow

    return float(tf_keras.backend.get_value(variable))


def set_value(variable: Any, value: float) -> None:
    """Assign a scalar variable (the optimizer's learning rate) on either Keras."""
    if is_keras3():
        variable.assign(value)
        return
    import tf_keras  # tf-keras only: jax/torch must not import TensorFlow

    tf_keras.backend.set_value(variable, value)


def gpu_names() -> list[str]:
    """The GPUs the backend sees, set up nothing."""
    if uses_tensorflow():
        import tensorflow as tf  # TensorFlow backends only

        return [gpu.name for gpu in tf.config.list_physical_devices("GPU")]
    if name() == "jax":
        import jax  # jax backend only

        return [str(device) for device in jax.devices() if device.platform == "gpu"]
    import torch  # torch backend only

    return [f"cuda:{index}" for index in range(torch.cuda.device_count())]


def versions() -> dict[str, Any]:
    """What env.json records of the backend: its name, Keras' version and the jax or torch
    version (read from the modules already imported; nothing new is imported)."""
    info: dict[str, Any] = {"backend": name()}
    if is_keras3():
        info["keras"] = getattr(sys.modules.get("keras"), "__version__", None)
    for module in ("jax", "torch"):
        if module in sys.modules:
            info[module] = getattr(sys.modules[module], "__version__", None)
    return info
