"""The busi command end to end on a tiny config, and its error messages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import busi
from busi.cli import main


@pytest.mark.parametrize("command", ["download", "index", "train", "evaluate", "predict"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: busi " + command in capsys.readouterr().out


def test_every_option_of_train_is_explained(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--epochs EPOCHS", "--batch-size BATCH_SIZE", "--image-size IMAGE_SIZE"):
        line = text.split(option, 1)[1].split("\n  -", 1)[0]
        assert "default" in line, option  # a help text follows the option
    assert "max_minutes" in text and "limit" in text


def test_train_and_predict_offer_the_registered_choices(capsys):
    from busi.data.geometry import MODES
    from busi.models import architectures as models
    from busi.models.encoders import ENCODERS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--architecture {" + ",".join(models.ARCHITECTURES) + "}" in text
    squeezed = "".join(text.split())  # argparse wraps long help, also inside names
    assert all(name in squeezed for name in ENCODERS)
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "--resize {" + ",".join(MODES) + "}" in capsys.readouterr().out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "busi.cli", "--version"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("busi ")


def test_index_reports_counts_and_writes_csv(busi_folder, tmp_path, capsys):
    assert main(["index", "--data", str(busi_folder), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "images: 21  masks: 24  with several masks: 2" in out
    assert "(1 exact)" in out
    # the second fingerprint is the one a default run records (env.json)
    table = busi.data.drop_conflicts(busi.data.add_groups(busi.data.index(busi_folder)))
    assert "fingerprint of all 21 images: " in out
    assert "images a default run uses" in out and busi.data.fingerprint(table) in out
    assert (tmp_path / "out" / "index.csv").is_file()
    assert (tmp_path / "out" / "duplicates.csv").is_file()


def test_missing_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BUSI_DATA", raising=False)
    assert main(["index", "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("busi index: error: BUSI not found")


def test_bad_config_key_is_named(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("epochz: 3\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown config key(s) ['epochz']" in capsys.readouterr().err
    assert main(["train", "--set", "learnig_rate=0.1"]) == 2
    assert "learnig_rate" in capsys.readouterr().err


def test_wrong_weights_file_is_a_clear_error(busi_table, tmp_path, capsys):
    (tmp_path / "model.h5").write_text("not a model")
    (tmp_path / "in").mkdir()
    shutil.copy(busi_table["image_path"][0], tmp_path / "in")
    assert main(["predict", str(tmp_path / "in"), str(tmp_path / "out"),
                 "--weights", str(tmp_path / "model.h5")]) == 2
    assert "model.h5" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "in"), str(tmp_path / "out"),
                 "--weights", str(tmp_path / "missing.h5")]) == 2
    assert "missing.h5" in capsys.readouterr().err


@pytest.mark.slow
def test_train_evaluate_predict_end_to_end(busi_folder, busi_table, tmp_path, capsys):
    run = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "architecture: classic_unet\nbase_filters: 4\ndepth: 2\nimage_size: 32\n"
        "batch_size: 4\nepochs: 1\naugment: false\n"
    )
    assert main(["train", "--config", str(config), "--data", str(busi_folder),
                 "--run-dir", str(run), "--set", "learning_rate=0.01"]) == 0
    assert (run / "best.h5").is_file() and (run / "evaluation" / "summary.json").is_file()
    assert json.loads((run / "config.json").read_text())["optimisation"]["learning_rate"] == 0.01
    out = capsys.readouterr().out
    assert "best.h5 on the test images" in out and "| lesion |" in out  # a table, not JSON
    assert main(["evaluate", str(run), "--split", "val", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "val" in summary["splits"]
    assert main(["evaluate", str(run), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("best.h5 on the val images (32 px, letterbox)")
    assert f"| lesion | {summary['splits']['val']['lesion']['n']} |" in out
    images = busi_folder / "normal"
    assert main(["predict", str(images), str(tmp_path / "pred"), "--weights",
                 str(run / "best.h5")]) == 0
    n_images = len(busi_table[busi_table["label"] == "normal"])
    assert len(list((tmp_path / "pred").glob("*_pred.png"))) == n_images  # masks left out
    assert main(["predict", str(images), str(tmp_path / "all"), "--weights",
                 str(run / "best.h5"), "--include-masks"]) == 0
    assert len(list((tmp_path / "all").glob("*_pred.png"))) == 2 * n_images


def test_download_offers_only_datasets_that_can_be_fetched(capsys):
    with pytest.raises(SystemExit):
        main(["download", "--help"])
    assert "--dataset {busi,busbra}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["download", "--dataset", "folder"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'folder'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["download", "--data", "somewhere"],
                                  ["evaluate", "run", "--dat", "somewhere"]])
def test_an_option_is_never_read_as_an_abbreviation_of_another(argv, capsys):
    """`download --data X` used to mean `--dataset X` (argparse's prefix matching)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {argv[-2]} {argv[-1]}" in capsys.readouterr().err


def test_set_and_its_own_option_must_agree(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--set", "epochs=5", "--epochs", "8", "--run-dir", str(run)]) == 2
    assert "--set epochs=5 and --epochs 8 disagree" in capsys.readouterr().err
    assert not run.exists()


def test_restart_on_an_existing_run_names_the_option_not_the_python_argument(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert main(["train", "--run-dir", str(run), "--restart"]) == 2
    err = capsys.readouterr().err
    assert "resuming it was refused (--restart" in err and "pass resume=True" not in err
