"""The export that travels with published weights: which one a model gets, the training images
an int8 export is calibrated on, and the export written beside the weights and added to their
sidecar.

Apart from the publish transaction (:mod:`busi.inference.publish`), which stages the weights,
sidecar, card and export and moves them into place together: an export can also be made later for
weights already published (:func:`publish_export`), and its choices are the model's, not the
transaction's. Why each model gets its export: :mod:`busi.inference.export`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from busi.data.masks import read_image
from busi.data.run_parts import run_parts
from busi.errors import DataError
from busi.inference import export
from busi.inference.bundle import ModelRecord
from busi.inference.predictor import model_batch
from busi.models import backend
from busi.runs.folder import RunFolder
from busi.utils.digests import FileDigest

CALIBRATION_IMAGES = 64
"""Training images an int8 export measures its activation ranges on (:func:`calibration_images`)."""


def default_export(model: Any) -> str:
    """The export :func:`busi.inference.publish.publish` makes unless told: ``"tflite:int8"`` for a
    model with layers int8 cannot carry (:func:`busi.inference.export.is_lite_unet`: an
    EfficientNet-Lite U-Net, whose dynamic-range int8 export does not keep its masks), kept in
    float32 there; else ``"tflite:dynamic"``, which needs no calibration images. An ensemble (``busi
    cv``, ``busi ensemble``: member models nested in one) gets a float32 ``"tflite"``: int8
    would need the float layers of each nested member, which the int8 export cannot name. On a
    Keras 3 backend none: the TFLite converter needs tf-keras (publishing the run where
    ``BUSI_BACKEND`` is unset exports it, from the same portable ``.h5``)."""
    if backend.is_keras3():
        return "none"
    if any(hasattr(layer, "layers") for layer in model.layers):
        return "tflite"
    return "tflite:int8" if export.is_lite_unet(model) else "tflite:dynamic"


def calibration_images(run: RunFolder, n: int = CALIBRATION_IMAGES) -> np.ndarray:
    """``n`` images of the run's training part (all of them if fewer), drawn with the run's
    seed and resized as the model sees them (its image size and resize mode, gray replicated
    to 3 channels, float32 in [0, 255]): what an int8 export measures activation ranges on.
    Never validation or test images, which are what the export is checked on.

    Raises:
        DataError: the run's dataset is not where its config says (or was changed since).
    """
    config = run.load_config()
    try:
        train = run_parts(run, config)["train"]
    except (DataError, FileNotFoundError) as error:
        raise DataError(
            f"an int8 export is calibrated on the training images of {run.root}, which are not "
            f"available (export without them: --export tflite:dynamic, tflite or none): {error}"
        ) from error
    rows = train.sample(min(n, len(train)), random_state=config.seed)
    images = [read_image(path) for path in rows["image_path"]]
    return model_batch(images, config.image_size, config.resize)[0]


def publish_export(
    weights: str | os.PathLike, backend: str = "tflite", quantize: str | None = "dynamic",
    calibration: Any = None,
) -> Path:
    """Export published weights for fast CPU inference, next to them, under the same sidecar.

    The default here, TFLite with dynamic-range int8 weights, was the fastest path that kept
    the masks of the Keras model (``benchmarks/inference_speed.py``) for all but EfficientNet-Lite
    U-Nets, for which :func:`busi.inference.export.export` warns
    (:func:`busi.inference.publish.publish` chooses per model with :func:`default_export`; see
    :mod:`busi.inference.export`). ``quantize="int8"`` needs ``calibration`` images
    (:func:`calibration_images`). The exported file's digests are added to the sidecar (the weights'
    model record), so :func:`busi.predict` applies the same post-processing to it and refuses it if
    it changes.

    Returns:
        The exported file's path (``<name>.tflite`` or ``<name>.onnx``; int8 or bfloat16
        variants get ``.int8``/``.bf16`` before the suffix).
    """
    weights = Path(weights)
    sidecar_path = weights.with_suffix(".json")
    record = ModelRecord.read(sidecar_path) if sidecar_path.is_file() else None
    covered = None if record is None else record.covers(weights.name)
    if covered is None or covered.differs(FileDigest.of(weights)):
        raise FileNotFoundError(
            f"{sidecar_path}: no sidecar for these weights; publish them first "
            "(busi.publish_weights)"
        )
    tag = {"dynamic": ".int8", "int8": ".int8", "bfloat16": ".bf16", "float16": ".fp16"}
    suffix = ".tflite" if backend == "tflite" else ".onnx"
    out = weights.with_name(weights.stem + tag.get(quantize or "", "") + suffix)
    export.export(weights, out, backend=backend, quantize=quantize, calibration=calibration)
    record.with_file(out).write(sidecar_path)
    return out


__all__ = ["CALIBRATION_IMAGES", "calibration_images", "default_export", "publish_export"]
