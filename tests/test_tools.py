"""tools/ensemble_eval.py on two tiny runs of one split: it scores every model and combination."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import busi
from busi.config.train_config import TrainConfig

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "ensemble_eval.py"


def _run(busi_folder, root, name, seed):
    return busi.train(TrainConfig(
        name=name, data=str(busi_folder), run_dir=str(root / name),
        architecture="classic_unet", base_filters=4, depth=2, image_size=32, batch_size=4,
        epochs=1, augment=False, evaluate=False, seed=seed,
    ))


def _ensemble(*weights):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, weights)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_ensemble_eval_scores_singles_and_pairs(busi_folder, tmp_path):
    first = _run(busi_folder, tmp_path, "a", seed=1)
    second = _run(busi_folder, tmp_path, "b", seed=1)
    out = _ensemble(first / "best.h5", second / "best.h5")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if "best.h5 |" in line]
    assert len(rows) == 3  # a, b, a + b
    assert " + " in rows[2]
    for row in rows:
        val, test = row.split(" | ")[1:3]
        assert 0.0 <= float(val) <= 1.0 and 0.0 <= float(test.split(" / ")[0]) <= 1.0


def test_ensemble_eval_refuses_runs_of_different_splits(busi_folder, tmp_path):
    first = _run(busi_folder, tmp_path, "a", seed=1)
    other = _run(busi_folder, tmp_path, "c", seed=2)
    out = _ensemble(first / "best.h5", other / "best.h5")
    assert out.returncode != 0 and "do not share one split.csv" in out.stderr


PREDICT_AGREES = SCRIPT.with_name("predict_agrees.py")


@pytest.fixture(scope="module")
def evaluated_run(busi_folder, tmp_path_factory):
    """A tiny run, trained one epoch and evaluated (post-processing chosen on its val part)."""
    root = tmp_path_factory.mktemp("tools")
    return busi.train(TrainConfig(
        name="p", data=str(busi_folder), run_dir=str(root / "p"),
        architecture="classic_unet", base_filters=4, depth=2, image_size=32, batch_size=4,
        epochs=1, augment=False, evaluate=True, seed=1,
    ))


def test_predict_agrees_with_evaluate_on_a_tiny_run(evaluated_run):
    run = evaluated_run
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, str(PREDICT_AGREES), str(run / "best.h5"), str(run),
                          "--tolerance", "1e-6"],
                         capture_output=True, text=True, env=env, timeout=600)
    # the same weights and post-processing through the written PNGs: the same scores
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "difference 0.0000" in out.stdout


SCORE_PUBLISHED = SCRIPT.with_name("score_published.py")


def _score_published():
    """tools/score_published.py as a module, run in this process (no second TensorFlow start)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("score_published", SCORE_PUBLISHED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_score_published_matches_evaluate_of_its_run(evaluated_run, busbra_folder, tmp_path,
                                                     capsys):
    """A published model scored from its sidecar alone gives what ``busi evaluate RUN --dataset``
    gives from the run folder: the same rows, weights and post-processing, so the same numbers."""
    from busi.inference.publish import publish

    weights = publish(evaluated_run, tmp_path / "weights", export=None)[0]
    expected = busi.evaluate(evaluated_run, split="all", dataset="busbra", data=busbra_folder)
    out = tmp_path / "scores.csv"
    capsys.readouterr()
    assert _score_published().main([str(weights), "--dataset", "busbra", "--data",
                                    str(busbra_folder), "--part", "all", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    scores = pd.read_csv(out)
    lesion = expected["splits"]["all"]["lesion"]
    assert len(scores) == lesion["n"]
    assert scores["dice"].mean() == pytest.approx(lesion["dice_mean"], abs=1e-9)  # same masks
    assert f"| lesion | {lesion['n']} | {lesion['dice_mean']:.3f} |" in printed


def test_score_published_refuses_weights_without_their_sidecar(evaluated_run, tmp_path):
    from busi.inference.publish import publish

    weights = publish(evaluated_run, tmp_path / "weights", export=None)[0]
    weights.with_suffix(".json").unlink()
    with pytest.raises(SystemExit, match="no sidecar"):
        _score_published().main([str(weights), "--dataset", "busbra"])
