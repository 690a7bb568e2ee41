"""Segment new images with a trained model: one mask PNG and one overlay PNG per image.

Prediction goes through the same functions as evaluation
(:func:`busi.inference.predictor.predict_images` and
:class:`busi.inference.postprocess.PostProcess`), so a delivered mask is exactly what was scored; it
needs nothing of the scoring code (:mod:`busi.evaluation.evaluator`).

Settings: a model file is opened with :func:`busi.inference.predictor.open_model`, which checks its
digest against its record and returns the settings recorded for it (:mod:`busi.inference.bundle`):
the post-processing chosen on validation (threshold, flip TTA, component filtering), the input size
and resize mode. They are used for every argument left at None; a file no record covers gets
:class:`~busi.inference.postprocess.PostProcess`'s defaults and letterbox (or the resize of the run
folder it sits in). The output folder gets ``predict.json``: which model file (digests) made the
masks, with which settings, by which busi version.

Research software: the masks are not for clinical decisions.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pandas as pd

import busi
from busi.data.index import IMAGE_SUFFIXES, mask_of
from busi.data.masks import read_image
from busi.errors import DataError
from busi.inference import predictor as inference
from busi.inference.postprocess import PostProcess
from busi.inference.predictor import ImageSize, model_input_size, predict_images_and_labels
from busi.models import heads
from busi.utils import progress
from busi.utils.atomic import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from busi.inference.bundle import ModelSettings

log = logging.getLogger(__name__)

#: File types read from an input folder (case-insensitive).
#: Columns of the table :func:`predict` returns.
COLUMNS = ["input", "pred", "overlay", "height", "width", "lesion_pixels", "max_probability",
           "error"]
OVERLAY_BGR = (0, 0, 255)  # red
RECORD_FILE = "predict.json"
"""In an output folder: what made its masks (:func:`write_run_record`)."""
CLASSES_FILE = "classes.csv"
"""In an output folder of a model with the image-level head: each image's class and
probabilities."""


def list_inputs(inputs: str | os.PathLike, include_masks: bool = False) -> list[Path]:
    """The image files to segment: ``inputs`` itself, or the images directly in that folder.

    A folder is not searched recursively and hidden files are skipped. In a folder laid out like
    BUSI, ``X_mask.png`` (``X_mask_1.png`` ...) next to an image ``X`` is that image's ground
    truth, not an image to segment, so it is left out unless ``include_masks``; a file named
    like a mask whose image is not in the folder is predicted like any other.
    """
    path = Path(inputs)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{path}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = sorted(
        p for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not include_masks:
        stems = {p.stem for p in files}
        masks = {p for p in files if (mask := mask_of(p)) is not None and mask[0] in stems}
        images = [p for p in files if p not in masks]
        if len(images) < len(files):
            log.info("%s: left out %d ground-truth mask file(s) of images in the folder "
                     "(include_masks=True keeps them)", path, len(files) - len(images))
        files = images
    if not files:
        raise DataError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def output_paths(image_path: Path, output_dir: Path) -> tuple[Path, Path]:
    """``<stem>_pred.png`` and ``<stem>_overlay.png`` in ``output_dir``."""
    return (output_dir / f"{image_path.stem}_pred.png",
            output_dir / f"{image_path.stem}_overlay.png")


def _check_outputs(inputs: Path, files: Sequence[Path], output_dir: Path) -> None:
    """Refuse anything that could overwrite an input, or two inputs writing the same file."""
    if inputs.is_dir() and output_dir.resolve() == inputs.resolve():
        raise ValueError(
            f"output folder {output_dir} is the input folder; choose another one so the inputs "
            "are never overwritten or mixed with predictions"
        )
    resolved_inputs = {f.resolve() for f in files}
    seen: dict[Path, Path] = {}
    for file in files:
        for out in output_paths(file, output_dir):
            target = out.resolve()
            if target in resolved_inputs:
                raise ValueError(f"writing {out} would overwrite the input file {out}")
            if target in seen:
                raise ValueError(
                    f"{seen[target].name} and {file.name} would both be written to {out.name}; "
                    "rename one of them"
                )
            seen[target] = file


def check_output_dir(output_dir: Path) -> None:
    """Fail early, before a model is loaded, if ``output_dir`` cannot become an output folder:
    it is a file, or the folder (or the first existing folder above it) is not writable."""
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"{output_dir}: the output folder is a file; choose a folder")
    existing = next(p for p in (output_dir, *output_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "output folder" if existing == output_dir else f"folder above {output_dir}"
        raise DataError(f"{existing}: the {what} is not writable")


def make_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` and prove it takes a file (a read-only file system passes
    :func:`check_output_dir`'s permission test), so no inference runs for nothing."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise DataError(f"{output_dir}: cannot write to the output folder: "
                        f"{error.strerror or error}") from error


def overlay_image(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = OVERLAY_BGR
                  ) -> np.ndarray:
    """BGR picture of a gray image with the mask tinted and outlined, for a quick visual check.

    The fill is translucent so the echo texture under the prediction stays visible; the outline
    thickens with the image size so it is visible on large images too.
    """
    picture = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if not mask.any():
        return picture
    inside = mask.astype(bool)
    tint = np.array(colour, np.float32)
    picture[inside] = (0.7 * picture[inside] + 0.3 * tint).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(min(image.shape) / 250))
    cv2.drawContours(picture, contours, -1, colour, thickness)
    return picture


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, encoded.tobytes())


def predict(
    model_or_path: Any,
    inputs: str | os.PathLike,
    output_dir: str | os.PathLike,
    image_size: ImageSize | None = None,
    resize: str | None = None,
    threshold: float | None = None,
    tta: bool | None = None,
    min_component_fraction: float | None = None,
    keep_largest: bool | None = None,
    gate: float | None = None,
    batch_size: int = 8,
    include_masks: bool = False,
    safe_mode: bool | None = None,
    verify: bool | None = None,
) -> pd.DataFrame:
    """Segment an image file or every image of a folder; write mask and overlay PNGs.

    For each image ``<stem>.<ext>`` (PNG/JPEG/BMP, any size, gray or colour; colour is
    converted to gray as for training), ``output_dir`` gets ``<stem>_pred.png``, the binary mask
    (0/255, 8-bit gray) at the image's original size, and ``<stem>_overlay.png``, the gray image
    with the mask in red. Files are written atomically. Inputs are never modified.

    Args:
        model_or_path: the path of a model file saved by busi (``.h5``, or ``.tflite``/``.onnx``
            from ``busi publish``), or a loaded model (:func:`busi.inference.predictor.load`, a
            Keras model or a callable, see :func:`busi.inference.predictor.predict_images`).
        inputs: an image file or a folder of images (see :func:`list_inputs`).
        output_dir: folder for the outputs (created); must not be the input folder.
        image_size: model input side; default the model's input size (or the run's).
        resize, threshold, tta, min_component_fraction, keep_largest, gate: None takes the value
            chosen on validation for these weights (module docstring), else letterbox and
            :class:`~busi.inference.postprocess.PostProcess`'s defaults. ``gate=0`` turns off the
            image-level gate of a model with the head (masks wherever pixels say so).
        batch_size: images per forward pass.
        include_masks: also segment BUSI ground-truth masks found next to their images
            (see :func:`list_inputs`).
        safe_mode: for a ``.h5`` path, refuse layers that can run code stored in the file
            (:func:`busi.inference.weights.load_model`); False only for files you trust.
        verify: for a path, refuse a file whose digest differs from its record
            (:func:`busi.inference.predictor.open_model`); False uses it with a warning.

    A model with the image-level head (:mod:`busi.models.heads`) also writes ``classes.csv``: each
    image's class (normal, benign, malignant) and probabilities.

    Returns:
        One row per input file (:data:`COLUMNS`): output paths, original size, predicted lesion
        pixels, maximum probability, and ``error`` (None, or why an unreadable file was skipped;
        it is also reported as a warning); with the head also the columns of ``classes.csv``.

    Raises:
        ValueError: ``output_dir`` is the input folder, an output would overwrite an input, or
            two inputs would write the same output (``a.png`` and ``a.jpg``).
        busi.errors.DataError: ``output_dir`` is a file or cannot be written (found before
            the model is loaded or anything predicted), the model file is damaged, not the one
            its record was made for, or not a busi model, or no image could be segmented (a
            folder the output folder was created for is then removed).
    """
    inputs = Path(inputs)
    output_dir = Path(output_dir)
    files = list_inputs(inputs, include_masks)
    _check_outputs(inputs, files, output_dir)
    check_output_dir(output_dir)

    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        model = inference.open_model(model_or_path, safe_mode=safe_mode, verify=verify)
    settings: ModelSettings | None = getattr(model, "settings", None)
    if image_size is None:
        image_size = model_input_size(model) or (settings and settings.image_size)
    if image_size is None:
        raise ValueError("the model has no fixed input size: give the side it was trained at "
                         "(busi predict --image-size N; image_size=N in Python)")
    resize = resize if resize is not None else (settings.resize if settings else "letterbox")
    post = (settings.postprocess if settings else PostProcess()).override(
        threshold=threshold, tta=tta, min_component_fraction=min_component_fraction,
        keep_largest=keep_largest, gate=gate)
    if post.gate > 0 and getattr(model, "has_head", None) is False:
        raise DataError(f"{getattr(model, 'path', 'the model')}: gate {post.gate} set, but the "
                        "model has no image-level head; use --gate 0")
    created = not output_dir.exists()
    make_output_dir(output_dir)

    rows: list[dict[str, Any]] = []
    with progress.bar(total=len(files), desc=f"segmenting {inputs.name}") as shown:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            shown.update(len(chunk))  # counted when started: the bar's rate is the same
            readable: list[tuple[Path, np.ndarray]] = []
            for file in chunk:
                try:
                    readable.append((file, read_image(file)))
                except (DataError, OSError) as error:
                    warnings.warn(f"skipped {file}: {error}", stacklevel=2)
                    rows.append({"input": str(file), "error": str(error)})
            if not readable:
                continue
            probs, labels = predict_images_and_labels(
                model, [image for _, image in readable], image_size, resize, batch_size,
                post.tta)
            if labels is None and post.gate > 0:
                raise DataError(f"{getattr(model, 'path', 'the model')}: gate {post.gate} set, "
                                "but the model has no image-level head; use --gate 0")
            lesion = [None] * len(readable) if labels is None else \
                heads.lesion_probability(labels)
            classes = [{}] * len(readable) if labels is None else heads.probability_table(
                [file.name for file, _ in readable], labels).drop(columns="image").to_dict(
                "records")
            for index, ((file, image), prob) in enumerate(zip(readable, probs, strict=True)):
                mask = post.apply(prob, lesion[index])
                pred_path, overlay_path = output_paths(file, output_dir)
                _write_png(pred_path, mask * np.uint8(255))
                _write_png(overlay_path, overlay_image(image, mask))
                rows.append({
                    "input": str(file), "pred": str(pred_path), "overlay": str(overlay_path),
                    "height": image.shape[0], "width": image.shape[1],
                    "lesion_pixels": int(mask.sum()), "max_probability": float(prob.max()),
                    "error": None, **classes[index],
                })
    order = {str(file): i for i, file in enumerate(files)}
    extra = [key for row in rows for key in row if key not in COLUMNS]
    table = pd.DataFrame.from_records(rows, columns=[*COLUMNS, *dict.fromkeys(extra)])
    table = table.sort_values("input", key=lambda s: s.map(order)).reset_index(drop=True)
    segmented = int(table["error"].isna().sum())
    if not segmented:
        if created:
            with contextlib.suppress(OSError):  # only if empty: never remove anyone's files
                output_dir.rmdir()
        raise DataError(f"{inputs}: no image was segmented: none of the {len(files)} file(s) "
                        f"could be read ({table['error'].iloc[0]})")
    if extra:  # the image-level head: each image's class and probabilities beside the masks
        classes = table[table["error"].isna()][["input", *dict.fromkeys(extra)]]
        atomic_write_text(output_dir / CLASSES_FILE, classes.to_csv(index=False))
    write_run_record(output_dir / RECORD_FILE, model, settings, inputs, image_size, resize,
                     post, segmented, len(table) - segmented)
    return table


def write_run_record(path: Path, model: Any, settings: ModelSettings | None, inputs: Path,
                     image_size: ImageSize, resize: str, post: PostProcess, segmented: int,
                     skipped: int) -> None:
    """``predict.json``: what made the masks in the folder, so they can be traced to the very
    model file (its digests and what vouched for it), the settings used after the caller's
    overrides, and the busi version."""
    model_path = getattr(model, "path", None)
    values = {
        "busi_version": busi.__version__,
        "model": {
            "path": None if model_path is None else str(Path(model_path).absolute()),
            "runtime": getattr(model, "runtime", type(model).__name__),
            "precision": getattr(model, "precision", None),
            **(settings.provenance() if settings is not None else {}),
        },
        "settings": {"image_size": image_size, "resize": resize, **post.to_dict()},
        "inputs": str(inputs.absolute()),
        "segmented": segmented,
        "skipped": skipped,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "not_for_clinical_use": True,
    }
    atomic_write_text(path, json.dumps(values, indent=2, default=str) + "\n")


__all__ = ["IMAGE_SUFFIXES", "RECORD_FILE", "list_inputs", "overlay_image", "output_paths",
           "predict", "write_run_record"]
