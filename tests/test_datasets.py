"""Datasets as plug-ins: the registry, BUSI unchanged through the seam, BUS-BRA and a user's
folder indexed and split honestly, and every kind of bad input named by file."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from busi.config.train_config import TrainConfig
from busi.data import add_groups, busbra, datasets, folder, make_split
from busi.errors import DataError


def _tree_digest(root: Path) -> str:
    """Names and bytes of every file under ``root``: inputs must never change."""
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / source.name))


# ---------------------------------------------------------------------------- registry


def test_registry_names_the_three_adapters_and_rejects_unknown_names():
    assert datasets.names()[:3] == ["busi", "busbra", "folder"]
    assert datasets.get("busbra") is datasets.BUSBRA
    with pytest.raises(ValueError, match="unknown dataset 'nope'; known: busi, busbra, folder"):
        datasets.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        datasets.register(datasets.BUSI)


def test_config_datasets_default_to_busi_and_are_checked():
    assert TrainConfig(architecture="classic_unet").datasets == ("busi",)
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        TrainConfig(architecture="classic_unet", datasets=["nope"])
    with pytest.raises(ValueError, match="each once"):
        TrainConfig(architecture="classic_unet", datasets=["busi", "busi"])
    with pytest.raises(ValueError, match="published partition"):
        TrainConfig(architecture="classic_unet", authors_fold=1)
    with pytest.raises(ValueError, match=r"unknown data_paths key\(s\) \['busbra'\]"):
        TrainConfig(architecture="classic_unet", data_paths={"busbra": "x"})
    config = TrainConfig(architecture="classic_unet", data="a", datasets=["busi", "busbra"],
                         data_paths={"busbra": "b"})
    assert (config.data_path("busi"), config.data_path("busbra")) == ("a", "b")
    assert TrainConfig.from_dict(config.to_dict()) == config


# ------------------------------------------------------------------- BUSI through the seam

# The split CSV (sha1) and dataset fingerprint of a default-config run on the synthetic BUSI
# fixture, as computed by the code before datasets became plug-ins (commit 345dbc6); the second
# pair for classes benign + malignant, seed 3, conflicts kept.
BUSI_BEFORE = {
    "default": ("4b1ed686edfe53301a2a36810fe383a7102f49e3", "bf74f705d20aaea3"),
    "variant": ("260eeb8856c0c32199971fe36f71c4226ccfe7aa", "dcdb5aaa3c77ee11"),
}


@pytest.mark.parametrize("variant", ["default", "variant"])
def test_busi_split_and_fingerprint_are_unchanged(busi_folder, variant):
    from busi.data import fingerprint
    from busi.data.parts import dataset_table, make_run_split, split_parts

    config = TrainConfig(data=str(busi_folder), architecture="classic_unet")
    if variant == "variant":
        config = config.replace(classes=["benign", "malignant"], seed=3, drop_conflicts=False)
    table = dataset_table(config)
    split = make_run_split(config, table)
    csv = split[["id", "label", "group", "split"]].to_csv(index=False)
    parts = split_parts(config, table, split)
    assert "dataset" not in split
    assert (hashlib.sha1(csv.encode()).hexdigest(), fingerprint(pd.concat(parts.values()))) \
        == BUSI_BEFORE[variant]


# ------------------------------------------------------------------------------ BUS-BRA


def test_busbra_index_has_patients_metadata_and_labels(busbra_folder):
    before = _tree_digest(busbra_folder)
    table = busbra.index(busbra_folder, strict=True)
    assert len(table) == 28 and set(table["label"]) == {"benign", "malignant"}
    row = table.set_index("id").loc["bus_0003-s"]
    assert (row["patient"], row["label"], row["device"], row["side"]) == (
        "3", "benign", "GE Logiq 7", "left")
    assert row["mask_paths"] == (str(busbra_folder / "Masks" / "mask_0003-s.png"),)
    assert datasets.load("busbra", busbra_folder, strict=True).equals(table)
    assert _tree_digest(busbra_folder) == before


def test_busbra_groups_keep_patients_and_cross_patient_duplicates_together(busbra_folder):
    table = add_groups(busbra.index(busbra_folder, strict=True))
    groups = table.groupby("group")["patient"].agg(frozenset)
    # patients 1 and 3 are joined by the near duplicate bus_0003-l ~ bus_0001-l
    assert frozenset({"1", "3"}) in set(groups)
    assert len(groups) == 11 and table.groupby("patient")["group"].nunique().max() == 1
    for seed in range(5):
        split = make_split(table, seed=seed).merge(table[["id", "patient"]], on="id")
        assert split.groupby("patient")["split"].nunique().max() == 1
        assert split.groupby("group")["split"].nunique().max() == 1


def test_busbra_authors_split_takes_their_test_fold_and_drops_straddling_groups(busbra_folder):
    table = add_groups(busbra.index(busbra_folder, strict=True))
    patient = table.set_index("id")["patient"].astype(int)
    csv = busbra_folder / "5-fold-cv.csv"
    for fold in range(1, 6):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            split = busbra.authors_split(busbra_folder, table, fold)
        test = split.loc[split["split"] == "test", "id"]
        assert set(test) == {i for i in table["id"] if patient[i] % 5 + 1 == fold}
        rest = split[split["split"] != "test"].merge(table[["id", "patient"]], on="id")
        assert rest.groupby("patient")["split"].nunique().max() == 1
        assert split.groupby("group")["split"].nunique().max() == 1
        # patients 1 and 3 share a group: folds 2 and 4 test one of them and leave the other out
        ours = [str(w.message) for w in caught if str(w.message).startswith(f"{csv}: ")]
        assert len(ours) == (fold in (2, 4)), ours
    # fold 2 tests patient 1, whose near duplicate is patient 3's: patient 3 is left out, and
    # the warning names the partition file and every image left out
    with pytest.warns(UserWarning, match=rf"{csv}: 3 image\(s\) outside test fold 2 share a"
                      ) as caught:
        split = busbra.authors_split(busbra_folder, table, 2)
    assert not split["id"].str.startswith("bus_0003").any()
    message = next(str(w.message) for w in caught if str(w.message).startswith(f"{csv}: "))
    assert "bus_0003-l, bus_0003-r, bus_0003-s (grouped with test image(s) bus_0001-l, " \
           "bus_0001-r)" in message
    assert len(busbra.authors_split(busbra_folder, table, 1)) == len(table)
    with pytest.raises(ValueError, match=r"fold must be in 1..5"):
        busbra.authors_split(busbra_folder, table, 6)


def test_busbra_authors_partition_with_an_id_twice_is_named(busbra_folder, tmp_path):
    table = add_groups(busbra.index(busbra_folder, strict=True))
    lines = (busbra_folder / "5-fold-cv.csv").read_text().splitlines()
    csv = tmp_path / "5-fold-cv.csv"
    csv.write_text("\n".join([*lines, lines[1].replace(",2,", ",3,")]) + "\n")
    with pytest.raises(DataError, match=rf"{csv}: IDs listed twice: \['bus_0001-l'\]"):
        busbra.authors_split(tmp_path, table, 1)


def test_busbra_locate_and_download_say_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("BUSBRA_DATA", raising=False)
    with pytest.raises(DataError, match=r"BUS-BRA not found(.|\n)*10.5281/zenodo.7730709"):
        busbra.locate(tmp_path)

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(busbra.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=r"Could not download BUS-BRA(.|\n)*BUSBRA_DATA"):
        busbra.download(tmp_path / "dest")


def test_busbra_locate_ignores_a_half_extracted_hidden_folder(busbra_folder, tmp_path,
                                                               monkeypatch):
    """A killed download leaves ``.extracting-*`` with whatever was extracted so far; it must
    not pass for the dataset (a visible copy beside it is found as usual)."""
    monkeypatch.delenv("BUSBRA_DATA", raising=False)
    dest = tmp_path / "dest"
    shutil.copytree(busbra_folder, dest / ".extracting-abc123")
    with pytest.raises(DataError, match="BUS-BRA not found"):
        busbra.locate(dest)
    shutil.copytree(busbra_folder, dest / "BUS-BRA")
    assert busbra.locate(dest) == (dest / "BUS-BRA").resolve()


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_busbra_download_errors_that_say_what_is_wrong_are_not_rewrapped(tmp_path, monkeypatch):
    """A DataError (a ValueError) of the download itself, a damaged archive say, reaches the
    user whole, not shortened inside "Could not download"."""
    record = {"files": [{"key": "BUS-BRA.zip", "links": {"self": "https://z/BUS-BRA.zip"},
                         "size": 3, "checksum": "md5:" + "0" * 32}]}

    def fake_urlopen(url, timeout):
        return _Response(json.dumps(record).encode() if "/api/records/" in url else b"abc")

    monkeypatch.setattr(busbra.urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(DataError) as error:
        busbra.download(tmp_path / "dest")
    assert str(error.value).startswith("BUS-BRA.zip: MD5 900150983cd24fb0d6963f7d28e17f72 "
                                       "differs from Zenodo's 000")
    assert "Could not download" not in str(error.value)
    assert not list((tmp_path / "dest").iterdir())  # the damaged download is not kept
    record["files"] = [{"key": "README.md"}]
    with pytest.raises(DataError, match=r"lists no \.zip file(.|\n)*BUSBRA_DATA") as error:
        busbra.download(tmp_path / "dest")
    assert "Could not download" not in str(error.value)


def _strict_message(index, root: Path) -> str:
    before = _tree_digest(root)
    with pytest.raises(DataError) as error:
        index(root, strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = index(root)
    assert any(str(error.value) in str(w.message) for w in caught)
    assert _tree_digest(root) == before  # inputs never modified
    return str(error.value), table


def test_busbra_bad_input_is_named_by_file(busbra_folder, tmp_path):
    root = _copy(busbra_folder, tmp_path)
    (root / "Masks" / "mask_0004-l.png").unlink()  # missing mask
    shutil.copy(root / "Images" / "bus_0005-l.png", root / "Images" / "bus_0099-l.png")
    shutil.copy(root / "Masks" / "mask_0005-l.png", root / "Masks" / "mask_0099-l.png")
    (root / "Images" / "bus_0006-r.png").unlink()  # CSV row without files
    (root / "Masks" / "mask_0006-r.png").unlink()
    wrong = np.zeros((10, 12), np.uint8)
    wrong[2:5, 2:5] = 255
    cv2.imwrite(str(root / "Masks" / "mask_0007-l.png"), wrong)  # mask of the wrong size
    message, table = _strict_message(busbra.index, root)
    csv = root / "bus_data.csv"
    assert f"{root / 'Images' / 'bus_0004-l.png'}: image has no mask (Masks/mask_0004-l.png)" \
        in message
    assert f"{root / 'Images' / 'bus_0099-l.png'}: image not listed in {csv}" in message
    assert f"{csv}: row bus_0006-r has no image (Images/bus_0006-r.png) and no mask" in message
    assert f"{root / 'Masks' / 'mask_0007-l.png'}: mask size 12x10 differs from image" in message
    assert message.startswith("4 problem(s)")
    assert not set(table["id"]) & {"bus_0004-l", "bus_0099-l", "bus_0006-r", "bus_0007-l"}
    assert len(table) == 28 - 3


def test_busbra_bad_metadata_is_named(busbra_folder, tmp_path):
    root = _copy(busbra_folder, tmp_path)
    csv = root / "bus_data.csv"
    csv.write_text(csv.read_text().replace("bus_0004-r,4,fibroadenoma,malignant",
                                           "bus_0004-r,4,fibroadenoma,unsure"))
    message, _ = _strict_message(busbra.index, root)
    assert f"{csv}: row bus_0004-r has Pathology 'unsure'; expected benign or malignant" \
        in message
    (root / "Images" / "bus_0008-l.png").unlink()  # mask left without image
    message, _ = _strict_message(busbra.index, root)
    assert f"{root / 'Masks' / 'mask_0008-l.png'}: mask has no image (Images/bus_0008-l.png)" \
        in message
    csv.write_text("ID,Case\nbus_0001-l,1\n")
    with pytest.raises(DataError, match=rf"{csv}: lacks columns \['Pathology'"):
        busbra.index(root)


# ------------------------------------------------------------------------ a user's folder


def _write_folder(root: Path, n: int = 6, empty: tuple[int, ...] = (5,)) -> Path:
    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image = (rng.random((40, 48)) * 255).astype(np.uint8)
        mask = np.zeros_like(image)
        if i not in empty:
            mask[10:20, 12:24 + i] = 255
        cv2.imwrite(str(root / "images" / f"case{i}.png"), image)
        cv2.imwrite(str(root / "masks" / (f"case{i}_mask.png" if i % 2 else f"case{i}.png")),
                    mask)
    return root


def test_folder_without_labels_reads_lesion_or_normal_off_the_masks(tmp_path):
    root = _write_folder(tmp_path / "mine")
    before = _tree_digest(root)
    table = folder.index(root, strict=True)
    assert dict(zip(table["id"], table["label"], strict=True)) == {
        **{f"case{i}": "lesion" for i in range(5)}, "case5": "normal"}
    assert _tree_digest(root) == before
    split = make_split(add_groups(table), val_fraction=0.2, test_fraction=0.5)
    assert len(split) == 6  # unlabelled lesions take part with the default classes


def test_folder_labels_and_patients_from_csv(tmp_path):
    root = _write_folder(tmp_path / "mine")
    (root / "labels.csv").write_text(
        "id,label,patient\ncase0,benign,p1\ncase1,malignant,p1\ncase2,benign,p2\n"
        "case3,benign,p3\ncase4,malignant,p3\ncase5,normal,p4\n")
    table = add_groups(folder.index(root, strict=True))
    assert list(table.sort_values("id")["label"]) == [
        "benign", "malignant", "benign", "benign", "malignant", "normal"]
    assert table.groupby("patient")["group"].nunique().max() == 1
    assert table["group"].nunique() == 4


def test_folder_bad_input_is_named_by_file(tmp_path, monkeypatch):
    root = _write_folder(tmp_path / "mine")
    (root / "masks" / "case2.png").rename(root / "masks" / "case2b.png")  # unmatched names
    (root / "labels.csv").write_text("id,label\ncase0,benign\ncase1,maybe\ncase3,normal\n"
                                     "case4,benign\ncase5,normal\ncase9,benign\ncase2b,benign\n")
    message, table = _strict_message(folder.index, root)
    assert f"{root / 'images' / 'case2.png'}: image has no mask (masks/case2.png)" in message
    assert f"{root / 'masks' / 'case2b.png'}: mask has no image (images/case2b.png)" in message
    assert f"{root / 'labels.csv'}: case1 has label 'maybe'" in message
    assert f"{root / 'labels.csv'}: case9 has no image" in message
    assert f"{root / 'masks' / 'case3_mask.png'}: a normal image's mask marks" in message
    assert set(table["id"]) == {"case0", "case4", "case5"}
    with pytest.raises(DataError, match="no images/ or masks/ folder inside"):
        folder.index(tmp_path)
    monkeypatch.delenv("BUSI_FOLDER_DATA", raising=False)
    with pytest.raises(DataError, match="the folder dataset needs a path"):
        folder.locate(None)


def test_folder_several_files_for_one_image_are_named(tmp_path):
    """``a.png`` + ``a.jpg``, or masks ``a.png`` + ``a_mask.png``: which one is meant is a guess,
    so neither is used, and the files are named (silently keeping one was the old behaviour)."""
    root = _write_folder(tmp_path / "mine")
    shutil.copy(root / "images" / "case0.png", root / "images" / "case0.jpg")
    shutil.copy(root / "masks" / "case1_mask.png", root / "masks" / "case1.png")
    message, table = _strict_message(folder.index, root)
    images, masks = root / "images", root / "masks"
    assert f"{images / 'case0.jpg'}, {images / 'case0.png'}: several files for image case0" \
        in message
    assert f"{masks / 'case1.png'}, {masks / 'case1_mask.png'}: several files for image case1" \
        in message
    assert message.startswith("2 problem(s)")
    assert set(table["id"]) == {"case2", "case3", "case4", "case5"}


def test_folder_labels_csv_from_excel_with_a_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte order mark, and people type labels as they like;
    neither may turn into "needs columns id and label" or an unknown label."""
    root = _write_folder(tmp_path / "mine")
    rows = ["id,label", "case0,Benign", "case1, MALIGNANT", "case2,benign ", "case3,Lesion",
            "case4,malignant", "case5,Normal"]
    (root / "labels.csv").write_bytes("\r\n".join(rows).encode("utf-8-sig") + b"\r\n")
    table = folder.index(root, strict=True).sort_values("id")
    assert list(table["label"]) == ["benign", "malignant", "benign", "lesion", "malignant",
                                    "normal"]
    (root / "labels.csv").write_bytes("id;label\ncase0;bénin\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{root / 'labels.csv'}: not UTF-8 text"):
        folder.index(root)
    (root / "labels.csv").write_text("id;label\ncase0;benign\n")
    with pytest.raises(DataError, match=r"needs columns id and label .*found \['id;label'\]"):
        folder.index(root)


# ------------------------------------------------------------------------------- joint


def test_joint_table_and_split_keep_each_dataset_apart(busi_folder, busbra_folder):
    from busi.data.parts import dataset_table, make_run_split

    alone = TrainConfig(data=str(busi_folder), architecture="classic_unet")
    joint = alone.replace(datasets=["busi", "busbra"], data_paths={"busbra": str(busbra_folder)})
    table = dataset_table(joint)
    assert table.groupby("dataset").size().to_dict() == {"busi": 19, "busbra": 28}
    split = make_run_split(joint, table)
    busi_alone = make_run_split(alone, dataset_table(alone))
    busi_part = split[split["dataset"] == "busi"].drop(columns="dataset").reset_index(drop=True)
    pd.testing.assert_frame_equal(busi_part, busi_alone)  # same BUSI test part as a BUSI run
    assert not set(split.loc[split["dataset"] == "busi", "group"]) & set(
        split.loc[split["dataset"] == "busbra", "group"])
    for name in ("busi", "busbra"):
        assert set(split.loc[split["dataset"] == name, "split"]) == {"train", "val", "test"}


def test_combine_refuses_an_id_in_two_datasets(busbra_folder):
    table = busbra.index(busbra_folder, strict=True)
    with pytest.raises(ValueError, match="'bus_0001-l' is in datasets 'a' and 'b'"):
        datasets.combine({"a": table, "b": table})


def test_joint_run_refuses_an_image_that_two_datasets_share(busi_folder, tmp_path):
    """A user's folder made partly of BUSI images: each dataset is grouped and split on its own,
    so the copy could train in one and be tested in the other. The run is refused, naming both
    images (dataset:id) and what to do."""
    from busi.data.parts import dataset_table

    busi_table = datasets.load("busi", busi_folder)
    original = busi_table.set_index("id").loc["benign (4)"]
    root = _write_folder(tmp_path / "mine")
    shutil.copy(original["image_path"], root / "images" / "exact.png")
    near = cv2.imread(original["image_path"], cv2.IMREAD_GRAYSCALE)
    near[:2, :2] = 255  # a few pixels changed: a near duplicate, not an exact one
    cv2.imwrite(str(root / "images" / "near.png"), near)
    for name in ("exact", "near"):
        shutil.copy(original["mask_paths"][0], root / "masks" / f"{name}.png")
    config = TrainConfig(data=str(busi_folder), architecture="classic_unet",
                         datasets=["busi", "folder"], data_paths={"folder": str(root)})
    with pytest.raises(DataError) as error:
        dataset_table(config)
    message = str(error.value)
    assert message.startswith("2 pair(s) of images are exact or near duplicates across the "
                              "datasets of this run")
    assert "busi:benign (4) ~ folder:exact (identical pixels)" in message
    assert "busi:benign (4) ~ folder:near (perceptual hash" in message
    assert "Remove the copies from one of the datasets" in message
    pairs = datasets.cross_duplicate_pairs(busi_table, folder.index(root))
    assert sorted(pairs["id_b"]) == ["exact", "near"] and pairs["exact"].sum() == 1
    # without the copies, the same two datasets combine
    for name in ("exact", "near"):
        (root / "images" / f"{name}.png").unlink()
        (root / "masks" / f"{name}.png").unlink()
    assert set(dataset_table(config)["dataset"]) == {"busi", "folder"}
