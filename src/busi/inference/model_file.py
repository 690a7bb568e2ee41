"""Read what a Keras ``.h5`` model file holds without running it, and refuse files that could.

A full-model ``.h5`` stores its architecture as JSON (the ``model_config`` attribute). Loading
it rebuilds every layer from that JSON, and a ``Lambda`` layer carries Python bytecode (or a
function by module name) that runs when the model is built: a model file fetched from a release
or a hub can then run any code. Keras 3 refuses such files by default (``safe_mode=True``);
tf-keras, which busi uses, does not check ``.h5`` files at all. So busi reads the JSON first,
with h5py, and accepts only the standard layer classes its own builders emit
(:data:`ALLOWED_LAYERS`); anything else stops the load with the file, the layer and how to opt
in for a trusted file: ``safe_mode=False`` in Python, ``--unsafe-weights`` on the command line
(or :func:`enable_unsafe_deserialization` for the whole process, as in Keras 3).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py

from busi.errors import DataError
from busi.utils.digests import file_digest

#: Layer classes of busi's models (classic U-Net, segmentation-models U-Nets with the encoders
#: busi builds, EfficientNet-Lite encoders), checked against the builders in the tests. None of
#: them holds code: each is rebuilt from numbers and names in its config.
ALLOWED_LAYERS = frozenset({
    "InputLayer", "Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose",
    "BatchNormalization", "Activation", "ReLU", "LeakyReLU", "Softmax", "Add", "Multiply",
    "Concatenate", "Average", "UpSampling2D", "MaxPooling2D", "AveragePooling2D",
    "GlobalAveragePooling2D", "GlobalMaxPooling2D", "ZeroPadding2D", "Cropping2D", "Dropout",
    "SpatialDropout2D",
    "Rescaling", "Normalization", "Reshape", "Dense", "Flatten", "Permute",
    # efficientnet's Dropout with a noise shape, registered by busi
    # (busi.models.architectures.custom_objects)
    "FixedDropout",
})

#: Models that hold layers: allowed, and their layers are checked in turn.
CONTAINERS = frozenset({"Functional", "Model", "Sequential"})

#: Objects that carry code: refused wherever they appear in the config (a layer's activation
#: can be a serialised lambda too).
CODE_OBJECTS = frozenset({"Lambda", "TFOpLambda", "SlicingOpLambda", "__lambda__"})

UNSAFE_HINT = (
    "Load it only if you trust where the file came from: pass --unsafe-weights to the busi "
    "command, or safe_mode=False in Python "
    "(busi.inference.weights.load_model(path, safe_mode=False))"
)

_unsafe_allowed = False
_written_here: set[str] = set()  # SHA-256 of model files this process saved with such layers


class UnsafeModelError(DataError):
    """A model file holds a layer that could run code when loaded (or one busi does not know)."""


def enable_unsafe_deserialization() -> None:
    """Let every later load in this process accept any layer (Keras 3's function of this name):
    for files the user trusts, e.g. a model of another encoder with ``Lambda`` layers."""
    global _unsafe_allowed
    _unsafe_allowed = True


@contextlib.contextmanager
def unsafe_deserialization() -> Iterator[None]:
    """:func:`enable_unsafe_deserialization` for a ``with`` block only (the ``busi`` command's
    ``--unsafe-weights``), so the opt-in does not outlive the command that asked for it."""
    global _unsafe_allowed
    before, _unsafe_allowed = _unsafe_allowed, True
    try:
        yield
    finally:
        _unsafe_allowed = before


def safe_mode_default(safe_mode: bool | None) -> bool:
    """``safe_mode``, or when None, True unless :func:`enable_unsafe_deserialization` was called."""
    return (not _unsafe_allowed) if safe_mode is None else bool(safe_mode)


def remember_if_unsafe(model: Any, path: str | os.PathLike) -> None:
    """Record the SHA-256 of ``path``, just saved from ``model``, if a safe load would refuse it.

    Some segmentation-models encoders (SE-ResNet50+, ResNeXt, ...) build ``Lambda`` layers
    themselves: ``busi train`` with them must still evaluate the ``best.h5`` it has just
    written. A file whose bytes this very process wrote cannot carry anyone else's code; a
    copy from elsewhere, or the same file in a later process, is checked as usual.
    """
    try:
        check_model_config(json.loads(model.to_json()), path)
    except UnsafeModelError:
        _written_here.add(file_digest(path))


def _written_by_this_process(path: Path) -> bool:
    if not _written_here:
        return False

    return file_digest(path) in _written_here


def check_file(path: str | os.PathLike, config: dict[str, Any]) -> None:
    """:func:`check_model_config` for the file ``path`` (architecture ``config``), passing a
    file this process saved itself (see :func:`remember_if_unsafe`)."""
    try:
        check_model_config(config, path)
    except UnsafeModelError:
        if not _written_by_this_process(Path(path)):
            raise


def open_h5(path: Path) -> Any:
    """``h5py.File(path, "r")``, with a damaged file (a truncated download or copy) reported as
    a DataError naming the file instead of h5py's "Unable to synchronously open file"."""
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise DataError(
            f"{path}: cannot read this HDF5 file, it is damaged or incomplete (a truncated "
            f"download or copy?): {error}"
        ) from error


def read_model_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The architecture JSON stored in a Keras ``.h5`` (None for a weights-only file)."""
    path = Path(path)
    with open_h5(path) as handle:
        text = handle.attrs.get("model_config")
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf8")
    try:
        config = json.loads(text)
    except ValueError as error:
        raise DataError(f"{path}: the model architecture (model_config) is not valid JSON: "
                        f"{error}") from error
    if not isinstance(config, dict):
        raise DataError(f"{path}: the model architecture (model_config) is not a JSON object")
    return config


def layer_names(path: str | os.PathLike) -> set[str]:
    """The names of the layers of the model in a Keras ``.h5``, nested ones as
    ``model/layer`` (read with h5py, nothing reaches Keras): layers without weights, which
    :func:`busi.inference.weights.has_layer` cannot see, included."""
    config = read_model_config(path)
    return set() if config is None else {name for name, _ in _layers(config)}


def _layers(config: dict[str, Any], where: str = "") -> Iterator[tuple[str, str]]:
    """(path of the layer, class name) of every layer, nested models included."""
    for layer in (config.get("config") or {}).get("layers") or []:
        if not isinstance(layer, dict):
            continue
        name = str(layer.get("name") or (layer.get("config") or {}).get("name") or "?")
        yield where + name, str(layer.get("class_name"))
        if layer.get("class_name") in CONTAINERS:
            yield from _layers(layer, f"{where}{name}/")


def _code_objects(value: Any) -> Iterator[str]:
    """Class names of code-bearing objects anywhere in a config (activations included)."""
    if isinstance(value, dict):
        if value.get("class_name") in CODE_OBJECTS or "function_type" in value:
            yield str(value.get("class_name", "function"))
        for item in value.values():
            yield from _code_objects(item)
    elif isinstance(value, list):
        for item in value:
            yield from _code_objects(item)


def check_model_config(config: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise :class:`UnsafeModelError` unless every layer of ``config`` is a standard one.

    Code-bearing layers are named first: they are the danger, an unknown class only a reason
    for caution.
    """
    top = str(config.get("class_name"))
    if top not in CONTAINERS:
        raise UnsafeModelError(f"{path}: the model is a {top!r}, not a Keras functional or "
                               f"sequential model. {UNSAFE_HINT}")
    layers = list(_layers(config))
    code = [(name, cls) for name, cls in layers if cls in CODE_OBJECTS]
    if code:
        listed = ", ".join(f"{name!r} ({cls})" for name, cls in code)
        raise UnsafeModelError(
            f"{path}: refused to load: layer {listed} can run code stored in the file when the "
            f"model is built (busi's models use no such layer). {UNSAFE_HINT}"
        )
    hidden = sorted(set(_code_objects(config)))
    if hidden:
        raise UnsafeModelError(
            f"{path}: refused to load: the model config holds {', '.join(hidden)} objects, "
            f"which can run code stored in the file. {UNSAFE_HINT}"
        )
    unknown = [(name, cls) for name, cls in layers
               if cls not in ALLOWED_LAYERS and cls not in CONTAINERS]
    if unknown:
        listed = ", ".join(f"{name!r} ({cls})" for name, cls in unknown[:5])
        raise UnsafeModelError(
            f"{path}: refused to load: layer {listed}{' ...' if len(unknown) > 5 else ''} is "
            f"not one of the standard Keras layers busi's models use "
            f"({', '.join(sorted(ALLOWED_LAYERS))}). {UNSAFE_HINT}"
        )


__all__ = [
    "ALLOWED_LAYERS", "UnsafeModelError", "check_file", "check_model_config",
    "enable_unsafe_deserialization", "remember_if_unsafe",
    "open_h5", "read_model_config", "safe_mode_default", "unsafe_deserialization",
]
