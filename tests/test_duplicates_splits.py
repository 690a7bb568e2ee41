"""Duplicate groups and leak-free splits on the synthetic folder."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

import busi
from busi.data.duplicates import perceptual_hash
from busi.errors import DataError


def test_exact_cross_class_duplicate_found(busi_table):
    pairs = busi.data.duplicate_pairs(busi_table)
    exact = pairs[pairs["exact"]]
    assert list(zip(exact["id_a"], exact["id_b"], strict=True)) == [
        ("benign (10)", "malignant (6)")
    ]


def test_near_duplicate_found_and_distinct_images_not(busi_table):
    image = busi.data.read_image(busi_table["image_path"][0])
    marked = image.copy()
    cv2.putText(marked, "+", (5, 10), cv2.FONT_HERSHEY_SIMPLEX, 0.3, 255, 1)  # calliper mark
    other = busi.data.read_image(busi_table["image_path"][1])
    table = pd.DataFrame({
        "id": ["a", "b", "c"], "label": ["benign"] * 3, "hash": ["1", "2", "3"],
        "phash": [perceptual_hash(image), perceptual_hash(marked), perceptual_hash(other)],
    })
    pairs = busi.data.duplicate_pairs(table)
    assert list(zip(pairs["id_a"], pairs["id_b"], strict=True)) == [("a", "b")]


def test_groups_and_conflicts(busi_table):
    grouped = busi.data.add_groups(busi_table)
    by_id = grouped.set_index("id")["group"]
    assert by_id["benign (10)"] == by_id["malignant (6)"]
    assert grouped["group"].nunique() == len(grouped) - 1
    conflicts = busi.data.conflicting_groups(grouped)
    assert set(conflicts["id"]) == {"benign (10)", "malignant (6)"}
    kept = busi.data.drop_conflicts(grouped)
    assert len(kept) == len(grouped) - 2


def _assert_no_straddling(split):
    assert split.groupby("group")["split"].nunique().max() == 1


def test_split_grouped_stratified_reproducible(busi_table):
    split = busi.data.make_split(busi_table, seed=3)
    _assert_no_straddling(split)
    assert set(split["split"]) == {"train", "val", "test"}
    assert len(split) == len(busi_table)
    for label in busi.data.LABELS:  # every class in every part
        assert set(split.loc[split["label"] == label, "split"]) >= {"train", "test"}
    again = busi.data.make_split(busi_table, seed=3)
    pd.testing.assert_frame_equal(split, again)
    other = busi.data.make_split(busi_table, seed=4)
    assert not split["split"].equals(other["split"])


def test_leaked_flags_test_images_with_a_duplicate_in_train(busi_table):
    grouped = busi.data.add_groups(busi_table)
    random_split = grouped.assign(split="train")
    random_split.loc[random_split["id"].isin(["malignant (6)", "benign (3)"]), "split"] = "test"
    flags = busi.data.leaked(random_split)
    by_id = dict(zip(random_split.loc[flags.index, "id"], flags, strict=True))
    assert by_id == {"malignant (6)": True, "benign (3)": False}  # benign (10) is in train
    assert not busi.data.leaked(busi.data.make_split(busi_table, seed=3)).any()
    with pytest.raises(ValueError, match="add_groups"):
        busi.data.leaked(busi_table.assign(split="test"))
    with pytest.raises(ValueError, match="no 'train' or no 'test' rows"):
        busi.data.leaked(random_split.assign(split="train"))


def test_split_classes_parameter(busi_table):
    split = busi.data.make_split(busi_table, classes=busi.data.LESION_CLASSES)
    assert set(split["label"]) == {"benign", "malignant"}
    with pytest.raises(ValueError, match="unknown classes"):
        busi.data.make_split(busi_table, classes=("cyst",))


def test_cross_validation_keeps_test_fixed(busi_table):
    splits = busi.data.cross_validation_splits(busi_table, n_folds=3)
    test_ids = [set(s.loc[s["split"] == "test", "id"]) for s in splits]
    assert test_ids[0] == test_ids[1] == test_ids[2]
    val_ids = [set(s.loc[s["split"] == "val", "id"]) for s in splits]
    assert not (val_ids[0] & val_ids[1]) and not (val_ids[1] & val_ids[2])
    for split in splits:
        _assert_no_straddling(split)


def test_split_round_trip_and_select(busi_table, tmp_path):
    split = busi.data.make_split(busi_table)
    path = busi.data.save_split(split, tmp_path / "split.csv")
    loaded = busi.data.load_split(path)
    pd.testing.assert_frame_equal(loaded, split.reset_index(drop=True), check_dtype=False)
    test = busi.data.select(busi_table, loaded, "test")
    assert list(test["id"]) == list(split.loc[split["split"] == "test", "id"])
    assert "image_path" in test


def test_bad_split_files(busi_table, tmp_path):
    split = busi.data.make_split(busi_table)
    leaky = split.copy()
    group = leaky.loc[leaky["split"] == "test", "group"].iloc[0]
    leaky = pd.concat([leaky, leaky[leaky["group"] == group].assign(id="extra", split="train")])
    busi.data.save_split(leaky, tmp_path / "leaky.csv")
    with pytest.raises(DataError, match="straddle"):
        busi.data.load_split(tmp_path / "leaky.csv")
    (tmp_path / "cols.csv").write_text("id,split\na,train\n")
    with pytest.raises(DataError, match=r"cols\.csv: split file lacks columns"):
        busi.data.load_split(tmp_path / "cols.csv")
    with pytest.raises(DataError, match="not in this dataset"):
        busi.data.select(busi_table.iloc[:3], split, "train")
    with pytest.raises(DataError, match="not found"):
        busi.data.load_split(tmp_path / "missing.csv")


def test_perceptual_hash_survives_re_encoding_and_gain_but_not_other_content():
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (60, 80), dtype=np.uint8), (9, 9), 3)
    brighter = np.clip(image.astype(int) * 1.2, 0, 255).astype(np.uint8)
    resized = cv2.resize(cv2.resize(image, (160, 120)), (80, 60))
    other = cv2.GaussianBlur(rng.integers(0, 255, (60, 80), dtype=np.uint8), (9, 9), 3)

    def bits(a, b):
        return bin(int(perceptual_hash(a), 16) ^ int(perceptual_hash(b), 16)).count("1")

    assert len(perceptual_hash(image)) == 16
    assert bits(image, brighter) <= 8 and bits(image, resized) <= 8
    assert bits(image, other) > 8


def test_a_small_class_does_not_make_scikit_learn_warn_at_every_split(busi_table):
    """5 normal images cannot fill 7 validation folds; the split allows for it (37 of the suite's
    warnings were scikit-learn saying so)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        busi.data.make_split(busi_table, seed=0)
        busi.data.cross_validation_splits(busi_table, n_folds=7)
    assert not [w for w in caught if "least populated class" in str(w.message)]
