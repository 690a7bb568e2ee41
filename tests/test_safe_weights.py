"""Model files are read before they are built: a Lambda layer (code in the file) is refused by
every loader unless the user opts in; damaged or foreign files get errors naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from busi._keras import keras as get_keras
from busi.cli import main
from busi.errors import DataError
from busi.inference import model_file, weights
from busi.models import architectures as models
from busi.models import heads

keras = get_keras()


def evil_model(marker: Path):
    """A segmentation-shaped model whose Lambda layer writes ``marker`` when it is built: what
    an attacker's file would do with os.system."""
    command = f"touch {marker}"

    def payload(x):
        import os

        os.system(command)
        return x

    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Lambda(payload, name="innocent")(inputs)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture()
def evil(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.h5"
    evil_model(marker).save(path, save_format="h5")
    marker.unlink(missing_ok=True)  # saving traced the payload once
    return path, marker


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.full((40, 50), 90, np.uint8))
    return folder


def test_a_lambda_layer_is_refused_by_load_and_by_busi_predict(evil, images, tmp_path, capsys):
    path, marker = evil
    with pytest.raises(model_file.UnsafeModelError,
                       match=r"evil\.h5: refused to load: layer 'innocent' \(Lambda\) can run "
                             r"code.*--unsafe-weights.*safe_mode=False"):
        weights.load_model(path, compile=False)
    assert main(["predict", "--weights", str(path), str(images), str(tmp_path / "out")]) == 2
    assert "layer 'innocent' (Lambda)" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()
    # the file really runs its code when trusted: the refusal above is what kept it from running
    assert main(["predict", "--unsafe-weights", "--weights", str(path), str(images),
                 str(tmp_path / "out")]) == 0
    assert marker.exists()


def test_every_loader_goes_through_the_check(evil, tmp_path):
    from busi.inference import predictor as inference

    path, marker = evil
    for load in (lambda: weights.load_for_inference(path), lambda: inference.load(path),
                 lambda: weights.load_model(path)):
        with pytest.raises(model_file.UnsafeModelError):
            load()
    with pytest.raises(model_file.UnsafeModelError):
        from busi.inference.export import export

        export(path, tmp_path / "x.tflite", backend="tflite")
    assert not marker.exists()


def test_a_lambda_hidden_in_a_nested_model_is_found(tmp_path):
    inner_in = keras.Input((8, 8, 3))
    inner = keras.Model(inner_in, keras.layers.Lambda(lambda x: x * 2, name="hidden")(inner_in),
                        name="block")
    outer_in = keras.Input((8, 8, 3))
    outer = keras.Model(outer_in, keras.layers.Conv2D(1, 1)(inner(outer_in)))
    outer.save(tmp_path / "nested.h5", save_format="h5")
    with pytest.raises(model_file.UnsafeModelError, match=r"'block/hidden' \(Lambda\)"):
        weights.load_model(tmp_path / "nested.h5")


@pytest.mark.parametrize("build", [
    lambda: models.classic_unet(input_shape=(32, 32, 3), base_filters=4, depth=2, dropout=0.1),
    lambda: models.build_model("resnet18", input_shape=(32, 32, 3), encoder_weights=None,
                               decoder_filters=(8, 8, 4, 4, 4)),
    lambda: models.build_model("mobilenetv2", input_shape=(32, 32, 3), encoder_weights=None,
                               decoder_filters=(8, 8, 4, 4, 4)),
    *(lambda pool=pool: heads.add_image_head(
        models.classic_unet(input_shape=(32, 32, 3), base_filters=4, depth=2), pool=pool)
      for pool in heads.POOLS),
], ids=["classic_unet", "unet_resnet18", "unet_mobilenetv2",
        *(f"image_head_{pool}" for pool in heads.POOLS)])
def test_busi_models_pass_the_check(build):
    """The allowlist holds every layer class busi's builders emit."""
    model = build()
    assert {type(layer).__name__ for layer in model.layers} <= model_file.ALLOWED_LAYERS
    import json

    model_file.check_model_config(json.loads(model.to_json()), "model.h5")


def test_a_truncated_file_is_named(tmp_path):
    model = models.classic_unet(input_shape=(32, 32, 3), base_filters=4, depth=2)
    path = weights.save_model(model, tmp_path / "full.h5", include_optimizer=False)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.h5: .*damaged or incomplete"):
        weights.load_model(cut)


def test_an_unrelated_keras_model_is_named_and_leaves_no_output(tmp_path, images, capsys):
    inputs = keras.Input((32, 32, 3))
    classifier = keras.Model(inputs, keras.layers.Dense(10)(
        keras.layers.GlobalAveragePooling2D()(inputs)))
    path = tmp_path / "classifier.h5"
    classifier.save(path, save_format="h5")
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(path), str(images), str(out)]) == 2
    err = capsys.readouterr().err
    assert "classifier.h5: not a busi segmentation model" in err and "(None, 10)" in err
    assert not out.exists()


def test_output_folder_problems_are_found_before_the_model_loads(tmp_path, images, monkeypatch):
    from busi.inference import prediction

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(weights, "load_for_inference", no_model)
    model = tmp_path / "m.h5"
    model.write_bytes(b"never read")
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(DataError, match=r"taken: the output folder is a file"):
        prediction.predict(model, images, a_file)
    with pytest.raises(DataError, match=r"taken: the folder above .*taken/sub is not writable"):
        prediction.predict(model, images, a_file / "sub")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_named_before_inference(tmp_path, images):
    from busi.inference import prediction

    def no_inference(batch):
        raise AssertionError("inference ran before the output folder was checked")

    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(DataError, match=r"out: the output folder is not writable"):
            prediction.predict(no_inference, images, out, image_size=32)
    finally:
        out.chmod(0o700)


def test_a_file_this_process_saved_loads_but_not_in_another_process(tmp_path):
    """An sm encoder with its own Lambda layers: training must evaluate the best.h5 it just
    wrote; the same file opened by a new process (a downloaded run) is refused as usual."""
    import subprocess
    import sys

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1)(
        keras.layers.Lambda(lambda x: x / 2, name="halve")(inputs)))
    path = weights.save_model(model, tmp_path / "own.h5", include_optimizer=False)
    weights.load_model(path, compile=False)
    code = ("import sys, busi.inference.weights as w\ntry:\n    w.load_model(sys.argv[1])\n"
            "except Exception as e:\n    print(type(e).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, timeout=300)
    assert out.stdout.strip() == "UnsafeModelError"
