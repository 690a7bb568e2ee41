"""Published weights keep their settings (the sidecar JSON, found by predict via SHA-1), and a
run's report is built from its files."""

from __future__ import annotations

import json

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest

import busi
from busi.config.train_config import TrainConfig
from busi.inference.bundle import postprocess_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated_run(busi_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    config = TrainConfig(
        name="pub", data=str(busi_folder), run_dir=str(root / "run"),
        architecture="classic_unet", base_filters=4, depth=2, image_size=32, batch_size=4,
        epochs=1, augment=False, evaluate=True, resize="stretch",
    )
    return busi.train(config)


def test_sidecar_carries_the_chosen_settings(evaluated_run, tmp_path):
    weights = busi.publish_weights(evaluated_run, tmp_path / "weights", "model")
    assert weights == tmp_path / "weights" / "model.h5"
    assert weights.read_bytes() == (evaluated_run / "best.h5").read_bytes()
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    chosen = json.loads((evaluated_run / "evaluation" / "postprocess.json").read_text())
    assert sidecar["threshold"] == chosen["threshold"] and sidecar["chosen_on"] == "val"
    assert sidecar["resize"] == "stretch" and sidecar["image_size"] == 32
    assert sidecar["metrics"]["test"]["lesion"]["n"] > 0
    assert postprocess_for(weights)["threshold"] == chosen["threshold"]
    card = weights.with_suffix(".md").read_text()
    assert "not for clinical use" in card and sidecar["model_sha1"] in card
    assert f"| lesion | {sidecar['metrics']['test']['lesion']['n']} |" in card
    assert "augmentation off" in card


@pytest.mark.parametrize(("config", "said"), [
    ({"augment": True}, "on (busi's defaults)"),
    ({"augment": True, "augmentation": {"max_rotation_deg": 20, "scale_range": [0.7, 1.4]}},
     "on (defaults but max_rotation_deg 20, scale_range [0.7, 1.4])"),
    ({"augment": False, "augmentation": {"max_rotation_deg": 20}}, "off"),
])
def test_model_card_names_the_augmentation_strengths(config, said):
    from busi.inference.publish import _augmentation

    assert _augmentation(config) == said


def test_weights_their_sidecar_was_not_made_for_are_refused(evaluated_run, tmp_path):
    from busi.utils.digests import DigestMismatchError

    weights = busi.publish_weights(evaluated_run, tmp_path / "w")
    sidecar = weights.with_suffix(".json")
    values = json.loads(sidecar.read_text())
    values["files"][weights.name]["sha256"] = "0" * 64
    sidecar.write_text(json.dumps(values))
    with pytest.raises(DigestMismatchError, match=r"its SHA-256 differs from the one recorded"):
        postprocess_for(weights)


def test_predict_uses_the_sidecar(evaluated_run, busi_table, tmp_path):
    weights = busi.publish_weights(evaluated_run, tmp_path / "weights", "model")
    values = json.loads(weights.with_suffix(".json").read_text())
    values["threshold"] = 1.0  # nothing is above 1: every mask must come out empty
    weights.with_suffix(".json").write_text(json.dumps(values))
    images = tmp_path / "images"
    images.mkdir()
    for path in busi_table["image_path"][:2]:
        cv2.imwrite(str(images / path.rsplit("/", 1)[1]), cv2.imread(path))
    table = busi.predict(weights, images, tmp_path / "out")
    for mask_path in table["pred"]:
        assert cv2.imread(mask_path, cv2.IMREAD_GRAYSCALE).max() == 0
    explicit = busi.predict(weights, images, tmp_path / "out2", threshold=0.0)
    assert any(np.any(cv2.imread(p, cv2.IMREAD_GRAYSCALE)) for p in explicit["pred"])


def test_publish_needs_trained_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="best.h5"):
        busi.publish_weights(tmp_path, tmp_path / "weights")


def test_report_has_figures_and_a_table_from_the_summary(evaluated_run, tmp_path):
    from busi.evaluation.report import write_report

    out = write_report(evaluated_run, tmp_path / "report", n_overlays=4, n_worst=2)
    for name in ("curves.png", "overlays_test.png", "worst_test.png", "metrics.md"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((evaluated_run / "evaluation" / "summary.json").read_text())
    lesion = summary["splits"]["test"]["lesion"]
    table = (out / "metrics.md").read_text()
    assert f"| lesion | {lesion['n']} | {lesion['dice_mean']:.3f} |" in table


def test_exported_model_keeps_the_sidecar_settings(evaluated_run, busi_table, tmp_path):
    weights = busi.publish_weights(evaluated_run, tmp_path / "weights", "model")
    exported = busi.publish_export(weights, backend="tflite", quantize=None)
    assert exported.name == "model.tflite"
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    assert "model.tflite" in sidecar["exports"]
    assert postprocess_for(exported)["threshold"] == sidecar["threshold"]
    images = tmp_path / "images"
    images.mkdir()
    for path in busi_table["image_path"][:2]:
        cv2.imwrite(str(images / path.rsplit("/", 1)[1]), cv2.imread(path))
    keras_masks = busi.predict(weights, images, tmp_path / "keras")["pred"]
    lite_masks = busi.predict(exported, images, tmp_path / "lite")["pred"]
    for a, b in zip(keras_masks, lite_masks, strict=True):
        ka, kb = cv2.imread(a, 0) > 0, cv2.imread(b, 0) > 0
        assert (ka != kb).mean() < 0.01  # float32 TFLite: the same masks but for rounding


def test_results_table_reads_each_run_folder(evaluated_run, tmp_path):
    from busi.cli import main
    from busi.evaluation.report import _parameter_count, results_table

    summary = json.loads((evaluated_run / "evaluation" / "summary.json").read_text())
    lesion = summary["splits"]["test"]["lesion"]
    model = busi.load_model(evaluated_run / "best.h5", compile=False)
    assert _parameter_count(evaluated_run / "best.h5") == model.count_params()
    table = results_table([evaluated_run])
    row = table.splitlines()[2]
    assert row.startswith(f"| `{evaluated_run.name}` | classic U-Net, 4 filters, depth 2")
    assert "| 1 (kept 1), " in row  # one epoch trained, its weights kept
    cells = [cell.strip() for cell in row.split("|")]
    low, high = map(float, cells[cells.index(f"{lesion['dice_mean']:.3f} / "
                                             f"{lesion['dice_median']:.3f}") + 1].split("-"))
    assert low - 0.005 <= lesion["dice_mean"] <= high + 0.005  # the bootstrap CI of the mean
    assert f"| {lesion['dice_mean']:.3f} / {lesion['dice_median']:.3f} |" in row
    assert f"| {lesion['missed']} of {lesion['n']} |" in row
    env = json.loads((evaluated_run / "env.json").read_text())
    # no image-level head: no AUC; the command, commit and hardware of the run's env.json
    assert cells[-3] == "-"
    assert cells[-2].startswith(f"`{env['command']}` at ") and cells[-2].endswith("-core CPU")
    out = tmp_path / "results.md"
    assert main(["compare", str(evaluated_run), "--out", str(out)]) == 0
    assert out.read_text() == table
    with pytest.raises(FileNotFoundError, match="not evaluated"):
        results_table([tmp_path])
    with pytest.raises(ValueError, match="no 'train' split"):
        results_table([evaluated_run], split="train")


def test_demo_images_of_published_weights_are_the_runs_test_images(evaluated_run, busi_folder,
                                                                   tmp_path):
    from busi.notebook import demo_inputs

    weights = busi.publish_weights(evaluated_run, tmp_path / "weights", "model")
    from_run = demo_inputs(evaluated_run, tmp_path / "a", n=3)
    # A fresh clone has the published weights but not the run folder: the sidecar's config
    # makes the same split again.
    from_weights = demo_inputs(weights, tmp_path / "b", n=3, data=busi_folder)
    names = sorted(p.name for p in from_run.iterdir())
    assert len(names) == 3 and names == sorted(p.name for p in from_weights.iterdir())
    test = busi.data.select(busi.data.index(busi_folder),
                            busi.data.load_split(evaluated_run / "split.csv"), "test")
    assert len(set(test["label"])) > 1  # so the demo can show more than one class ...
    labels = {name.split(" (")[0] for name in names}
    assert len(labels) > 1, names  # ... and does (the first test rows are all benign)
    with pytest.raises(FileNotFoundError, match="INPUTS"):
        demo_inputs(tmp_path / "nothing.h5", tmp_path / "c")


def test_missing_weights_fall_back_to_the_shipped_model(tmp_path, capsys):
    from busi.notebook import weights_or_shipped
    from busi.utils.paths import SHIPPED_MODEL

    assert SHIPPED_MODEL.is_file(), "the shipped model is committed with the project"
    assert weights_or_shipped(tmp_path / "none.h5") == SHIPPED_MODEL
    assert "using the shipped" in capsys.readouterr().out
    capsys.readouterr()
    own = tmp_path / "own.h5"
    own.write_bytes(b"weights of a run")
    assert weights_or_shipped(own) == own  # existing weights are used as they are
    assert capsys.readouterr().out == ""


def test_other_weights_of_a_run_are_evaluated_reported_and_published(evaluated_run, tmp_path):
    from busi.cli import main
    from busi.evaluation.report import results_table

    last = evaluated_run / "last.h5"  # saved with its optimizer
    summary = busi.evaluate(evaluated_run, model_path=last)
    assert (evaluated_run / "evaluation" / "last" / "summary.json").is_file()
    row = results_table([last]).splitlines()[2]
    lesion = summary["splits"]["test"]["lesion"]
    assert row.startswith(f"| `{evaluated_run.name}/last.h5` |")
    assert f"| {lesion['dice_mean']:.3f} / {lesion['dice_median']:.3f} |" in row
    assert main(["report", str(evaluated_run), "--weights", str(last),
                 "--out", str(tmp_path / "report")]) == 0
    assert "(last.h5)" in (tmp_path / "report" / "metrics.md").read_text()

    weights = busi.publish_weights(evaluated_run, tmp_path / "w", "from-last", model_path=last)
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    assert sidecar["run_weights"].endswith("/last.h5")
    assert sidecar["metrics"]["test"]["lesion"]["dice_mean"] == lesion["dice_mean"]
    with h5py.File(weights, "r") as handle:
        assert "optimizer_weights" not in handle  # an inference copy
    assert postprocess_for(weights)["threshold"] == summary["postprocess"]["threshold"]


def _images(busi_table, folder, n=2):
    folder.mkdir()
    for path in busi_table["image_path"][:n]:
        cv2.imwrite(str(folder / path.rsplit("/", 1)[1]), cv2.imread(path))
    return folder


def test_an_int8_export_applies_the_threshold_of_its_sidecar(evaluated_run, busi_table, tmp_path):
    """``X.int8.tflite`` takes its post-processing from ``X.json`` (its ``exports`` entry): with
    a sidecar threshold of 1.0 no pixel is lesion, with 0.0 some are; the default (0.5) cannot
    give both."""
    from busi.inference.publish import publish

    written = publish(evaluated_run, tmp_path / "w", "model", export="tflite:dynamic")
    exported = tmp_path / "w" / "model.int8.tflite"
    assert [p.name for p in written] == ["model.h5", "model.json", "model.md", exported.name]
    images = _images(busi_table, tmp_path / "images")
    sidecar = exported.with_name("model.json")
    values = json.loads(sidecar.read_text())
    pixels = {}
    for threshold in (1.0, 0.0):
        sidecar.write_text(json.dumps({**values, "threshold": threshold}))
        table = busi.predict(exported, images, tmp_path / f"out{threshold}")
        pixels[threshold] = int(table["lesion_pixels"].sum())
    assert pixels[1.0] == 0 and pixels[0.0] > 0


def test_an_int8_export_is_calibrated_on_the_runs_training_images(evaluated_run, tmp_path,
                                                                  monkeypatch):
    """``tflite:int8`` measures its ranges on training images of the run, resized as the model
    input (the run's size and resize mode), never on the validation or test images that check
    it; the file is int8 and listed in the sidecar."""
    from busi.data.masks import read_image
    from busi.data.run_parts import run_parts
    from busi.inference import export
    from busi.inference import predictor as inference
    from busi.inference.publish import publish
    from busi.runs.folder import RunFolder

    seen = {}
    real = export.export

    def spy(*args, calibration=None, **kwargs):
        seen["calibration"] = calibration
        return real(*args, calibration=calibration, **kwargs)

    monkeypatch.setattr(export, "export", spy)
    written = publish(evaluated_run, tmp_path / "w", "model", export="tflite:int8")
    assert [p.name for p in written] == ["model.h5", "model.json", "model.md", "model.int8.tflite"]
    assert inference.load(written[3]).precision == "int8"
    assert "model.int8.tflite" in json.loads(written[1].read_text())["exports"]

    parts = run_parts(RunFolder(evaluated_run))

    def model_inputs(rows):
        batch = inference.model_batch([read_image(p) for p in rows["image_path"]], 32,
                                      "stretch")[0]
        return {image.tobytes() for image in batch}

    calibration = seen["calibration"]
    assert calibration.shape == (len(parts["train"]), 32, 32, 3)  # fewer than 64: all of them
    assert {image.tobytes() for image in calibration} == model_inputs(parts["train"])
    assert not model_inputs(pd.concat([parts["val"], parts["test"]])) & model_inputs(
        parts["train"])  # (the check above would not tell them apart otherwise)


def test_publish_exports_dynamic_int8_by_default_for_other_models(evaluated_run, tmp_path):
    """``--export auto`` (the default): a classic U-Net gets dynamic-range int8, which needs no
    calibration images."""
    from busi.cli import main
    from busi.inference import predictor as inference

    assert main(["publish", str(evaluated_run), "--dest", str(tmp_path), "--name", "m"]) == 0
    assert inference.load(tmp_path / "m.int8.tflite").precision == "dynamic-int8"


def test_an_int8_export_needs_the_runs_data(run_copy, tmp_path):
    from busi.errors import DataError
    from busi.inference.publish import publish

    config = json.loads((run_copy / "config.json").read_text())
    config["data"]["root"] = str(tmp_path / "gone")
    (run_copy / "config.json").write_text(json.dumps(config))
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="calibrated on the training images.*tflite:dynamic"):
        publish(run_copy, dest, "model", export="tflite:int8")
    assert not dest.exists()  # nothing written, not even the folder
    publish(run_copy, dest, "model", export="tflite:dynamic")  # needs no data


def test_training_records_each_checkpoints_sha256(evaluated_run):
    from busi.utils.digests import file_digest

    state = json.loads((evaluated_run / "state.json").read_text())
    for name in ("best.h5", "last.h5"):
        assert state["sha256"][name] == file_digest(evaluated_run / name)


@pytest.fixture()
def run_copy(evaluated_run, tmp_path):
    import shutil

    return shutil.copytree(evaluated_run, tmp_path / "run")


def test_a_truncated_checkpoint_is_not_published(run_copy, tmp_path, capsys):
    from busi.cli import main

    best = run_copy / "best.h5"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    dest = tmp_path / "dest"
    assert main(["publish", str(run_copy), "--dest", str(dest), "--export", "none"]) == 2
    assert "best.h5: its SHA-256 differs from the one training recorded" in capsys.readouterr().err
    assert not dest.exists()  # nothing written, not even the folder
    # a run that recorded no hash (made by an older busi): the file must still load
    state = json.loads((run_copy / "state.json").read_text())
    del state["sha256"]
    (run_copy / "state.json").write_text(json.dumps(state))
    assert main(["publish", str(run_copy), "--dest", str(dest), "--export", "none"]) == 2
    assert "best.h5: cannot read" in capsys.readouterr().err
    assert not dest.exists()  # nothing written, not even the folder


def test_a_failed_export_publishes_nothing(run_copy, tmp_path, monkeypatch):
    from busi.inference import export
    from busi.inference.publish import publish

    def broken(*args, **kwargs):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(export, "export", broken)
    dest = tmp_path / "dest"
    (dest).mkdir()
    (dest / "other.txt").write_text("kept")
    with pytest.raises(RuntimeError, match="converter crashed"):
        publish(run_copy, dest, "model", export="tflite:dynamic")
    assert sorted(p.name for p in dest.iterdir()) == ["other.txt"]  # no staging folder left


def test_trained_on_names_the_classes_the_training_part_held(tmp_path):
    """A run asked for all three classes but given a dataset without normal images (BUS-BRA)
    was trained on lesion images; the results table must not claim normal ones."""
    from busi.evaluation.report import trained_on
    from busi.runs.folder import RunFolder

    run, config = RunFolder(tmp_path), TrainConfig(name="x")
    rows = {"label": ["benign", "malignant", "normal"], "split": ["train", "train", "test"]}
    pd.DataFrame(rows).to_csv(run.split, index=False)
    assert trained_on(run, config) == "lesion images"
    rows["split"][2] = "train"
    pd.DataFrame(rows).to_csv(run.split, index=False)
    assert trained_on(run, config) == "benign, malignant, normal"


def test_card_carries_the_results_on_other_datasets(evaluated_run, busbra_folder, tmp_path):
    """A card travels without its run folder, so a model's results on another dataset (here
    external: never trained on) go into the sidecar and the card with it."""
    import shutil

    run = shutil.copytree(evaluated_run, tmp_path / "run")
    busi.evaluate(run, split="all", dataset="busbra", data=busbra_folder)
    weights = busi.publish_weights(run, tmp_path / "weights", "model")
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    other = sidecar["metrics_other_datasets"]["busbra"]
    assert other["part"] == "all" and other["trained_on_it"] is False
    card = weights.with_suffix(".md").read_text()
    assert "### busbra (all of it; never trained on" in card
    assert f"| lesion | {other['splits']['all']['lesion']['n']} |" in card
    assert f"Trained on the {sidecar['trained_on']} images of the training part." in card


def test_kept_epoch_of_a_run_that_keeps_its_last_weights(tmp_path):
    from busi.config.train_config import TrainConfig
    from busi.evaluation.report import _kept_epoch
    from busi.runs.folder import RunFolder

    run = RunFolder(tmp_path)
    history = pd.DataFrame({"epoch": [1, 2, 3], "val_iou_score": [0.2, 0.6, 0.4]})
    assert _kept_epoch(run, TrainConfig(), history, run.best) == 2  # the monitor's best
    assert _kept_epoch(run, TrainConfig(keep="last"), history, run.best) == 3
