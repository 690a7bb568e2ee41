"""Datasets as plug-ins: a name -> adapter registry, so the core never knows which one it reads.

An adapter is a small module or object that locates (and, where possible, downloads) one
dataset's files and turns them into the common index table (nnU-Net's "a new dataset is a
converter, not a change to the core"). Everything downstream (checks, duplicate groups, splits,
the input pipeline, training, evaluation) reads only that table:

=================  ==============================================================================
``id``             unique image name within the dataset
``label``          benign, malignant, normal, or lesion (kind unknown)
``image_path``     the image file; ``mask_paths``: its mask files (merged by OR), ``mask_count``
``patient``        optional: images of one patient never straddle two parts of a split
``height``...      ``width``, ``lesion_fraction``, ``hash`` (pixels), ``phash`` (near duplicates)
(more)             metadata the adapter keeps (BUS-BRA: histology, BI-RADS, device, side)
=================  ==============================================================================

Registered: ``busi`` (Kaggle BUSI, the project's default), ``busbra`` (BUS-BRA) and ``folder``
(a user's ``images/`` + ``masks/``). Add one with :func:`register`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from busi.data import busbra, folder
from busi.data.download import ENV_VAR as BUSI_ENV_VAR
from busi.data.download import download as busi_download
from busi.data.download import locate as busi_locate
from busi.data.index import index as busi_index


@dataclass(frozen=True)
class Dataset:
    """One dataset's adapter.

    Attributes:
        name: registry key, as configs and ``--dataset`` name it.
        title: for people (figures, reports).
        locate: ``locate(path or None) -> root``; None looks in the dataset's usual places and
            environment variable; raises :class:`busi.errors.DataError` saying how to get it.
        download: ``download(dest, force) -> root``.
        index: ``index(root, strict, workers) -> table`` (the common index table).
        authors_split: the split with the dataset's published partition (``authors_fold``), if
            it has one: ``authors_split(root, grouped_table, fold, classes=, val_fraction=,
            test_fraction=, seed=) -> split``.
        env_var: the environment variable that points at it.
        citation: what its licence asks users to cite.
    """

    name: str
    title: str
    locate: Callable[..., Path]
    download: Callable[..., Path]
    index: Callable[..., pd.DataFrame]
    env_var: str
    citation: str
    authors_split: Callable[..., pd.DataFrame] | None = None


BUSI = Dataset(
    name="busi", title="BUSI", locate=busi_locate, download=busi_download,
    index=busi_index, env_var=BUSI_ENV_VAR,
    citation="Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. "
             "Data in Brief 28 (2020) 104863.",
)
BUSBRA = Dataset(
    name=busbra.NAME, title="BUS-BRA", locate=busbra.locate, download=busbra.download,
    index=busbra.index, env_var=busbra.ENV_VAR, citation=busbra.CITATION,
    authors_split=busbra.authors_split,
)
FOLDER = Dataset(
    name=folder.NAME, title="own images", locate=folder.locate, download=folder.download,
    index=folder.index, env_var=folder.ENV_VAR, citation="",
)

_REGISTRY: dict[str, Dataset] = {}


def register(dataset: Dataset, replace: bool = False) -> Dataset:
    """Add an adapter under ``dataset.name``; a taken name is an error unless ``replace``."""
    if dataset.name in _REGISTRY and not replace:
        raise ValueError(f"a dataset named {dataset.name!r} is already registered")
    _REGISTRY[dataset.name] = dataset
    return dataset


for _dataset in (BUSI, BUSBRA, FOLDER):
    register(_dataset)


def names() -> list[str]:
    """The registered dataset names."""
    return list(_REGISTRY)


def get(name: str) -> Dataset:
    """The adapter registered as ``name``; an unknown name is an error listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(_REGISTRY)}") from None


def load(
    name: str, path: str | os.PathLike | None = None, strict: bool = False, workers: int = 4
) -> pd.DataFrame:
    """Locate and index dataset ``name``: its common index table."""
    dataset = get(name)
    return dataset.index(dataset.locate(path), strict=strict, workers=workers)


def combine(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Tables of several datasets as one, with a ``dataset`` column and duplicate groups kept
    apart (each table's ``group`` numbers offset past the previous table's).

    Raises:
        ValueError: an id occurs in two datasets (a split names images by id).
    """
    frames, offset, seen = [], 0, {}
    for name, table in tables.items():
        for image_id in table["id"]:
            if image_id in seen:
                raise ValueError(
                    f"image id {image_id!r} is in datasets {seen[image_id]!r} and {name!r}; ids "
                    "must be unique across the datasets of one run (rename the files)"
                )
            seen[image_id] = name
        frame = table.assign(dataset=name)
        if "group" in frame:
            frame["group"] = frame["group"] + offset
            offset = int(frame["group"].max()) + 1 if len(frame) else offset
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def check_names(values: Sequence[str]) -> tuple[str, ...]:
    """``values`` as a tuple of registered names, each once, at least one."""
    values = tuple(values)
    if not values or len(set(values)) != len(values):
        raise ValueError(f"datasets must name at least one dataset, each once, got {list(values)}")
    for value in values:
        get(value)
    return values


__all__ = ["BUSBRA", "BUSI", "FOLDER", "Dataset", "check_names", "combine", "get",
           "load", "names", "register"]
