"""Small helpers the notebooks need, kept here so each notebook cell stays one call.

The notebooks (``notebooks/0*.ipynb``) run in Jupyter, in Colab and headless in CI with tiny
parameters. What differs between those places is handled here: where the dataset comes from,
where runs and weights are written (the project's ``runs/`` and ``weights/``, or Google Drive in
Colab so they outlive the session), and demo images for the prediction notebook. What a run
holds the notebooks read with the functions of its stage, given a :class:`busi.RunFolder`: its
parts (:mod:`busi.data.run_parts`), masks (:mod:`busi.inference.run_models`) and evaluations
(:mod:`busi.runs.evaluations`).

The Colab install cell itself cannot live here: it runs before busi is installed.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from busi.data.download import DEFAULT_DEST, locate
from busi.data.download import download as fetch
from busi.data.parts import stratified_head
from busi.data.run_parts import run_parts, with_data
from busi.errors import DataError
from busi.evaluation.published import published_parts, sidecar_path
from busi.runs.folder import RunFolder
from busi.utils.atomic import atomic_path
from busi.utils.paths import RUNS_DIR, SHIPPED_MODEL, WEIGHTS_DIR

log = logging.getLogger(__name__)

DRIVE_MOUNT = Path("/content/drive")
DRIVE_FOLDER = DRIVE_MOUNT / "MyDrive" / "busi"
"""Where runs and weights go on Google Drive when a notebook is told ``USE_DRIVE = True``."""


def in_colab() -> bool:
    """True inside Google Colab: its kernel has imported ``google.colab``, and the runtime sets
    ``COLAB_RELEASE_TAG``. The notebooks' install cell tests the same. (Looking the package up
    with ``importlib.util.find_spec("google.colab")`` raises where a ``google`` module that is
    no package, e.g. from protobuf, is installed.)"""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def drive_folder(folder: Path = DRIVE_FOLDER) -> Path:
    """Mount Google Drive (Colab asks for permission once) and return ``folder`` on it, created.

    Raises:
        RuntimeError: not in Colab; Drive mounting is a Colab feature.
    """
    if not in_colab():
        raise RuntimeError(
            "USE_DRIVE = True needs Google Colab; elsewhere set RUN_DIR / WEIGHTS_DIR to any "
            "folder instead"
        )
    from google.colab import drive  # type: ignore[import-not-found]  # optional: Colab only

    drive.mount(str(DRIVE_MOUNT))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def locations(
    run_name: str,
    run_dir: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    use_drive: bool = False,
) -> tuple[Path, Path]:
    """The run folder and the weights folder a notebook reads and writes.

    A given ``run_dir`` / ``weights_dir`` wins; otherwise they are ``runs/<run_name>`` and
    ``weights/`` on Google Drive when ``use_drive`` (Colab; the run then survives a disconnect
    and training resumes from it), else in the project (``busi.utils.paths``, which honours
    ``$BUSI_RUNS`` and ``$BUSI_WEIGHTS``).
    """
    runs, weights = RUNS_DIR, WEIGHTS_DIR
    if use_drive:
        base = drive_folder()
        runs, weights = base / "runs", base / "weights"
    run = Path(run_dir) if run_dir is not None else runs / run_name
    return run, Path(weights_dir) if weights_dir is not None else weights


def get_data(path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The BUSI root folder: found where :func:`busi.data.locate` looks, else downloaded.

    Args:
        path: where the dataset is (or should be downloaded to); None looks in ``$BUSI_DATA``
            and the project's ``data/`` and downloads to ``data/raw``.
        download: fetch it from Kaggle if it is not found; with False a missing dataset is an
            error that says where to put it.
    """
    try:
        return locate(path)
    except DataError:
        if not download:
            raise
    log.info("BUSI not found; downloading it")
    return fetch(path if path is not None else DEFAULT_DEST)


def weights_or_shipped(path: str | os.PathLike) -> Path:
    """``path`` if it exists, else the model shipped in ``weights/`` (with a notice), so the
    prediction notebook also runs on a fresh clone where nothing has been trained."""
    path = Path(path)
    if path.is_file() or not SHIPPED_MODEL.is_file():
        return path
    print(f"{path} not found (train with 02_train first); using the shipped {SHIPPED_MODEL.name}")
    return SHIPPED_MODEL


def demo_inputs(run_dir: str | os.PathLike, dest: str | os.PathLike, n: int = 6,
                split: str = "test", data: str | os.PathLike | None = None) -> Path:
    """Copy ``n`` images (no masks) of a run's split part into ``dest``, to try prediction on.

    Test images by default: the model has not seen them. ``run_dir`` is a run folder, or
    published weights (``.h5`` with its sidecar) whose run folder is not at hand (a fresh
    clone): their split is made again from the sidecar and confirmed to be the run's
    (:func:`busi.evaluation.published.published_parts`). The dataset is only read.
    """
    source = Path(run_dir)
    run = RunFolder(source)
    if run.config.is_file():
        rows = run_parts(run, with_data(run, data))[split]  # checked against its fingerprint
    elif source.is_file() and sidecar_path(source).is_file():
        try:
            rows = published_parts(source, data)[split]
        except DataError as error:
            raise DataError(f"{error}; or set INPUTS to a folder of images") from error
    else:
        raise FileNotFoundError(
            f"{source}: neither a run folder nor published weights with a sidecar to take demo "
            "images from; set INPUTS to a folder of images"
        )
    dest = Path(dest)
    # every class in proportion (the first n rows of a split part are all benign)
    for image_path in stratified_head(rows, n)["image_path"]:
        source_image = Path(image_path)
        with atomic_path(dest / source_image.name) as tmp:
            tmp.write_bytes(source_image.read_bytes())
    return dest


__all__ = [
    "demo_inputs", "drive_folder", "get_data", "in_colab", "locations", "weights_or_shipped",
]
