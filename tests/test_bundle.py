"""Model files are used only as their record says: the record reads in every version, a file
whose digest differs is refused before a runtime sees it, a damaged or foreign file is named,
and ``busi predict`` records what made its masks."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

import busi
from busi.cli import main
from busi.errors import DataError
from busi.inference import bundle, model_checks, weights
from busi.inference import predictor as inference
from busi.inference.bundle import ModelRecord
from busi.inference.postprocess import PostProcess
from busi.utils.digests import DigestMismatchError, FileDigest, file_digest, file_sha1
from busi.utils.paths import PROJ_ROOT

SIZE = 32
SHIPPED_SIDECARS = sorted((PROJ_ROOT / "weights").glob("*.json"))
#: Sidecars written before records had versions (SHA-1 only, flat config): still read.
VERSION_1_SIDECARS = [path for path in SHIPPED_SIDECARS
                      if "version" not in json.loads(path.read_text())]
CLASSIC = PROJ_ROOT / "weights" / "classic-unet-cosine-cpu"


def gray_model():
    """Probability 1 - gray/255 (0.53 on gray 120): masks known without training."""
    keras = busi._keras.keras()
    inputs = keras.Input((SIZE, SIZE, 3))
    conv = keras.layers.Conv2D(1, 1, name="conv")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.full((1, 1, 3, 1), -1 / 765, np.float32), np.array([1.0], np.float32)])
    return model


def publish_like(folder: Path, name: str = "m", threshold: float = 0.6) -> Path:
    """``<name>.h5`` with its record ``<name>.json``, as ``busi publish`` leaves them."""
    folder.mkdir(parents=True, exist_ok=True)
    path = weights.save_model(gray_model(), folder / f"{name}.h5", include_optimizer=False)
    ModelRecord(model=path.name, files={path.name: FileDigest.of(path)}, image_size=SIZE,
                postprocess=PostProcess(threshold=threshold), chosen_on="val",
                classes=("benign", "malignant", "normal")).write(folder / f"{name}.json")
    return path


def overwrite_kernel(path: Path) -> None:
    """Change the kernel's values in place: the file still opens and loads."""
    with h5py.File(path, "r+") as handle:
        kernels = []
        handle.visititems(lambda name, obj: kernels.append(obj)
                          if isinstance(obj, h5py.Dataset) and "kernel" in name else None)
        kernels[0][...] = np.full(kernels[0].shape, 1 / 765, np.float32)


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "gray.png"), np.full((33, 81), 120, np.uint8))
    return folder


# ---------------------------------------------------------------------------- the record


@pytest.mark.parametrize("sidecar", sorted(set(SHIPPED_SIDECARS) - set(VERSION_1_SIDECARS)),
                         ids=lambda p: p.stem)
def test_a_shipped_version_2_sidecar_names_its_files_and_its_sectioned_config(sidecar):
    from busi.config.train_config import TrainConfig

    values = json.loads(sidecar.read_text())
    record = ModelRecord.read(sidecar)
    assert record.version == bundle.VERSION and record.classes == ("benign", "malignant", "normal")
    assert {"data", "model", "optimisation", "runtime"} <= set(values["config"])
    config = TrainConfig.from_dict({**values["config"], "data": {**values["config"]["data"],
                                                                  "root": None}})
    assert config.image_head and config.image_size == record.image_size
    weights_file = sidecar.with_name(values["model"])
    assert record.covers(values["model"]) == FileDigest.of(weights_file)


@pytest.mark.parametrize("sidecar", VERSION_1_SIDECARS, ids=[p.stem for p in VERSION_1_SIDECARS])
def test_a_version_1_sidecar_reads_and_round_trips_as_version_2(sidecar):
    values = json.loads(sidecar.read_text())
    assert "version" not in values
    record = ModelRecord.read(sidecar)
    assert record.version == 1 and record.model == values["model"]
    assert record.covers(values["model"]) == FileDigest(sha1=values["model_sha1"])
    assert set(record.files) == {values["model"], *values["exports"]}
    assert record.postprocess == PostProcess.from_dict(values)
    assert (record.image_size, record.resize) == (values["image_size"], values["resize"])
    assert record.classes == tuple(values["config"]["classes"])
    written = record.to_dict()
    assert written["version"] == bundle.VERSION
    # what a busi that reads version 1 looks for is still there, with the same values
    assert {k: written[k] for k in values} == values
    again = ModelRecord.from_dict(json.loads(json.dumps(written)))
    assert again.files == record.files and again.postprocess == record.postprocess
    assert again.provenance == record.provenance


@pytest.mark.parametrize(("change", "said"), [
    ({"version": 99}, "record version 99 was written by a newer busi"),
    ({"threshold": 7}, "post-processing: threshold must be in"),
    ({"resize": "crop"}, "'resize' must be one of"),
    ({"model": None}, "'model' must be a non-empty string"),
    ({"version": 2, "files": {"other.h5": {"sha1": "0"}}}, "'files' must map file names"),
])
def test_a_malformed_record_is_named(tmp_path, change, said):
    values = {**json.loads((CLASSIC.with_suffix(".json")).read_text()), **change}
    path = tmp_path / "x.json"
    path.write_text(json.dumps(values))
    with pytest.raises(DataError, match=rf"x\.json: {said}"):
        ModelRecord.read(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"x\.json: not a valid JSON model record"):
        ModelRecord.read(path)


# --------------------------------------------------------------- verified before use


def test_a_changed_h5_is_refused_before_tensorflow_reads_it(tmp_path, images, monkeypatch,
                                                           capsys):
    path = publish_like(tmp_path / "w")
    assert inference.open_model(path).settings.verified_by == path.with_suffix(".json")
    overwrite_kernel(path)
    weights.load_model(path, verify=False)  # the damage is silent: the file still loads
    with pytest.raises(DigestMismatchError, match=r"m\.h5: its SHA-256 differs"):
        busi.load_model(path)  # the Keras loader checks too

    def no_load(*args, **kwargs):
        raise AssertionError("the file reached tf-keras before its digest was checked")

    with monkeypatch.context() as patched:
        patched.setattr(weights, "load_for_inference", no_load)
        with pytest.raises(DigestMismatchError,
                           match=r"w/m\.h5: its SHA-256 differs from the one recorded in .*"
                                 r"w/m\.json.*--skip-digest-check"):
            inference.open_model(path)
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(path), str(images), str(out)]) == 2
    assert "m.h5: its SHA-256 differs" in capsys.readouterr().err and not out.exists()
    # the user's explicit choice: used, with a warning, and with the record's settings
    assert main(["predict", "--skip-digest-check", "--weights", str(path), str(images),
                 str(out)]) == 0
    record = json.loads((out / "predict.json").read_text())
    assert record["model"]["verified_by"] is None and record["settings"]["threshold"] == 0.6


def test_an_export_is_checked_against_the_record_that_lists_it(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    for suffix in (".json", ".int8.tflite"):
        shutil.copy(CLASSIC.with_name(CLASSIC.name + suffix), folder)
    export = folder / f"{CLASSIC.name}.int8.tflite"
    model = inference.open_model(export)
    assert model.settings.verified_by == folder / f"{CLASSIC.name}.json"
    assert model.settings.image_size == 256
    export.write_bytes(export.read_bytes()[: int(export.stat().st_size * 0.99)])
    with pytest.raises(DigestMismatchError, match=r"int8\.tflite: its SHA-1 differs"):
        inference.open_model(export)


def test_resume_refuses_a_last_h5_that_is_not_the_one_state_json_recorded(tmp_path,
                                                                         monkeypatch):
    from busi.config.train_config import TrainConfig
    from busi.runs.folder import RunFolder

    config = TrainConfig(name="r", run_dir=str(tmp_path / "run"), architecture="classic_unet",
                         base_filters=4, depth=2, image_size=SIZE, epochs=3)
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    config.save(run.config)
    weights.save_model(gray_model(), run.last)
    run.write_record(run.state, {"epoch": 1, "sha256": {"last.h5": file_digest(run.last)}})
    overwrite_kernel(run.last)

    def no_load(*args, **kwargs):
        raise AssertionError("the changed last.h5 was loaded to train on")

    monkeypatch.setattr(weights, "load_model", no_load)
    with pytest.raises(DigestMismatchError,
                       match=r"last\.h5: its SHA-256 differs from the one training recorded in "
                             r".*state\.json"):
        busi.train(config)


# ------------------------------------------------------------------ every load error named


@pytest.fixture()
def cut_tflite(tmp_path) -> Path:
    """The shipped int8 file cut to 99% of its bytes, with no record beside it."""
    path = tmp_path / "cut.tflite"
    source = CLASSIC.with_name(CLASSIC.name + ".int8.tflite").read_bytes()
    path.write_bytes(source[: int(len(source) * 0.99)])
    return path


def test_a_damaged_tflite_is_named_and_busi_predict_exits_2(cut_tflite, tmp_path, images,
                                                            capsys):
    with pytest.raises(DataError, match=r"cut\.tflite: damaged or unsupported TFLite file"):
        inference.open_model(cut_tflite)
    cut_tflite.write_bytes(b"\0" * 64)
    with pytest.raises(DataError, match=r"cut\.tflite: not a TFLite model \(no 'TFL3'"):
        inference.open_model(cut_tflite)
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(cut_tflite), str(images), str(out)]) == 2
    err = capsys.readouterr().err
    assert "cut.tflite: not a TFLite model" in err and "Traceback" not in err
    assert not out.exists()


def test_a_crash_of_the_tflite_interpreter_is_reported_not_suffered(cut_tflite, monkeypatch):
    """Whatever the damage, only the child process that reads the file can die."""
    monkeypatch.setattr(model_checks, "_CHILD",
                        "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    shutil.copy(CLASSIC.with_name(CLASSIC.name + ".int8.tflite"), cut_tflite)  # a good header
    with pytest.raises(DataError, match=rf"cut\.tflite: damaged TFLite file: the interpreter "
                                        rf"crashed \({signal.SIGSEGV.name}\)"):
        inference.open_model(cut_tflite)


def test_a_damaged_onnx_is_named(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07garbage that is no protobuf" * 10)
    with pytest.raises(DataError, match=r"model\.onnx: damaged or not an ONNX model"):
        inference.open_model(path)


def _set_h5_attribute(path: Path, key: str, value: str) -> None:
    with h5py.File(path, "r+") as handle:
        handle.attrs[key] = value


def test_an_h5_from_keras_3_or_with_an_unknown_activation_is_named(tmp_path, images, capsys):
    path = weights.save_model(gray_model(), tmp_path / "k3.h5", include_optimizer=False)
    _set_h5_attribute(path, "keras_version", "3.15.1")
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(path), str(images), str(out)]) == 2
    err = capsys.readouterr().err
    assert "k3.h5: saved by Keras 3.15.1; busi reads .h5 files written by tf-keras" in err
    assert "Traceback" not in err and not out.exists()

    path = weights.save_model(gray_model(), tmp_path / "act.h5", include_optimizer=False)
    with h5py.File(path, "r+") as handle:
        config = json.loads(handle.attrs["model_config"])
        config["config"]["layers"][1]["config"]["activation"] = "no_such_activation"
        handle.attrs["model_config"] = json.dumps(config)
    assert main(["predict", "--weights", str(path), str(images), str(out)]) == 2
    err = capsys.readouterr().err
    assert "act.h5: tf-keras cannot rebuild the model stored in it" in err
    assert "no_such_activation" in err and not out.exists()


# ------------------------------------------------------------------------ busi predict


def test_busi_predict_exits_2_when_nothing_was_segmented(tmp_path, capsys):
    path = publish_like(tmp_path / "w")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(path), str(notes), str(out)]) == 2
    assert "notes.txt: not an image file" in capsys.readouterr().err and not out.exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="a.png"):
        assert main(["predict", "--weights", str(path), str(broken), str(out)]) == 2
    assert "no image was segmented" in capsys.readouterr().err
    assert not out.exists()  # the folder made for the outputs is removed when empty


def test_the_output_folder_records_the_model_settings_and_version(tmp_path, images):
    path = publish_like(tmp_path / "w", threshold=0.6)
    out = tmp_path / "out"
    table = busi.predict(path, images, out, tta=True)
    assert table["lesion_pixels"].iloc[0] == 0  # 0.53 < the record's threshold
    record = json.loads((out / "predict.json").read_text())
    assert record["busi_version"] == busi.__version__
    assert record["model"]["path"] == str(path.absolute())
    assert record["model"]["sha256"] == file_digest(path)
    assert record["model"]["sha1"] == file_sha1(path)
    assert record["model"]["verified_by"] == str(path.with_suffix(".json"))
    assert record["settings"]["threshold"] == 0.6 and record["settings"]["tta"] is True
    assert record["segmented"] == 1 and record["skipped"] == 0


# ----------------------------------------------------------------- publish, all or nothing


@pytest.fixture()
def trained_run(tmp_path):
    """A run folder as training leaves it (config, best.h5, last.h5, state.json with their
    SHA-256), with the gray model instead of a trained one."""
    from busi.config.train_config import TrainConfig
    from busi.runs.folder import RunFolder

    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    TrainConfig(name="run", run_dir=str(run.root), architecture="classic_unet", base_filters=4,
                depth=2, image_size=SIZE, augment=False).save(run.config)
    weights.save_model(gray_model(), run.best, include_optimizer=False)
    shutil.copy(run.best, run.last)
    run.write_record(run.state, {"epoch": 1, "sha256": {
        name: file_digest(run.root / name) for name in ("best.h5", "last.h5")}})
    return run


def contents(folder: Path) -> dict[str, bytes | None]:
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(folder.iterdir())}


def test_publish_leaves_the_destination_as_it_was_when_a_folder_is_in_the_way(trained_run,
                                                                              tmp_path):
    from busi.inference.publish import publish

    dest = tmp_path / "dest"
    publish(trained_run.root, dest, "X", export="none")
    (dest / "X.tflite").mkdir()
    before = contents(dest)
    with pytest.raises(DataError, match=r"X\.tflite: a folder stands where publish writes"):
        publish(trained_run.root, dest, "X", export="tflite")
    assert contents(dest) == before  # no new X.h5 beside the old X.json, no staging folder

    (dest / "X.tflite").rmdir()
    written = publish(trained_run.root, dest, "X", export="tflite")
    assert [p.name for p in written] == ["X.h5", "X.json", "X.md", "X.tflite"]
    record = ModelRecord.read(dest / "X.json")
    assert record.version == bundle.VERSION and set(record.files) == {"X.h5", "X.tflite"}
    assert record.covers("X.tflite").sha256 == file_digest(dest / "X.tflite")
    # published again without an export: the old export, which no record covers now, goes
    publish(trained_run.root, dest, "X", export="none")
    assert sorted(contents(dest)) == ["X.h5", "X.json", "X.md"]


def test_a_failed_move_puts_the_old_files_back(trained_run, tmp_path, monkeypatch):
    import os

    from busi.inference.publish import publish

    dest = tmp_path / "dest"
    dest.mkdir()
    for name in ("X.h5", "X.json", "X.md"):
        (dest / name).write_text(f"old {name}")
    before = contents(dest)
    real_replace = os.replace
    failures = []

    def failing(src, dst, *args, **kwargs):
        if Path(dst) == dest / "X.json" and not failures:  # the last move, once
            failures.append(dst)
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        publish(trained_run.root, dest, "X", export="none")
    monkeypatch.undo()
    assert failures and contents(dest) == before  # old files back, no hidden folder left


# ----------------------------------------------- settings checked before a run folder exists


@pytest.mark.parametrize(("change", "said"), [
    ({"image_size": 30}, r"multiples of 4"),
    ({"data": "/nonexistent/busi"}, r"/nonexistent/busi"),
    ({"init_weights": "OTHER"}, r"other\.h5 do not fit"),
    ({"split_file": "/nonexistent/split.csv"}, r"split_file: /nonexistent/split\.csv not found"),
], ids=["image_size", "data", "init_weights", "split_file"])
def test_settings_that_cannot_train_leave_no_run_folder(busi_folder, tmp_path, change, said):
    from busi.config.train_config import TrainConfig

    if change.get("init_weights") == "OTHER":
        other = busi.classic_unet(input_shape=(SIZE, SIZE, 3), base_filters=8, depth=2)
        change = {"init_weights": str(weights.save_model(other, tmp_path / "other.h5"))}
    config = TrainConfig(name="p", data=str(busi_folder), run_dir=str(tmp_path / "run"),
                         architecture="classic_unet", base_filters=4, depth=2,
                         image_size=SIZE, epochs=1, augment=False, evaluate=False)
    with pytest.raises((ValueError, FileNotFoundError), match=said):
        busi.train(config.replace(**change))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recorded", [True, False], ids=["state-written", "state-not-written"])
def test_a_last_h5_not_yet_renamed_is_settled_before_resume_checks_it(tmp_path, recorded):
    """A kill between state.json and renaming last.pending.h5 must leave a run that resumes:
    last.h5 and the SHA-256 state.json holds agree after settling."""
    from busi.runs.folder import RunFolder
    from busi.training.callbacks import settle_pending

    run = RunFolder(tmp_path)
    run.last.write_bytes(b"epoch 3")
    pending = tmp_path / "last.pending.h5"
    pending.write_bytes(b"epoch 4")
    wanted = file_digest(pending) if recorded else file_digest(run.last)
    run.write_record(run.state, {"epoch": 4 if recorded else 3, "sha256": {"last.h5": wanted}})
    settle_pending(run)
    assert not pending.exists()
    assert run.last.read_bytes() == (b"epoch 4" if recorded else b"epoch 3")
    run.verify_checkpoint(run.last)  # resumable: no DigestMismatchError
