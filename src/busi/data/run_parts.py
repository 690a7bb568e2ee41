"""The images of a run folder's parts: its split made (a new run) or read back, and the data
checked against the fingerprint the run recorded, so that training, evaluation, reports,
publishing and the notebooks all see the images the run was trained on.

Apart from :mod:`busi.data.parts`, whose pure functions of a config and a table never touch a
run folder, and from :mod:`busi.runs.folder`, which only names the folder: this is where the data
stage reads and writes a run's ``split.csv`` and ``env.json``.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import pandas as pd

from busi.config.train_config import TrainConfig
from busi.data.index import fingerprint
from busi.data.parts import dataset_table, make_run_split, split_parts
from busi.data.splits import in_classes, load_split, save_split
from busi.errors import DataError
from busi.runs.folder import RunFolder, environment

if TYPE_CHECKING:
    from busi.data.cache import Cache


def run_parts(run: RunFolder, config: TrainConfig | None = None, new_run: bool = False,
              cache: Cache | None = None) -> dict[str, pd.DataFrame]:
    """Index and check the dataset and return the rows of each part of the run's split.

    Args:
        run: the run folder.
        config: the run's settings; default its ``config.json`` (give one to point at the
            data elsewhere, see :func:`with_data`).
        new_run: make the split (or take ``config.split_file``) and write ``split.csv`` and
            ``env.json``. Otherwise (resuming, evaluating) the run's own ``split.csv`` is
            read, nothing is written, and the data must have the fingerprint recorded in
            ``env.json``.
        cache: a :class:`busi.data.cache.Cache` made for ``config``: its rows and split
            stand in for the datasets, which are not read (``env.json`` then names it).

    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` index rows; "train" holds only
        ``config.train_classes`` if set.
    """
    config = config if config is not None else run.load_config()
    table = dataset_table(config) if cache is None else cache.table
    if new_run:
        split = make_run_split(config, table) if cache is None else cache.split
    elif run.split.is_file():
        split = load_split(run.split)
    else:
        raise DataError(f"{run.split}: the run folder has no split; was it trained?")
    parts = split_parts(config, table, split)
    found = fingerprint(pd.concat(parts.values()))
    if new_run:
        save_split(split, run.split)
        record = environment(found)
        if cache is not None:
            record["data_cache"] = cache.provenance()
        run.write_record(run.env, record)
    elif run.env.is_file():
        recorded = json.loads(run.env.read_text()).get("dataset_fingerprint")
        if recorded != found:
            raise DataError(
                f"{run.env}: the run was made with other data (fingerprint {recorded}, "
                f"this data {found}); point `data` at the dataset it was trained on"
            )
    if config.train_classes is not None:
        train = parts["train"]
        parts["train"] = train[in_classes(train["label"], config.train_classes)].reset_index(
            drop=True)
    return parts


def with_data(run: RunFolder, data: str | os.PathLike | None, dataset: str | None = None
              ) -> TrainConfig:
    """The run's config with ``dataset`` (default its first) found at ``data``: the same
    dataset elsewhere (its fingerprint is still checked). None leaves the config as it is."""
    config = run.load_config()
    if data is None:
        return config
    name = dataset or config.datasets[0]
    return config.replace(data_paths={**config.data_paths, name: str(data)})


__all__ = ["run_parts", "with_data"]
