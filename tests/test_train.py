"""Training end to end on the synthetic folder with tiny models: run folder, loss, resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import h5py
import pandas as pd
import pytest

import busi
from busi.config.train_config import TrainConfig
from busi.data import parts, pipeline
from busi.data.run_parts import run_parts
from busi.inference.publish import publish
from busi.inference.weights import load_for_inference
from busi.runs.folder import RunFolder
from busi.training import callbacks
from busi.training import trainer as training

pytestmark = pytest.mark.slow


def tiny(busi_folder, tmp_path, **changes) -> TrainConfig:
    values = dict(
        name="tiny", data=str(busi_folder), run_dir=str(tmp_path / "run"),
        architecture="classic_unet", base_filters=4, depth=2, image_size=32, batch_size=4,
        epochs=2, learning_rate=1e-2, augment=False, evaluate=False, seed=1,
    )
    values.update(changes)
    if values["architecture"] != "classic_unet":  # its settings would be refused on another
        for name in {"base_filters", "depth"} - set(changes):
            del values[name]
    return TrainConfig(**values)


def _iterations(path) -> int:
    with h5py.File(path, "r") as handle:
        group = handle["optimizer_weights"]
        names = []
        group.visit(names.append)
        name = next(n for n in names if n.endswith("iteration:0"))
        return int(group[name][()])


def test_run_folder_holds_everything(busi_folder, tmp_path):
    run = busi.train(tiny(busi_folder, tmp_path, evaluate=True))
    for name in ("config.json", "split.csv", "env.json", "history.csv", "best.h5", "last.h5",
                 "state.json", "evaluation/summary.json", "evaluation/per_image_test.csv"):
        assert (run / name).is_file(), name
    assert TrainConfig.load(run / "config.json").epochs == 2
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert {"loss", "iou_score", "f1-score", "val_loss", "val_iou_score", "lr"} <= set(history)
    env = json.loads((run / "env.json").read_text())
    assert env["dataset_fingerprint"] and env["tensorflow"]
    split = busi.data.load_split(run / "split.csv")
    assert len(split) == 19  # the cross-class duplicate pair is left out (drop_conflicts)
    assert not list(run.glob(".*.h5*")), "temporary files left behind"


def test_loss_falls(busi_folder, tmp_path):
    run = busi.train(tiny(busi_folder, tmp_path, epochs=8))
    loss = pd.read_csv(run / "history.csv")["loss"]
    assert loss.iloc[-1] < 0.9 * loss.iloc[0]


def test_resume_continues_where_it_stopped(busi_folder, tmp_path):
    first = busi.train(tiny(busi_folder, tmp_path, epochs=1))
    steps = _iterations(first / "last.h5")
    assert steps > 0
    run = busi.train(tiny(busi_folder, tmp_path, epochs=3))  # as after an interruption
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3]
    assert _iterations(run / "last.h5") == 3 * steps  # optimizer state carried over
    assert json.loads((run / "state.json").read_text())["epoch"] == 3
    again = busi.train(tiny(busi_folder, tmp_path, epochs=3))  # finished: nothing more to do
    assert len(pd.read_csv(again / "history.csv")) == 3


def test_resume_refuses_other_settings(busi_folder, tmp_path):
    busi.train(tiny(busi_folder, tmp_path, epochs=1))
    with pytest.raises(ValueError, match="base_filters: 4 -> 8"):
        busi.train(tiny(busi_folder, tmp_path, epochs=2, base_filters=8))
    with pytest.raises(FileExistsError):
        busi.train(tiny(busi_folder, tmp_path, epochs=2), resume=False)


def test_segmentation_models_unet_trains(busi_folder, tmp_path):
    config = tiny(busi_folder, tmp_path, architecture="unet", encoder="resnet18",
                  encoder_weights=None, image_size=64, epochs=1, steps_per_epoch=2)
    run = busi.train(config)
    model = busi.load_model(run / "best.h5")
    assert model.output_shape == (None, 64, 64, 1)


def test_mirrored_strategy_on_two_logical_cpus(busi_folder, tmp_path):
    """Several devices: MirroredStrategy replicates the model (CPU stands in for GPUs)."""
    config = tiny(busi_folder, tmp_path, epochs=1, devices=["/cpu:0", "/cpu:1"])
    path = config.save(tmp_path / "config.json")
    code = (
        "import busi, tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, "
        "[tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from busi.training.devices import distribution_strategy\n"
        "assert distribution_strategy(['/cpu:0', '/cpu:1']).num_replicas_in_sync == 2\n"
        f"busi.train({str(path)!r})\n"
        "print('mirrored ok')\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mirrored ok" in result.stdout
    assert len(pd.read_csv(tmp_path / "run" / "history.csv")) == 1


def test_time_limit_stops_after_a_finished_epoch_and_resumes(busi_folder, tmp_path, caplog):
    # A budget of 6 ms is shorter than any epoch: the first epoch of a new run cannot be
    # predicted, so it is finished, and the user is told that it overran the budget.
    run = busi.train(tiny(busi_folder, tmp_path, epochs=5, max_minutes=1e-4, evaluate=True))
    assert len(pd.read_csv(run / "history.csv")) == 1  # the first epoch is always finished
    state = json.loads((run / "state.json").read_text())
    assert state["epoch"] == 1 and not state["stopped_early"]
    assert not (run / "evaluation").exists()
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("stopped by the time budget (0.0001 min) after 1 epoch(s) (epoch 1 of 5" in m
               and "run the same command" in m and "evaluation skipped" in m
               and "That epoch alone took longer than the whole budget" in m for m in said), said
    caplog.clear()
    # Resumed on the same budget: the measured epoch does not fit, so no epoch is started.
    busi.train(tiny(busi_folder, tmp_path, epochs=5, max_minutes=1e-4, evaluate=True))
    assert len(pd.read_csv(run / "history.csv")) == 1
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("before epoch 2 of 5" in m and "raise max_minutes" in m for m in said), said
    busi.train(tiny(busi_folder, tmp_path, epochs=2))
    assert len(pd.read_csv(run / "history.csv")) == 2


class _FakeModel:
    stop_training = False


def test_time_limit_does_not_start_an_epoch_predicted_to_overrun(monkeypatch):
    """With a clock in hand: epochs of 10 s, deadline at 35 s. After epoch 3 (t=30) another
    10 s epoch would end at 40 s, past the deadline, so training stops after epoch 3 (it does
    not run to t=40); after epoch 2 (t=20) a third still fits (ends at 30)."""
    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    limit = callbacks.TimeLimit(deadline=35.0)
    limit.set_model(_FakeModel())
    for epoch in range(3):
        assert limit.next_epoch_fits()
        limit.on_epoch_begin(epoch)
        clock[0] += 10.0
        limit.on_epoch_end(epoch)
        assert limit.model.stop_training == (epoch == 2), epoch
    assert limit.stopped and limit.durations == [10.0, 10.0, 10.0]
    resumed = callbacks.TimeLimit(deadline=clock[0] + 9.0, durations=[10.0])
    assert not resumed.next_epoch_fits()  # a resumed run knows its epoch length


def test_time_limit_does_not_stop_after_the_last_epoch(monkeypatch):
    """A run whose last epoch ends where another would not fit has still done all its epochs:
    it is finished (and gets evaluated), not "stopped by the time budget". Found when the joint
    BUSI + BUS-BRA run did 4 of 4 epochs and reported a stop with evaluation skipped."""
    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    limit = callbacks.TimeLimit(deadline=25.0)
    limit.set_model(_FakeModel())
    limit.set_params({"epochs": 2})
    for epoch in range(2):
        limit.on_epoch_begin(epoch)
        clock[0] += 10.0
        limit.on_epoch_end(epoch)
    assert not limit.next_epoch_fits()  # a third epoch would end at 30 s, past 25 s
    assert not limit.stopped and not limit.model.stop_training


def test_time_limit_warns_early_when_the_first_epoch_will_overrun(monkeypatch, caplog):
    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    limit = callbacks.TimeLimit(deadline=60.0)
    limit.set_model(_FakeModel())
    limit.set_params({"steps": 100, "epochs": 1})
    limit.on_epoch_begin(0)
    for batch in range(3):  # 2 s a batch: 100 batches take 200 s, past the 60 s budget
        clock[0] += 2.0
        limit.on_train_batch_end(batch)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == ["time budget: this epoch will take about 3.3 min (training alone), past the "
                    "time budget (54 s left); it will be finished, then training stops"]


def test_cosine_schedule_is_followed_across_an_interruption(busi_folder, tmp_path):
    config = tiny(busi_folder, tmp_path, epochs=4, lr_schedule="cosine", warmup_epochs=1,
                  learning_rate=1e-2, min_learning_rate=1e-4)
    busi.train(config.replace(max_minutes=1e-4))  # the time budget stops it after epoch 1 ...
    run = busi.train(config)  # ... and the same command continues the same schedule
    lr = pd.read_csv(run / "history.csv")["lr"].tolist()
    # warm-up to half the rate, then cosine from the full rate down to the minimum
    expected = [5e-3, 1e-2, 1e-4 + 0.5 * (1e-2 - 1e-4), 1e-4]
    assert lr == pytest.approx(expected, rel=1e-5)


def test_train_classes_trains_on_those_but_keeps_the_split(busi_folder, tmp_path):
    config = tiny(busi_folder, tmp_path, epochs=1, train_classes=["benign", "malignant"])
    run = RunFolder(config.directory)
    trained = run_parts(run, config, new_run=True)
    assert set(trained["train"]["label"]) == {"benign", "malignant"}
    everything = run_parts(run, config.replace(train_classes=None))
    assert "normal" in set(everything["train"]["label"])
    for name in ("val", "test"):  # evaluation still sees the normal images
        assert trained[name]["id"].tolist() == everything[name]["id"].tolist()


def test_best_checkpoint_is_float32_after_bfloat16_training(busi_folder, tmp_path):
    run = busi.train(tiny(busi_folder, tmp_path, epochs=1, mixed_precision="mixed_bfloat16"))
    from busi._keras import keras

    assert keras().mixed_precision.global_policy().name == "float32"  # not leaked to later code
    policies = {layer.dtype_policy.name for layer in busi.load_model(run / "best.h5").layers}
    assert policies == {"float32"}
    last = busi.load_model(run / "last.h5")  # the resumable checkpoint keeps training precision
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in last.layers}
    inference = load_for_inference(run / "last.h5")  # as evaluation and prediction load it
    assert {layer.dtype_policy.name for layer in inference.layers} == {"float32"}


def test_checkpoint_monitor_counts_the_trained_classes_only(busi_folder, tmp_path):
    val = pd.DataFrame({"id": ["a", "b", "c"], "label": ["benign", "normal", "malignant"]})
    lesions = tiny(busi_folder, tmp_path, train_classes=["benign", "malignant"])
    assert training._monitored(lesions, val)["id"].tolist() == ["a", "c"]
    assert training._monitored(tiny(busi_folder, tmp_path), val)["id"].tolist() == ["a", "b", "c"]


def test_training_data_is_augmented_as_the_config_says(busi_folder, tmp_path, monkeypatch):
    seen = []
    real = pipeline.make_dataset  # the trainer imports it when it trains on tf-keras

    def spy(*args, **kwargs):
        if kwargs.get("training"):
            seen.append(kwargs["augment_config"])
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "make_dataset", spy)
    config = tiny(busi_folder, tmp_path, augment=True, epochs=1,
                  augmentation={"max_rotation_deg": 25, "gamma_range": [0.6, 1.6]})
    busi.train(config)
    assert seen and seen[0] == config.augment_config()
    assert seen[0].max_rotation_deg == 25 and seen[0].gamma_range == (0.6, 1.6)
    seen.clear()
    busi.train(tiny(busi_folder, tmp_path / "off", augment=False, epochs=1))
    assert seen == [training.NO_AUGMENTATION]


def test_a_split_with_the_left_out_conflicts_is_explained(busi_folder, tmp_path):
    """A split made from the whole index keeps the label-conflicting pair (benign (10) =
    malignant (6)) that runs leave out: the error says so instead of blaming the data."""
    table = busi.data.add_groups(busi.data.index(busi_folder))
    busi.data.save_split(busi.data.make_split(table, seed=0), tmp_path / "split.csv")
    config = tiny(busi_folder, tmp_path, split_file=str(tmp_path / "split.csv"))
    with pytest.raises(busi.errors.DataError, match=r"split\.csv: the split holds 2 image\(s\) "
                       r"of label-conflicting duplicate groups.*drop_conflicts\(table\)"):
        parts.split_parts(config, parts.dataset_table(config), parts.make_run_split(
            config, table))
    kept = parts.split_parts(config.replace(drop_conflicts=False), table,
                             parts.make_run_split(config, table))
    assert sum(len(part) for part in kept.values()) == len(table)


@pytest.mark.parametrize("recorded", [True, False])
def test_best_h5_written_but_not_yet_recorded_is_settled_on_resume(tmp_path, recorded):
    """A kill between saving a new best and recording its hash in state.json must not leave a
    best.h5 whose hash the state does not know (publish would refuse it as replaced)."""
    import pandas as pd

    from busi.runs.folder import RunFolder
    from busi.training.callbacks import RunCheckpoint
    from busi.utils.digests import file_digest

    run = RunFolder(tmp_path)
    run.best.write_bytes(b"old best")
    run.last.write_bytes(b"last")  # a state counts only beside its last.h5
    pending = tmp_path / "best.pending.h5"
    pending.write_bytes(b"new best")
    wanted = file_digest(pending) if recorded else file_digest(run.best)
    run.write_record(run.state, {"epoch": 3, "sha256": {run.best.name: wanted}})
    RunCheckpoint(run, TrainConfig(run_dir=str(tmp_path)), pd.DataFrame(), None, [])
    assert not pending.exists()
    assert run.best.read_bytes() == (b"new best" if recorded else b"old best")
    assert file_digest(run.best) == run.read_state()["sha256"][run.best.name]


def test_init_weights_starts_a_run_from_another_model(busi_folder, tmp_path):
    """Fine-tuning a trained model: the new run starts from its weights exactly, records the
    file's digest, and a model of another architecture is refused naming the file."""
    import numpy as np

    from busi.utils.digests import file_digest, file_sha1

    source = busi.train(tiny(busi_folder, tmp_path / "a", epochs=1)) / "best.h5"
    config = tiny(busi_folder, tmp_path / "b", epochs=1, init_weights=str(source))
    run = RunFolder(config.directory)
    run.root.mkdir(parents=True)
    model = training._initial_model(config, run, freeze_encoder=False)
    expected = busi.load_model(source, compile=False).get_weights()
    assert len(model.get_weights()) == len(expected)
    for built, saved in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_array_equal(built, saved)
    record = json.loads(run.init_weights.read_text())
    assert record == {"path": str(source.resolve()), "sha256": file_digest(source),
                      "sha1": file_sha1(source)}

    trained = busi.train(tiny(busi_folder, tmp_path / "c", epochs=1, init_weights=str(source)))
    assert json.loads((trained / "init_weights.json").read_text())["sha256"] == record["sha256"]
    card = publish(trained, tmp_path / "published", export=None)[2].read_text()
    assert f"Fine-tuned from the weights run/best (SHA-1 {file_sha1(source)})" in card

    other = tiny(busi_folder, tmp_path / "d", epochs=1, base_filters=8, init_weights=str(source))
    with pytest.raises(ValueError, match=f"{re.escape(str(source))}.*do not fit"):
        busi.train(other)
    assert not (tmp_path / "d" / "run").exists()  # refused before the run folder is written
    # a start with init_weights killed in its first epoch (kill -9: no clean-up) leaves its
    # record; started again without init_weights (allowed: no epoch had finished), it goes
    (tmp_path / "d" / "run").mkdir(parents=True)
    (tmp_path / "d" / "run" / "init_weights.json").write_text(json.dumps(record))
    busi.train(tiny(busi_folder, tmp_path / "d", epochs=1, base_filters=8))
    assert not (tmp_path / "d" / "run" / "init_weights.json").exists()

    missing = tiny(busi_folder, tmp_path / "e", init_weights=str(tmp_path / "nothing.h5"))
    with pytest.raises(FileNotFoundError, match="init_weights: .*nothing.h5 not found"):
        busi.train(missing)
    assert not RunFolder(missing.directory).config.exists()  # refused before writing anything


def test_init_weights_trained_on_the_runs_test_images_is_refused(busi_folder, tmp_path):
    """A model trained on another split has seen some of this run's val and test images:
    fine-tuning it would inflate every score, so the run refuses to start and says which
    images and which split file, also when the images came in through the model that model was
    fine-tuned from. The same split passes; published weights (no split beside them) are not
    checked."""
    from busi.data.splits import load_split, save_split
    from busi.training.init_split import trained_on_scored_images

    probe = tiny(busi_folder, tmp_path / "probe")
    parts = run_parts(RunFolder(probe.directory), probe, new_run=True)
    own = load_split(RunFolder(probe.directory).split)
    assert "dataset" not in own  # a one-dataset split: its runs' configs name the dataset
    runs = {name: RunFolder(tmp_path / name) for name in ("same", "other", "child")}
    for name, split in (("same", own), ("other", own.assign(split="train")), ("child", own)):
        runs[name].root.mkdir()
        save_split(split, runs[name].split)
        probe.save(runs[name].config)
    busi.inference.weights.save_model(busi.models.build(probe), runs["other"].best,
                                      include_optimizer=False)  # it fits: only its split is wrong
    n_val, n_test = len(parts["val"]), len(parts["test"])
    assert n_val and n_test
    assert trained_on_scored_images(runs["same"].best, parts, "busi") is None  # not read
    message = trained_on_scored_images(runs["other"].best, parts, "busi")
    assert f"trained on {n_val} of its {n_val} val images and {n_test} of its {n_test} test " \
        f"images (split: {runs['other'].split})" in message
    # the rows of a joint run's parts name their dataset; a one-dataset split is read as its own
    joint = {name: rows.assign(dataset="busi") for name, rows in parts.items()}
    assert trained_on_scored_images(runs["other"].best, joint, "busbra") == message
    assert trained_on_scored_images(runs["other"].best,
                                    {name: rows.assign(dataset="busbra")
                                     for name, rows in parts.items()}, "busbra") is None
    # a run of the right split that was itself fine-tuned from the wrong one
    runs["child"].write_record(runs["child"].init_weights, {"path": str(runs["other"].best)})
    through = trained_on_scored_images(runs["child"].best, parts, "busi")
    assert f"through {runs['other'].root}" in through
    (tmp_path / "published").mkdir()
    assert trained_on_scored_images(tmp_path / "published" / "model.h5", parts, "busi") is None

    leaky = tiny(busi_folder, tmp_path / "b", init_weights=str(runs["other"].best))
    with pytest.raises(ValueError, match=f"trained on {n_val} of its {n_val} val images"):
        busi.train(leaky)
    assert not (tmp_path / "b").exists()  # what the refused start wrote is gone


def test_frozen_encoder_warm_up_then_fine_tunes_everything(busi_folder, tmp_path):
    """``freeze_encoder_epochs``: the warm-up epochs leave the encoder's convolutions as they
    started (its BatchNorm layers adapt, as in sm's ``encoder_freeze``); the epochs after it,
    also in a resumed session, train them too. Started from ``init_weights`` so no ImageNet
    download is needed."""
    import numpy as np

    from busi import _keras
    from busi.models import architectures as models

    batchnorm = _keras.keras().layers.BatchNormalization

    small = dict(architecture="unet", encoder="resnet18", encoder_weights=None, image_size=32,
                 steps_per_epoch=1, precise_bn_batches=1, learning_rate=1e-3)
    source = busi.train(tiny(busi_folder, tmp_path / "a", epochs=1, **small)) / "best.h5"

    def encoder_and_rest(path):
        model = busi.load_model(path, compile=False)
        inside = {layer.name for layer in models.encoder_layers(model)}
        split = {True: [], False: []}
        for layer in model.layers:
            if not isinstance(layer, batchnorm):  # they adapt in the warm-up too: see above
                split[layer.name in inside].extend(layer.get_weights())
        return split[True], split[False]

    start_encoder, start_rest = encoder_and_rest(source)
    config = dict(init_weights=str(source), freeze_encoder_epochs=1, **small)
    run = busi.train(tiny(busi_folder, tmp_path / "b", epochs=1, **config))
    encoder, rest = encoder_and_rest(run / "last.h5")
    assert start_encoder and all(np.array_equal(a, b) for a, b in zip(encoder, start_encoder,
                                                                      strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(rest, start_rest, strict=True))

    run = busi.train(tiny(busi_folder, tmp_path / "b", epochs=2, **config))  # resumed
    encoder, _ = encoder_and_rest(run / "last.h5")
    assert not all(np.array_equal(a, b) for a, b in zip(encoder, start_encoder, strict=True))
