"""Make sure busi runs on Keras 2 (tf-keras), which segmentation-models needs.

TensorFlow >= 2.16 resolves ``tf.keras`` to Keras 3 unless ``TF_USE_LEGACY_KERAS=1`` is set
before ``tf.keras`` is first touched, and segmentation-models picks its backend from
``SM_FRAMEWORK`` when it is imported. Both are read once, so they are set here, when ``busi`` is
imported, before anything of TensorFlow is used. Importing TensorFlow itself is left to the
modules that need it, so ``import busi`` and ``busi --help`` stay fast.
"""

from __future__ import annotations

import contextlib
import os
import sys
from types import ModuleType

ENV = {"TF_USE_LEGACY_KERAS": "1", "SM_FRAMEWORK": "tf.keras"}

KERAS3_MESSAGE = (
    "busi needs Keras 2 (the tf-keras package), but tf.keras in this Python process is already "
    "Keras {version}: TensorFlow's Keras was used before `import busi`. Restart the kernel (or "
    "Python) and put `import busi` before `import tensorflow`, or set the environment variable "
    "TF_USE_LEGACY_KERAS=1 before TensorFlow is imported. Check that tf-keras is installed "
    "(`pip install tf-keras`, same minor version as tensorflow)."
)


def set_environment() -> None:
    """Point TensorFlow at tf-keras and segmentation-models at tf.keras (always: a user's other
    setting would only break segmentation-models)."""
    for name, value in ENV.items():
        os.environ[name] = value
    # TensorFlow's C++ INFO lines (oneDNN, CUDA probing) drown notebook output; warnings stay.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


def tf_keras_version() -> str | None:
    """Which Keras ``tf.keras`` is bound to in this process, or None if not decided yet.

    Importing ``tensorflow`` leaves ``tf.keras`` as a lazy loader; the Keras version is chosen
    (from ``TF_USE_LEGACY_KERAS``) the first time an attribute of it is used, and the loader is
    then replaced by the real module. Looking at the loader's state tells, without deciding it.
    """
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return None
    bound = vars(tf).get("keras")
    if bound is None:
        return None
    if type(bound).__name__ == "KerasLazyLoader":
        if not object.__getattribute__(bound, "_tfll_initialized"):
            return None
        return str(object.__getattribute__(bound, "_tfll_keras_version"))
    name = getattr(bound, "__name__", "")
    return "tf_keras" if name.startswith("tf_keras") else "keras_3"


def check_keras() -> None:
    """Raise if this process is already locked into Keras 3 through ``tf.keras``."""
    if tf_keras_version() == "keras_3":
        version = getattr(sys.modules.get("keras"), "__version__", "3")
        raise ImportError(KERAS3_MESSAGE.format(version=version))


def keras() -> ModuleType:
    """The Keras 2 module that TensorFlow and segmentation-models use (``tf_keras``)."""
    check_keras()
    import tf_keras

    return tf_keras


def sm() -> ModuleType:
    """segmentation_models, imported with the tf.keras framework."""
    check_keras()
    # segmentation-models prints its framework on import; keep stdout for results (the CLI
    # prints JSON there) and send the notice to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        import segmentation_models

    if segmentation_models.framework() != "tf.keras":
        segmentation_models.set_framework("tf.keras")
    return segmentation_models
