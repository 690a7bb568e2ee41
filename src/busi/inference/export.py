"""Fast CPU inference: export a model to ONNX or TFLite (run by
:func:`busi.inference.predictor.load`, like the ``.h5`` it came from).

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
- ``busi.inference.predictor.load("best.h5", precision="bfloat16")``: Keras under
``mixed_bfloat16``; 1.8x,
  Dice 0.999, no export and no extra dependency.

Float32 gains nothing worth having: onnxruntime, OpenVINO and TFLite all run at 0.9-1.15x
(TensorFlow's oneDNN kernels are as good); float16 TFLite weights only halve the file.

EfficientNet-Lite U-Nets are the exception, both ways (``runs/lite0-joint-cpu``, masks of ``busi
predict`` on the 126 BUSI test lesion images, per-image Dice with the ``.h5``'s masks, mean / worst,
by ``tools/predict_agrees.py``): float32 TFLite already runs them ~2.5x faster than Keras
(TensorFlow's depthwise convolutions are slow), and no int8 of the whole network agrees:
dynamic-range 0.985 / 0.87 (0.947 / 0.0 on ``lite0-imagenet-cpu``), full int8 0.906 / 0.0. Their
encoder is what int8 cannot carry: ImageNet colour filters nearly cancel on a gray image (R = G =
B), and BatchNorm statistics measured on gray ultrasound scale them up (gains up to 233 in the
stem), so the float32 masks already move with input noise of +-1 gray level (mean Dice 0.95 with the
noise-free masks); rounding any encoder layer to int8 is noise of that size. (A Lite0 trained from
scratch, without those filters, keeps its masks under dynamic-range int8: 0.994 / 0.94.) So a TFLite
int8 export keeps the layers of :func:`float_layers` (an EfficientNet-Lite's encoder, 22% of its
multiply-adds) in float32 and quantises the decoder, 78% of them: 0.998 / 0.957, 16 MB instead of 24
MB, 2.7x Keras (float32 TFLite 2.5x, dynamic-range int8 1.8x; full int8 was ~1.15x faster than this
in a rougher timing). The other models have no such layers: their int8 is int8 throughout.

onnxruntime, tf2onnx, onnx, openvino and ai-edge-litert are optional (``pip install busi[fast]``),
imported only when needed. The model input convention is unchanged: float32 ``[B, H, W, 3]`` in
[0, 255] in, float32 ``[B, H, W, 1]`` sigmoid probabilities out, whatever the file
(:class:`busi.inference.runtimes.Predictor`).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from busi.inference.runtimes import PRECISION_KEY, model_input_size, require, tflite_interpreter
from busi.inference.weights import load_model, with_policy
from busi.models.architectures import encoder_layers
from busi.utils.atomic import atomic_path

BACKENDS: dict[str, tuple[str | None, ...]] = {
    "onnx": (None, "bfloat16", "int8"),
    "tflite": (None, "float16", "dynamic", "int8"),
}
"""Export backend -> accepted ``quantize`` values (None = float32)."""

ONNX_OPSET = 17


# --------------------------------------------------------------------------- helpers


def _as_model(model_or_h5_path: Any) -> Any:
    """A Keras model, loaded (uncompiled) if given a path to an ``.h5``, whose digest is
    checked against its record first (:func:`busi.inference.weights.load_model`): an export of a
    damaged or replaced file would carry the damage on under a new digest."""
    if isinstance(model_or_h5_path, (str, os.PathLike)):
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
    hw = model_input_size(model)
    if hw is None:
        raise ValueError(
            f"the model input {shape} has no fixed size; build it with the size to export, e.g. "
            "build_model(input_shape=(256, 256, 3)), and copy the weights (set_weights)"
        )
    return hw


def is_lite_unet(model: Any) -> bool:
    """Whether ``model`` is a U-Net on busi's own EfficientNet-Lite encoder (its int8 export keeps
    the encoder in float32)."""
    return {"preprocess", "stem_conv", "block0_dw_conv"} <= {layer.name for layer in model.layers}


def float_layers(model: Any) -> list[str]:
    """The layers a TFLite int8 export of ``model`` keeps in float32 unless told otherwise: the
    input normalisation and encoder of an EfficientNet-Lite U-Net (see the module docstring for
    why), and the image-level head of any model (three probabilities that a gate thresholds:
    a pooling and one dense layer, nothing to gain from int8); none for other models."""
    names = [layer.name for layer in model.layers]
    head = [name for name in names if name.startswith("label")]
    if not is_lite_unet(model):
        return head

    return ["preprocess", *(layer.name for layer in encoder_layers(model)), *head]


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
    keep_float: Sequence[str] | None = None,
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
              the file, no speed-up on x86), ``"int8"`` (int8 weights and activations with
              float input/output, needs ``calibration``; the layers of ``keep_float`` stay
              float32).
            See the module docstring for measured speed and agreement.
        calibration: float32 ``[N, H, W, 3]`` images in [0, 255] for int8 (activation ranges are
            measured on them, so use real images, resized as for the model, e.g. 32-64).
        keep_float: TFLite int8 only: names of Keras layers whose operations stay float32 (the
            rest is int8). Default :func:`float_layers`: an EfficientNet-Lite's encoder, else
            none; ``()`` quantises everything.

    Returns:
        ``out_path`` as a Path.

    Raises:
        ValueError: unknown backend or quantize value, model without a fixed input size,
            missing or malformed calibration images, ``keep_float`` naming no layer of the model
            or given for another export than TFLite int8.
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
    lite_encoder = float_layers(model)
    if (backend, quantize) != ("tflite", "int8"):
        if keep_float:
            raise ValueError("keep_float applies to TFLite int8 exports only")
        keep_float = ()
    elif keep_float is None:
        keep_float = lite_encoder
    unknown = sorted(set(keep_float) - {layer.name for layer in model.layers})
    if unknown:
        raise ValueError(f"keep_float names layers the model does not have: {unknown[:5]}")
    if quantize == "dynamic" and is_lite_unet(model):
        warnings.warn(
            f"{out_path}: dynamic-range int8 changed the masks of ImageNet-initialised "
            "EfficientNet-Lite U-Nets (per-image Dice 0.95-0.985 with the float model's, worst "
            "images 0.0-0.87); prefer quantize='int8' with calibration images, which keeps "
            "their encoder in float32, and check with tools/predict_agrees.py", stacklevel=2)
    if backend == "onnx":
        _export_onnx(model, Path(out_path), hw, quantize, calibration)
    else:
        _export_tflite(model, Path(out_path), quantize, calibration, tuple(keep_float))
    return Path(out_path)


def _export_onnx(
    model: Any, out: Path, hw: tuple[int, int], quantize: str | None, calibration: Any
) -> None:
    """tf2onnx conversion with a dynamic batch axis, then optional int8, then metadata."""
    onnx = require("onnx", "onnx", "exporting to ONNX")
    tf2onnx = require("tf2onnx", "tf2onnx", "exporting to ONNX")
    import tensorflow as tf  # start-up: TensorFlow (test_busi_import_stays_light)

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
    onnx = require("onnx", "onnx", "int8 quantisation")
    quantization = require(
        "onnxruntime.quantization", "onnxruntime", "int8 quantisation of ONNX models"
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process  # optional: busi[fast]

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


def _export_tflite(
    model: Any, out: Path, quantize: str | None, calibration: Any, keep_float: tuple[str, ...]
) -> None:
    """TFLiteConverter from the Keras model; the batch axis stays resizable at run time."""
    import tensorflow as tf  # start-up: TensorFlow (test_busi_import_stays_light)

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
        if not keep_float:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # input and output stay float32, so the Predictor contract holds for every file
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Statistics for quantized inputs")
        # the QuantizationDebugger opens its models with tf.lite.Interpreter
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        if quantize == "int8" and keep_float:
            flatbuffer = _int8_keeping_float(converter, representative, keep_float)
        else:
            flatbuffer = converter.convert()
    with atomic_path(out) as tmp:
        tmp.write_bytes(flatbuffer)


def _int8_keeping_float(converter: Any, representative: Any, keep_float: tuple[str, ...]
                        ) -> bytes:
    """Int8 but for the operations of the layers ``keep_float``: TFLite's selective
    quantisation (the QuantizationDebugger's ``denylisted_nodes``, which take the names of the
    operations' output tensors). A TFLite tensor name joins the Keras op paths fused into it
    (``model/block3_project_bn/FusedBatchNormV3;model/block3_project_conv/Conv2D``); an operation
    is kept in float when one of those paths passes through a layer of ``keep_float``."""
    import tensorflow as tf  # start-up: TensorFlow (test_busi_import_stays_light)

    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=representative)
    wanted = set(keep_float)
    denied = [name for name in _tensor_names(debugger.calibrated_model)
              if any(wanted & set(path.split("/")) for path in name.split(";"))]
    if not denied:
        raise RuntimeError(
            f"no TFLite operation matched the layers to keep in float ({keep_float[:3]}...); "
            "has the converter's tensor naming changed? Export with keep_float=() or as float32"
        )
    debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=denied)
    return debugger.get_nondebug_quantized_model()


def _tensor_names(flatbuffer: bytes) -> list[str]:
    """Names of the tensors of a ``.tflite`` flatbuffer."""
    interpreter = tflite_interpreter(model_content=flatbuffer)
    return [tensor["name"] for tensor in interpreter.get_tensor_details()]
