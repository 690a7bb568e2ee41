"""Checks on the real BUSI dataset; skipped unless BUSI_DATA points at it."""

from __future__ import annotations

import numpy as np
import pytest

import busi

pytestmark = pytest.mark.busi_data


def test_counts(real_table):
    assert len(real_table) == 780
    assert real_table["mask_count"].sum() == 798
    assert (real_table["mask_count"] > 1).sum() == 17
    assert (real_table["mask_count"] >= 1).all()
    assert real_table["label"].value_counts().to_dict() == {
        "benign": 437, "malignant": 210, "normal": 133,
    }


def test_normal_masks_are_empty_and_lesion_masks_are_not(real_table):
    normal = real_table["label"] == "normal"
    assert (real_table.loc[normal, "lesion_fraction"] == 0).all()
    assert (real_table.loc[~normal, "lesion_fraction"] > 0).all()


def test_multi_mask_images_merge_to_the_union(real_table):
    multi = real_table[real_table["mask_count"] > 1]
    for row in multi.itertuples():
        _, merged = busi.data.load_example(row._asdict())
        parts = [busi.data.read_mask(p) for p in row.mask_paths]
        union = np.logical_or.reduce(parts)
        np.testing.assert_array_equal(merged, union.astype(np.uint8))
        assert set(np.unique(merged)) <= {0, 1}


def test_known_exact_cross_class_duplicate(real_table):
    pairs = busi.data.duplicate_pairs(real_table)
    exact = pairs[pairs["exact"]]
    exact_pairs = set(zip(exact["id_a"], exact["id_b"], strict=True))
    assert ("benign (433)", "malignant (145)") in exact_pairs
    # At the documented threshold (8 bits): 215 pairs, 1 exact, 602 groups (README, duplicates.py)
    assert len(pairs) == 215 and int(exact.shape[0]) == 1
    assert busi.data.add_groups(real_table)["group"].nunique() == 602
    conflicts = busi.data.conflicting_groups(real_table)
    assert len(conflicts) == 18 and conflicts["group"].nunique() == 8


def test_default_split_has_no_group_across_parts(real_table, tmp_path):
    split = busi.data.make_split(real_table)
    assert split.groupby("group")["split"].nunique().max() == 1
    fractions = split["split"].value_counts(normalize=True)
    assert abs(fractions["test"] - 0.2) < 0.03 and abs(fractions["val"] - 0.1) < 0.03
    loaded = busi.data.load_split(busi.data.save_split(split, tmp_path / "split.csv"))
    assert len(loaded) == 780
