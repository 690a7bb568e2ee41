"""Fast CPU inference: export a model to ONNX or TFLite, and run ``.h5``, ``.onnx`` and ``.tflite``
files through one :class:`Predictor`.

Why: float32 Keras runs the ResNet34 U-Net at about 6-20 images/s on 2 shared CPU cores, which
makes evaluation, post-processing searches and ``busi predict`` on many images slow. Measured
with ``benchmarks/inference_speed.py`` (2 shared AVX-512 VNNI/BF16 cores, 256x256, batch 8;
speed as a ratio to Keras float32 ``predict`` in the same run; agreement = Dice of the
0.5-thresholded masks vs Keras float32, pooled over 32 real BUSI images, for a from-scratch
model at val IoU 0.62):

- ``export(..., backend="tflite", quantize="dynamic")``: int8 weights, activations quantised per
  batch at run time by XNNPACK. 2.6-2.9x, Dice 0.997. Needs nothing beyond TensorFlow.
- ``export(..., backend="onnx", quantize="int8")`` run by OpenVINO: static int8 calibrated on
  real images. 3.3-3.7x (2.8x under onnxruntime), Dice 0.994; on a weaker checkpoint (val IoU
  0.27, many probabilities near 0.5) it fell to 0.991, so check agreement on the model at hand.
- ``export(..., backend="onnx", quantize="bfloat16")`` run by OpenVINO: float32 weights in the
  file, bfloat16 compute. 2.0-2.4x, Dice 0.998-0.999.
- ``load_predictor("best.h5", precision="bfloat16")``: Keras under ``mixed_bfloat16``; 1.8x,
  Dice 0.999, no export and no extra dependency.

Float32 gains nothing worth having: onnxruntime, OpenVINO and TFLite all run at 0.9-1.15x
(TensorFlow's oneDNN kernels are as good); float16 TFLite weights only halve the file.

onnxruntime, tf2onnx, onnx, openvino and ai-edge-litert are optional (``pip install busi[fast]``),
imported only when needed. The model input convention is unchanged: float32 ``[B, H, W, 3]`` in
[0, 255] in, float32 ``[B, H, W, 1]`` sigmoid probabilities out, whatever the file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from busi.atomic import atomic_path
from busi.weights import with_policy

BACKENDS: dict[str, tuple[str | None, ...]] = {
    "onnx": (None, "bfloat16", "int8"),
    "tflite": (None, "float16", "dynamic", "int8"),
}
"""Export backend -> accepted ``quantize`` values (None = float32)."""

RUNTIMES = ("keras", "openvino", "onnxruntime", "tflite")
"""What can run a model file; :func:`load_predictor` picks one from the file suffix."""

ONNX_OPSET = 17
PRECISION_KEY = "busi.precision"
"""ONNX metadata key: the precision the file was exported for ("float32", "bfloat16", "int8")."""

_EXTRA_HINT = "install the optional extra with `pip install 'busi[fast]'` (or `pip install {}`)"


# --------------------------------------------------------------------------- helpers


def _optional(module: str, package: str, purpose: str) -> Any:
    """Import an optional dependency, or raise an ImportError that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the {package!r} package: " + _EXTRA_HINT.format(package)
        ) from error


def _has(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (imports are slow)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: in sys.modules with no spec (e.g. None)
        return False


def _cores() -> int:
    """CPU cores this process may use (the affinity mask, not the machine's core count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _as_model(model_or_h5_path: Any) -> Any:
    """A Keras model, loaded (uncompiled) if given a path to an ``.h5``."""
    if isinstance(model_or_h5_path, (str, os.PathLike)):
        from busi.weights import load_model

        return load_model(model_or_h5_path, compile=False)
    if not hasattr(model_or_h5_path, "input_shape"):
        raise TypeError(
            f"expected a Keras model or the path of an .h5 file, got {type(model_or_h5_path)}"
        )
    return model_or_h5_path


def _model_hw(model: Any) -> tuple[int, int]:
    """``(height, width)`` of a Keras model's fixed input; exporting needs a fixed size."""
    shape = model.input_shape
    if isinstance(shape, list) or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"expected one image input (B, H, W, 3), the model has {shape}")
    if shape[1] is None or shape[2] is None:
        raise ValueError(
            f"the model input {shape} has no fixed size; build it with the size to export, e.g. "
            "build_model(input_shape=(256, 256, 3)), and copy the weights (set_weights)"
        )
    return int(shape[1]), int(shape[2])


def _check_calibration(calibration: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray:
    if calibration is None:
        raise ValueError(
            "quantize='int8' needs calibration images: pass calibration=float32 [N, H, W, 3] in "
            "[0, 255], a few dozen real training images resized like the model input"
        )
    array = np.ascontiguousarray(calibration, dtype=np.float32)
    if array.ndim != 4 or array.shape[1:] != (*hw, 3) or len(array) == 0:
        raise ValueError(
            f"calibration must be [N, {hw[0]}, {hw[1]}, 3] with N >= 1, got {array.shape}"
        )
    return array


# --------------------------------------------------------------------------- export


def export(
    model_or_h5_path: Any,
    out_path: str | os.PathLike,
    backend: str = "onnx",
    quantize: str | None = None,
    calibration: np.ndarray | None = None,
) -> Path:
    """Write a model as an ONNX or TFLite file for fast CPU inference (atomically).

    Args:
        model_or_h5_path: a Keras model with a fixed input size, or the path of a busi ``.h5``.
        out_path: the file to write (``.onnx`` or ``.tflite``).
        backend: ``"onnx"`` (tf2onnx; run by OpenVINO or onnxruntime) or ``"tflite"``.
        quantize: None for float32, or
            - onnx: ``"bfloat16"`` (float32 file marked for bfloat16 compute under OpenVINO;
              closest to Keras of the fast paths), ``"int8"`` (static QDQ int8, needs
              ``calibration``; fastest under OpenVINO);
            - tflite: ``"dynamic"`` (int8 weights, activations quantised per batch at run time;
              fast and close to Keras with TensorFlow alone), ``"float16"`` (fp16 weights: half
              the file, no speed-up on x86), ``"int8"`` (full int8 with float input/output,
              needs ``calibration``).
            See the module docstring for measured speed and agreement.
        calibration: float32 ``[N, H, W, 3]`` images in [0, 255] for int8 (activation ranges are
            measured on them, so use real images, resized as for the model, e.g. 32-64).

    Returns:
        ``out_path`` as a Path.

    Raises:
        ValueError: unknown backend or quantize value, model without a fixed input size,
            missing or malformed calibration images.
        ImportError: the backend's optional converter (tf2onnx, onnx, onnxruntime) is missing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    if quantize not in BACKENDS[backend]:
        raise ValueError(
            f"quantize={quantize!r} is not available for backend {backend!r}; choose one of "
            f"{BACKENDS[backend]}"
        )
    # float32 graph even for a model saved from mixed-precision training: the precision of an
    # exported file is chosen here (quantize), not inherited from how the model was trained
    model = with_policy(_as_model(model_or_h5_path), "float32")
    hw = _model_hw(model)
    if quantize == "int8":
        calibration = _check_calibration(calibration, hw)
    if backend == "onnx":
        _export_onnx(model, Path(out_path), hw, quantize, calibration)
    else:
        _export_tflite(model, Path(out_path), quantize, calibration)
    return Path(out_path)


def _export_onnx(
    model: Any, out: Path, hw: tuple[int, int], quantize: str | None, calibration: Any
) -> None:
    """tf2onnx conversion with a dynamic batch axis, then optional int8, then metadata."""
    onnx = _optional("onnx", "onnx", "exporting to ONNX")
    tf2onnx = _optional("tf2onnx", "tf2onnx", "exporting to ONNX")
    import tensorflow as tf

    spec = (tf.TensorSpec((None, *hw, 3), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=ONNX_OPSET)
    if quantize == "int8":
        proto = _quantize_onnx_int8(proto, calibration)
    props = {entry.key: entry.value for entry in proto.metadata_props}
    props.update({PRECISION_KEY: quantize or "float32", "busi.input_size": f"{hw[0]}x{hw[1]}"})
    onnx.helper.set_model_props(proto, props)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))


def _quantize_onnx_int8(proto: Any, calibration: np.ndarray) -> Any:
    """Static int8: QDQ format, per-channel int8 weights, uint8 activations, MinMax ranges.

    QDQ (not QOperator) because both onnxruntime and OpenVINO turn it into int8 kernels; uint8
    activations with int8 weights is onnxruntime's fast x86 (VNNI) combination. Symbolic shape
    inference is skipped: only the batch axis is dynamic, and it would need sympy.
    """
    onnx = _optional("onnx", "onnx", "int8 quantisation")
    quantization = _optional(
        "onnxruntime.quantization", "onnxruntime", "int8 quantisation of ONNX models"
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = proto.graph.input[0].name

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calibration[i : i + 8] for i in range(0, len(calibration), 8))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory(prefix="busi-int8-") as folder:
        plain, prepared, quantized = (Path(folder) / n for n in ("f.onnx", "p.onnx", "q.onnx"))
        onnx.save(proto, str(plain))
        quant_pre_process(str(plain), str(prepared), skip_symbolic_shape=True)
        quantization.quantize_static(
            str(prepared), str(quantized), Reader(),
            quant_format=quantization.QuantFormat.QDQ, per_channel=True,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax,
        )
        return onnx.load(str(quantized))


def _export_tflite(model: Any, out: Path, quantize: str | None, calibration: Any) -> None:
    """TFLiteConverter from the Keras model; the batch axis stays resizable at run time."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        def representative() -> Any:
            for i in range(len(calibration)):
                yield [calibration[i : i + 1]]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # input and output stay float32, so the Predictor contract holds for every file
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Statistics for quantized inputs")
        flatbuffer = converter.convert()
    with atomic_path(out) as tmp:
        tmp.write_bytes(flatbuffer)


# --------------------------------------------------------------------------- prediction


class Predictor:
    """Runs one model file on image batches, whatever its format.

    Attributes:
        input_size: ``(height, width)`` the model takes (resize images to it first, e.g. with
            :func:`busi.data.geometry.to_model`).
        runtime: what runs it: one of :data:`RUNTIMES`.
        precision: what it computes in ("float32", "bfloat16", "int8", "dynamic-int8", ...).
        path: the model file.

    ``input_shape`` (``(None, H, W, 3)``) and calling the predictor like a function are also
    provided, so code written for Keras models (``model.input_shape``, ``model(batch)``) works.
    """

    runtime = "?"

    def __init__(self, path: Path, input_size: tuple[int, int], precision: str) -> None:
        self.path = path
        self.input_size = input_size
        self.precision = precision

    @property
    def input_shape(self) -> tuple[None, int, int, int]:
        return (None, *self.input_size, 3)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities float32 ``[B, H, W, 1]`` of images float32 ``[B, H, W, 3]`` in 0-255."""
        array = np.ascontiguousarray(batch, dtype=np.float32)
        if array.ndim != 4 or array.shape[1:] != (*self.input_size, 3):
            raise ValueError(
                f"{self.path.name}: expected a batch [B, {self.input_size[0]}, "
                f"{self.input_size[1]}, 3], got shape {np.shape(batch)}"
            )
        if len(array) == 0:
            return np.zeros((0, *self.input_size, 1), np.float32)
        out = np.asarray(self._run(array), dtype=np.float32)
        return out.reshape(len(array), *self.input_size, 1)

    __call__ = predict

    def _run(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path.name!r}, runtime={self.runtime!r}, "
            f"precision={self.precision!r}, input_size={self.input_size})"
        )


class KerasPredictor(Predictor):
    """A busi ``.h5`` run by Keras, in float32 or rebuilt under ``mixed_bfloat16``."""

    runtime = "keras"

    def __init__(self, path: Path, precision: str = "float32") -> None:
        import tensorflow as tf

        policies = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
        if precision not in policies:
            raise ValueError(f"Keras precision must be 'float32' or 'bfloat16', got {precision!r}")
        model = with_policy(_as_model(path), policies[precision])
        super().__init__(path, _model_hw(model), precision)
        self.model = model
        # one traced graph for every batch size: no retracing per batch, no predict() overhead
        self._call = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec((None, *self.input_size, 3), tf.float32)],
        )

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._call(batch).numpy()


class OpenVinoPredictor(Predictor):
    """An ``.onnx`` run by OpenVINO (float32, or bfloat16 if the file was exported for it)."""

    runtime = "openvino"

    def __init__(self, path: Path, precision: str, threads: int) -> None:
        ov = _optional("openvino", "openvino", "running .onnx files with OpenVINO")
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

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._request.infer({0: batch})[0].copy()


class OnnxRuntimePredictor(Predictor):
    """An ``.onnx`` run by onnxruntime on the CPU, all graph optimisations on."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, precision: str, threads: int) -> None:
        ort = _optional("onnxruntime", "onnxruntime", "running .onnx files with onnxruntime")
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

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: batch})[0]


class TFLitePredictor(Predictor):
    """A ``.tflite`` run with XNNPACK by LiteRT (``ai-edge-litert``) or ``tf.lite``."""

    runtime = "tflite"

    def __init__(self, path: Path, threads: int) -> None:
        if _has("ai_edge_litert"):
            from ai_edge_litert.interpreter import Interpreter
        else:  # tf.lite.Interpreter is deprecated, and will go, in favour of ai-edge-litert
            import tensorflow as tf

            Interpreter = tf.lite.Interpreter  # noqa: N806
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
            self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
        details = self._interpreter.get_input_details()[0]
        self._input = details["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
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
        return self._interpreter.get_tensor(self._output).copy()


def _tflite_precision(interpreter: Any) -> str:
    """What a ``.tflite`` computes in, from its tensor types (for reports only).

    Full int8 has int8 activations, so most tensors are int8; dynamic-range files have int8
    weights but float32 activations; float16 files keep fp16 weights (dequantised on x86).
    """
    counts: dict[str, int] = {}
    for tensor in interpreter.get_tensor_details():
        name = np.dtype(tensor["dtype"]).name
        counts[name] = counts.get(name, 0) + 1
    if counts.get("int8", 0) > counts.get("float32", 0):
        return "int8"
    if counts.get("int8", 0):
        return "dynamic-int8"
    return "float16-weights" if counts.get("float16", 0) else "float32"


def _onnx_precision(path: Path) -> str:
    """The precision recorded at export; files from elsewhere count as float32."""
    if not _has("onnx"):
        return "float32"
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {entry.key: entry.value for entry in proto.metadata_props}
    return props.get(PRECISION_KEY, "float32")


def load_predictor(
    path: str | os.PathLike,
    *,
    runtime: str | None = None,
    precision: str | None = None,
    threads: int | None = None,
) -> Predictor:
    """Open a ``.h5``, ``.onnx`` or ``.tflite`` model for prediction.

    Args:
        path: the model file; its suffix decides the format.
        runtime: force one of :data:`RUNTIMES` that can read the format; by default ``.onnx``
            runs under OpenVINO when installed (int8 about 1.3x faster than onnxruntime, and
            only OpenVINO computes bfloat16 files in bfloat16), else onnxruntime.
        precision: ``.h5`` only: ``"bfloat16"`` rebuilds the model under ``mixed_bfloat16``
            (about 1.8x on AVX512_BF16 CPUs). ``.onnx`` and ``.tflite`` files carry their
            precision.
        threads: CPU threads for ONNX/TFLite runtimes; default all cores this process may use.

    Returns:
        A :class:`Predictor`: ``predict(float32 [B, H, W, 3] in [0, 255]) -> float32
        [B, H, W, 1]`` probabilities, and ``input_size`` ``(H, W)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown suffix, runtime or precision for that format.
        ImportError: the runtime needed is not installed (the message says what to install).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    suffix = path.suffix.lower()
    threads = threads or _cores()
    formats = {".h5": ("keras",), ".hdf5": ("keras",), ".onnx": ("openvino", "onnxruntime"),
               ".tflite": ("tflite",)}
    if suffix not in formats:
        raise ValueError(f"{path}: unknown model format {suffix!r}; use .h5, .onnx or .tflite")
    if runtime is not None and runtime not in formats[suffix]:
        raise ValueError(f"{path}: runtime must be one of {formats[suffix]}, got {runtime!r}")
    if precision is not None and suffix not in (".h5", ".hdf5"):
        raise ValueError(
            f"{path}: precision= applies to .h5 files only; {suffix} files carry the precision "
            "chosen at export (busi.export.export(..., quantize=...))"
        )
    if suffix in (".h5", ".hdf5"):
        return KerasPredictor(path, precision or "float32")
    if suffix == ".tflite":
        return TFLitePredictor(path, threads)
    exported = _onnx_precision(path)
    if runtime is None:
        runtime = "openvino" if _has("openvino") else "onnxruntime"
    if runtime == "openvino":
        return OpenVinoPredictor(path, exported, threads)
    if exported == "bfloat16":
        warnings.warn(
            f"{path.name} was exported for bfloat16, which needs OpenVINO; onnxruntime runs it "
            "in float32 (same masks, about 3x slower): pip install openvino",
            stacklevel=2,
        )
    return OnnxRuntimePredictor(path, exported, threads)
