"""A run folder's model and masks: its weights opened as evaluation opens them, and the masks
they give for the images of a part, for overlays and worst cases.

Inference on a run, kept out of :mod:`busi.inference.predictor` (model files and images only, the
path ``busi predict`` takes) and out of :mod:`busi.runs.folder` (only the folder): the masks shown
in figures are made with the images, weights and post-processing that evaluation scored.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from busi.data.cross_dataset import dataset_rows
from busi.data.run_parts import run_parts, with_data
from busi.inference import predictor as inference
from busi.inference.postprocess import PostProcess
from busi.inference.runtimes import Predictor
from busi.models import heads
from busi.runs.folder import RunFolder


def open_run_model(run: RunFolder, model_path: str | os.PathLike | None = None,
                   safe_mode: bool | None = None) -> Predictor:
    """The run's weights (default ``best.h5``) ready to predict, checked against the
    SHA-256 training recorded and carrying their settings
    (:func:`busi.inference.predictor.open_model`, the safe loader)."""
    path = run.weights(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    return inference.open_model(path, safe_mode=safe_mode)


def run_predictions(
    run: RunFolder, split: str = "test", model_path: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None, dataset: str | None = None,
    postprocess: PostProcess | None = None,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The images of one part and the run's binary masks for them, for overlays and worst
    cases: the images and masks evaluation scores.

    Args:
        run: the run folder.
        split: a part of the run's split ("train", "val", "test"); for a dataset the run was
            not trained on, "all" or "test" (:func:`busi.data.cross_dataset.dataset_rows`).
        model_path: the weights; default ``best.h5``.
        data: the dataset's folder, if not where the run's config says.
        dataset: only the images of this dataset (one of a joint run's, or another one);
            None: every image of the part.
        postprocess: how probabilities become masks; default what evaluation chose on
            validation for these weights (:func:`busi.inference.bundle.postprocess_for`), else the
            defaults (for another dataset, an error: it is scored with the run's own choice).

    Returns:
        ``(table, masks)``: the index rows, and ``{id: uint8 (H, W) mask in {0, 1}}`` at each
        image's original size.
    """
    config = run.load_config()
    if dataset is None or dataset in config.datasets:
        config = with_data(run, data, dataset)
        rows = run_parts(run, config)[split]
        if dataset is not None and "dataset" in rows:
            rows = rows[rows["dataset"] == dataset].reset_index(drop=True)
    else:
        rows = dataset_rows(config, dataset, split, data)
    model = open_run_model(run, model_path)
    chosen = model.settings.record if model.settings is not None else None
    if chosen is None and postprocess is None and dataset not in (None, *config.datasets):
        # another dataset is scored with the run's own choice; defaults would not be it
        raise ValueError(
            f"{run.weights(model_path)}: no post-processing chosen on validation yet; "
            f"run `busi evaluate {run.root}` first (in Python, or give postprocess=)"
        )
    post = postprocess or (chosen.postprocess if chosen is not None else PostProcess())
    probs, labels = inference.predict_table(model, rows, config.image_size, config.resize,
                                            config.batch_size, post.tta, desc=split)
    lesion = [None] * len(rows) if labels is None else heads.lesion_probability(labels)
    return rows, {image_id: post.apply(prob, p_lesion) for image_id, prob, p_lesion
                  in zip(rows["id"], probs, lesion, strict=True)}


__all__ = ["open_run_model", "run_predictions"]
