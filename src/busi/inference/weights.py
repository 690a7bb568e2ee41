"""Save and load busi models as Keras ``.h5`` files, with errors that say what to do.

A busi ``.h5`` holds the whole model (architecture, weights, and by default the optimizer state
and the compile settings), including the input normalisation (see :mod:`busi.models.architectures`),
so it can be used for prediction with no other information. It loads with tf-keras through
:func:`load_model` (which supplies the segmentation-models losses and metrics by name), with
``tf.keras`` under ``TF_USE_LEGACY_KERAS=1``, and with plain Keras 3
(``keras.models.load_model(path, compile=False)``) for models whose layers are all standard.

Weights-only files (``model.save_weights("x.h5")``) carry no architecture: they go through
:func:`load_weights_into` a model built with the same configuration, which checks the
architecture first, since Keras' own error for a mismatch does not say what differs.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import h5py

from busi import _keras
from busi.errors import DataError
from busi.inference import h5_compat, model_file
from busi.inference.bundle import verify_file
from busi.models import architectures as models
from busi.models import backend, heads, losses
from busi.utils.atomic import atomic_path

H5_SUFFIXES = (".h5", ".hdf5")


def _custom_objects() -> dict[str, Any]:
    if backend.is_keras3():  # no segmentation-models/efficientnet objects: they need tf-keras
        return {**losses.CUSTOM_OBJECTS, **heads.CUSTOM_OBJECTS}
    return {**models.custom_objects(), **losses.CUSTOM_OBJECTS, **heads.CUSTOM_OBJECTS}


def save_model(model: Any, path: str | os.PathLike, include_optimizer: bool = True) -> Path:
    """Write the full ``model`` to ``path`` (``.h5``) atomically and return the path.

    The optimizer state is kept by default so that training can resume from a checkpoint;
    pass ``include_optimizer=False`` for a smaller file meant for prediction only.

    On Keras 3 such a prediction file (``best.h5``, published weights) is rewritten in tf-keras'
    dialect (:func:`busi.inference.h5_compat.make_portable`), so it loads in busi and plain
    tf.keras as well as in Keras 3 on any backend; a file with the optimizer (``last.h5``)
    stays Keras 3's, since its optimizer state belongs to that Keras.
    """
    path = Path(path)
    if path.suffix.lower() not in H5_SUFFIXES:
        raise ValueError(f"{path}: busi saves models as HDF5; use a .h5 file name")
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # .h5 is chosen on purpose (readable by tf-keras and Keras 3): silence "legacy format".
        warnings.filterwarnings("ignore", message=".*HDF5 file via `model.save\\(\\)`")
        # Keras 3 takes the format from the suffix (and warns about save_format)
        options = {} if backend.is_keras3() else {"save_format": "h5"}
        model.save(tmp, include_optimizer=include_optimizer, **options)
        _drop_keras2_only_keys(tmp)
        if backend.is_keras3() and not include_optimizer:
            h5_compat.make_portable(tmp)
    model_file.remember_if_unsafe(model, path)  # an encoder's own Lambda layers: see there
    return path


# Keys tf-keras writes into a layer's config that Keras 3 refuses ("Unrecognized keyword
# arguments"), with the value tf-keras takes when the key is absent, so dropping it changes nothing.
_KERAS2_ONLY = {"DepthwiseConv2D": {"groups": 1}}


def _drop_keras2_only_keys(path: Path) -> None:
    """Remove from the saved architecture the keys only tf-keras knows, at their default
    values, so the ``.h5`` of a model with ``DepthwiseConv2D`` (EfficientNet-Lite) also loads in
    Keras 3."""
    with h5py.File(path, "r+") as handle:
        raw = handle.attrs.get("model_config")
        if raw is None:
            return
        config = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        changed = False
        for layer in config.get("config", {}).get("layers", []):
            for key, default in _KERAS2_ONLY.get(layer.get("class_name"), {}).items():
                if layer["config"].get(key, default) == default and key in layer["config"]:
                    del layer["config"][key]
                    changed = True
        if changed:
            handle.attrs["model_config"] = json.dumps(config).encode("utf-8")


def _check_h5(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if not path.is_file() or not h5py.is_hdf5(path):
        raise DataError(
            f"{path} is not an HDF5 (.h5) Keras file"
            + (" (it looks like a Keras 3 .keras zip archive)" if path.suffix == ".keras" else "")
            + "; busi saves and loads models as .h5 (busi.inference.weights.save_model)"
        )


def _weights_group(handle: Any, path: Path) -> Any:
    group = handle["model_weights"] if "model_weights" in handle else handle
    if "layer_names" not in group.attrs:
        raise DataError(f"{path} is an HDF5 file but holds no Keras model or weights")
    return group


def load_model(path: str | os.PathLike, compile: bool = True, safe_mode: bool | None = None,
               verify: bool | None = None) -> Any:
    """Load a full model saved by :func:`save_model` (or ``model.save("x.h5")``).

    Args:
        path: the ``.h5`` file.
        compile: restore the loss, metrics and optimizer state as saved, so training can go on.
            Use False for prediction only (faster, and independent of the loss code).
        safe_mode: refuse, before anything is built, a file with a layer outside the standard
            Keras layers busi's models use (a ``Lambda`` layer runs code stored in the file;
            see :mod:`busi.inference.model_file`). False loads any layer: only for files you trust.
            None: True unless :func:`busi.inference.model_file.enable_unsafe_deserialization` was
            called. A file saved without them (``best.h5``, published weights) loads uncompiled
            either way, without Keras' warning to "compile it manually".
        verify: refuse a file whose digest differs from its record (a published sidecar or the
            run's ``state.json``: :func:`busi.inference.bundle.verify_file`) before tf-keras reads
            it; None: unless :func:`busi.utils.digests.skipping_digest_checks`. False: no check, for
            a caller that made it (:func:`busi.inference.predictor.open_model`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        busi.errors.DataError: not an HDF5 Keras file, a damaged one, or a weights-only file.
        busi.utils.digests.DigestMismatchError: the file is not the one its record was made for.
        busi.inference.model_file.UnsafeModelError: safe mode and a layer that is not allowed.
    """
    path = Path(path)
    _check_h5(path)
    if verify is not False:
        verify_file(path, verify)
    config = model_file.read_model_config(path)
    if config is None:
        with model_file.open_h5(path) as handle:
            _weights_group(handle, path)
        raise DataError(
            f"{path} holds weights only, no model architecture. Build the model with the "
            "same configuration (busi.models.architectures.build(config) or build_model(...)) "
            "and load "
            "the file with busi.inference.weights.load_weights_into(model, path)"
        )
    _check_saved_by_tf_keras(path)
    if model_file.safe_mode_default(safe_mode):
        model_file.check_file(path, config)
    if compile:  # nothing to restore from a file saved without its training state
        with model_file.open_h5(path) as handle:
            compile = "training_config" in handle.attrs
    keras = _keras.keras()
    try:
        return keras.models.load_model(path, custom_objects=_custom_objects(), compile=compile)
    except (OSError, KeyError) as error:  # h5py: a dataset cut short or missing
        raise DataError(f"{path}: cannot read the model, the file is damaged or incomplete: "
                        f"{error}") from error
    except (TypeError, ValueError, AttributeError) as error:
        # An architecture tf-keras cannot rebuild (an unknown activation or layer option, a
        # layer config of another Keras version): the cause, with the file named.
        reader = "Keras 3" if backend.is_keras3() else "tf-keras"
        raise DataError(f"{path}: {reader} cannot rebuild the model stored in it: "
                        f"{type(error).__name__}: {error}") from error


def _check_saved_by_tf_keras(path: Path) -> None:
    """Refuse a ``.h5`` written by Keras 3, whose layer configs tf-keras does not read (it
    fails with "Unrecognized keyword arguments: ['batch_shape']", naming no file). Keras 3
    reads both dialects; files busi made portable are in tf-keras'."""
    if backend.is_keras3():
        return
    with model_file.open_h5(path) as handle:
        if "busi_converted_from" in handle.attrs:  # busi.inference.h5_compat.make_portable
            return
        version = handle.attrs.get("keras_version")
    if isinstance(version, bytes):
        version = version.decode("utf8", "replace")
    if isinstance(version, str) and version.split(".")[0].isdigit() and \
            int(version.split(".")[0]) >= 3:
        raise DataError(
            f"{path}: saved by Keras {version}; busi reads .h5 files written by tf-keras "
            "(Keras 2), as busi.inference.weights.save_model writes them. Load it with Keras 3 and "
            "rebuild the model with busi, or save it again from tf-keras"
        )


def _file_layers(path: Path) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(layer name, weight shapes) of each layer with weights in a Keras ``.h5``, in order."""

    def text(value: Any) -> str:
        return value.decode("utf8") if isinstance(value, bytes) else str(value)

    layers = []
    with model_file.open_h5(path) as handle:
        group = _weights_group(handle, path)
        for name in map(text, group.attrs["layer_names"]):
            names = [text(weight) for weight in group[name].attrs["weight_names"]]
            if names:
                layers.append((name, [tuple(group[name][weight].shape) for weight in names]))
    return layers


def has_layer(path: str | os.PathLike, name: str) -> bool:
    """Whether the ``.h5`` at ``path`` holds weights of a layer called ``name`` (read with h5py:
    nothing reaches Keras)."""
    return any(layer == name for layer, _ in _file_layers(Path(path)))


def _model_layers(model: Any) -> list[tuple[str, list[tuple[int, ...]]]]:
    """Same as :func:`_file_layers` for a model, in the order Keras writes the weights."""
    layers = []
    for layer in model.layers:
        weights = layer.trainable_weights + layer.non_trainable_weights
        if weights:
            layers.append((layer.name, [tuple(weight.shape) for weight in weights]))
    return layers


def _describe_mismatch(
    saved: list[tuple[str, list]], built: list[tuple[str, list]]
) -> str | None:
    for index, (file_layer, model_layer) in enumerate(zip(saved, built, strict=False)):
        if file_layer[1] != model_layer[1]:
            return (
                f"first difference at weighted layer #{index}: file {file_layer[0]!r} has "
                f"weights of shapes {file_layer[1]}, model {model_layer[0]!r} has {model_layer[1]}"
            )
    if len(saved) != len(built):
        return f"the file has {len(saved)} layers with weights, the model {len(built)}"
    return None


def load_weights_into(model: Any, path: str | os.PathLike) -> Any:
    """Load the weights in ``path`` (weights-only or full-model ``.h5``) into ``model``.

    ``model`` must have the architecture the weights were saved from: build it with the same
    configuration (encoder, input channels, decoder filters, depth, ...). Weights are matched
    by layer order, as Keras does; the input size does not matter.

    Returns:
        ``model``, for chaining.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        busi.errors.DataError: not an HDF5 Keras file.
        ValueError: the architectures differ (the message says where).
    """
    path = Path(path)
    _check_h5(path)
    mismatch = _describe_mismatch(_file_layers(path), _model_layers(model))
    if mismatch:
        raise ValueError(
            f"the weights in {path} do not fit model {model.name!r}: {mismatch}. Build the model "
            "with the configuration the weights were trained with (encoder, decoder filters, "
            "depth, base filters)"
        )
    model.load_weights(path)
    return model


def with_policy(model: Any, policy: str) -> Any:
    """The same model with every layer under ``policy``, weights copied; ``model`` if already so.

    ``"mixed_bfloat16"``: on CPUs with AVX512_BF16 (or AMX) oneDNN runs bfloat16 convolutions
    about twice as fast as float32. The input layer, the ``preprocess`` layer and the output
    layers stay float32: bfloat16 holds only ~3 significant digits, too coarse for pixel
    normalisation and for probabilities near a threshold. ``"float32"`` undoes that for a model
    saved from mixed-precision training, so "float32" means float32. A layer's dtype is fixed
    in its config (setting the global policy does not reach it), so the config is rewritten.
    """
    keras = _keras.keras()
    keep = set(model.output_names) | {"preprocess"}
    wanted = {
        layer.name: "float32" if layer.name in keep else policy
        for layer in model.layers if type(layer).__name__ != "InputLayer"
    }
    if all(model.get_layer(name).dtype_policy.name == p for name, p in wanted.items()):
        return model
    config = model.get_config()
    for layer in config["layers"]:
        if layer["name"] in wanted and "dtype" in layer["config"]:
            layer["config"]["dtype"] = wanted[layer["name"]]

    try:  # segmentation-models' objects: tf-keras only (efficientnet imports TensorFlow)
        custom = {} if backend.is_keras3() else models.custom_objects()
    except ImportError:  # efficientnet (only some encoders need it) is not installed
        custom = {}
    rebuilt = keras.Model.from_config(config, custom_objects=custom)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def check_segmentation_model(model: Any, path: str | os.PathLike) -> None:
    """Raise DataError unless ``model`` maps images (B, H, W, 3) to one probability map
    (B, H, W, 1), as every busi model does (first, with the image-level head): another Keras
    model (a classifier, say) would otherwise fail deep in prediction, with a shape and no file
    name."""
    inputs, outputs = model.input_shape, model.output_shape
    if heads.has_image_head(model):  # [mask, label]: the mask is checked like any model's
        outputs = outputs[0]
    if (isinstance(inputs, list) or isinstance(outputs, list) or len(inputs) != 4
            or len(outputs) != 4 or inputs[-1] != 3 or outputs[-1] != 1):
        raise DataError(
            f"{path}: not a busi segmentation model: it maps inputs of shape {inputs} to "
            f"{outputs}; busi models map images (batch, height, width, 3) to lesion "
            "probabilities (batch, height, width, 1)"
        )


def load_for_inference(path: str | os.PathLike, safe_mode: bool | None = None,
                       verify: bool | None = None) -> Any:
    """A model file loaded for prediction: uncompiled and in float32, whatever precision it was
    trained in (``last.h5`` of a mixed-precision run keeps the training policy), so evaluation
    scores are float32 scores and match what published weights give. Checked to be a
    segmentation model (:func:`check_segmentation_model`); ``safe_mode`` and ``verify`` as in
    :func:`load_model`."""
    model = load_model(path, compile=False, safe_mode=safe_mode, verify=verify)
    check_segmentation_model(model, path)
    return with_policy(model, "float32")
