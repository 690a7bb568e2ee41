"""A published model scored without its run folder.

A fresh clone has ``weights/NAME.h5`` (and its exports) but not ``runs/``, so ``busi evaluate
RUN`` cannot score the shipped model. Its sidecar ``NAME.json`` (written by ``busi publish``)
holds what that needs: the training config, from which the run's split is made again with the
function training used (:func:`busi.data.parts.make_run_split`), the fingerprint of the images
the run was split on, and the post-processing chosen on the run's validation images for this
very file. The fingerprint says whether the images here are those images, and the number of
validation and test images the sidecar's metrics counted says whether the split made here is
the run's (a split made with another version of scikit-learn might not be): a test part that
cannot be confirmed is refused, never scored as if it were the run's. Another dataset is scored
as ``busi evaluate RUN --dataset`` scores it (:mod:`busi.data.cross_dataset`).

Nothing is written: the scores are returned (``busi evaluate`` prints them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from busi.config import sections
from busi.config.train_config import TrainConfig
from busi.data import datasets
from busi.data.cross_dataset import dataset_rows
from busi.data.index import fingerprint
from busi.data.parts import dataset_table, make_run_split, split_parts
from busi.data.splits import in_classes, is_lesion
from busi.errors import DataError
from busi.evaluation.score_tables import evaluate_model, summary_record
from busi.inference import predictor as inference
from busi.inference.bundle import postprocess_for, published_record, record_candidates
from busi.inference.postprocess import PostProcess
from busi.utils.atomic import json_ready
from busi.utils.digests import file_sha1


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """The sidecar of a published model file: the model record beside it that lists it by name
    (:func:`busi.inference.bundle.published_record`: ``X.json`` for ``X.h5`` and its exports); where
    there is none, ``X.json``, the path an error names."""
    found = published_record(model_path)
    return found[0] if found is not None else record_candidates(Path(model_path))[-1]


def read_sidecar(model_path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """``(path, content)`` of the sidecar of ``model_path``, checked to hold a training config.

    Raises:
        FileNotFoundError: no model file at ``model_path``.
        DataError: no sidecar beside it, or one without a training config.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: model file not found")
    path = sidecar_path(model_path)
    found = published_record(model_path)
    sidecar = None if found is None else found[1].to_dict()
    if sidecar is None:
        raise DataError(
            f"{model_path}: no sidecar {path.name} beside it (busi publish writes one), so its "
            "split and post-processing are unknown; score it from its run folder instead "
            "(busi evaluate RUN --weights FILE)"
        )
    if not isinstance(sidecar.get("config"), dict):
        raise DataError(f"{path}: no training config in it; not a sidecar written by busi "
                        "publish")
    return path, sidecar


def published_config(sidecar: dict[str, Any], data: str | os.PathLike | None = None,
                     dataset: str | None = None) -> TrainConfig:
    """The training config of a sidecar, with the datasets looked for here (``data`` for
    ``dataset``, default the first; the others where their adapters look), not at the paths of
    the machine the model was trained on."""
    flat = sections.flatten(sidecar["config"])  # sectioned, or flat in older sidecars
    config = TrainConfig.from_dict({**flat, "data": None, "data_paths": {}})
    name = dataset or config.datasets[0]
    if data is not None and name in config.datasets:
        config = config.replace(data_paths={name: str(data)})
    return config


def published_parts(model_path: str | os.PathLike, data: str | os.PathLike | None = None,
                    dataset: str | None = None) -> dict[str, pd.DataFrame]:
    """The rows of each part of the split a published model was trained with, made again from
    its sidecar and confirmed (see the module's docstring); ``data`` and ``dataset`` as in
    :func:`published_config`.

    Raises:
        DataError: the data here are not the images the model was split on, or the split made
            here is not the run's.
    """
    path, sidecar = read_sidecar(model_path)
    config = published_config(sidecar, data, dataset)
    table = dataset_table(config)
    parts = split_parts(config, table, make_run_split(config, table))
    recorded, found = sidecar.get("dataset_fingerprint"), fingerprint(pd.concat(parts.values()))
    if recorded != found:
        raise DataError(
            f"{path}: {Path(model_path).name} was split and trained on other images (dataset "
            f"fingerprint {recorded}; the data here {found}), so its test images cannot be told "
            f"apart here. Point --data (or ${_env_var(config.datasets[0])}) at the dataset it "
            "was trained on"
        )
    _check_part_sizes(path, sidecar, config, parts)
    if config.train_classes is not None:  # as run_parts: the images it trained on
        train = parts["train"]
        parts["train"] = train[in_classes(train["label"], config.train_classes)].reset_index(
            drop=True)
    return parts


def _env_var(dataset: str) -> str:
    return datasets.get(dataset).env_var


def _check_part_sizes(path: Path, sidecar: dict[str, Any], config: TrainConfig,
                      parts: dict[str, pd.DataFrame]) -> None:
    """Refuse a split whose val or test part holds other numbers of lesion and normal images
    than the sidecar's metrics counted (those of the run's first dataset)."""
    metrics = sidecar.get("metrics") or {}
    for part in ("val", "test"):
        recorded = metrics.get(part)
        if not isinstance(recorded, dict) or "lesion" not in recorded:
            continue
        rows = _of_dataset(parts[part], config.datasets[0])
        here = {"lesion": int(is_lesion(rows["label"]).sum()),
                "normal": int((rows["label"] == "normal").sum())}
        there = {kind: int((recorded.get(kind) or {}).get("n", 0)) for kind in here}
        if here != there:
            raise DataError(
                f"{path}: the split made here from its config differs from the run's: its "
                f"{part} part holds {here['lesion']} lesion and {here['normal']} normal images "
                f"here, {there['lesion']} and {there['normal']} in the run (another version of "
                "the split code?); score the model from its run folder instead"
            )


def _of_dataset(rows: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The rows of one dataset of a joint run's part (all rows of a one-dataset run)."""
    if "dataset" not in rows:
        return rows
    return rows[rows["dataset"] == dataset].reset_index(drop=True)


def evaluate_published(
    model_path: str | os.PathLike,
    split: str = "test",
    dataset: str | None = None,
    data: str | os.PathLike | None = None,
    batch_size: int | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score a published model (``.h5`` or an export beside its sidecar) as ``busi evaluate``
    scores a run: per image at the original size, with the post-processing chosen on the run's
    validation images.

    Args:
        model_path: the model file; its sidecar sits beside it.
        split: a part of the run's split ("train", "val", "test") for a dataset the model was
            trained on; "test" or "all" for another one
            (:func:`busi.data.cross_dataset.dataset_rows`).
        dataset: default the model's first dataset.
        data: that dataset's folder, if not where its adapter looks.
        batch_size: default the run's.

    Returns:
        ``(per_image, summary)``: the per-image scores and a summary in the form of
        ``summary.json`` (:func:`busi.evaluation.score_tables.summary_record`), ``splits[split]``
        the figures.
    """
    model_path = Path(model_path)
    path, sidecar = read_sidecar(model_path)
    config = published_config(sidecar, data, dataset)
    name = dataset or config.datasets[0]
    if name in config.datasets:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split (--split) must be train, val or test for {name}, which "
                             f"the model was trained on, got {split!r} ('all' is for another "
                             "dataset)")
        rows = _of_dataset(published_parts(model_path, data, dataset)[split], name)
    else:
        rows = dataset_rows(config, name, split, data)
    chosen = postprocess_for(model_path)
    if chosen is None:
        raise DataError(f"{path}: records no post-processing for {model_path.name} (made for "
                        "other weights?); it cannot be scored as it was evaluated")
    post = PostProcess.from_dict(chosen)
    per_image, figures = evaluate_model(inference.load(model_path), rows, post,
                                        config.image_size, config.resize,
                                        batch_size or config.batch_size, desc=split)
    record = summary_record(model_path, file_sha1(model_path), post, config.image_size,
                            config.resize)
    record.update({
        "dataset": name, "part": split, "dataset_fingerprint": fingerprint(rows),
        "postprocess_chosen_on": "val of the run's own datasets "
                                 f"({', '.join(config.datasets)}), from the sidecar {path.name}",
        "splits": {split: figures},
    })
    return per_image, json_ready(record)


__all__ = ["evaluate_published", "published_config", "published_parts", "read_sidecar",
           "sidecar_path"]
