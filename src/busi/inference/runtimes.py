"""What runs a model file: one :class:`Predictor` per format (Keras ``.h5``, ONNX under OpenVINO
or onnxruntime, TFLite), all with the same contract, so the code that predicts never asks which.

The contract: float32 ``[B, H, W, 3]`` images in [0, 255] in, float32 ``[B, H, W, 1]`` sigmoid
probabilities out, whatever the file. :func:`busi.inference.predictor.load` picks the class from the
file suffix; :mod:`busi.inference.export` writes the ``.onnx`` and ``.tflite`` files. onnxruntime,
openvino and ai-edge-litert are optional (``pip install busi[fast]``), imported only when a file
needs them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from busi import _keras
from busi.errors import DataError
from busi.inference.weights import load_for_inference, with_policy
from busi.models import backend, heads

if TYPE_CHECKING:
    from busi.inference.bundle import ModelSettings

RUNTIMES = ("keras", "openvino", "onnxruntime", "tflite")
"""What can run a model file; :func:`busi.inference.predictor.open_model` picks one from the file
suffix."""

PRECISION_KEY = "busi.precision"
"""ONNX metadata key: the precision the file was exported for ("float32", "bfloat16", "int8")."""

_EXTRA_HINT = "install the optional extra with `pip install 'busi[fast]'` (or `pip install {}`)"


def require(module: str, package: str, purpose: str) -> Any:
    """Import an optional dependency, or raise an ImportError that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the {package!r} package: " + _EXTRA_HINT.format(package)
        ) from error


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (imports are slow)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: in sys.modules with no spec (e.g. None)
        return False


def cores() -> int:
    """CPU cores this process may use (the affinity mask, not the machine's core count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class Predictor:
    """Runs one model file on image batches, whatever its format.

    Attributes:
        input_size: ``(height, width)`` the model takes (resize images to it first, e.g. with
            :func:`busi.data.geometry.to_model`); None for a Keras model built without a fixed
            size, which takes any (the caller then says which, as at training).
        runtime: what runs it: one of :data:`RUNTIMES`.
        precision: what it computes in ("float32", "bfloat16", "int8", "dynamic-int8", ...).
        path: the model file.

    ``input_shape`` (``(None, H, W, 3)``) and calling the predictor like a function are also
    provided, so code written for Keras models (``model.input_shape``, ``model(batch)``) works.
    """

    runtime = "?"
    settings: ModelSettings | None = None
    """How the file is used and what vouched for it; set by
    :func:`busi.inference.predictor.open_model`."""

    def __init__(self, path: Path, input_size: tuple[int, int] | None, precision: str) -> None:
        self.path = path
        self.input_size = input_size
        self.precision = precision

    @property
    def input_shape(self) -> tuple[None, int | None, int | None, int]:
        return (None, *(self.input_size or (None, None)), 3)

    has_head = False
    """Whether the model also gives the image-level output (:mod:`busi.models.heads`)."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities float32 ``[B, H, W, 1]`` of images float32 ``[B, H, W, 3]`` in 0-255."""
        return self.predict_with_labels(batch)[0]

    __call__ = predict

    def predict_with_labels(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`predict`, and the image-level probabilities ``[B, 3]`` (normal, benign,
        malignant) of a model with the head, else None."""
        array = np.ascontiguousarray(batch, dtype=np.float32)
        if array.ndim != 4 or array.shape[-1] != 3 or (
                self.input_size is not None and array.shape[1:3] != self.input_size):
            expected = "H, W" if self.input_size is None else \
                f"{self.input_size[0]}, {self.input_size[1]}"
            raise ValueError(
                f"{self.path.name}: expected a batch [B, {expected}, 3], got shape "
                f"{np.shape(batch)}"
            )
        if len(array) == 0:
            return np.zeros((*array.shape[:3], 1), np.float32), None
        out, labels = self._run(array), None
        if isinstance(out, tuple):
            out, labels = out
            labels = np.asarray(labels, dtype=np.float32).reshape(len(array), -1)
        out = np.asarray(out, dtype=np.float32)
        return out.reshape(*array.shape[:3], 1), labels

    def _run(self, batch: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The mask probabilities of ``batch``, or ``(mask, labels)`` for a model with the
        head."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path.name!r}, runtime={self.runtime!r}, "
            f"precision={self.precision!r}, input_size={self.input_size})"
        )


def model_input_size(model: Any) -> tuple[int, int] | None:
    """``(height, width)`` of a model's fixed input, or None if it has none (or no model): the
    one reader of it for inference, export and publishing."""
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, list):  # several inputs: not a busi model
        return None
    if shape is None or len(shape) != 4 or shape[1] is None or shape[2] is None:
        return None
    return int(shape[1]), int(shape[2])


class KerasPredictor(Predictor):
    """A busi ``.h5`` run by Keras, in float32 or rebuilt under ``mixed_bfloat16``.

    Loaded by :func:`busi.inference.weights.load_for_inference`, the safe loader: a model file never
    runs code unless the user trusts it (``safe_mode=False``).
    """

    runtime = "keras"

    def __init__(self, path: Path, precision: str = "float32", safe_mode: bool | None = None,
                 verify: bool | None = None) -> None:
        policies = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
        if precision not in policies:
            raise ValueError(
                f"{path}: Keras precision must be 'float32' or 'bfloat16', got {precision!r}")
        model = with_policy(load_for_inference(path, safe_mode=safe_mode, verify=verify),
                            policies[precision])
        fixed = model_input_size(model)  # (B, H, W, 3) checked by load_for_inference
        super().__init__(path, fixed, precision)
        self.model = model
        self.has_head = heads.has_image_head(model)
        self._call = None
        if not backend.is_keras3():
            import tensorflow as tf  # start-up: TensorFlow; predictor imports runtimes

            # one traced graph for every batch size: no retracing per batch, no predict()
            # overhead (probabilities bit-identical to predict_on_batch's, measured on lite0)
            self._call = tf.function(
                lambda x: model(x, training=False),
                input_signature=[tf.TensorSpec((None, *(fixed or (None, None)), 3), tf.float32)],
            )

    def _run(self, batch: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        if self._call is None:  # Keras 3: its own compiled predict step (no TensorFlow)
            out = self.model.predict_on_batch(batch)
            if self.has_head:
                return np.asarray(out[0]), np.asarray(out[1])
            return np.asarray(out)
        out = self._call(batch)
        if self.has_head:
            return out[0].numpy(), out[1].numpy()
        return out.numpy()


class OpenVinoPredictor(Predictor):
    """An ``.onnx`` run by OpenVINO (float32, or bfloat16 if the file was exported for it)."""

    runtime = "openvino"

    def __init__(self, path: Path, precision: str, threads: int) -> None:
        ov = require("openvino", "openvino", "running .onnx files with OpenVINO")
        core = ov.Core()
        model = core.read_model(str(path))
        shape = model.inputs[0].get_partial_shape()
        hw = (shape[1].get_length(), shape[2].get_length())
        hint = "bf16" if precision == "bfloat16" else "f32"  # int8 QDQ files run int8 anyway
        self._compiled = core.compile_model(
            model, "CPU",
            # no pinning of threads to cores: on a shared machine a pinned thread waits for its
            # busy core, and the whole layer with it (measured: half the speed under load)
            {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint,
             "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False},
        )
        actual = str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))
        if precision == "bfloat16" and "bf" not in actual.lower():
            precision = "float32"  # no bfloat16 on this CPU: OpenVINO computes in float32
        super().__init__(path, hw, precision)
        self._request = self._compiled.create_infer_request()
        self.has_head = len(self._compiled.outputs) == 2

    def _run(self, batch: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        results = self._request.infer({0: batch})
        return _mask_and_labels([results[output].copy() for output in self._compiled.outputs])


class OnnxRuntimePredictor(Predictor):
    """An ``.onnx`` run by onnxruntime on the CPU, all graph optimisations on."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, precision: str, threads: int) -> None:
        ort = require("onnxruntime", "onnxruntime", "running .onnx files with onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # idle threads sleep instead of spinning, which would take CPU from other processes
        # (and from the next backend in a benchmark) for a small latency gain
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # tf2onnx writes nearest Resize with an attribute onnxruntime calls deprecated; it warns
        # once per upsampling layer at load time through the default logger. Errors only.
        ort.set_default_logger_severity(3)
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        node = self._session.get_inputs()[0]
        if precision == "bfloat16":
            precision = "float32"  # onnxruntime has no bfloat16 CPU convolutions
        super().__init__(path, (int(node.shape[1]), int(node.shape[2])), precision)
        self._input = node.name
        self.has_head = len(self._session.get_outputs()) == 2

    def _run(self, batch: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        return _mask_and_labels(self._session.run(None, {self._input: batch}))


def tflite_interpreter(**options: Any) -> Any:
    """A TFLite interpreter (``model_path=`` or ``model_content=``, ``num_threads=``): LiteRT's
    (``ai-edge-litert``) if installed, else ``tf.lite``'s, which is deprecated in its favour."""
    if available("ai_edge_litert"):
        from ai_edge_litert.interpreter import Interpreter  # optional: busi[fast]
    else:
        import tensorflow as tf  # start-up: TensorFlow; predictor imports runtimes

        Interpreter = tf.lite.Interpreter  # noqa: N806
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        interpreter = Interpreter(**options)
    # The first allocation of a process applies XNNPACK and prints "INFO: Created TensorFlow
    # Lite XNNPACK delegate for CPU." to stderr, whatever the log level: allocated here, quietly
    with _keras.native_noise_dropped():
        interpreter.allocate_tensors()
    return interpreter


class TFLitePredictor(Predictor):
    """A ``.tflite`` run with XNNPACK by LiteRT (``ai-edge-litert``) or ``tf.lite``."""

    runtime = "tflite"

    def __init__(self, path: Path, threads: int) -> None:
        self._interpreter = tflite_interpreter(model_path=str(path), num_threads=threads)
        details = self._interpreter.get_input_details()[0]
        self._input = details["index"]
        self._outputs = [d["index"] for d in self._interpreter.get_output_details()]
        self.has_head = len(self._outputs) == 2
        self._batch = -1
        super().__init__(path, (int(details["shape"][1]), int(details["shape"][2])),
                         _tflite_precision(self._interpreter))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) != self._batch:  # cheap next to a forward pass (~0.1 s measured)
            self._interpreter.resize_tensor_input(self._input, [len(batch), *self.input_size, 3])
            self._interpreter.allocate_tensors()
            self._batch = len(batch)
        self._interpreter.set_tensor(self._input, batch)
        self._interpreter.invoke()
        return _mask_and_labels([self._interpreter.get_tensor(index).copy()
                                 for index in self._outputs])


def _mask_and_labels(outputs: list[np.ndarray]) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The mask of an exported model's outputs, or ``(mask, labels)`` for one with the
    image-level head. Converters do not keep Keras' output order (TFLite sorts outputs by its
    own tensor names), so the two are told apart by rank: the mask is (B, H, W, 1), the labels
    (B, 3)."""
    if len(outputs) == 1:
        return outputs[0]
    by_rank = {np.ndim(output): output for output in outputs}
    if len(outputs) != 2 or set(by_rank) != {2, 4}:
        raise DataError(f"an exported model with outputs of shapes "
                        f"{[np.shape(o) for o in outputs]}: busi exports give a mask "
                        "(B, H, W, 1), and with the image-level head labels (B, 3)")
    return by_rank[4], by_rank[2]


def _tflite_precision(interpreter: Any) -> str:
    """What a ``.tflite`` computes in, from its tensor types (for reports only).

    Full int8 has int8 activations (the tensors with a batch axis, but for the float input and
    output); an int8 file that keeps some layers in float32
    (:func:`busi.inference.export.float_layers`) has float32 activations too: "int8+float32".
    Dynamic-range files have int8 weights but float32 activations; float16 files keep fp16 weights
    (dequantised on x86).
    """
    io = {d["index"] for d in interpreter.get_input_details() + interpreter.get_output_details()}
    counts: dict[str, int] = {}
    activations: dict[str, int] = {}
    for tensor in interpreter.get_tensor_details():
        name = np.dtype(tensor["dtype"]).name
        counts[name] = counts.get(name, 0) + 1
        signature = tensor.get("shape_signature")
        if tensor["index"] not in io and signature is not None and len(signature) == 4 \
                and signature[0] == -1:  # batch axis resizable: an activation, not a weight
            activations[name] = activations.get(name, 0) + 1
    if activations.get("int8", 0) or counts.get("int8", 0) > counts.get("float32", 0):
        return "int8+float32" if activations.get("float32", 0) else "int8"
    if counts.get("int8", 0):
        return "dynamic-int8"
    return "float16-weights" if counts.get("float16", 0) else "float32"


def onnx_precision(path: Path) -> str:
    """The precision recorded at export; files from elsewhere count as float32."""
    if not available("onnx"):
        return "float32"
    import onnx  # optional: busi[fast]

    proto = onnx.load(str(path), load_external_data=False)
    props = {entry.key: entry.value for entry in proto.metadata_props}
    return props.get(PRECISION_KEY, "float32")
