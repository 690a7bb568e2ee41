"""Checks on the real BUS-BRA dataset (skipped unless BUSBRA_DATA points at it), and that the
real BUSI split and fingerprint of a default run did not change when datasets became plug-ins
(skipped unless BUSI_DATA is set)."""

from __future__ import annotations

import hashlib
import os
import re
import warnings

import pandas as pd
import pytest

from busi.config.train_config import TrainConfig
from busi.data import add_groups, busbra, duplicate_pairs, make_split


@pytest.fixture(scope="module")
def busbra_table():
    return busbra.index(busbra.locate(os.environ.get("BUSBRA_DATA")), strict=True)


@pytest.mark.busbra_data
def test_busbra_counts(busbra_table):
    assert len(busbra_table) == 1875
    assert busbra_table["patient"].nunique() == 1064
    assert busbra_table["label"].value_counts().to_dict() == {"benign": 1268, "malignant": 607}
    assert (busbra_table["lesion_fraction"] > 0).all()


@pytest.mark.busbra_data
def test_busbra_groups_are_the_patients(busbra_table):
    """No near-duplicate pair within 8 bits in BUS-BRA, so the groups are exactly the patients
    (the closest pairs, at 10 bits, are 2 views of one patient and 4 of different patients)."""
    assert len(duplicate_pairs(busbra_table)) == 0
    grouped = add_groups(busbra_table)
    assert grouped["group"].nunique() == 1064
    assert grouped.groupby("group")["patient"].nunique().max() == 1


@pytest.mark.busbra_data
def test_busbra_splits_keep_patients_and_groups_in_one_part(busbra_table):
    """The honest-split guarantee on the real data: our grouped split (seeds 0-4) and the
    authors' partition (folds 1-5, validation drawn by us) never put a patient (``Case``) or a
    duplicate group in two parts, and the authors' folds leave no image out here (no group
    straddles their test folds, so authors_split warns of nothing)."""
    grouped = add_groups(busbra_table)
    root = busbra.locate(os.environ.get("BUSBRA_DATA"))
    splits = {f"seed {seed}": make_split(grouped, seed=seed) for seed in range(5)}
    for fold in range(1, 6):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=re.escape(str(root)))
            splits[f"fold {fold}"] = busbra.authors_split(root, grouped, fold)
    for name, split in splits.items():
        parts = split.merge(grouped[["id", "patient"]], on="id")
        assert len(parts) == len(grouped), name
        assert parts.groupby("patient")["split"].nunique().max() == 1, name
        assert parts.groupby("group")["split"].nunique().max() == 1, name
        assert set(parts["split"]) == {"train", "val", "test"}, name


@pytest.mark.busi_data
def test_real_busi_default_split_and_fingerprint_unchanged():
    """Values computed with the code before datasets became plug-ins (commit 345dbc6)."""
    from busi.data import fingerprint
    from busi.data.parts import dataset_table, make_run_split, split_parts

    config = TrainConfig(architecture="classic_unet")
    table = dataset_table(config)
    split = make_run_split(config, table)
    csv = split[["id", "label", "group", "split"]].to_csv(index=False)
    parts = split_parts(config, table, split)
    assert hashlib.sha1(csv.encode()).hexdigest() == "e6b7fd71948a57c4f084aad4b47243c176c1015f"
    assert fingerprint(pd.concat(parts.values())) == "e4ba80bdc4d05a53"
