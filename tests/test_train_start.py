"""How a training starts: the name of a run nobody named, what it says before the first epoch,
and what a start that fails before its first epoch leaves behind (nothing it made)."""

from __future__ import annotations

import json

import pytest

import busi
from busi.config.train_config import TrainConfig
from busi.data.run_parts import run_parts
from busi.training import trainer as training


def test_a_run_without_a_name_is_named_after_its_model():
    assert TrainConfig().directory.name == "unet-resnet34"
    assert TrainConfig(architecture="classic_unet").run_name == "classic-unet"
    assert TrainConfig(encoder="efficientnet-lite0").run_name == "unet-efficientnet-lite0"
    assert TrainConfig(encoder_weights=None).run_name == "unet-resnet34-scratch"
    assert TrainConfig(datasets=("busi", "busbra")).run_name == "unet-resnet34-busi-busbra"
    assert TrainConfig(name="mine", architecture="classic_unet").directory.name == "mine"
    assert TrainConfig(architecture="classic_unet", run_dir="/x/y").directory.name == "y"


def tiny(busi_folder, **changes) -> TrainConfig:
    values = dict(data=str(busi_folder), architecture="classic_unet", base_filters=4, depth=2,
                  image_size=32, batch_size=4, epochs=1, augment=False, evaluate=False)
    return TrainConfig(**{**values, **changes})


@pytest.mark.slow
def test_training_says_where_what_and_how_long_before_it_starts(busi_folder, tmp_path,
                                                                monkeypatch, capsys):
    monkeypatch.setattr(busi.utils.paths, "RUNS_DIR", tmp_path / "runs")
    run = busi.train(tiny(busi_folder, max_minutes=30))
    assert run == tmp_path / "runs" / "classic-unet"  # not runs/unet-resnet34
    assert json.loads((run / "config.json").read_text())["name"] == "classic-unet"
    parts = run_parts(busi.RunFolder(run))
    out = capsys.readouterr().out
    head = out.split("Epoch 1/1")[0]  # all of it before training starts
    assert f"run folder: {run} (new run)" in head
    assert (f"data: BUSI at {busi_folder}: train {len(parts['train'])}, val "
            f"{len(parts['val'])}, test {len(parts['test'])} images") in head
    assert "model: classic U-Net, 4 filters, depth 2, from scratch; 32 px, batch 4" in head
    assert "epochs: 1; time budget 30 min" in head
    busi.train(tiny(busi_folder, max_minutes=30, epochs=2))
    assert f"run folder: {run} (resuming after epoch 1 of 2)" in capsys.readouterr().out


def _fail_before_the_first_epoch(monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("ImageNet weights could not be downloaded (offline)")

    monkeypatch.setattr(training, "_train_epochs", offline)


@pytest.mark.slow
def test_a_start_that_fails_before_its_first_epoch_leaves_no_folder(busi_folder, tmp_path,
                                                                    monkeypatch):
    _fail_before_the_first_epoch(monkeypatch)
    run = tmp_path / "runs" / "new"
    with pytest.raises(RuntimeError, match="offline"):
        busi.train(tiny(busi_folder, run_dir=str(run)))
    assert not (tmp_path / "runs").exists()  # the folders it made, the parent too
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_failed_start_in_an_existing_folder_removes_only_what_it_wrote(busi_folder, tmp_path,
                                                                         monkeypatch):
    _fail_before_the_first_epoch(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("the user's")
    with pytest.raises(RuntimeError, match="offline"):
        busi.train(tiny(busi_folder, run_dir=str(run)))
    assert [path.name for path in run.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_a_run_with_a_finished_epoch_is_kept_when_a_later_step_fails(busi_folder, tmp_path,
                                                                     monkeypatch):
    import busi.evaluation.evaluator

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(training, "evaluate", broken)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation failed"):
        busi.train(tiny(busi_folder, run_dir=str(run), evaluate=True))
    assert (run / "state.json").is_file() and (run / "last.h5").is_file()  # it resumes
