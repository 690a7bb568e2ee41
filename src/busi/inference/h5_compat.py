"""Make a Keras 3 ``.h5`` load in tf-keras: rewrite its architecture JSON into tf-keras' form.

Keras 3 (any backend) writes ``model.save("x.h5")`` in the legacy HDF5 layout that tf-keras
reads: the weights (``model_weights``, layer by layer, in tf-keras' order) load in tf-keras
as they are. Only the architecture JSON (``model_config``) is in Keras 3's dialect, which
tf-keras refuses ("Unrecognized keyword arguments: ['batch_shape']"). The dialects differ in
a few, enumerable places for the standard layers busi's models use
(:data:`busi.inference.model_file.ALLOWED_LAYERS`), found by comparing both Kerases' JSON of the
same busi models:

- ``InputLayer``: ``batch_shape`` is ``batch_input_shape``; ``optional`` does not exist.
- ``dtype``: a ``DTypePolicy`` object instead of a string (or tf-keras' ``Policy`` object for a
  mixed policy).
- initializers carry ``input_axes``/``output_axes`` (None), ``Dense`` ``quantization_config``
  (None), and LoRA keys (0/None): unknown to tf-keras, dropped at their defaults.
- ``inbound_nodes``: ``{"args": [keras tensor or list of them], "kwargs": {}}`` instead of
  ``[[layer, node, tensor, kwargs], ...]``; ``input_layers``/``output_layers`` of a model with
  one input or output are a flat triple instead of a list of triples.

:func:`make_portable` rewrites a file in place with h5py alone (no TensorFlow, no Keras): the
architecture in tf-keras' form (which Keras 3 also reads: busi's tf-keras files always loaded
there), training state dropped (the optimizer variables of one Keras mean nothing to the
other). Anything it does not know is an error, never silently passed on.

Resuming on Keras 3 reads ``last.h5``'s optimizer state with :func:`optimizer_weights`: Keras
3.15's own ``load_model(compile=True)`` of an ``.h5`` builds the optimizer on no variables and
loses it (the next ``fit`` then fails).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any

import h5py
import numpy as np

# key -> the values at which a Keras-3-only key may be dropped (it then means what tf-keras does)
_DROP_AT_DEFAULT: dict[str, tuple] = {
    "optional": (False,),  # InputLayer
    "input_axes": (None,), "output_axes": (None,),  # initializers (Keras 3.12+)
    "quantization_config": (None,), "quantization_mode": (None,),
    "lora_rank": (None, 0), "lora_alpha": (None, 0),
}
_POLICY_CLASSES = ("DTypePolicy", "FloatDTypePolicy")


class NotConvertible(ValueError):
    """The Keras 3 architecture holds something this converter does not know."""


def _dtype(value: Any) -> Any:
    if isinstance(value, dict) and value.get("class_name") in _POLICY_CLASSES:
        name = value["config"]["name"]
        if name.startswith("mixed_"):
            return {"module": "keras.mixed_precision", "class_name": "Policy",
                    "config": {"name": name}, "registered_name": None}
        return name
    if isinstance(value, dict) and "class_name" in value:
        raise NotConvertible(f"dtype policy {value['class_name']!r}")
    return value


def _clean(value: Any) -> Any:
    """Nested objects (initializers, regularizers, constraints): drop Keras-3-only keys."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in _DROP_AT_DEFAULT:
                if item not in _DROP_AT_DEFAULT[key]:
                    raise NotConvertible(f"{key}={item!r} has no tf-keras equivalent")
                continue
            out[key] = _clean(item)
        return out
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return value


def _history(tensor: Any) -> list:
    if not (isinstance(tensor, dict) and tensor.get("class_name") == "__keras_tensor__"):
        raise NotConvertible(f"call argument {json.dumps(tensor)[:80]} is not a Keras tensor")
    name, node, index = tensor["config"]["keras_history"]
    return [name, node, index]


def _node(node: dict) -> list:
    args, kwargs = node.get("args", []), dict(node.get("kwargs", {}))
    if len(args) != 1:
        raise NotConvertible(f"a call with {len(args)} positional arguments")
    if any("__keras_tensor__" in json.dumps(v) for v in kwargs.values()):
        raise NotConvertible("a Keras tensor passed as a keyword argument")
    first = args[0]
    tensors = first if isinstance(first, list) else [first]
    return [_history(t) + [dict(kwargs)] for t in tensors]


def _endpoints(value: list) -> list:
    return [value] if value and isinstance(value[0], str) else value


def _layer(layer: dict) -> dict:
    cls = layer["class_name"]
    if cls in ("Functional", "Model", "Sequential"):
        raise NotConvertible("nested model: busi's models are one flat graph")
    config = _clean({k: v for k, v in layer["config"].items() if k != "dtype"})
    if "dtype" in layer["config"]:
        config["dtype"] = _dtype(layer["config"]["dtype"])
    if cls == "InputLayer":
        if "batch_shape" in config:
            config["batch_input_shape"] = config.pop("batch_shape")
        config.setdefault("sparse", False)
        config.setdefault("ragged", False)
    return {"class_name": cls, "config": config, "name": layer["name"],
            "inbound_nodes": [_node(n) for n in layer.get("inbound_nodes", [])]}


def is_keras3_config(config: dict) -> bool:
    """Whether a model_config is in Keras 3's dialect (its nodes are {"args": ...} objects or
    its input layer has batch_shape)."""
    for layer in config.get("config", {}).get("layers", []):
        if layer["class_name"] == "InputLayer" and "batch_shape" in layer["config"]:
            return True
        if any(isinstance(n, dict) for n in layer.get("inbound_nodes", [])):
            return True
    return False


def to_tf_keras_config(config: dict) -> dict:
    """The Keras 3 ``model_config`` of a flat functional model in tf-keras' form."""
    if config.get("class_name") not in ("Functional", "Model"):
        raise NotConvertible(f"model class {config.get('class_name')!r}")
    inner = copy.deepcopy(config["config"])
    unknown = set(inner) - {"name", "trainable", "layers", "input_layers", "output_layers"}
    if unknown:
        raise NotConvertible(f"model config keys {sorted(unknown)}")
    inner["layers"] = [_layer(layer) for layer in inner["layers"]]
    inner["input_layers"] = _endpoints(inner["input_layers"])
    inner["output_layers"] = _endpoints(inner["output_layers"])
    return {"class_name": "Functional", "config": inner}


def make_portable(path: str | os.PathLike, output: str | os.PathLike | None = None) -> bool:
    """Make the ``.h5`` at ``path`` (saved by Keras 3) load in tf-keras too, written to
    ``output`` (default: ``path``, replaced); a tf-keras file is left as it is. Only the model
    and its weights are kept: the training state (``training_config``, ``optimizer_weights``)
    is one Keras' own. The file is written anew, not edited: HDF5 does not give back the space
    of a deleted group. Returns whether a file was written."""
    output = path if output is None else output
    with h5py.File(path, "r") as source:
        raw = source.attrs.get("model_config")
        if raw is None:
            raise NotConvertible(f"{path}: weights only, no architecture")
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        if not is_keras3_config(config):
            if output != path:
                shutil.copyfile(path, output)
            return output != path
        try:
            converted = to_tf_keras_config(config)
        except NotConvertible as error:
            raise NotConvertible(f"{path}: its Keras 3 architecture cannot be written in "
                                 f"tf-keras' form: {error}") from error
        scratch = f"{output}.portable.tmp"
        with h5py.File(scratch, "w") as target:
            for key, value in source.attrs.items():
                if key not in ("model_config", "training_config"):
                    target.attrs[key] = value
            target.attrs["model_config"] = json.dumps(converted).encode("utf-8")
            version = source.attrs.get("keras_version")
            version = version.decode() if isinstance(version, bytes) else str(version)
            target.attrs["busi_converted_from"] = f"keras {version} ({source.attrs.get('backend')})"
            source.copy(source["model_weights"], target, "model_weights")
    os.replace(scratch, output)
    return True


def optimizer_weights(path: str | os.PathLike) -> list[np.ndarray] | None:
    """The optimizer variables saved in a full ``.h5`` (``include_optimizer=True``), in the order
    ``optimizer.set_weights`` takes them; None if it holds none."""
    with h5py.File(path, "r") as handle:
        if "optimizer_weights" not in handle:
            return None
        group = handle["optimizer_weights"]
        names = [n.decode("utf-8") if isinstance(n, bytes) else str(n)
                 for n in group.attrs["weight_names"]]
        return [np.asarray(group[name]) for name in names]
