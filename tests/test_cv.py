"""busi cv: folds around the config's test part, fold runs, and their ensemble as a model that
busi evaluates, predicts with, publishes and exports, its post-processing chosen out of fold.

Tiny classic U-Nets (4 filters, depth 2, 32 px) on the synthetic folder; one cross-validation
of 2 folds x 1 epoch is shared by the tests that need trained folds (``cv_run``).
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from test_train import tiny as train_tiny

import busi
from busi.cli import main
from busi.config.train_config import TrainConfig
from busi.data.masks import load_truths
from busi.data.parts import dataset_table, make_run_split
from busi.data.run_parts import run_parts
from busi.data.splits import load_split
from busi.evaluation.postprocess_choice import postprocess_grid
from busi.evaluation.score_tables import score_table
from busi.inference.bundle import ModelRecord
from busi.inference.predictor import open_model, predict_table
from busi.inference.run_models import open_run_model
from busi.runs.ensembles import ensemble_members
from busi.runs.evaluations import GRID_FILE, POSTPROCESS_FILE, SUMMARY_FILE, summary_for
from busi.runs.folder import RunFolder
from busi.training import cv
from busi.utils.digests import file_digest

pytestmark = pytest.mark.slow

# TFLite float32 reorders float32 sums (measured ~1e-6 on these models; see tests/test_export.py).
FLOAT32_ATOL = 1e-4


def tiny(busi_folder, tmp_path, **changes) -> TrainConfig:
    """test_train's tiny run, one epoch long, evaluated, in ``tmp_path/tiny``."""
    return train_tiny(busi_folder, tmp_path, **{
        "epochs": 1, "evaluate": True, "run_dir": str(tmp_path / "tiny"), **changes})


def _with_duplicate(busi_folder, tmp_path):
    """A copy of the synthetic folder with ``benign (11)``, an exact copy of ``benign (1)``:
    a duplicate group of one label, which a run keeps (the folder's own pair conflicts)."""
    root = tmp_path / "data" / "Dataset_BUSI_with_GT"
    shutil.copytree(busi_folder, root)
    for suffix in ("", "_mask"):
        shutil.copy(root / "benign" / f"benign (1){suffix}.png",
                    root / "benign" / f"benign (11){suffix}.png")
    return root


# ------------------------------------------------------------------------------ folds


def test_folds_keep_groups_whole_and_leave_the_test_part_alone(busi_folder, tmp_path):
    config = tiny(_with_duplicate(busi_folder, tmp_path), tmp_path)
    table = dataset_table(config)
    pair = table.loc[table["id"].isin(["benign (1)", "benign (11)"]), "group"]
    assert len(pair) == 2 and pair.nunique() == 1  # the copy is grouped with its original
    usual_test = make_run_split(config, table).query("split == 'test'")["id"]
    splits = cv.fold_splits(config, 3)
    assert len(splits) == 3
    for split in splits:
        assert list(split.query("split == 'test'")["id"]) == list(usual_test)
        assert (split.groupby("group")["split"].nunique() == 1).all()
    held = pd.concat([split.query("split == 'val'")["id"] for split in splits])
    rest = splits[0].query("split != 'test'")["id"]
    assert sorted(held) == sorted(rest)  # each train+val image in exactly one fold's val


def test_joint_folds_split_each_dataset_around_its_own_test_part(busi_folder, busbra_folder,
                                                                   tmp_path):
    config = tiny(busi_folder, tmp_path, datasets=["busi", "busbra"],
                  data_paths={"busbra": str(busbra_folder)})
    table = dataset_table(config)
    usual = make_run_split(config, table)
    for split in cv.fold_splits(config, 2):
        assert set(split["dataset"]) == {"busi", "busbra"}
        assert list(split.query("split == 'test'")["id"]) == \
            list(usual.query("split == 'test'")["id"])
        busbra = split[split["dataset"] == "busbra"].merge(table[["id", "patient"]], on="id")
        assert (busbra.groupby("patient")["split"].nunique() == 1).all()  # patients whole


def test_split_seed_keeps_the_split_while_the_seed_changes(busi_folder, tmp_path):
    config = tiny(busi_folder, tmp_path)
    table = dataset_table(config)
    split = make_run_split(config, table)
    # a seed that splits these 19 images otherwise (some seeds happen to give the same split)
    other_seed = next(config.replace(seed=seed) for seed in range(1, 50)
                      if not make_run_split(config.replace(seed=seed), table)["split"].equals(
                          split["split"]))
    pinned = make_run_split(other_seed.replace(split_seed=config.seed), table)
    assert pinned[["id", "split"]].equals(split[["id", "split"]])
    pinned_folds = cv.fold_splits(other_seed.replace(split_seed=config.seed), 2)
    for a, b in zip(cv.fold_splits(config, 2), pinned_folds, strict=True):
        assert a[["id", "split"]].equals(b[["id", "split"]])


@pytest.mark.parametrize("folds", [1, 11, 2.5, True])
def test_a_bad_number_of_folds_is_named(busi_folder, tmp_path, folds):
    with pytest.raises(ValueError, match=r"folds \(--folds\) must be a whole number from 2 to "
                                         r"10"):
        cv.fold_splits(tiny(busi_folder, tmp_path), folds)


def test_the_command_names_a_bad_folds_option_before_touching_anything(busi_folder, tmp_path,
                                                                        capsys):
    config = tmp_path / "tiny.yaml"
    tiny(busi_folder, tmp_path).save(config)
    assert main(["cv", "--config", str(config), "--folds", "1"]) == 2
    assert "--folds" in capsys.readouterr().err
    assert not (tmp_path / "tiny-cv").exists()
    with pytest.raises(SystemExit):  # argparse: "argument --folds: invalid int value"
        main(["cv", "--config", str(config), "--folds", "two"])
    assert "--folds" in capsys.readouterr().err


def test_more_folds_than_the_data_can_fill_is_an_error(busi_folder, tmp_path):
    with pytest.raises(ValueError, match="10 folds need 10 images of one class"):
        cv.fold_splits(tiny(busi_folder, tmp_path), 10)


def test_a_config_with_its_own_split_is_refused(busi_folder, tmp_path):
    with pytest.raises(ValueError, match="unset split_file and authors_fold"):
        cv.fold_splits(tiny(busi_folder, tmp_path, split_file=str(tmp_path / "s.csv")), 2)


def test_a_fold_the_budget_stopped_stops_the_call(busi_folder, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cv, "train", lambda config: calls.append(config))  # no epoch
    config = tmp_path / "tiny.yaml"
    tiny(busi_folder, tmp_path).save(config)
    assert main(["cv", "--config", str(config), "--folds", "2", "--max-minutes", "5"]) == 0
    assert [c.name for c in calls] == ["tiny-fold0"]
    assert 0 < calls[0].max_minutes <= 5  # the call's budget, less what went before
    assert "0 of 2 folds done; run the same command to continue" in capsys.readouterr().out


def test_pooled_grids_are_the_grid_of_all_the_images(busi_table):
    rng = np.random.default_rng(0)
    table = busi_table
    truths = load_truths(table)
    probs = [rng.random(truth.shape).astype(np.float32) * 0.6 + 0.4 * truth for truth in truths]
    flipped = [p[:, ::-1] * 0.5 + p * 0.5 for p in probs]
    parts = [np.arange(len(table)) % 3 == k for k in range(3)]
    grids = [postprocess_grid(table[part].reset_index(drop=True),
                              [p for p, keep in zip(probs, part, strict=True) if keep],
                              [p for p, keep in zip(flipped, part, strict=True) if keep],
                              truths=[t for t, keep in zip(truths, part, strict=True) if keep])
             for part in parts]
    whole = postprocess_grid(table, probs, flipped, truths=truths)
    # the same sums in another order: equal to float64 rounding
    pd.testing.assert_frame_equal(cv.pool_grids(grids), whole, check_exact=False, rtol=1e-12)
    with pytest.raises(ValueError, match="other post-processing candidates"):
        cv.pool_grids([grids[0], grids[1].iloc[::-1]], ["a.csv", "b.csv"])


def _inputs(n: int = 3, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.repeat(rng.uniform(0, 255, (n, size, size, 1)).astype(np.float32), 3, axis=-1)


# ------------------------------------------------------------- a whole cross-validation


@pytest.fixture(scope="module")
def cv_run(busi_folder, tmp_path_factory):
    """(config, result) of a finished 2-fold cross-validation."""
    tmp = tmp_path_factory.mktemp("cv")
    config = tiny(busi_folder, tmp)
    return config, cv.cross_validate(config, folds=2)


def test_folds_are_evaluated_runs_on_their_splits_and_the_ensemble_is_one_too(cv_run):
    config, result = cv_run
    root = cv.cv_root(config)
    assert result.root == root and result.total == 2
    assert [p.name for p in result.folds] == ["tiny-fold0", "tiny-fold1"]
    for k, fold in enumerate(result.folds):
        run = RunFolder(fold)
        split = load_split(run.split)
        assert split.equals(load_split(root / "splits" / f"fold{k}.csv"))
        assert "test" in summary_for(run)["splits"]
    ensemble = RunFolder(result.ensemble)
    assert result.ensemble == root / "tiny-ensemble"
    split = load_split(ensemble.split)
    folds = [load_split(RunFolder(fold).split) for fold in result.folds]
    assert not (split["split"] == "val").any()  # nothing to choose or score on: see evaluation
    assert list(split.query("split == 'test'")["id"]) == \
        list(folds[0].query("split == 'test'")["id"])
    assert sorted(split.query("split == 'train'")["id"]) == \
        sorted(pd.concat([f.query("split == 'val'")["id"] for f in folds]))
    assert set(summary_for(ensemble)["splits"]) == {"test"}
    assert ensemble_members(ensemble) == list(result.folds)


def test_the_ensembles_choice_is_made_on_out_of_fold_predictions(cv_run):
    config, result = cv_run
    tables, plain, flipped = [], [], []
    for fold in map(RunFolder, result.folds):
        val = run_parts(fold)["val"]
        model = open_run_model(fold)
        for tta, maps in ((False, plain), (True, flipped)):
            maps.extend(predict_table(model, val, config.image_size, config.resize, 4, tta)[0])
        tables.append(val)
    oof = pd.concat(tables, ignore_index=True)
    expected = postprocess_grid(oof, plain, flipped)
    ensemble = RunFolder(result.ensemble)
    saved = pd.read_csv(ensemble.evaluation / GRID_FILE)
    pd.testing.assert_frame_equal(saved, expected, check_exact=False, rtol=1e-9)
    record = ModelRecord.read(ensemble.evaluation / POSTPROCESS_FILE)
    assert record.chosen_on == cv.CHOSEN_ON
    assert record.covers("best.h5").sha256 == file_digest(ensemble.best)
    assert summary_for(ensemble)["postprocess"] == record.postprocess.to_dict()


def test_evaluate_reuses_the_out_of_fold_choice(cv_run, monkeypatch):
    from busi.evaluation import evaluator as evaluation

    ensemble = RunFolder(cv_run[1].ensemble)
    before = (ensemble.evaluation / POSTPROCESS_FILE).read_bytes()

    def no_choosing(*args, **kwargs):
        raise AssertionError("evaluate chose post-processing again")

    monkeypatch.setattr(evaluation, "postprocess_grid", no_choosing)
    summary = evaluation.evaluate(ensemble.root)
    assert (ensemble.evaluation / POSTPROCESS_FILE).read_bytes() == before
    assert set(summary["splits"]) == {"test"}
    with pytest.raises(ValueError, match="to score or to choose post-processing on; a busi cv"):
        evaluation.evaluate(ensemble.root, rechoose=True)
    with pytest.raises(ValueError, match="no validation images to score; "):
        evaluation.evaluate(ensemble.root, split="val")


def test_the_results_table_has_a_row_per_fold_and_one_for_the_ensemble(cv_run, tmp_path):
    from busi.evaluation.report import results_table, write_report

    _, result = cv_run
    rows = results_table([*result.folds, result.ensemble]).splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == \
        ["`tiny-fold0`", "`tiny-fold1`", "`tiny-ensemble`"]
    assert "mean of 2 folds' classic U-Net" in rows[2]
    assert "2 in 2 folds" in rows[2]  # one epoch each
    out = write_report(result.ensemble, tmp_path / "report")  # no training curves of its own
    assert (out / "metrics.md").is_file() and not (out / "curves.png").exists()


def test_the_ensemble_opens_predicts_publishes_and_exports(cv_run, busi_table, tmp_path):
    from busi.inference.publish import publish

    ensemble = RunFolder(cv_run[1].ensemble)
    record = ModelRecord.read(ensemble.evaluation / POSTPROCESS_FILE)
    model = open_model(ensemble.best)
    assert model.settings.postprocess == record.postprocess
    assert model.settings.verified_by == ensemble.state  # its SHA-256, as a trained run's
    written = publish(ensemble.root, tmp_path / "weights", export="tflite")
    names = sorted(path.name for path in written)
    assert names == ["tiny-ensemble.h5", "tiny-ensemble.json", "tiny-ensemble.md",
                     "tiny-ensemble.tflite"]
    sidecar = ModelRecord.read(tmp_path / "weights" / "tiny-ensemble.json")
    assert sidecar.chosen_on == cv.CHOSEN_ON and sidecar.postprocess == record.postprocess
    lite = open_model(tmp_path / "weights" / "tiny-ensemble.tflite")
    x = _inputs()
    np.testing.assert_allclose(lite.predict(x), model.predict(x), atol=FLOAT32_ATOL, rtol=0)
    masks = busi.predict(ensemble.best, busi_table["image_path"].iloc[0], tmp_path / "masks")
    assert len(masks) == 1


def test_a_resumed_cv_skips_finished_folds(cv_run, monkeypatch):

    config, result = cv_run
    watched = [RunFolder(fold).history for fold in result.folds] + \
        [RunFolder(fold).evaluation / SUMMARY_FILE for fold in (*result.folds, result.ensemble)] \
        + [RunFolder(result.ensemble).best]
    before = [path.stat().st_mtime_ns for path in watched]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(cv, "train", no_training)
    again = cv.cross_validate(config, folds=2)
    assert again == result
    assert [path.stat().st_mtime_ns for path in watched] == before


def test_the_command_resumes_and_prints_the_table(cv_run, tmp_path, capsys):
    config, result = cv_run
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["cv", "--config", str(path), "--folds", "2"]) == 0
    out = capsys.readouterr().out
    assert "fold 1 of 2" in out and "fold 2 of 2" in out
    assert "`tiny-ensemble`" in out and str(result.root) in out


def test_a_cv_folder_of_other_folds_or_settings_is_refused(cv_run):
    config, result = cv_run
    with pytest.raises(ValueError, match=r"holds 2 fold splits, 3 asked for \(--folds\)"):
        cv.prepare(config, 3)
    with pytest.raises(ValueError, match="made with other settings or data"):
        cv.prepare(config.replace(seed=7), 2)


# ------------------------------------------------------------------ folds with the image-level head


@pytest.fixture(scope="module")
def cv_head_run(busi_folder, tmp_path_factory):
    """(config, result) of a finished 2-fold cross-validation of a config with the head."""
    tmp = tmp_path_factory.mktemp("cv_head")
    config = tiny(busi_folder, tmp, image_head=True)
    return config, cv.cross_validate(config, folds=2)


def test_an_ensemble_of_folds_with_the_head_keeps_it_and_chooses_its_gate_out_of_fold(
        cv_run, cv_head_run):
    from busi.evaluation.classification import choose_gate, gate_curve
    from busi.inference.weights import load_for_inference
    from busi.models import heads

    config, result = cv_head_run
    ensemble = RunFolder(result.ensemble)
    assert heads.has_image_head(load_for_inference(ensemble.best))
    # the gate's curve of every fold's val images, each scored (ungated) by its own fold model
    # at its own post-processing, as the folds' evaluations chose the fold gates
    scored, p_lesion = [], []
    for fold in map(RunFolder, result.folds):
        val = run_parts(fold)["val"]
        post = ModelRecord.read(fold.evaluation / POSTPROCESS_FILE).postprocess
        maps, labels = predict_table(open_run_model(fold), val, config.image_size,
                                     config.resize, 4, post.tta)
        scored.append(score_table(val, maps, post.override(gate=0.0), truths=load_truths(val)))
        p_lesion.extend(heads.lesion_probability(labels))
    expected = gate_curve(pd.concat(scored, ignore_index=True), p_lesion)
    saved = pd.read_csv(ensemble.evaluation / "gate_out_of_fold.csv")
    # pooled means of folds against one mean of all the images: float64 sums reordered
    pd.testing.assert_frame_equal(saved, expected, check_dtype=False, rtol=1e-9)
    record = ModelRecord.read(ensemble.evaluation / POSTPROCESS_FILE)
    assert record.chosen_on == cv.CHOSEN_ON
    assert record.postprocess.gate == choose_gate(saved)
    summary = summary_for(ensemble)
    assert summary["postprocess"] == record.postprocess.to_dict()
    assert "classification" in summary["splits"]["test"]
    assert (ensemble.evaluation / "gate_test.csv").is_file()
    assert (ensemble.evaluation / "gate.png").is_file()
    assert not (ensemble.evaluation / "gate_val.csv").exists()  # it has no validation part
    # folds without the head: an ensemble of masks, no gate
    plain = RunFolder(cv_run[1].ensemble)
    assert not heads.has_image_head(load_for_inference(plain.best))
    assert not (plain.evaluation / "gate_out_of_fold.csv").exists()


def test_a_fold_curve_that_does_not_give_its_saved_gate_is_refused(cv_head_run, tmp_path):
    config, result = cv_head_run
    folds = [RunFolder(shutil.copytree(fold, tmp_path / fold.name)) for fold in result.folds]
    path = folds[1].evaluation / "gate_val.csv"
    curve = pd.read_csv(path)
    saved = ModelRecord.read(folds[1].evaluation / POSTPROCESS_FILE).postprocess.gate
    other = 0.5 if saved != 0.5 else 0.25  # a curve on which only this gate masks no normal
    curve["lesion_dice"] = 0.5
    curve["n_normal"] = curve["n_normal"].clip(lower=1)
    curve["normal_fp"] = np.where(curve["gate"] == other, 0, curve["n_normal"])
    path.write_text(curve.to_csv(index=False))
    with pytest.raises(ValueError, match="gate_val.csv: the validation gate curve does not give"):
        cv.out_of_fold_gate_curve(folds, config)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="gate_val.csv: missing"):
        cv.out_of_fold_gate_curve(folds, config)


def test_a_gate_chosen_out_of_fold_is_what_the_ensemble_is_scored_with(cv_head_run, monkeypatch):
    from busi.evaluation.classification import GATE_THRESHOLDS

    config, result = cv_head_run
    ensemble = RunFolder(result.ensemble)
    # a pooled curve on which 0.25 masks the fewest normal images at no cost in Dice
    curve = pd.DataFrame({"gate": GATE_THRESHOLDS, "lesion_dice": 0.5, "lesions_gated": 0,
                          "normal_fp": [3 if g < 0.25 else 0 for g in GATE_THRESHOLDS],
                          "n_lesion": 10, "n_normal": 5})
    monkeypatch.setattr(cv, "out_of_fold_gate_curve", lambda folds, config: curve)
    cv.build_ensemble(config, result.folds)
    record = ModelRecord.read(ensemble.evaluation / POSTPROCESS_FILE)
    assert record.postprocess.gate == 0.25
    summary = summary_for(ensemble)  # evaluated again: the choice changed, the weights did not
    assert summary["postprocess"]["gate"] == 0.25
    test = pd.read_csv(ensemble.evaluation / "per_image_test.csv")
    below = test["p_lesion"] < 0.25
    assert test.loc[below, "empty_pred"].astype(bool).all()
    monkeypatch.undo()
    cv.build_ensemble(config, result.folds)  # the fixture's own choice again
    assert summary_for(ensemble)["postprocess"] == \
        ModelRecord.read(ensemble.evaluation / POSTPROCESS_FILE).postprocess.to_dict()


def test_an_ensemble_made_without_the_head_is_made_again_for_folds_with_it(cv_head_run):
    import json

    from busi.inference.weights import load_for_inference
    from busi.models import heads
    from busi.runs.ensembles import ENSEMBLE_FILE

    config, result = cv_head_run
    ensemble = RunFolder(result.ensemble)
    path = ensemble.root / ENSEMBLE_FILE
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "image_head": False}))  # as a masks-only build left it
    cv.build_ensemble(config, result.folds)
    assert json.loads(path.read_text())["image_head"] is True
    assert heads.has_image_head(load_for_inference(ensemble.best))
    assert summary_for(ensemble) is not None  # evaluated again, for the new file
