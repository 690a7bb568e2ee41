"""Cross-dataset evaluation: score a run's model on a dataset it was not trained on.

How well a BUSI model segments BUS-BRA (other scanners, other country, other annotators) is the
question a single-dataset test cannot answer. The protocol is the run's own, unchanged: the
threshold, flip TTA and component filtering are those chosen on the run's **own validation
data** (never re-tuned on the new dataset, which would make its figures a best case), images are
scored per image at original resolution, and the figures are the same as on the run's test part
(:func:`busi.evaluation.summarize`). Results go to ``<run>/evaluation-<dataset>/`` so they never
mix with the run's own.

``part="all"`` scores every image of the dataset (of the run's classes); ``part="test"`` only
the test part of the dataset's own split, made with the run's seed and fractions (and the
authors' partition if the run used ``authors_fold``): the part a joint model trained with that
dataset is tested on, so the two numbers compare.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from busi.config import TrainConfig

PARTS = ("all", "test")


def dataset_config(config: TrainConfig, dataset: str, data: str | os.PathLike | None = None
                   ) -> TrainConfig:
    """The run's config with ``dataset`` as its only dataset (at ``data``, else where its
    adapter looks): the split settings of the run applied to another dataset."""
    from busi.data import datasets

    fold = config.authors_fold if datasets.get(dataset).authors_split is not None else None
    return config.replace(datasets=[dataset], data=None if data is None else str(data),
                          data_paths={}, authors_fold=fold, split_file=None)


def dataset_rows(
    config: TrainConfig, dataset: str, part: str = "all", data: str | os.PathLike | None = None
) -> pd.DataFrame:
    """The index rows of ``dataset`` a run with ``config`` is evaluated on.

    Args:
        config: the run's settings (classes, seed, fractions, ``limit``).
        dataset: a registered dataset name the run was not trained on.
        part: "all" (every image of the run's classes) or "test" (the test part of the
            dataset's own split with the run's settings).
        data: the dataset's folder; default where its adapter looks.

    Raises:
        ValueError: the run was trained on ``dataset`` (its own split must be used), or an
            unknown part.
    """
    from busi.data import select
    from busi.data.splits import in_classes
    from busi.training import dataset_split, single_dataset_table, stratified_head

    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if dataset in config.datasets:
        raise ValueError(
            f"the run was trained on {dataset!r}: evaluate its own split of it "
            f"(busi evaluate RUN --dataset {dataset} --split test), not a cross-dataset part"
        )
    other = dataset_config(config, dataset, data)
    table = single_dataset_table(other, dataset)
    if part == "all":
        rows = table[in_classes(table["label"], config.classes)].reset_index(drop=True)
    else:
        rows = select(table, dataset_split(other, dataset, table), "test")
    return stratified_head(rows, config.limit) if config.limit else rows


def run_postprocess(run_dir: str | os.PathLike, model_path: str | os.PathLike | None = None
                    ) -> dict[str, Any]:
    """The post-processing the run chose on its own validation data for these weights
    (``evaluation[/<stem>]/postprocess.json``); chosen first (by evaluating the run's val part)
    if it has not been, or was chosen for earlier weights."""
    from busi.evaluation import _read_json, evaluate, evaluation_dir, file_sha1

    run_dir = Path(run_dir)
    model_path = Path(model_path) if model_path is not None else run_dir / "best.h5"
    path = evaluation_dir(run_dir, model_path) / "postprocess.json"
    params = _read_json(path)
    if params is None or params.get("model_sha1") != file_sha1(model_path):
        evaluate(run_dir, split="val", model_path=model_path)
        params = _read_json(path)
    assert params is not None
    return params


def evaluate_dataset(
    run_dir: str | os.PathLike,
    dataset: str,
    part: str = "all",
    model_path: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Evaluate a run's model on another dataset, with the run's own post-processing.

    Writes (atomically) ``per_image_<part>.csv`` and ``summary.json`` into
    ``evaluation-<dataset>/`` (``evaluation-<dataset>/<stem>/`` for weights other than
    ``best.h5``); the summary records the dataset, the part, the post-processing and where it was
    chosen, and the fingerprint of the images scored.

    Returns:
        The content of ``summary.json``, its ``splits[part]`` a :func:`busi.evaluation.summarize`
        dict.
    """
    from busi import weights
    from busi.data import fingerprint
    from busi.evaluation import _write_summary, evaluate_model, evaluation_dir, file_sha1
    from busi.runs import RunFolder

    run = RunFolder(Path(run_dir))
    with run.lock("evaluation"):  # one writer (reentrant: evaluate() may hold it already)
        config = TrainConfig.load(run.config)
        model_path = Path(model_path) if model_path is not None else run.best
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: model file not found")
        rows = dataset_rows(config, dataset, part, data)
        params = run_postprocess(run.root, model_path)
        model = weights.load_for_inference(model_path)
        per_image, _ = evaluate_model(model, rows, params, config.image_size, config.resize,
                                      batch_size or config.batch_size)
        out_dir = evaluation_dir(run.root, model_path, dataset)
        record = _write_summary(out_dir, {part: per_image}, model_path, file_sha1(model_path),
                                params, config.image_size, config.resize, dataset)
        record.update({
            "part": part, "dataset_fingerprint": fingerprint(rows),
            "postprocess_chosen_on":
                f"val of the run's own datasets ({', '.join(config.datasets)})",
        })
        from busi.evaluation import _write_json

        _write_json(out_dir / "summary.json", record)
        return record


def dataset_predictions(
    run_dir: str | os.PathLike, dataset: str, part: str = "all",
    model_path: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The rows :func:`evaluate_dataset` scores and the run's binary masks for them (for
    overlays and worst cases, as :func:`busi.notebook.run_predictions` for the run's own data)."""
    from busi import weights
    from busi.evaluation import postprocess, postprocess_kwargs, predict_probabilities

    run_dir = Path(run_dir)
    config = TrainConfig.load(run_dir / "config.json")
    model_path = Path(model_path) if model_path is not None else run_dir / "best.h5"
    rows = dataset_rows(config, dataset, part, data)
    params = run_postprocess(run_dir, model_path)
    model = weights.load_for_inference(model_path)
    probs = predict_probabilities(model, rows, config.image_size, config.resize,
                                  config.batch_size, tta=bool(params.get("tta", False)))
    kwargs = postprocess_kwargs(params)
    masks = {image_id: postprocess(prob, **kwargs)
             for image_id, prob in zip(rows["id"], probs, strict=True)}
    return rows, masks


__all__ = ["PARTS", "dataset_config", "dataset_predictions", "dataset_rows", "evaluate_dataset",
           "run_postprocess"]
