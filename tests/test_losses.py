"""busi.models.losses: names, values, and that compiled models reload from .h5 with no user help."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from busi._keras import keras as get_keras
from busi.inference import weights
from busi.models import architectures as models
from busi.models import losses

keras = get_keras()


def tensors(truth, pred):
    return (keras.backend.constant(np.asarray(truth, "float32")),
            keras.backend.constant(np.asarray(pred, "float32")))


def test_names_of_losses_and_metrics():
    assert losses.get_loss().__name__ == "dice_loss_plus_binary_focal_loss"
    assert losses.get_loss("dice_focal").__name__ == "dice_loss_plus_binary_focal_loss"
    assert losses.get_loss("bce").__name__ == "binary_crossentropy"
    assert losses.get_loss("bce_dice").__name__ == "binary_crossentropy_plus_dice_loss"
    assert [metric.__name__ for metric in losses.get_metrics()] == ["iou_score", "f1-score"]
    assert tuple(m.__name__ for m in losses.get_metrics()) == losses.METRIC_NAMES


def test_unknown_loss():
    with pytest.raises(ValueError, match="bce_dice"):
        losses.get_loss("dice")


def test_loss_values():
    truth = np.zeros((1, 4, 4, 1))
    truth[0, :2] = 1
    perfect, wrong = tensors(truth, truth), tensors(truth, 1 - truth)
    for name in losses.LOSS_NAMES:
        loss = losses.get_loss(name)
        good, bad = float(loss(*perfect)), float(loss(*wrong))
        assert good < 0.05 and bad > 0.9, name
    # bce alone is the mean binary cross-entropy
    half = tensors(truth, np.full_like(truth, 0.5))
    assert float(losses.get_loss("bce")(*half)) == pytest.approx(np.log(2), rel=1e-3)
    # dice_focal = dice + focal. For 0.5 everywhere, half the pixels lesion: dice loss 1/2;
    # focal (1-p)^2 log 2 = log(2) / 4, weighted alpha=0.25 on lesion and 0.75 elsewhere.
    dice_focal = float(losses.get_loss("dice_focal")(*half))
    assert dice_focal == pytest.approx(0.5 + (0.25 + 0.75) / 2 * np.log(2) / 4, rel=1e-3)


def test_metrics_are_thresholded():
    truth = np.zeros((1, 4, 4, 1))
    truth[0, :2] = 1
    iou, f1 = losses.get_metrics()
    soft = tensors(truth, truth * 0.6 + 0.2)  # 0.8 on the lesion, 0.2 elsewhere
    assert float(iou(*soft)) == pytest.approx(1.0, abs=1e-4)
    assert float(f1(*soft)) == pytest.approx(1.0, abs=1e-4)
    half = np.zeros_like(truth)
    half[0, 0] = 1  # one of the two lesion rows found: IoU 1/2, F1 2/3
    assert float(iou(*tensors(truth, half))) == pytest.approx(0.5, abs=1e-4)
    assert float(f1(*tensors(truth, half))) == pytest.approx(2 / 3, abs=1e-4)


def test_custom_objects_cover_every_saved_name():
    names = set(losses.CUSTOM_OBJECTS)
    assert {"dice_loss_plus_binary_focal_loss", "binary_crossentropy",
            "binary_crossentropy_plus_dice_loss", "iou_score", "f1-score"} <= names
    assert losses.CUSTOM_OBJECTS["iou_score"].threshold == losses.THRESHOLD


def tiny_compiled(loss_name: str):
    keras.backend.clear_session()
    model = models.classic_unet(input_shape=(16, 16, 3), base_filters=2, depth=1)
    model.compile("adam", loss=losses.get_loss(loss_name), metrics=losses.get_metrics())
    return model


def saved_names(path) -> list[str]:
    """The loss and metric names Keras wrote into the .h5 (what CUSTOM_OBJECTS must cover)."""
    with h5py.File(path) as handle:
        config = json.loads(handle.attrs["training_config"])
    return [config["loss"]] + [metric["config"]["fn"] for metric in config["metrics"][0]]


@pytest.mark.parametrize("loss_name", losses.LOSS_NAMES)
def test_every_loss_reloads_compiled(tmp_path, loss_name):
    path = weights.save_model(tiny_compiled(loss_name), tmp_path / "model.h5")
    name = losses.get_loss(loss_name).__name__
    assert saved_names(path) == [name, "iou_score", "f1-score"]
    loaded = weights.load_model(path)  # no custom_objects from the caller
    assert loaded.loss is losses.CUSTOM_OBJECTS[name]


def test_trained_model_reloads_with_same_loss_metrics_and_optimizer(tmp_path):
    model = tiny_compiled("dice_focal")
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    y = (x[..., :1] > 128).astype("float32")
    model.fit(x, y, epochs=1, verbose=0)
    loaded = weights.load_model(weights.save_model(model, tmp_path / "model.h5"))
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    after = loaded.evaluate(x, y, verbose=0, return_dict=True)
    assert set(after) == {"loss", "iou_score", "f1-score"}
    for key, value in before.items():
        assert after[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # the optimizer state (step count, Adam moments) came back, so training can resume
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 1
    saved_moments = [np.asarray(v) for v in model.optimizer.variables()]
    loaded_moments = [np.asarray(v) for v in loaded.optimizer.variables()]
    assert len(loaded_moments) == len(saved_moments) > 1
    for saved_value, loaded_value in zip(saved_moments, loaded_moments, strict=True):
        np.testing.assert_array_equal(saved_value, loaded_value)
