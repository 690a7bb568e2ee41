"""A published model scored without its run folder (``busi evaluate weights/NAME.h5``): the split
made again from its sidecar gives the run's own test images and scores, and data or a split that
are not the run's are refused."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

import busi
from busi.cli import main
from busi.config.train_config import TrainConfig
from busi.data.run_parts import run_parts

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def published(busi_folder, tmp_path_factory):
    """(run folder, published .h5) of a tiny run trained one epoch, evaluated and published."""
    from busi.inference.publish import publish

    root = tmp_path_factory.mktemp("published")
    run = busi.train(TrainConfig(
        name="p", data=str(busi_folder), run_dir=str(root / "p"),
        architecture="classic_unet", base_filters=4, depth=2, image_size=32, batch_size=4,
        epochs=1, augment=False, evaluate=True, seed=1,
    ))
    return run, publish(run, root / "weights", export=None)[0]


def _table(out: str) -> str:
    """The metrics table of ``busi evaluate``'s output (the header names the weights file)."""
    return out[out.index("| images |"):].split("\n\n")[0].split("per-image")[0].split("split ")[0]


def test_a_published_model_scores_its_runs_test_images_as_the_run_did(
        published, busi_folder, monkeypatch, capsys):
    run, weights = published
    monkeypatch.setenv("BUSI_DATA", str(busi_folder))  # not the path the run recorded
    assert main(["evaluate", str(run)]) == 0
    of_run = capsys.readouterr().out
    assert main(["evaluate", str(weights)]) == 0
    of_file = capsys.readouterr().out
    assert of_file.startswith("p.h5 on the test images (32 px, letterbox)")
    assert "| lesion |" in of_file and _table(of_file) == _table(of_run)
    assert "nothing written" in of_file
    assert sorted(path.name for path in weights.parent.iterdir()) == ["p.h5", "p.json", "p.md"]


def test_another_part_and_json_of_a_published_model(published, busi_folder, capsys):
    run, weights = published
    expected = busi.evaluate(run, split="val")["splits"]["val"]["lesion"]
    capsys.readouterr()
    assert main(["evaluate", str(weights), "--split", "val", "--data", str(busi_folder),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["part"] == "val" and summary["dataset"] == "busi"
    assert summary["splits"]["val"]["lesion"]["dice_mean"] == pytest.approx(
        expected["dice_mean"], abs=1e-9)


def test_a_published_model_refuses_other_data(published, tmp_path, capsys):
    from conftest import write_busi_like

    _, weights = published
    other = write_busi_like(tmp_path, seed=5)
    assert main(["evaluate", str(weights), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "p.json: p.h5 was split and trained on other images" in err
    assert "fingerprint" in err


def test_a_split_made_again_that_is_not_the_runs_is_refused(published, busi_folder, tmp_path,
                                                            capsys):
    _, weights = published
    for path in weights.parent.iterdir():
        shutil.copy(path, tmp_path)
    sidecar = json.loads((tmp_path / "p.json").read_text())
    sidecar["metrics"]["test"]["lesion"]["n"] += 1  # what another split code would have given
    (tmp_path / "p.json").write_text(json.dumps(sidecar))
    assert main(["evaluate", str(tmp_path / "p.h5"), "--data", str(busi_folder)]) == 2
    assert "the split made here from its config differs from the run's" in capsys.readouterr().err


def test_a_model_file_needs_its_sidecar_and_no_weights_option(published, tmp_path, capsys):
    _, weights = published
    shutil.copy(weights, tmp_path / "alone.h5")
    assert main(["evaluate", str(tmp_path / "alone.h5")]) == 2
    assert "no sidecar alone.json beside it" in capsys.readouterr().err
    assert main(["evaluate", str(weights), "--weights", str(weights)]) == 2
    assert "--weights is for a run folder" in capsys.readouterr().err
    assert main(["report", str(weights)]) == 2
    assert "a file, not a run folder" in capsys.readouterr().err


def test_score_published_scores_the_models_own_dataset(published, busi_folder, tmp_path, capsys):
    """`--dataset busi`, one of its choices, used to end in a ValueError traceback."""
    spec = importlib.util.spec_from_file_location("score_published",
                                                  ROOT / "tools" / "score_published.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    run, weights = published
    expected = busi.evaluate(run)["splits"]["test"]["lesion"]
    capsys.readouterr()
    out = tmp_path / "scores.csv"
    assert tool.main([str(weights), "--dataset", "busi", "--part", "test", "--data",
                      str(busi_folder), "--out", str(out)]) == 0
    assert f"| lesion | {expected['n']} | {expected['dice_mean']:.3f} |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="score_published: error: split .* got 'all'"):
        tool.main([str(weights), "--dataset", "busi", "--part", "all", "--data",
                   str(busi_folder)])


def test_notebook_demo_images_of_a_published_model_are_its_test_images(published, busi_folder,
                                                                       tmp_path):
    run, weights = published
    dest = busi.notebook.demo_inputs(weights, tmp_path / "demo", n=3, data=busi_folder)
    test_ids = set(run_parts(busi.RunFolder(run))["test"]["id"])
    assert {path.stem for path in dest.iterdir()} <= test_ids and len(list(dest.iterdir())) == 3


def test_a_joint_model_scores_each_of_its_datasets_as_its_run_did(busi_folder, busbra_folder,
                                                                 tmp_path, monkeypatch, capsys):
    from busi.inference.publish import publish

    run = busi.train(TrainConfig(
        name="j", datasets=("busi", "busbra"), data=str(busi_folder),
        data_paths={"busbra": str(busbra_folder)}, run_dir=str(tmp_path / "j"),
        architecture="classic_unet", base_filters=4, depth=2, image_size=32, batch_size=4,
        epochs=1, augment=False, evaluate=True, seed=1,
    ))
    weights = publish(run, tmp_path / "weights", export=None)[0]
    monkeypatch.setenv("BUSI_DATA", str(busi_folder))  # the sidecar's paths are not used
    monkeypatch.setenv("BUSBRA_DATA", str(busbra_folder))
    for dataset in ("busi", "busbra"):
        assert main(["evaluate", str(run), "--dataset", dataset]) == 0
        of_run = capsys.readouterr().out
        assert main(["evaluate", str(weights), "--dataset", dataset]) == 0
        assert _table(capsys.readouterr().out) == _table(of_run), dataset
