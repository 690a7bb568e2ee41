"""Inference: open a model file, and turn images into probability maps at their own size.

This is the one prediction path of busi: evaluation (:mod:`busi.evaluation.evaluator`), the run's
figures (:func:`busi.inference.run_models.run_predictions`) and ``busi predict``
(:mod:`busi.inference.prediction`) all call :func:`predict_images`, so a delivered mask and a scored
mask cannot differ. The model sees a letterboxed (or stretched) copy at its input size; the
probabilities are mapped back to the image's original size with
:func:`busi.data.geometry.to_original`, and thresholded only there
(:mod:`busi.inference.postprocess`).

Keyword names follow the run's ``config.json`` and the weights' sidecar: ``image_size`` (the
model input side) and ``resize`` (``"letterbox"`` or ``"stretch"``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from busi.data.geometry import Mode, to_model, to_original
from busi.data.masks import read_image
from busi.errors import DataError
from busi.inference import bundle, model_checks, runtimes
from busi.inference.runtimes import model_input_size
from busi.utils import progress

ImageSize = int | tuple[int, int]
"""A model input side, or ``(height, width)``."""

_FORMATS = {".h5": ("keras",), ".hdf5": ("keras",), ".onnx": ("openvino", "onnxruntime"),
            ".tflite": ("tflite",)}


def open_model(
    path: str | os.PathLike,
    *,
    runtime: str | None = None,
    precision: str | None = None,
    threads: int | None = None,
    safe_mode: bool | None = None,
    verify: bool | None = None,
) -> runtimes.Predictor:
    """Open a ``.h5``, ``.onnx`` or ``.tflite`` model for prediction, with its settings.

    The file's digest is checked against its record (:func:`busi.inference.bundle.settings_for`)
    before any runtime reads it, and a ``.tflite`` or ``.onnx`` that no record vouches for is
    checked for damage first (:mod:`busi.inference.model_checks`), so a damaged or replaced file is
    refused with its name instead of giving wrong masks or crashing the process.

    Args:
        path: the model file; its suffix decides the format.
        runtime: force one of :data:`busi.inference.runtimes.RUNTIMES` that can read the format; by
            default ``.onnx`` runs under OpenVINO when installed (int8 about 1.3x faster than
            onnxruntime, and only OpenVINO computes bfloat16 files in bfloat16), else
            onnxruntime.
        precision: ``.h5`` only: ``"bfloat16"`` rebuilds the model under ``mixed_bfloat16``
            (about 1.8x on AVX512_BF16 CPUs). ``.onnx`` and ``.tflite`` files carry their
            precision.
        threads: CPU threads for ONNX/TFLite runtimes; default all cores this process may use.
        safe_mode: ``.h5`` only: refuse layers that can run code stored in the file
            (:func:`busi.inference.weights.load_model`); False only for files you trust.
        verify: refuse a file whose digest differs from its record; False uses it with a
            warning. None: True unless :func:`busi.utils.digests.skipping_digest_checks`.

    Returns:
        A :class:`busi.inference.runtimes.Predictor`: ``predict(float32 [B, H, W, 3] in [0, 255]) ->
        float32 [B, H, W, 1]`` probabilities, ``input_size`` ``(H, W)``, and ``settings``
        (:class:`busi.inference.bundle.ModelSettings`: input size, resize mode, post-processing, and
        what vouched for the file).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown suffix, runtime or precision for that format.
        ImportError: the runtime needed is not installed (the message says what to install).
        busi.utils.digests.DigestMismatchError: the file is not the one its record was made for.
        busi.errors.DataError: a damaged file, an ``.h5`` that is not a busi segmentation
            model or was saved by Keras 3, or one with layers that could run code (in safe
            mode); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"{path}: unknown model format {suffix!r}; use .h5, .onnx or .tflite")
    if runtime is not None and runtime not in _FORMATS[suffix]:
        raise ValueError(f"{path}: runtime must be one of {_FORMATS[suffix]}, got {runtime!r}")
    if precision is not None and suffix not in (".h5", ".hdf5"):
        raise ValueError(
            f"{path}: precision= applies to .h5 files only; {suffix} files carry the precision "
            "chosen at export (busi.inference.export.export(..., quantize=...))"
        )
    settings = bundle.settings_for(path, verify)
    try:
        predictor = _open(path, suffix, runtime, precision, threads, safe_mode,
                          vouched=settings.verified_by is not None)
    except (DataError, ImportError):
        raise
    except Exception as error:  # a runtime's own error names no file: name it
        raise DataError(f"{path}: cannot load this {suffix} model: {type(error).__name__}: "
                        f"{error}") from error
    predictor.settings = settings
    return predictor


load = open_model
"""Another name of :func:`open_model`, the one scripts and notebooks of busi use."""


def _open(path: Path, suffix: str, runtime: str | None, precision: str | None,
          threads: int | None, safe_mode: bool | None, vouched: bool) -> runtimes.Predictor:
    """The predictor of a file whose digest was checked; ``vouched``: a record matched it, so
    its bytes are those checked at export and need no damage check."""
    if suffix in (".h5", ".hdf5"):
        return runtimes.KerasPredictor(path, precision or "float32", safe_mode=safe_mode,
                                       verify=False)  # checked by open_model
    threads = threads or runtimes.cores()
    if suffix == ".tflite":
        if not vouched:
            model_checks.check_tflite(path)
        return runtimes.TFLitePredictor(path, threads)
    if not vouched:
        model_checks.check_onnx(path)
    exported = runtimes.onnx_precision(path)
    if runtime is None:
        runtime = "openvino" if runtimes.available("openvino") else "onnxruntime"
    if runtime == "openvino":
        return runtimes.OpenVinoPredictor(path, exported, threads)
    if exported == "bfloat16":
        warnings.warn(
            f"{path.name} was exported for bfloat16, which needs OpenVINO; onnxruntime runs it "
            "in float32 (same masks, about 3x slower): pip install openvino",
            stacklevel=3,
        )
    return runtimes.OnnxRuntimePredictor(path, exported, threads)


def _resolve_size(model: Any, image_size: ImageSize | None) -> ImageSize:
    if image_size is not None:
        return image_size
    fixed = model_input_size(model)
    if fixed is None:
        raise ValueError(
            "the model has no fixed input size (or is a plain callable): pass image_size=, the "
            "side the model was trained at"
        )
    return fixed


def _forward(model: Any, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities ``(B, H, W)`` for a float32 ``(B, H, W, 3)`` batch, and the image-level
    probabilities ``(B, 3)`` of a model with the head (:mod:`busi.models.heads`), else None.

    Keras models go through ``predict_on_batch`` (no progress bar, no per-call retracing); a
    :class:`busi.inference.runtimes.Predictor` through ``predict_with_labels``; any other callable
    (a fake model in tests) is simply called.
    """
    labels = None
    if hasattr(model, "predict_with_labels"):
        out, labels = model.predict_with_labels(batch)
    else:
        out = model.predict_on_batch(batch) if hasattr(model, "predict_on_batch") else model(batch)
        if isinstance(out, (list, tuple)) and len(out) == 2:  # a Keras model with the head
            out, labels = out
    out = np.asarray(out, dtype=np.float32)  # float16 output of mixed-precision models, too
    if out.ndim == 4 and out.shape[-1] == 1:
        out = out[..., 0]
    if out.shape != batch.shape[:3]:
        raise ValueError(
            f"the model returned shape {out.shape} for a batch of shape {batch.shape}; expected "
            "one sigmoid channel per pixel, (B, H, W, 1)"
        )
    return out, None if labels is None else np.asarray(labels, dtype=np.float32)


def model_batch(images: Sequence[np.ndarray], image_size: ImageSize, resize: Mode):
    """Gray images -> float32 ``(B, S, S, 3)`` in [0, 255] (the model input convention), and
    the placement of each image in its square (to map predictions back)."""
    resized, placements = [], []
    for image in images:
        array, _, placement = to_model(image, size=image_size, mode=resize)
        resized.append(array)
        placements.append(placement)
    batch = np.stack(resized).astype(np.float32)
    return np.repeat(batch[..., np.newaxis], 3, axis=-1), placements


def predict_images(
    model: Any,
    images: Sequence[np.ndarray],
    image_size: ImageSize | None = None,
    resize: Mode = "letterbox",
    batch_size: int = 8,
    tta: bool = False,
) -> list[np.ndarray]:
    """Probability maps of gray images, each at its image's original size.

    Args:
        model: what :func:`load` returns, a Keras model (fixed input size, [0, 255] float input,
            sigmoid output) or any callable mapping a float32 ``(B, H, W, 3)`` batch to
            ``(B, H, W, 1)`` probabilities.
        images: uint8 gray ``(H, W)`` images of any sizes.
        image_size: model input side or ``(height, width)``; default the model's input size.
        resize: ``"letterbox"`` or ``"stretch"``, as the model was trained.
        batch_size: images per forward pass (TTA doubles the pass).
        tta: also predict the horizontally mirrored image and average the two maps. Mirroring
            is done on the original image (then resized), so the letterbox padding, which is one
            pixel off-centre for odd margins, is identical in both passes.

    Returns:
        One float32 ``(H, W)`` array per image, values in [0, 1].
    """
    return predict_images_and_labels(model, images, image_size, resize, batch_size, tta)[0]


def predict_images_and_labels(
    model: Any,
    images: Sequence[np.ndarray],
    image_size: ImageSize | None = None,
    resize: Mode = "letterbox",
    batch_size: int = 8,
    tta: bool = False,
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """:func:`predict_images`, and the image-level probabilities ``(N, 3)`` (normal, benign,
    malignant) of a model with the head, else None. With ``tta`` both are the mean of the image
    and its mirror."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    image_size = _resolve_size(model, image_size)
    probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        chunk = [np.asarray(image) for image in images[start : start + batch_size]]
        for image in chunk:
            if image.ndim != 2:
                raise ValueError(f"images must be gray (H, W) arrays, got shape {image.shape}")
        if tta:
            chunk = chunk + [image[:, ::-1] for image in chunk]
        batch, placements = model_batch(chunk, image_size, resize)
        out, label = _forward(model, batch)
        maps = [to_original(o, p) for o, p in zip(out, placements, strict=True)]
        if tta:
            half = len(maps) // 2
            maps = [(a + b[:, ::-1]) / 2.0 for a, b in zip(maps[:half], maps[half:], strict=True)]
            if label is not None:
                label = (label[:half] + label[half:]) / 2.0
        probs.extend(np.ascontiguousarray(m, dtype=np.float32) for m in maps)
        if label is not None:
            labels.append(label)
    return probs, (np.concatenate(labels) if labels else None)


def predict_probabilities(
    model: Any,
    table: pd.DataFrame,
    image_size: ImageSize | None = None,
    resize: Mode = "letterbox",
    batch_size: int = 8,
    tta: bool = False,
    desc: str = "predicting",
) -> list[np.ndarray]:
    """Probability maps of the images of index rows, in row order, at each image's original size.

    See :func:`predict_images` for the arguments; ``desc`` labels the progress bar
    (:mod:`busi.utils.progress`). Images are decoded per batch, so a whole split is never held in
    memory at model size.
    """
    return predict_table(model, table, image_size, resize, batch_size, tta, desc)[0]


def predict_table(
    model: Any,
    table: pd.DataFrame,
    image_size: ImageSize | None = None,
    resize: Mode = "letterbox",
    batch_size: int = 8,
    tta: bool = False,
    desc: str = "predicting",
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """:func:`predict_probabilities`, and the image-level probabilities ``(N, 3)`` of a model
    with the head (else None), row by row."""
    rows = table.to_dict("records")
    probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    with progress.bar(total=len(rows), desc=desc + (" (with flips)" if tta else "")) as shown:
        for start in range(0, len(rows), batch_size):
            images = [read_image(row["image_path"]) for row in rows[start : start + batch_size]]
            maps, label = predict_images_and_labels(model, images, image_size, resize,
                                                    batch_size, tta)
            probs.extend(maps)
            if label is not None:
                labels.append(label)
            shown.update(len(images))
    return probs, (np.concatenate(labels) if labels else None)


__all__ = ["ImageSize", "load", "model_batch", "model_input_size", "open_model",
           "predict_images", "predict_images_and_labels", "predict_probabilities",
           "predict_table"]
