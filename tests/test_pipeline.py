"""The tf.data pipeline: cached arrays, batch contents, order, determinism, real images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from busi.data.augment import AugmentConfig
from busi.data.geometry import to_model, to_original
from busi.data.masks import load_example
from busi.data.pipeline import load_arrays, make_dataset
from busi.errors import DataError

SIZE = 32


@pytest.fixture(scope="module")
def arrays(busi_table: pd.DataFrame):
    return load_arrays(busi_table, size=SIZE)


def collect(dataset) -> tuple[np.ndarray, np.ndarray, list[int]]:
    images, masks, sizes = [], [], []
    for image, mask in dataset:
        images.append(image.numpy())
        masks.append(mask.numpy())
        sizes.append(len(image))
    return np.concatenate(images), np.concatenate(masks), sizes


def test_load_arrays_shapes_and_row_order(busi_table: pd.DataFrame, arrays) -> None:
    images, masks, placements = arrays
    n = len(busi_table)
    assert images.shape == (n, SIZE, SIZE, 1) and images.dtype == np.uint8
    assert masks.shape == (n, SIZE, SIZE, 1) and masks.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 1}
    assert len(placements) == n
    for i, row in enumerate(busi_table.to_dict("records")):
        image, mask = load_example(row)
        expected_image, expected_mask, placement = to_model(image, mask, size=SIZE)
        assert placements[i] == placement
        assert (placement.orig_h, placement.orig_w) == (row["height"], row["width"])
        assert np.array_equal(images[i, ..., 0], expected_image)
        assert np.array_equal(masks[i, ..., 0], expected_mask)


def test_load_arrays_placements_bring_masks_back(busi_table: pd.DataFrame) -> None:
    rows = busi_table[busi_table["label"] != "normal"].head(4)
    _, masks, placements = load_arrays(rows, size=64, mode="stretch")
    for mask, placement, row in zip(masks, placements, rows.to_dict("records"), strict=True):
        original = load_example(row)[1]
        back = to_original(mask[..., 0], placement)
        assert back.shape == original.shape
        assert (back & original).sum() * 2 / (back.sum() + original.sum()) > 0.85


def test_evaluation_yields_every_input_exactly_in_order(busi_table: pd.DataFrame, arrays) -> None:
    images, masks, sizes = collect(
        make_dataset(busi_table, size=SIZE, batch_size=8, cache_arrays=arrays)
    )
    n = len(busi_table)
    assert sizes == [8] * (n // 8) + ([n % 8] if n % 8 else [])  # the partial batch is kept
    assert images.dtype == np.float32 and images.shape == (n, SIZE, SIZE, 3)
    assert masks.dtype == np.float32 and masks.shape == (n, SIZE, SIZE, 1)
    expected = np.repeat(arrays[0], 3, axis=-1).astype(np.float32)
    assert np.array_equal(images, expected)
    assert np.array_equal(masks, arrays[1].astype(np.float32))


def test_without_cache_the_table_is_decoded(busi_table: pd.DataFrame, arrays) -> None:
    rows = busi_table.head(3)
    images, masks, _ = collect(make_dataset(rows, size=SIZE, batch_size=2))
    assert np.array_equal(images[..., :1], arrays[0][:3].astype(np.float32))
    assert np.array_equal(masks, arrays[1][:3].astype(np.float32))


def test_training_batches_have_the_model_input_format(busi_table: pd.DataFrame, arrays) -> None:
    dataset = make_dataset(busi_table, size=SIZE, batch_size=8, training=True, cache_arrays=arrays)
    images, masks, sizes = collect(dataset)
    assert sum(sizes) == len(busi_table)
    assert images.shape[1:] == (SIZE, SIZE, 3) and masks.shape[1:] == (SIZE, SIZE, 1)
    assert np.array_equal(images[..., 0], images[..., 1])
    assert np.array_equal(images[..., 0], images[..., 2])
    assert images.min() >= 0 and images.max() <= 255 and images.max() > 100
    assert set(np.unique(masks)) == {0.0, 1.0}
    assert not np.array_equal(images[..., :1], arrays[0].astype(np.float32))  # augmented


def test_training_is_deterministic_under_a_seed(busi_table: pd.DataFrame, arrays) -> None:
    def epochs(seed: int) -> list[np.ndarray]:
        dataset = make_dataset(
            busi_table, size=SIZE, batch_size=8, training=True, seed=seed, cache_arrays=arrays
        )
        return [collect(dataset)[0] for _ in range(2)]

    first, again, other = epochs(5), epochs(5), epochs(6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], first[1])  # a new order and new draws every epoch
    assert not np.array_equal(first[0], other[0])


def test_shuffling_permutes_without_losing_examples(busi_table: pd.DataFrame, arrays) -> None:
    dataset = make_dataset(busi_table, size=SIZE, shuffle=True, seed=1, cache_arrays=arrays)
    images = collect(dataset)[0][..., 0]
    expected = arrays[0][..., 0].astype(np.float32)
    assert not np.array_equal(images, expected)
    key = lambda a: sorted(x.tobytes() for x in a)  # noqa: E731
    assert key(images) == key(expected)


def test_the_cache_is_used_and_checked(busi_table: pd.DataFrame, arrays) -> None:
    blank = (np.zeros_like(arrays[0]), arrays[1])
    images = collect(make_dataset(busi_table, size=SIZE, cache_arrays=blank))[0]
    assert not images.any()
    with pytest.raises(ValueError, match="rows"):
        make_dataset(busi_table.head(3), size=SIZE, cache_arrays=arrays)
    with pytest.raises(ValueError, match="size"):
        make_dataset(busi_table, size=SIZE * 2, cache_arrays=arrays)


def test_bad_arguments_raise(busi_table: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="training=False"):
        make_dataset(busi_table, augment_config=AugmentConfig())
    with pytest.raises(DataError, match="no rows"):
        make_dataset(busi_table.head(0))
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset(busi_table, batch_size=0)
    with pytest.raises(DataError, match="mask_paths"):
        load_arrays(busi_table.drop(columns=["mask_paths"]))


def test_unreadable_files_are_named(busi_table: pd.DataFrame, tmp_path) -> None:
    rows = busi_table.head(2).copy()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows.loc[rows.index[1], "image_path"] = str(broken)
    with pytest.raises(DataError, match="broken.png"):
        load_arrays(rows, size=SIZE)


@pytest.mark.busi_data
def test_real_images_make_a_valid_batch(real_table: pd.DataFrame) -> None:
    rows = real_table.groupby("label").head(2).reset_index(drop=True)  # 2 of each class
    images, masks, placements = load_arrays(rows, size=256)
    dataset = make_dataset(rows, size=256, batch_size=len(rows), cache_arrays=(images, masks))
    image, mask = (t.numpy() for t in next(iter(dataset)))
    assert image.shape == (6, 256, 256, 3) and mask.shape == (6, 256, 256, 1)
    assert 0 <= image.min() and image.max() <= 255 and image.std() > 10
    assert set(np.unique(mask)) == {0.0, 1.0}
    lesion = (rows["label"] != "normal").to_numpy()
    assert np.all(mask[lesion].sum(axis=(1, 2, 3)) > 0)
    assert np.all(mask[~lesion].sum(axis=(1, 2, 3)) == 0)
    for i, row in enumerate(rows.to_dict("records")):
        original = (row["height"], row["width"])
        assert (placements[i].orig_h, placements[i].orig_w) == original
        assert to_original(mask[i], placements[i]).shape == (*original, 1)
