"""The portable cache (busi.data.cache): what it holds, training from it without the datasets,
and the caches it refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_train import tiny as train_tiny

import busi
from busi.cli import main
from busi.config.train_config import TrainConfig
from busi.data.cache import FORMAT, open_cache, write_cache
from busi.data.index import fingerprint
from busi.data.parts import dataset_table, make_run_split
from busi.data.pipeline import load_arrays
from busi.errors import DataError


def tiny(busi_folder, tmp_path, **changes) -> TrainConfig:
    """test_train's tiny run, one epoch long."""
    return train_tiny(busi_folder, tmp_path, **{"epochs": 1, **changes})


def _expected(config: TrainConfig):
    """The split, its rows and the train + val arrays, as a run on the raw data makes them."""
    table = dataset_table(config)
    split = make_run_split(config, table)
    rows = table.set_index("id", drop=False).loc[list(split["id"])].reset_index(drop=True)
    pixels = rows[split["split"].isin(["train", "val"]).to_numpy()].reset_index(drop=True)
    return split, rows, pixels, load_arrays(pixels, size=config.image_size, mode=config.resize)


@pytest.fixture(scope="module")
def lossless(busi_folder, tmp_path_factory):
    """A lossless cache of the synthetic folder and its config (read only)."""
    folder = tmp_path_factory.mktemp("cache")
    config = tiny(busi_folder, folder)
    return write_cache(config, folder / "busi-32.npz", quality=None), config


def test_lossless_cache_holds_exactly_what_training_reads(lossless):
    cache, config = lossless
    split, rows, pixels, (images, masks, _) = _expected(config)
    got_images, got_masks = cache.arrays(pixels)
    assert got_images.dtype == got_masks.dtype == np.uint8
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_masks, masks)
    assert cache.split.to_csv(index=False) == split.to_csv(index=False)
    assert list(cache.table["id"]) == list(rows["id"])
    assert list(cache.table["label"]) == list(rows["label"])
    assert cache.meta["fingerprint"] == fingerprint(rows)
    assert cache.meta["image_error"]["max_abs"] == 0 and cache.lossless
    assert cache.meta["config"]["image_size"] == 32 and cache.meta["format"] == FORMAT
    test = cache.table[cache.split["split"].to_numpy() == "test"]
    with pytest.raises(DataError, match="no pixels for .* test part"):
        cache.arrays(test)  # the test images are evaluated on the raw data, not cached


def test_jpeg_cache_is_within_its_stated_error(busi_folder, tmp_path):
    """JPEG images: masks exact, padding exactly zero, mean absolute error at most 2 gray
    levels (about 1 on BUSI/BUS-BRA at quality 94), and the error the file states is the real
    one."""
    config = tiny(busi_folder, tmp_path)
    cache = write_cache(config, tmp_path / "busi.npz")
    _, _, pixels, (images, masks, placements) = _expected(config)
    got_images, got_masks = cache.arrays(pixels)
    np.testing.assert_array_equal(got_masks, masks)
    padding = np.ones(images.shape, bool)
    for i, p in enumerate(placements):
        padding[i, p.top:p.top + p.inner_h, p.left:p.left + p.inner_w] = False
    assert padding.any() and not got_images[padding].any()
    difference = np.abs(got_images.astype(int) - images.astype(int))
    assert 0 < difference.mean() <= 2
    stated = cache.meta["image_error"]
    assert stated["max_abs"] == difference.max()
    assert stated["mean_abs"] == pytest.approx(difference.mean(), abs=1e-4)
    assert cache.meta["images"] == {"codec": "jpeg", "quality": 94} and not cache.lossless


@pytest.mark.slow
def test_training_from_the_cache_needs_no_data_and_matches_a_run_on_it(
        busi_folder, tmp_path, monkeypatch, caplog):
    data = shutil.copytree(busi_folder, tmp_path / "data" / busi_folder.name)
    on_data = busi.train(tiny(data, tmp_path, run_dir=str(tmp_path / "on-data")))
    config = tiny(data, tmp_path, run_dir=str(tmp_path / "from-cache"), evaluate=True)
    path = write_cache(config, tmp_path / "busi.npz").path

    data.rename(tmp_path / "away")  # no dataset anywhere the config or the environment says
    monkeypatch.delenv("BUSI_DATA", raising=False)
    with caplog.at_level("WARNING", logger="busi.training.trainer"):
        from_cache = busi.train(config, cache=path)
    assert (from_cache / "split.csv").read_bytes() == (on_data / "split.csv").read_bytes()
    env = json.loads((from_cache / "env.json").read_text())
    assert env["dataset_fingerprint"] == json.loads(
        (on_data / "env.json").read_text())["dataset_fingerprint"]
    assert env["data_cache"]["sha256"] == str(open_cache(path)._members["sha256"])
    assert "evaluation skipped" in caplog.text and not (from_cache / "evaluation").exists()
    busi.train(config.replace(epochs=2), cache=path)  # resumed from the cache too
    assert len((from_cache / "history.csv").read_text().splitlines()) == 1 + 2

    (tmp_path / "away").rename(data)  # the raw data again: the run is evaluated on it
    summary = busi.evaluate(from_cache)
    assert "test" in summary["splits"]


def test_damaged_cache_is_refused_by_name(lossless, tmp_path):
    cache, config = lossless
    good = cache.path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=f"{truncated}.*truncated or damaged"):
        open_cache(truncated, config)
    for where in (0.25, 0.5, 0.75):
        flipped = bytearray(good)
        flipped[int(where * len(good))] ^= 0x01
        path = tmp_path / f"flipped-{where}.npz"
        path.write_bytes(bytes(flipped))
        with pytest.raises(DataError, match=f"{path}.*damaged"):
            open_cache(path, config)
    # a member changed and the file rewritten whole (zip checksums right): the digest tells
    with np.load(cache.path, allow_pickle=False) as npz:
        members = {name: npz[name] for name in npz.files}
    members["masks"] = members["masks"].copy()
    members["masks"][0, 0] ^= 0x80
    tampered = tmp_path / "tampered.npz"
    np.savez(tampered, **members)
    with pytest.raises(DataError, match=f"{tampered}.*damaged.*SHA-256"):
        open_cache(tampered, config)


def test_cache_of_another_format_is_refused(lossless, tmp_path):
    cache, config = lossless
    with np.load(cache.path, allow_pickle=False) as npz:
        members = {name: npz[name] for name in npz.files}
    meta = json.loads(str(members["meta"]))
    members["meta"] = np.array(json.dumps({**meta, "format": FORMAT + 1}))
    other = tmp_path / "other.npz"
    np.savez(other, **members)
    with pytest.raises(DataError, match=f"{other}: cache format {FORMAT + 1}.*reads format "
                                        f"{FORMAT}"):
        open_cache(other, config)
    not_cache = tmp_path / "array.npy"
    np.save(not_cache, np.zeros(3))
    with pytest.raises(DataError, match=f"{not_cache}: not a busi cache"):
        open_cache(not_cache)


def test_cache_of_other_settings_is_refused_before_a_run_folder_exists(lossless, tmp_path):
    cache, config = lossless
    with pytest.raises(DataError, match=f"{cache.path}.*image_size 32 \\(cache\\) vs 48"):
        open_cache(cache.path, config.replace(image_size=48))
    other = config.replace(seed=2, classes=["benign", "malignant"],
                           run_dir=str(tmp_path / "run"))
    with pytest.raises(DataError, match="classes .*seed 1 \\(cache\\) vs 2 \\(config\\)"):
        busi.train(other, cache=cache.path)
    assert not (tmp_path / "run").exists()
    # what training does with the parts may differ: limit, train_classes, the model
    open_cache(cache.path, config.replace(limit=4, train_classes=["benign"], depth=3))
    # the split's seed is what counts: another seed on the cache's split is the cache's data
    open_cache(cache.path, config.replace(seed=2, split_seed=config.seed))
    with pytest.raises(DataError, match="seed 1 \\(cache\\) vs 5 \\(config\\)"):
        open_cache(cache.path, config.replace(split_seed=5))


def test_joint_cache_holds_both_datasets_with_the_dataset_column(busi_folder, busbra_folder,
                                                                 tmp_path):
    config = tiny(None, tmp_path, data=None, datasets=["busi", "busbra"],
                  data_paths={"busi": str(busi_folder), "busbra": str(busbra_folder)})
    cache = write_cache(config, tmp_path / "joint.npz", quality=None)
    split, rows, pixels, (images, masks, _) = _expected(config)
    assert "dataset" in split and "dataset" in cache.split
    assert cache.split.to_csv(index=False) == split.to_csv(index=False)
    assert list(cache.table["dataset"]) == list(rows["dataset"])
    assert set(cache.table["dataset"]) == {"busi", "busbra"}
    got_images, got_masks = cache.arrays(pixels)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_masks, masks)
    assert cache.meta["fingerprint"] == fingerprint(rows)


def test_cache_command_and_train_option(busi_folder, tmp_path, capsys):
    out = tmp_path / "busi.npz"
    assert main(["cache", str(out), "--data", str(busi_folder), "--image-size", "32",
                 "--set", "seed=1", "--lossless"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "lossless PNG" in printed
    assert open_cache(out).meta["config"]["seed"] == 1
    # busi train reads the cache first: one made for other settings stops it at once
    assert main(["train", "--cache", str(out), "--image-size", "48", "--set", "seed=1",
                 "--run-dir", str(tmp_path / "run")]) == 2
    assert "image_size 32 (cache) vs 48 (config)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
