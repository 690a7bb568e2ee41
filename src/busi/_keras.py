"""Make sure busi runs on Keras 2 (tf-keras), which segmentation-models needs, unless a Keras 3
backend was chosen (:mod:`busi.models.backend`: ``backend: jax``, ``torch`` or ``tensorflow``),
in which case :func:`keras` gives Keras 3 and the guard below does not apply.

TensorFlow >= 2.16 resolves ``tf.keras`` to Keras 3 unless ``TF_USE_LEGACY_KERAS=1`` is set
before ``tf.keras`` is first touched, and segmentation-models picks its backend from
``SM_FRAMEWORK`` when it is imported. Both are read once, so they are set here, when ``busi`` is
imported, before anything of TensorFlow is used. Importing TensorFlow itself is left to the
modules that need it, so ``import busi`` and ``busi --help`` stay fast.

TensorFlow's C++ start-up lines (oneDNN notices, CUDA probing, and on a machine without an
NVIDIA driver ``E0000 ... failed call to cuInit: UNKNOWN ERROR (303)``) look like failures to a
new user and drown notebook output, so they are off by default: ``TF_CPP_MIN_LOG_LEVEL`` is set
unless the user set it, and the lines TensorFlow writes before that level applies are dropped at
the first ``import tensorflow`` of the process (:class:`_QuietTensorFlowFinder`).
``TF_CPP_MIN_LOG_LEVEL=0`` before ``import busi`` turns all of it back on.

Other known noise is dropped where it starts, by exact message, never by level: TensorFlow's
"Compiled the loaded model, but the compiled metrics have yet to be built" (logged whenever
training saves the uncompiled float32 copy that becomes ``best.h5``: nothing is wrong), LiteRT's
"Created TensorFlow Lite XNNPACK delegate" (:func:`native_noise_dropped`), OpenCV's C++
``[ERROR:...]`` lines for unreadable images (busi names each such file itself;
``OPENCV_LOG_LEVEL`` set by the user wins), and a warning of busi's own printed again and again
with the busi source line it points at (:func:`_quiet_busi_warnings`).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from busi.models import backend

ENV = {"TF_USE_LEGACY_KERAS": "1", "SM_FRAMEWORK": "tf.keras"}

KERAS3_MESSAGE = (
    "busi needs Keras 2 (the tf-keras package), but tf.keras in this Python process is already "
    "Keras {version}: TensorFlow's Keras was used before `import busi`. Restart the kernel (or "
    "Python) and put `import busi` before `import tensorflow`, or set the environment variable "
    "TF_USE_LEGACY_KERAS=1 before TensorFlow is imported. Check that tf-keras is installed "
    "(`pip install tf-keras`, same minor version as tensorflow). Models with busi's own encoders "
    "can also train on Keras 3: backend tensorflow, jax or torch (`busi train --backend`)."
)


def set_environment() -> None:
    """Point TensorFlow at tf-keras and segmentation-models at tf.keras (always: a user's other
    setting would only break segmentation-models)."""
    for name, value in ENV.items():
        os.environ[name] = value
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", default_log_level())
    os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")  # read when OpenCV first logs
    # TensorFlow's Python code logs to "tensorflow", Keras 3 to absl's logger
    for logger in (logging.getLogger("tensorflow"), logging.getLogger("absl")):
        if not any(isinstance(f, _KnownLogNoise) for f in logger.filters):
            logger.addFilter(_KnownLogNoise())
    _quiet_busi_warnings()
    if "tensorflow" not in sys.modules and not any(
        isinstance(finder, _QuietTensorFlowFinder) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())


class _KnownLogNoise(logging.Filter):
    """Drops log records that say nothing is wrong when nothing is (see the module docstring)."""

    MESSAGES = ("Compiled the loaded model, but the compiled metrics have yet to be built",
                # Keras 3 on every .h5 save: busi chooses .h5 on purpose (both Kerases read it)
                "You are saving your model as an HDF5 file via `model.save()`")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.MESSAGES)


BUSI_SOURCE = os.path.dirname(os.path.abspath(__file__))


def _quiet_busi_warnings() -> None:
    """Show each warning busi gives once per process, as one line without the busi source line
    it points at (a dataset problem met by training and again by evaluation is one problem).
    Warnings pointing at a user's code, and every other library's, keep Python's format."""
    warnings.filterwarnings("once", category=UserWarning, module=r"busi(\.|$)")
    if getattr(warnings.formatwarning, "_busi", False):
        return
    original = warnings.formatwarning

    def formatwarning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, line: str | None = None) -> str:
        if os.path.abspath(filename).startswith(BUSI_SOURCE + os.sep):
            return f"{category.__name__}: {message}\n"
        return original(message, category, filename, lineno, line)

    formatwarning._busi = True  # type: ignore[attr-defined]
    warnings.formatwarning = formatwarning


NVIDIA_DRIVER = "/proc/driver/nvidia"

# Lines TensorFlow's C++ code prints while it is imported, before TF_CPP_MIN_LOG_LEVEL applies
# (absl logs everything to stderr until it is initialised): noise, whatever the level.
IMPORT_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|cudart_stub\.cc.*Could not find cuda drivers"
    r"|oneDNN custom operations are on"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions|TF-TRT Warning: Could not find TensorRT"
)


def default_log_level(driver: str = NVIDIA_DRIVER) -> str:
    """TensorFlow's C++ log level busi sets unless the user set one.

    "2" (errors only) on a machine with an NVIDIA driver, where an error may explain a failing
    GPU; "3" (none) without one, where the only error TensorFlow logs is the failed CUDA probe.
    """
    return "2" if os.path.exists(driver) else "3"


def quiet_requested() -> bool:
    """False when the user asked for TensorFlow's C++ logs (TF_CPP_MIN_LOG_LEVEL below 2)."""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") not in ("0", "1")


NATIVE_NOISE = re.compile(r"INFO: Created TensorFlow Lite XNNPACK delegate for CPU")
"""What LiteRT (and tf.lite) print to stderr at a process's first interpreter allocation."""


def native_noise_dropped() -> contextlib.AbstractContextManager[None]:
    """A block whose :data:`NATIVE_NOISE` lines on stderr are dropped (others kept), unless the
    user asked for TensorFlow's logs (:func:`quiet_requested`)."""
    return _filtered_stderr(NATIVE_NOISE) if quiet_requested() else contextlib.nullcontext()


@contextlib.contextmanager
def _filtered_stderr(noise: re.Pattern[str] | None = None) -> Iterator[None]:
    """Drop lines matching ``noise`` (default :data:`IMPORT_NOISE`) written to the stderr file
    descriptor in this block.

    TensorFlow's C++ code writes to the descriptor, not to ``sys.stderr``, so the descriptor is
    pointed at a temporary file; the other lines are written back to stderr afterwards, so a
    real error message is not lost. Python exceptions pass through unchanged.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr descriptor (some embedded interpreters)
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            noise = IMPORT_NOISE if noise is None else noise
            kept = [line for line in capture.read().decode(errors="replace").splitlines()
                    if line.strip() and not noise.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


class _QuietLoader(importlib.abc.Loader):
    """Runs TensorFlow's own loader with its start-up noise filtered out of stderr, then takes
    the finder that made it off the import path: TensorFlow starts once."""

    def __init__(self, loader: importlib.abc.Loader, finder: importlib.abc.MetaPathFinder):
        self.loader, self.finder = loader, finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self.finder]
        if not quiet_requested():
            self.loader.exec_module(module)
            return
        with _filtered_stderr():
            self.loader.exec_module(module)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Catches the first ``import tensorflow`` of the process, wherever it happens (busi's
    modules, tf-keras, segmentation-models, a notebook cell), to import it quietly; then steps
    aside. Asking whether TensorFlow is installed (``importlib.util.find_spec``, as the backend
    check does) loads nothing and leaves it in place."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "tensorflow":
            return None
        for finder in [f for f in sys.meta_path if f is not self]:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _QuietLoader(spec.loader, self)
                return spec
        return None


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
    # `import tensorflow.keras` after tf.keras was resolved (efficientnet's
    # inject_tfkeras_modules, run on every model load; or a user's own import) re-imports
    # tf_keras' module under the name "tensorflow.keras": its file tells which Keras it is.
    path = str(getattr(bound, "__file__", "") or "")
    is_tf_keras = name.startswith("tf_keras") or f"{os.sep}tf_keras{os.sep}" in path
    return "tf_keras" if is_tf_keras else "keras_3"


def check_keras() -> None:
    """Raise if this process is already locked into Keras 3 through ``tf.keras``."""
    if tf_keras_version() == "keras_3":
        version = getattr(sys.modules.get("keras"), "__version__", "3")
        raise ImportError(KERAS3_MESSAGE.format(version=version))


def keras() -> ModuleType:
    """The Keras of busi's backend (:mod:`busi.models.backend`): ``tf_keras`` (Keras 2, what
    segmentation-models uses) by default, Keras 3 on the tensorflow, jax and torch backends."""
    if backend.is_keras3():
        return backend.keras3()
    check_keras()
    import tf_keras  # start-up: TensorFlow; `import busi` runs this module

    backend.handed_out(backend.DEFAULT)
    return tf_keras


def sm() -> ModuleType:
    """segmentation_models, imported with the tf.keras framework (tf-keras backend only)."""
    if backend.is_keras3():
        raise backend.BackendError(
            f"segmentation-models needs the tf-keras backend, not {backend.name()!r}")
    check_keras()
    # segmentation-models prints "using `tf.keras` framework" on import, in every command and
    # notebook; the framework is checked (and set) right below, so the notice is dropped.
    with contextlib.redirect_stdout(io.StringIO()):
        import segmentation_models  # start-up: TensorFlow; `import busi` runs this module

    if segmentation_models.framework() != "tf.keras":
        segmentation_models.set_framework("tf.keras")
    return segmentation_models
