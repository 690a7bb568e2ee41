"""Which images of another dataset a run is scored on: how well a BUSI model segments BUS-BRA
(other scanners, other country, other annotators) is the question a single-dataset test cannot
answer.

``part="all"`` is every image of the dataset (of the run's classes); ``part="test"`` only the
test part of the dataset's own split, made with the run's seed and fractions (and the authors'
partition if the run used ``authors_fold``): the part a joint model trained with that dataset is
tested on, so the two numbers compare. The scoring itself is the run's own, unchanged
(:func:`busi.evaluation.evaluator.evaluate_dataset`: post-processing chosen on the run's own
validation data, results in ``<run>/evaluation-<dataset>/``); the masks for figures come from
:func:`busi.inference.run_models.run_predictions` with ``dataset=``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pandas as pd

from busi.data import datasets
from busi.data.parts import dataset_split, single_dataset_table, stratified_head
from busi.data.splits import in_classes, select

if TYPE_CHECKING:
    from busi.config.train_config import TrainConfig

PARTS = ("all", "test")


def dataset_config(config: TrainConfig, dataset: str, data: str | os.PathLike | None = None
                   ) -> TrainConfig:
    """The run's config with ``dataset`` as its only dataset (at ``data``, else where its
    adapter looks): the split settings of the run applied to another dataset."""
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


__all__ = ["PARTS", "dataset_config", "dataset_rows"]
