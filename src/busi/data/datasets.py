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

import numpy as np
import pandas as pd

from busi.data import busbra, folder
from busi.data.download import ENV_VAR as BUSI_ENV_VAR
from busi.data.download import download as busi_download
from busi.data.download import locate as busi_locate
from busi.data.duplicates import NEAR_DUPLICATE_BITS
from busi.data.index import index as busi_index
from busi.errors import DataError


@dataclass(frozen=True)
class Dataset:
    """One dataset's adapter.

    Attributes:
        name: registry key, as configs and ``--dataset`` name it.
        title: for people (figures, reports).
        locate: ``locate(path or None) -> root``; None looks in the dataset's usual places and
            environment variable; raises :class:`busi.errors.DataError` saying how to get it.
        download: ``download(dest, force) -> root``; None for data that exists only where
            the user keeps it (a folder of their own images), which ``busi download`` does not
            offer.
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
    download: Callable[..., Path] | None
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
    name=folder.NAME, title="own images", locate=folder.locate, download=None,
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


def downloadable() -> list[str]:
    """The registered datasets that can be fetched (what ``busi download`` offers)."""
    return [name for name, dataset in _REGISTRY.items() if dataset.download is not None]


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

    Duplicate groups are made within each dataset, and each dataset is split on its own, so an
    image that two datasets share (a user's ``folder`` assembled partly from BUSI, say) could
    train in one and be tested in the other. Such copies are looked for across every pair of
    datasets (:func:`cross_duplicate_pairs`) and refused rather than silently split.

    Raises:
        ValueError: an id occurs in two datasets (a split names images by id).
        DataError: an image of one dataset is an exact or near duplicate of one in another.
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
    _refuse_shared_images(tables)
    return pd.concat(frames, ignore_index=True)


_BITS_SET = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


def cross_duplicate_pairs(
    first: pd.DataFrame, second: pd.DataFrame, max_distance: int = NEAR_DUPLICATE_BITS
) -> pd.DataFrame:
    """Pairs of an image of ``first`` and an image of ``second`` that are exact or near
    duplicates, by the rule of :func:`busi.data.duplicate_pairs` (identical pixel ``hash``, or
    perceptual hashes at most ``max_distance`` bits apart).

    Only the cross pairs are compared, as 64-bit integers (XOR and bit count): BUSI x BUS-BRA
    is 1.5 M comparisons in a few tens of MB, where :func:`busi.data.duplicate_pairs` on the stacked
    tables would hold every pair's 64 bits (~450 MB).

    Returns:
        DataFrame with ``id_a`` (of ``first``), ``id_b`` (of ``second``), ``distance`` and
        ``exact``, sorted by distance.
    """
    a_bits = np.array([int(h, 16) for h in first["phash"]], dtype=np.uint64)
    b_bits = np.array([int(h, 16) for h in second["phash"]], dtype=np.uint64)
    differing = a_bits[:, None] ^ b_bits[None, :]
    distance = _BITS_SET[differing.view(np.uint8)].reshape(*differing.shape, 8).sum(
        axis=2, dtype=np.int64)  # a bit count that numpy < 2 (no np.bitwise_count) has too
    exact = first["hash"].to_numpy()[:, None] == second["hash"].to_numpy()[None, :]
    a, b = np.nonzero((distance <= max_distance) | exact)
    pairs = pd.DataFrame({
        "id_a": first["id"].to_numpy()[a], "id_b": second["id"].to_numpy()[b],
        "distance": distance[a, b], "exact": exact[a, b],
    })
    return pairs.sort_values(["distance", "id_a", "id_b"], kind="stable").reset_index(drop=True)


def _refuse_shared_images(tables: dict[str, pd.DataFrame], shown: int = 20) -> None:
    """Raise :class:`DataError` naming the images two datasets of one run share."""
    found = []
    names = list(tables)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            pairs = cross_duplicate_pairs(tables[first], tables[second])
            found += [
                f"{first}:{a} ~ {second}:{b} ("
                + ("identical pixels" if exact else f"perceptual hash {distance} bits apart")
                + ")"
                for a, b, distance, exact in zip(pairs["id_a"], pairs["id_b"],
                                                 pairs["distance"], pairs["exact"], strict=True)
            ]
    if found:
        more = f"\n  ... and {len(found) - shown} more" if len(found) > shown else ""
        raise DataError(
            f"{len(found)} pair(s) of images are exact or near duplicates across the datasets "
            f"of this run (dataset:id ~ dataset:id):\n  " + "\n  ".join(found[:shown]) + more
            + "\nEach dataset is split on its own, so such a copy could train in one dataset and "
            "be tested in the other. Remove the copies from one of the datasets (e.g. from your "
            "own folder dataset), or train on one of them only."
        )


def check_names(values: Sequence[str]) -> tuple[str, ...]:
    """``values`` as a tuple of registered names, each once, at least one."""
    values = tuple(values)
    if not values or len(set(values)) != len(values):
        raise ValueError(f"datasets must name at least one dataset, each once, got {list(values)}")
    for value in values:
        get(value)
    return values


__all__ = ["BUSBRA", "BUSI", "FOLDER", "Dataset", "check_names", "combine",
           "cross_duplicate_pairs", "downloadable", "get", "load", "names", "register"]
