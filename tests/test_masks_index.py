"""Index, pairing and mask merging on the synthetic BUSI-like folder."""

from __future__ import annotations

import shutil
import warnings

import cv2
import numpy as np
import pytest

import busi
from busi.data.masks import merge_masks, read_image, read_mask
from busi.errors import DataError


def test_index_pairs_every_image_with_all_its_masks(busi_table):
    assert len(busi_table) == 21
    assert busi_table["mask_count"].sum() == 24
    row = busi_table.set_index("id").loc["benign (3)"]
    assert [p.rsplit("/", 1)[1] for p in row["mask_paths"]] == [
        "benign (3)_mask.png", "benign (3)_mask_1.png", "benign (3)_mask_2.png",
    ]
    assert not busi_table["id"].str.contains("_mask").any()  # _mask_1 files are never images
    assert busi_table["id"].is_unique


def test_index_sorts_naturally_and_records_sizes(busi_table):
    benign = list(busi_table.loc[busi_table["label"] == "benign", "id"])
    assert benign[:3] == ["benign (1)", "benign (2)", "benign (3)"]
    assert benign[-1] == "benign (10)"
    for row in busi_table.itertuples():
        assert read_image(row.image_path).shape == (row.height, row.width)


@pytest.mark.parametrize("storage", ["bilevel", "gray", "rgb", "rgba", "rgba_transparent"])
def test_read_mask_any_storage(tmp_path, storage):
    mask = np.zeros((9, 11), np.uint8)
    mask[2:5, 3:8] = 255
    path = tmp_path / "m.png"
    if storage == "bilevel":
        cv2.imwrite(str(path), mask, [cv2.IMWRITE_PNG_BILEVEL, 1])
    elif storage == "gray":
        cv2.imwrite(str(path), mask)
    elif storage == "rgb":
        cv2.imwrite(str(path), np.dstack([np.zeros_like(mask), mask, np.zeros_like(mask)]))
    else:
        alpha = np.full_like(mask, 255)
        if storage == "rgba_transparent":
            alpha[2:5, 3:5] = 0  # transparent pixels are not lesion
        cv2.imwrite(str(path), np.dstack([mask, mask, mask, alpha]))
    result = read_mask(path)
    expected = (mask > 0).astype(np.uint8)
    if storage == "rgba_transparent":
        expected[2:5, 3:5] = 0
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, expected)


def test_merge_is_logical_or_without_overflow(tmp_path):
    a = np.zeros((6, 6), np.uint8)
    b = np.zeros((6, 6), np.uint8)
    a[1:4, 1:4] = 255
    b[2:5, 2:5] = 255  # overlaps a: uint8 addition would wrap 255 + 255 to 254
    cv2.imwrite(str(tmp_path / "a.png"), a)
    cv2.imwrite(str(tmp_path / "b.png"), b)
    merged = merge_masks([tmp_path / "a.png", tmp_path / "b.png"])
    np.testing.assert_array_equal(merged, ((a > 0) | (b > 0)).astype(np.uint8))
    assert set(np.unique(merged)) == {0, 1}


def test_merged_masks_of_the_fixture(busi_table):
    row = busi_table.set_index("id").loc["benign (2)"]
    image, mask = busi.data.load_example(row)
    parts = [read_mask(p) for p in row["mask_paths"]]
    assert image.shape == mask.shape
    assert mask.sum() == (parts[0] | parts[1]).sum() > parts[0].sum()
    normal = busi_table.set_index("id").loc["normal (1)"]
    assert busi.data.load_example(normal)[1].sum() == 0


def test_colour_image_is_read_as_gray(busi_table):
    path = busi_table.set_index("id").loc["malignant (2)", "image_path"]
    assert cv2.imread(path, cv2.IMREAD_UNCHANGED).ndim == 3
    assert read_image(path).ndim == 2


def _copy(busi_folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(busi_folder, target)
    return target


def test_problems_are_named_warned_and_left_out(busi_folder, tmp_path):
    root = _copy(busi_folder, tmp_path)
    (root / "benign" / "benign (4)_mask.png").unlink()  # image without mask
    (root / "benign" / "benign (5).png").unlink()  # mask without image
    cv2.imwrite(str(root / "benign" / "benign (6)_mask.png"), np.zeros((5, 5), np.uint8))
    empty = np.zeros_like(cv2.imread(str(root / "benign" / "benign (7).png"), 0))
    cv2.imwrite(str(root / "benign" / "benign (7)_mask.png"), empty)
    marked = np.zeros_like(cv2.imread(str(root / "normal" / "normal (3).png"), 0))
    marked[:3, :3] = 255
    cv2.imwrite(str(root / "normal" / "normal (3)_mask.png"), marked)
    with pytest.warns(UserWarning) as caught:
        table = busi.data.index(root)
    message = str(caught[0].message)
    assert "benign (4).png: image has no mask" in message
    assert "benign (5)_mask.png: mask has no image" in message
    assert "benign (6)_mask.png: mask size 5x5 differs" in message
    assert "benign (7)_mask.png: the mask of a benign image is empty" in message
    assert "normal (3)_mask.png: a normal image's mask marks 9 lesion pixels" in message
    assert {"benign (4)", "benign (5)", "benign (6)", "benign (7)", "normal (3)"}.isdisjoint(
        table["id"])
    assert len(table) == 16
    with pytest.raises(DataError, match="5 problem"):
        busi.data.index(root, strict=True)


def test_unreadable_image_is_named(busi_folder, tmp_path):
    root = _copy(busi_folder, tmp_path)
    (root / "normal" / "normal (2).png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"normal \(2\)\.png: not a readable image"):
        busi.data.index(root, strict=True)


def test_index_does_not_touch_the_input(busi_folder):
    before = {p: p.stat().st_mtime_ns for p in busi_folder.rglob("*")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        busi.data.index(busi_folder)
    assert {p: p.stat().st_mtime_ns for p in busi_folder.rglob("*")} == before


def test_not_a_busi_folder(tmp_path):
    with pytest.raises(DataError, match="no class folder"):
        busi.data.index(tmp_path)


def test_fingerprint_changes_with_content(busi_table):
    first = busi.data.fingerprint(busi_table)
    assert first == busi.data.fingerprint(busi_table.iloc[::-1])
    assert first != busi.data.fingerprint(busi_table.iloc[1:])


def test_an_empty_class_folder_is_warned_about(busi_folder, tmp_path):
    root = _copy(busi_folder, tmp_path)
    for path in (root / "normal").iterdir():
        path.unlink()
    with pytest.warns(UserWarning, match=r"normal: no normal images \(the folder is empty\).*no "
                                         r"false-positive rate on normal images"):
        table = busi.data.index(root)
    assert set(table["label"]) == {"benign", "malignant"}


def test_a_dataset_without_images_is_a_named_error(tmp_path):
    for label in ("benign", "malignant", "normal"):
        (tmp_path / label).mkdir()
    (tmp_path / "benign" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"no usable images in benign/, malignant/, normal/"):
        busi.data.index(tmp_path)
