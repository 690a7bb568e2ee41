"""Prediction on new images: outputs at original size, inputs untouched, bad files reported."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import busi
from busi.inference.postprocess import PostProcess
from busi.inference.prediction import list_inputs, predict
from busi.inference.predictor import predict_images
from busi.utils.digests import file_sha1

SIZE = 32


def dark_is_lesion(batch: np.ndarray) -> np.ndarray:
    """Fake model: probability = darkness, so the outputs are known without training."""
    return 1.0 - batch[..., :1] / 255.0


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture()
def inputs(tmp_path: Path, busi_table: pd.DataFrame) -> Path:
    """A folder of mixed inputs: gray PNGs, a colour JPEG, a BMP, a mask file, one broken file."""
    folder = tmp_path / "in"
    folder.mkdir()
    rows = busi_table.head(3).to_dict("records")
    for row in rows:
        shutil.copy(row["image_path"], folder / Path(row["image_path"]).name)
    shutil.copy(rows[0]["mask_paths"][0], folder / Path(rows[0]["mask_paths"][0]).name)
    colour = np.zeros((45, 70, 3), np.uint8)
    colour[..., 2] = 200
    colour[10:30, 20:40] = 30
    cv2.imwrite(str(folder / "colour.jpg"), colour)
    cv2.imwrite(str(folder / "gray.bmp"), np.full((33, 81), 120, np.uint8))
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "notes.txt").write_text("ignored: not an image")
    return folder


def test_predict_writes_masks_and_overlays_at_original_size(tmp_path: Path, inputs: Path) -> None:
    before = digest(inputs)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="broken.png"):
        table = predict(dark_is_lesion, inputs, out, image_size=SIZE)
    assert digest(inputs) == before  # inputs untouched, nothing added to the input folder

    images = list_inputs(inputs)
    assert "notes.txt" not in [p.name for p in images]
    assert list(table["input"]) == [str(p) for p in images]
    failed = table[table["error"].notna()]
    assert list(failed["input"]) == [str(inputs / "broken.png")]
    assert "broken.png" in failed["error"].iloc[0] or "readable" in failed["error"].iloc[0]

    for file in images:
        if file.name == "broken.png":
            assert not (out / "broken_pred.png").exists()
            continue
        original = busi.data.read_image(file)
        pred = cv2.imread(str(out / f"{file.stem}_pred.png"), cv2.IMREAD_UNCHANGED)
        overlay = cv2.imread(str(out / f"{file.stem}_overlay.png"), cv2.IMREAD_UNCHANGED)
        assert pred.shape == original.shape and pred.dtype == np.uint8
        assert set(np.unique(pred)) <= {0, 255}
        assert overlay.shape == original.shape + (3,)
        row = table[table["input"] == str(file)].iloc[0]
        assert row["lesion_pixels"] == (pred > 0).sum()
        assert (row["height"], row["width"]) == original.shape
    # the same prediction path as evaluation: same probabilities, same threshold rule
    first = images[0]
    prob = predict_images(dark_is_lesion, [busi.data.read_image(first)], image_size=SIZE)[0]
    expected = PostProcess(threshold=0.5).apply(prob) * 255
    assert np.array_equal(cv2.imread(str(out / f"{first.stem}_pred.png"), 0), expected)
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_predict_refuses_to_write_into_the_input_folder(inputs: Path) -> None:
    before = digest(inputs)
    with pytest.raises(ValueError, match="input folder"):
        predict(dark_is_lesion, inputs, inputs, image_size=SIZE)
    with pytest.raises(ValueError, match="input folder"):
        predict(dark_is_lesion, inputs, inputs / ".." / inputs.name, image_size=SIZE)
    assert digest(inputs) == before


def test_predict_refuses_colliding_outputs(tmp_path: Path, inputs: Path) -> None:
    cv2.imwrite(str(inputs / "colour.png"), np.zeros((20, 20), np.uint8))  # colour.jpg too
    with pytest.raises(ValueError, match="colour"):
        predict(dark_is_lesion, inputs, tmp_path / "out", image_size=SIZE)
    assert not (tmp_path / "out").exists()


def test_predict_a_single_file_beside_itself(tmp_path: Path, inputs: Path) -> None:
    single = tmp_path / "single"
    single.mkdir()
    image = shutil.copy(inputs / "gray.bmp", single / "gray.bmp")
    table = predict(dark_is_lesion, image, single, image_size=SIZE, threshold=0.4)
    assert table["error"].isna().all()
    assert sorted(p.name for p in single.iterdir()) == [
        "gray.bmp", "gray_overlay.png", "gray_pred.png", "predict.json"]
    # 120/255 gray -> probability 0.53: lesion at 0.4, not at 0.6
    assert cv2.imread(str(single / "gray_pred.png"), 0).min() == 255
    predict(dark_is_lesion, image, single, image_size=SIZE, threshold=0.6)
    assert cv2.imread(str(single / "gray_pred.png"), 0).max() == 0


def test_predict_needs_a_size_for_a_plain_callable(tmp_path: Path, inputs: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        predict(dark_is_lesion, inputs / "gray.bmp", tmp_path / "out")


def _gray_model():
    """Keras model: probability 1 - gray/255, like dark_is_lesion, saved to .h5."""
    keras = busi._keras.keras()
    inputs = keras.Input((SIZE, SIZE, 3))
    conv = keras.layers.Conv2D(1, 1)
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.full((1, 1, 3, 1), -1 / 765, np.float32), np.array([1.0], np.float32)])
    return model


def test_predict_uses_the_threshold_chosen_for_the_weights(tmp_path: Path, inputs: Path) -> None:
    run = tmp_path / "run"
    model_path = run / "best.h5"
    busi.save_model(_gray_model(), model_path)
    busi.TrainConfig(image_size=SIZE).save(run / "config.json")
    image = inputs / "gray.bmp"  # probability 0.53 everywhere

    table = predict(model_path, image, tmp_path / "a")  # size from the model, threshold 0.5
    assert table["lesion_pixels"].iloc[0] == 33 * 81

    chosen = {"threshold": 0.6, "tta": False, "min_component_fraction": 0.0,
              "keep_largest": False, "resize": "letterbox", "image_size": SIZE,
              "model": "best.h5", "model_sha1": file_sha1(model_path)}
    (run / "evaluation").mkdir()
    (run / "evaluation" / "postprocess.json").write_text(json.dumps(chosen))
    assert predict(model_path, image, tmp_path / "b")["lesion_pixels"].iloc[0] == 0
    # an explicit threshold wins over the saved one
    assert predict(model_path, image, tmp_path / "c", threshold=0.5)["lesion_pixels"].iloc[0] > 0
    # a choice recorded for other weights is ignored
    chosen["model_sha1"] = "0" * 40
    (run / "evaluation" / "postprocess.json").write_text(json.dumps(chosen))
    assert predict(model_path, image, tmp_path / "d")["lesion_pixels"].iloc[0] == 33 * 81


def test_busi_masks_next_to_their_images_are_not_predicted(tmp_path: Path) -> None:
    folder = tmp_path / "benign"
    folder.mkdir()
    picture = np.full((20, 30), 90, np.uint8)
    for name in ("benign (1).png", "benign (1)_mask.png", "benign (1)_mask_1.png",
                 "lonely_mask.png"):  # no image "lonely": a user's image with such a name
        cv2.imwrite(str(folder / name), picture)
    names = [p.name for p in list_inputs(folder)]
    assert names == ["benign (1).png", "lonely_mask.png"]
    assert len(list_inputs(folder, include_masks=True)) == 4
    table = predict(dark_is_lesion, folder, tmp_path / "out", image_size=SIZE)
    assert [Path(p).name for p in table["input"]] == names
