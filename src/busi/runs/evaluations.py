"""Where a run's evaluations are, and what they hold: the one place that knows the names of
the files evaluation writes, so reports, publishing, the model records, the notebooks and the
tools find the results of the very weights they mean.

Nothing here evaluates or imports a model: reading results must not need TensorFlow, and the
model records (:mod:`busi.inference.bundle`) find a run's post-processing here without entering
evaluation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from busi.runs.folder import EVALUATION, RunFolder
from busi.utils.atomic import read_json
from busi.utils.digests import file_sha1

POSTPROCESS_FILE = "postprocess.json"
"""In an evaluation folder: the post-processing chosen on validation for the weights."""
GRID_FILE = "postprocess_grid.csv"
"""In an evaluation folder: every post-processing candidate scored on validation."""
GATE_FILE = "gate_{split}.csv"
"""Lesion Dice and normal false positives across the image-level gate's thresholds, per part."""
OUT_OF_FOLD = "out_of_fold"
"""The part of a ``busi cv`` ensemble's gate curve (``gate_out_of_fold.csv``): its folds'
validation parts, each predicted by its own fold model, where its gate was chosen."""
SUMMARY_FILE = "summary.json"
"""In an evaluation folder: the weights, the post-processing and the figures of each part."""
PER_IMAGE_FILE = "per_image_{split}.csv"
"""In an evaluation folder: the scores of each image of a part."""


def evaluation_dir(run: RunFolder, model_path: str | os.PathLike | None = None,
                   dataset: str | None = None) -> Path:
    """Where the evaluation of these weights goes: ``evaluation/`` for the run's ``best.h5``,
    ``evaluation/<model stem>/`` for any other weights (so evaluating ``last.h5`` does not
    overwrite the results of ``best.h5``).

    ``dataset``: results on a dataset other than the run's first go to
    ``evaluation-<name>/`` (the other datasets of a joint run, or a dataset the run never
    saw); None or the run's first dataset is ``evaluation/``, whose folder also holds the
    post-processing chosen on validation.
    """
    first = dataset is None or dataset == run.load_config().datasets[0]
    root = run.root / (EVALUATION if first else f"{EVALUATION}-{dataset}")
    path = run.weights(model_path)
    if path.resolve() == run.best.resolve():
        return root
    return root / path.stem


def summary_for(run: RunFolder, model_path: str | os.PathLike | None = None,
                dataset: str | None = None) -> dict[str, Any] | None:
    """The ``summary.json`` of these weights (default ``best.h5``), or None if they have not
    been evaluated, or the summary was made for earlier weights (training went on).
    ``dataset``: as in :func:`evaluation_dir`."""
    summary = read_json(evaluation_dir(run, model_path, dataset) / SUMMARY_FILE)
    if summary is None or summary.get("model_sha1") != file_sha1(run.weights(model_path)):
        return None
    return summary


def summary_with_test(run: RunFolder) -> dict[str, Any] | None:
    """The ``summary.json`` of the run's ``best.h5`` if it has test results for these very
    weights, else None."""
    summary = summary_for(run) if run.best.is_file() else None
    return summary if summary is not None and "test" in summary.get("splits", {}) else None


def tested(run: RunFolder) -> bool:
    """Whether the run's ``best.h5`` has test results (for these very weights)."""
    return summary_with_test(run) is not None


def per_image_path(run: RunFolder, split: str = "test",
                   model_path: str | os.PathLike | None = None,
                   dataset: str | None = None) -> Path:
    """Where evaluation writes the per-image scores of a part (``per_image_<split>.csv``)."""
    return evaluation_dir(run, model_path, dataset) / PER_IMAGE_FILE.format(split=split)


def per_image(run: RunFolder, split: str = "test", model_path: str | os.PathLike | None = None,
              dataset: str | None = None) -> pd.DataFrame:
    """The per-image scores evaluation wrote for a part (:func:`per_image_path`)."""
    return pd.read_csv(per_image_path(run, split, model_path, dataset))


__all__ = ["GATE_FILE", "GRID_FILE", "OUT_OF_FOLD", "PER_IMAGE_FILE", "POSTPROCESS_FILE",
           "SUMMARY_FILE", "evaluation_dir", "per_image", "per_image_path", "summary_for",
           "summary_with_test", "tested"]
