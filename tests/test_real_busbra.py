"""Checks on the real BUS-BRA dataset (skipped unless BUSBRA_DATA points at it), and that the
real BUSI split and fingerprint of a default run did not change when datasets became plug-ins
(skipped unless BUSI_DATA is set)."""

from __future__ import annotations

import hashlib
import os

import pandas as pd
import pytest

from busi.config import TrainConfig
from busi.data import add_groups, busbra, duplicate_pairs


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
