"""Reproducible train/validation/test splits, stratified by label and grouped by duplicates.

A split is made once, saved as CSV and read back by training, evaluation and the notebooks, so
they all use the same one (nnU-Net's ``splits_final.json`` idea). Duplicate groups (see
:mod:`busi.data.duplicates`) never straddle two parts. The fractions are met to within the
granularity of grouped k-fold: the test part is one fold of ``round(1 / test)`` folds, the
validation part one fold of the rest.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from busi.data.duplicates import add_groups
from busi.data.index import KNOWN_LABELS, LABELS, UNLABELLED_LESION
from busi.errors import DataError
from busi.utils.atomic import atomic_write_text

SPLIT_COLUMNS = ["id", "label", "group", "split"]
#: Written after :data:`SPLIT_COLUMNS` when present: which dataset an image is from (runs trained
#: on several datasets; the ids must then be unique across them).
DATASET_COLUMN = "dataset"
LESION_CLASSES = ("benign", "malignant")


def is_lesion(labels: pd.Series) -> pd.Series:
    """Which images hold a lesion: benign, malignant, or a user's unlabelled "lesion"."""
    return labels != "normal"


def in_classes(labels: pd.Series, classes: Sequence[str]) -> pd.Series:
    """Which images take part when ``classes`` are chosen. An unlabelled lesion (a user's folder
    without labels) counts as one of the lesion classes: it takes part if any of them does."""
    selected = labels.isin(classes)
    if set(classes) & set(LESION_CLASSES):
        selected |= labels == UNLABELLED_LESION
    return selected


def _one_fold(table: pd.DataFrame, n_folds: int, seed: int, fold: int = 0) -> pd.Series:
    """Boolean mask of the rows in fold ``fold`` of a stratified, grouped k-fold."""
    if n_folds < 2:
        raise ValueError(f"a part of the split needs at least 2 folds, got {n_folds}")
    # A tiny table (a quick test set-up) cannot fill more folds than its largest class has
    # images; take fewer, larger folds rather than fail.
    n_folds = min(n_folds, max(2, int(table["label"].value_counts().max())))
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # A class with fewer images than folds (normal images of a small folder) leaves some
        # folds without it, as it must; scikit-learn says so at every split, which is noise.
        warnings.filterwarnings("ignore", message="The least populated class in y has only",
                                category=UserWarning)
        _, held_out = list(folds.split(table, table["label"], table["group"]))[fold]
    selected = pd.Series(False, index=table.index)
    selected.iloc[held_out] = True
    return selected


def _prepare(table: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    unknown = sorted(set(classes) - set(KNOWN_LABELS))
    if unknown:
        raise ValueError(f"unknown classes {unknown}; choose from {list(KNOWN_LABELS)}")
    if "group" not in table:
        table = add_groups(table)
    # Groups are formed on the whole dataset first, so a duplicate of a left-out class still
    # keeps its group number (and is left out with it where labels conflict).
    return table[in_classes(table["label"], classes)].reset_index(drop=True)


def make_split(
    table: pd.DataFrame,
    classes: Sequence[str] = LABELS,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> pd.DataFrame:
    """Split the indexed images into train, val and test (default 70/10/20).

    Args:
        table: output of :func:`busi.data.index`, with or without a ``group`` column.
        classes: which labels take part; ``("benign", "malignant")`` is the usual protocol of
            published BUSI results, all three trains the model to leave normal images empty.
        val_fraction, test_fraction: fractions of the whole.
        seed: makes the split reproducible.

    Returns:
        DataFrame with columns ``id``, ``label``, ``group``, ``split``.
    """
    table = _prepare(table, classes)
    test = _one_fold(table, round(1 / test_fraction), seed)
    return split_around_test(table, test, val_fraction, test_fraction, seed)


def split_around_test(table: pd.DataFrame, test: pd.Series, val_fraction: float,
                      test_fraction: float, seed: int) -> pd.DataFrame:
    """The split whose test part is the rows of ``test`` (a boolean mask): validation is one
    grouped, stratified fold of the rest, the remainder trains. Shared by :func:`make_split` and
    published partitions (BUS-BRA's authors' folds)."""
    rest = table[~test]
    val_folds = round((1 - test_fraction) / val_fraction)
    val = _one_fold(rest, val_folds, seed).reindex(table.index, fill_value=False)
    split = table[["id", "label", "group"]].copy()
    split["split"] = "train"
    split.loc[val, "split"] = "val"
    split.loc[test, "split"] = "test"
    return split


def cross_validation_splits(
    table: pd.DataFrame,
    n_folds: int = 5,
    classes: Sequence[str] = LABELS,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> list[pd.DataFrame]:
    """k-fold splits with one fixed test part: in split k, fold k of the rest is validation.

    The test part is the same as :func:`make_split`'s with the same seed and test fraction.
    """
    table = _prepare(table, classes)
    test = _one_fold(table, round(1 / test_fraction), seed)
    rest = table[~test]
    largest = int(rest["label"].value_counts().max()) if len(rest) else 0
    if n_folds > max(2, largest):  # _one_fold would make fewer, larger folds
        raise ValueError(f"{n_folds} folds need {n_folds} images of one class outside the test "
                         f"part; the largest class there has {largest}")
    splits = []
    for fold in range(n_folds):
        val = _one_fold(rest, n_folds, seed, fold).reindex(table.index, fill_value=False)
        split = table[["id", "label", "group"]].copy()
        split["split"] = "train"
        split.loc[val, "split"] = "val"
        split.loc[test, "split"] = "test"
        splits.append(split)
    return splits


def leaked(split: pd.DataFrame, train: str = "train", test: str = "test") -> pd.Series:
    """Whether each ``test`` image has a duplicate (same ``group``: a near duplicate, or one of a
    chain of them) among the ``train`` images.

    For judging a split made elsewhere, e.g. the random image-level split of most BUSI papers
    (build its frame from a table with :func:`busi.data.add_groups`' ``group`` column): such
    test images are scored on scans the model has seen, so their scores measure memory, not
    generalisation. Splits of :func:`make_split` leak none by construction.

    Args:
        split: rows with ``group`` and ``split`` columns (like :func:`make_split`'s result).
        train, test: the names of the two parts.

    Returns:
        Boolean Series over the ``test`` rows, with their index; ``.mean()`` is the leaked share.
    """
    missing = [c for c in ("group", "split") if c not in split]
    if missing:
        raise ValueError(f"split lacks columns {missing}; add groups with busi.data.add_groups")
    is_train, is_test = split["split"] == train, split["split"] == test
    if not is_train.any() or not is_test.any():
        raise ValueError(
            f"the split has no {train!r} or no {test!r} rows (parts: {sorted(set(split['split']))})"
        )
    return split.loc[is_test, "group"].isin(set(split.loc[is_train, "group"])).rename("leaked")


def save_split(split: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a split as CSV, atomically (with a ``dataset`` column if the split has one)."""
    columns = SPLIT_COLUMNS + ([DATASET_COLUMN] if DATASET_COLUMN in split else [])
    return atomic_write_text(path, split[columns].to_csv(index=False))


def load_split(path: str | os.PathLike) -> pd.DataFrame:
    """Read a split CSV written by :func:`save_split` (or edited by hand), checking it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    split = pd.read_csv(io.StringIO(path.read_text()),
                        dtype={"id": str, "label": str, DATASET_COLUMN: str})
    missing = [c for c in SPLIT_COLUMNS if c not in split]
    if missing:
        raise DataError(f"{path}: split file lacks columns {missing}")
    bad = sorted(set(split["split"]) - {"train", "val", "test"})
    if bad:
        raise DataError(f"{path}: unknown split names {bad}; use train, val, test")
    if split["id"].duplicated().any():
        twice = sorted(split["id"][split["id"].duplicated()])
        raise DataError(f"{path}: ids listed twice: {twice}")
    straddling = split.groupby("group")["split"].nunique()
    if (straddling > 1).any():
        raise DataError(
            f"{path}: duplicate groups {list(straddling[straddling > 1].index)} straddle splits"
        )
    return split


def select(table: pd.DataFrame, split: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows of ``table`` in part ``name`` ("train", "val" or "test"), in the split's order."""
    ids = split.loc[split["split"] == name, "id"]
    by_id = table.set_index("id", drop=False)
    missing = sorted(set(ids) - set(by_id.index))
    if missing:
        raise DataError(
            f"the split names {len(missing)} image(s) not in this dataset, e.g. {missing[:3]}; "
            "was it made for another copy of BUSI?"
        )
    return by_id.loc[list(ids)].reset_index(drop=True)
