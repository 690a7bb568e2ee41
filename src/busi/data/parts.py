"""The images a run uses: its datasets' checked table, the split made from it, and the rows of
each part. Training makes the split once and saves it in the run folder; evaluation, reports and
the notebooks select in the same table with the saved split
(:func:`busi.data.run_parts.run_parts`), so every step sees the same images.

Pure functions of a config and a table: nothing here reads or writes a run folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from busi.data import datasets
from busi.data.duplicates import add_groups, conflicting_groups, drop_conflicts
from busi.data.splits import load_split, make_split, select
from busi.errors import DataError

if TYPE_CHECKING:
    from busi.config.train_config import TrainConfig


def dataset_table(config: TrainConfig) -> pd.DataFrame:
    """The checked index of the run's datasets with duplicate (and patient) groups,
    label-conflicting groups left out if ``config.drop_conflicts``: the table a run's split is
    made from and selects in. Several datasets give one table with a ``dataset`` column
    (:func:`busi.data.datasets.combine`)."""
    tables = {name: single_dataset_table(config, name) for name in config.datasets}
    if len(tables) == 1:
        return tables[config.datasets[0]]
    return datasets.combine(tables)


def single_dataset_table(config: TrainConfig, name: str) -> pd.DataFrame:
    """The grouped index of one dataset, where ``config`` says it is (see
    :meth:`TrainConfig.data_path`), label-conflicting groups left out if the config says so."""
    adapter = datasets.get(name)
    table = add_groups(adapter.index(adapter.locate(config.data_path(name))))
    return drop_conflicts(table) if config.drop_conflicts else table


def split_parts(
    config: TrainConfig, table: pd.DataFrame, split: pd.DataFrame
) -> dict[str, pd.DataFrame]:
    """The index rows of each part of ``split`` (in split-file order), ``config.limit`` applied.

    Their :func:`busi.data.fingerprint` is the run's dataset fingerprint (``env.json``).

    Raises:
        DataError: the split names images ``table`` lacks; the message tells whether they are
            label-conflicting duplicates the run leaves out or images of another dataset.
    """
    missing = sorted(set(split["id"]) - set(table["id"]))
    if missing:
        raise DataError(_missing_images(config, missing))
    parts = {name: select(table, split, name) for name in ("train", "val", "test")}
    if config.limit:
        parts = {name: stratified_head(part, config.limit) for name, part in parts.items()}
    return parts


def _missing_images(config: TrainConfig, missing: list[str]) -> str:
    """Why a split names images a run's table lacks, for the error message (an error path, so
    indexing the dataset again to find the label-conflicting images is affordable)."""
    source = f"{config.split_file}: " if config.split_file else ""
    if config.drop_conflicts:
        conflicting: set[str] = set()
        for name in config.datasets:
            kept = single_dataset_table(config.replace(drop_conflicts=False), name)
            conflicting |= set(conflicting_groups(kept)["id"])
        if set(missing) <= conflicting:
            return (
                f"{source}the split holds {len(missing)} image(s) of label-conflicting duplicate "
                f"groups, e.g. {missing[:3]}, which training leaves out (drop_conflicts=True, "
                "the default). Make the split from busi.data.drop_conflicts(table), as "
                "busi.data.parts.make_run_split does, or set drop_conflicts=False to keep them."
            )
    return (
        f"{source}the split names {len(missing)} image(s) not in this dataset, e.g. "
        f"{missing[:3]}; was it made for other data than {', '.join(config.datasets)}?"
    )


def split_seed(config: TrainConfig) -> int:
    """The seed the split is made with: ``config.split_seed``, else the run's ``seed``."""
    return config.seed if config.split_seed is None else config.split_seed


def make_run_split(config: TrainConfig, table: pd.DataFrame) -> pd.DataFrame:
    """The split a new run with ``config`` trains on: ``config.split_file`` if given, else each
    dataset's own split (:func:`dataset_split`); with several datasets they are stacked, with a
    ``dataset`` column."""
    if config.split_file:
        return load_split(config.split_file)
    if len(config.datasets) == 1:
        return dataset_split(config, config.datasets[0], table)
    return pd.concat([
        dataset_split(config, name, table[table["dataset"] == name]).assign(dataset=name)
        for name in config.datasets
    ], ignore_index=True)


def dataset_split(config: TrainConfig, name: str, table: pd.DataFrame) -> pd.DataFrame:
    """The split of one dataset: the published partition if ``config.authors_fold`` is set and
    the dataset has one, else a grouped, stratified split (label-conflicting duplicates left out
    first when ``config.drop_conflicts``). The same for a dataset alone and in a joint run."""
    # A run's own table (dataset_table) has them left out already, and dropping again changes
    # nothing; a table straight from add_groups (notebook 01, a user's) still holds them.
    if config.drop_conflicts:
        table = drop_conflicts(table)
    options = {"classes": config.classes, "val_fraction": config.val_fraction,
               "test_fraction": config.test_fraction, "seed": split_seed(config)}
    adapter = datasets.get(name)
    if config.authors_fold is not None and adapter.authors_split is not None:
        root = adapter.locate(config.data_path(name))
        return adapter.authors_split(root, table, config.authors_fold, **options)
    return make_split(table, **options)


def stratified_head(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """The first ``n`` rows with the classes interleaved in proportion, so that a small subset
    (quick runs, CI) still holds every class (of every dataset, in a joint run); rows keep their
    relative order within a class."""
    kind = table["label"] if "dataset" not in table else table["dataset"] + "/" + table["label"]
    rank = kind.groupby(kind).cumcount() / kind.groupby(kind).transform("size")
    order = sorted(range(len(table)), key=lambda i: (rank.iat[i], kind.iat[i]))
    return table.iloc[sorted(order[:n])].reset_index(drop=True)


__all__ = ["dataset_split", "dataset_table", "make_run_split", "single_dataset_table",
           "split_parts", "split_seed", "stratified_head"]
