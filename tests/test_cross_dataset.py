"""Cross-dataset evaluation (a BUSI run scored on BUS-BRA with its own post-processing) and the
per-dataset reports of a joint run, with fake models whose predictions are known."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_evaluate import _set_lesion_masks, _write_masks, darkness_model, make_run

import busi
from busi.config.train_config import TrainConfig
from busi.data.cross_dataset import dataset_rows
from busi.evaluation import evaluator as ev
from busi.evaluation.evaluator import evaluate_dataset
from busi.inference.postprocess import PostProcess
from busi.inference.predictor import predict_probabilities


def _busbra_copy(tmp_path: Path, busbra_folder: Path, threshold: float | None = None) -> Path:
    """A copy of the synthetic BUS-BRA whose masks are, if ``threshold`` is given, the darkness
    model's prediction at that threshold (so scoring at that threshold gives Dice 1)."""
    root = Path(shutil.copytree(busbra_folder, tmp_path / "busbra" / busbra_folder.name))
    if threshold is not None:
        rows = busi.data.busbra.index(root)
        probs = predict_probabilities(darkness_model(), rows, image_size=32, batch_size=4)
        _write_masks(rows, [PostProcess(threshold=threshold).apply(p) for p in probs])
    return root


def test_cross_dataset_uses_the_runs_own_choice_and_its_own_folder(
    tmp_path: Path, busi_folder: Path, busbra_folder: Path
) -> None:
    run, data_root = make_run(tmp_path, busi_folder)
    _set_lesion_masks(run, data_root, "val", 0.8)
    busbra_root = _busbra_copy(tmp_path, busbra_folder, threshold=0.3)
    summary = evaluate_dataset(run, "busbra", part="all", data=busbra_root)
    # chosen on the run's BUSI validation images (0.8), never re-tuned on BUS-BRA (0.3)
    assert summary["postprocess"]["threshold"] == 0.8
    assert json.loads((run / "evaluation" / "postprocess.json").read_text())["threshold"] == 0.8
    out = run / "evaluation-busbra"
    per_image = pd.read_csv(out / "per_image_all.csv")
    assert len(per_image) == 28 and set(per_image["label"]) == {"benign", "malignant"}
    assert summary["splits"]["all"]["lesion"]["n"] == 28
    assert summary["splits"]["all"]["lesion"]["dice_mean"] < 0.99  # masks made at 0.3
    assert (summary["dataset"], summary["part"]) == ("busbra", "all")
    assert summary == json.loads((out / "summary.json").read_text())
    assert "all" not in json.loads((run / "evaluation" / "summary.json").read_text())["splits"]

    # The same masks scored at the threshold they were made with: Dice 1 (the test can fail).
    values = json.loads((run / "evaluation" / "postprocess.json").read_text())
    (run / "evaluation" / "postprocess.json").write_text(json.dumps({**values, "threshold": 0.3}))
    again = evaluate_dataset(run, "busbra", part="all", data=busbra_root)
    assert again["splits"]["all"]["lesion"]["dice_mean"] == pytest.approx(1.0, abs=0.02)


def test_test_part_is_the_datasets_own_split_with_the_runs_settings(
    tmp_path: Path, busi_folder: Path, busbra_folder: Path
) -> None:
    from busi.data.parts import dataset_split, single_dataset_table

    run, _ = make_run(tmp_path, busi_folder)
    summary = evaluate_dataset(run, "busbra", part="test", data=busbra_folder)
    config = TrainConfig.load(run / "config.json")
    other = config.replace(datasets=["busbra"], data=str(busbra_folder))
    table = single_dataset_table(other, "busbra")
    split = dataset_split(other, "busbra", table)
    expected = set(split.loc[split["split"] == "test", "id"])
    per_image = pd.read_csv(run / "evaluation-busbra" / "per_image_test.csv")
    assert set(per_image["id"]) == expected and 0 < len(expected) < 28
    assert summary["splits"]["test"]["lesion"]["n"] == len(expected)
    with pytest.raises(ValueError, match="the run was trained on 'busi'"):
        dataset_rows(config, "busi")
    with pytest.raises(ValueError, match="part must be one of"):
        dataset_rows(config, "busbra", part="val")


def test_joint_run_reports_each_dataset_apart(
    tmp_path: Path, busi_folder: Path, busbra_folder: Path
) -> None:
    from busi.data.parts import dataset_table, make_run_split

    run, data_root = make_run(tmp_path, busi_folder)
    config = TrainConfig.load(run / "config.json").replace(
        datasets=["busi", "busbra"], data_paths={"busbra": str(busbra_folder)})
    config.save(run / "config.json")
    split = make_run_split(config, dataset_table(config))
    busi.data.save_split(split, run / "split.csv")
    assert list(busi.data.load_split(run / "split.csv")["dataset"].unique()) == ["busi", "busbra"]
    summary = ev.evaluate(run)
    assert summary["dataset"] == "busi"
    for folder, name in (("evaluation", "busi"), ("evaluation-busbra", "busbra")):
        for part in ("val", "test"):
            ids = set(pd.read_csv(run / folder / f"per_image_{part}.csv")["id"])
            expected = split.loc[(split["dataset"] == name) & (split["split"] == part), "id"]
            assert ids == set(expected)
        record = json.loads((run / folder / "summary.json").read_text())
        assert record["dataset"] == name
        assert record["postprocess"] == summary["postprocess"]  # one choice, on all val parts
    grid = pd.read_csv(run / "evaluation" / "postprocess_grid.csv")
    n_val = int((split["split"] == "val").sum())
    assert (grid["n_lesion"] + grid["n_normal"]).max() == n_val


def test_cli_evaluates_another_dataset_and_indexes_it(
    tmp_path: Path, busi_folder: Path, busbra_folder: Path, capsys
) -> None:
    from busi.cli import main

    run, _ = make_run(tmp_path, busi_folder)
    assert main(["index", "--dataset", "busbra", "--data", str(busbra_folder)]) == 0
    printed = capsys.readouterr().out
    assert "images: 28" in printed and "patients: 12" in printed
    assert main(["evaluate", str(run), "--dataset", "busbra", "--part", "all",
                 "--data", str(busbra_folder)]) == 0
    assert "busbra" in capsys.readouterr().out  # the readable table names where it is
    assert main(["evaluate", str(run), "--dataset", "busbra", "--part", "all",
                 "--data", str(busbra_folder), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["dataset"], printed["part"]) == ("busbra", "all")
    assert (run / "evaluation-busbra" / "per_image_all.csv").is_file()
    assert main(["evaluate", str(run), "--dataset", "busbra", "--part", "val"]) == 2
    assert "part must be one of" in capsys.readouterr().err


def test_a_users_folder_without_labels_is_scored_as_lesion_and_normal_images(
    tmp_path: Path, busi_folder: Path
) -> None:
    from test_datasets import _write_folder

    run, _ = make_run(tmp_path, busi_folder)
    mine = _write_folder(tmp_path / "mine", n=6, empty=(4, 5))
    summary = ev.evaluate(run, dataset="folder", split="all", data=mine)
    part = summary["splits"]["all"]
    assert part["lesion"]["n"] == 4 and part["normal"]["n"] == 2
    assert "benign" not in part and "malignant" not in part
    per_image = pd.read_csv(run / "evaluation-folder" / "per_image_all.csv")
    assert sorted(per_image["label"]) == ["lesion"] * 4 + ["normal"] * 2
