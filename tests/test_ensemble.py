"""Several models as one (busi.training.ensemble): the mean of their masks, and of their class
probabilities when every member has the image-level head; and busi ensemble, finished runs on one
split averaged into a run folder that is evaluated like any run.

Tiny classic U-Nets (4 filters, depth 2, 32 px): random ones saved as .h5 for the model, two
runs of one epoch on the synthetic folder for the run folder (``pair``).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_train import tiny

import busi
from busi.cli import main
from busi.config.train_config import TrainConfig
from busi.data.splits import load_split, save_split
from busi.evaluation.report import results_table
from busi.inference.bundle import ModelRecord
from busi.inference.predictor import open_model
from busi.inference.publish import publish
from busi.inference.weights import load_for_inference, save_model
from busi.models import architectures as models
from busi.models import heads
from busi.runs.ensembles import CHOSEN_ON_VAL, ENSEMBLE_FILE, ensemble_kind, ensemble_members
from busi.runs.evaluations import POSTPROCESS_FILE, summary_for
from busi.runs.folder import RunFolder
from busi.training import ensemble

pytestmark = pytest.mark.slow

# Keras' Average layer and a hand-made mean add the same float32 maps; the only difference is
# the graph the members run in (the ensemble's graph may fuse or reorder float32 ops), which
# moves sigmoid outputs in [0, 1] by a few ulps (~1e-7).
MEAN_ATOL = 1e-6
# TFLite float32 reorders float32 sums (measured ~1e-6 on these models; see tests/test_export.py).
FLOAT32_ATOL = 1e-4


def _save(folder, seed: int, head: bool, size: int = 32):
    busi._keras.keras().utils.set_random_seed(seed)
    config = TrainConfig(architecture="classic_unet", base_filters=4, depth=2, image_size=size,
                         image_head=head)
    return save_model(models.build(config), folder / f"m{seed}-{head}-{size}.h5",
                      include_optimizer=False)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three tiny U-Nets with different random weights: without the head, with it, with it."""
    folder = tmp_path_factory.mktemp("members")
    return [_save(folder, 0, False), _save(folder, 1, True), _save(folder, 2, True)]


def _inputs(n: int = 3, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.repeat(rng.uniform(0, 255, (n, size, size, 1)).astype(np.float32), 3, axis=-1)


def _outputs(path, x) -> list[np.ndarray]:
    out = load_for_inference(path).predict_on_batch(x)
    return list(out) if isinstance(out, list) else [out]


# -------------------------------------------------------------------------- the model


def test_the_ensemble_gives_the_mean_of_its_members_masks(members, tmp_path):
    x = _inputs()
    masks = [_outputs(path, x)[0] for path in members[:2]]  # the head's model: [mask, label]
    assert not np.allclose(masks[0], masks[1], atol=1e-3)  # a mean that means something
    path = save_model(ensemble.ensemble_model(members[:2]), tmp_path / "ensemble.h5",
                      include_optimizer=False)
    model = load_for_inference(path)  # safe mode: nested models of standard layers
    assert [layer.name for layer in model.layers] == ["image", "fold0", "fold1", "mask"]
    np.testing.assert_allclose(model.predict_on_batch(x), np.mean(masks, axis=0),
                               atol=MEAN_ATOL, rtol=0)


def test_an_ensemble_of_headed_models_keeps_the_mean_of_their_class_probabilities(
        members, tmp_path):
    x = _inputs()
    outputs = [_outputs(path, x) for path in members[1:]]
    assert not np.allclose(outputs[0][1], outputs[1][1], atol=1e-3)
    path = save_model(ensemble.ensemble_model(members[1:], keep_head=True),
                      tmp_path / "headed.h5", include_optimizer=False)
    model = load_for_inference(path)
    assert heads.has_image_head(model)
    mask, label = model.predict_on_batch(x)
    np.testing.assert_allclose(mask, np.mean([o[0] for o in outputs], axis=0), atol=MEAN_ATOL,
                               rtol=0)
    np.testing.assert_allclose(label, np.mean([o[1] for o in outputs], axis=0), atol=MEAN_ATOL,
                               rtol=0)
    np.testing.assert_allclose(label.sum(axis=1), 1.0, atol=MEAN_ATOL)  # still probabilities


def test_an_ensemble_needs_two_models_of_one_input_size_and_heads_to_keep_one(members,
                                                                              tmp_path):
    with pytest.raises(ValueError, match="at least 2 models"):
        ensemble.ensemble_model(members[:1])
    other = _save(tmp_path, 0, False, size=64)
    with pytest.raises(ValueError, match="different inputs"):
        ensemble.ensemble_model([members[0], other])
    with pytest.raises(ValueError, match=rf"{members[0].name}: has no image-level head"):
        ensemble.ensemble_model(members[:2], keep_head=True)


# --------------------------------------------------------------------- busi ensemble


@pytest.fixture(scope="module")
def pair(busi_folder, tmp_path_factory):
    """Two finished one-epoch runs with the head on one split (seeds 1 and 2, split_seed 1),
    and their ensemble's folder."""
    tmp = tmp_path_factory.mktemp("pair")
    runs = []
    for seed in (1, 2):
        config = tiny(busi_folder, tmp, name=f"seed{seed}", run_dir=str(tmp / "runs" /
                      f"seed{seed}"), epochs=1, seed=seed, split_seed=1, image_head=True)
        busi.train(config)
        runs.append(RunFolder(config.directory))
    return runs, ensemble.combine_runs([run.root for run in runs], "pair")


def test_the_ensemble_of_runs_is_an_evaluated_run_folder_beside_them(pair):
    runs, root = pair
    run = RunFolder(root)
    assert root == runs[0].root.parent / "pair"
    assert load_split(run.split)[["id", "split"]].equals(
        load_split(runs[0].split)[["id", "split"]])
    assert ensemble_members(run) == [member.root for member in runs]
    assert ensemble_kind(run) == "runs"
    record = json.loads((root / ENSEMBLE_FILE).read_text())
    assert record["postprocess_chosen_on"] == CHOSEN_ON_VAL
    assert "class probabilities" in record["output"]
    config = run.load_config()
    assert config.image_head and config.name == "pair"
    assert config.split_file is None and config.split_seed == 1  # made again from the data
    assert "test" in summary_for(run)["splits"]
    chosen = json.loads((run.evaluation / POSTPROCESS_FILE).read_text())
    assert chosen["chosen_on"] == "val"
    assert heads.has_image_head(load_for_inference(run.best))


def test_the_results_table_calls_it_a_mean_of_runs(pair):
    runs, root = pair
    row = results_table([root]).splitlines()[-1]
    assert "mean of 2 runs'" in row and "2 in 2 runs" in row


def test_making_it_again_keeps_the_model_unless_a_member_changed(pair):
    runs, root = pair
    before = RunFolder(root).best.stat().st_mtime_ns
    ensemble.combine_runs([run.root for run in runs], "pair")
    assert RunFolder(root).best.stat().st_mtime_ns == before


def test_runs_on_other_splits_are_refused_by_file(pair, tmp_path):
    runs, _ = pair
    other = RunFolder(tmp_path / "other")
    other.root.mkdir()
    for name in ("config.json", "env.json", "best.h5", "state.json"):
        (other.root / name).write_bytes((runs[1].root / name).read_bytes())
    split = load_split(runs[1].split)
    train = split.index[split["split"] == "train"][0]
    test = split.index[split["split"] == "test"][0]
    split.loc[[train, test], "split"] = ["test", "train"]  # a test image trained on
    save_split(split, other.split)
    with pytest.raises(ValueError, match=rf"{other.split}: splits busi otherwise than "
                                         rf"{runs[0].split}"):
        ensemble.combine_runs([runs[0].root, other.root], "bad", tmp_path / "bad")


def _copy_run(run: RunFolder, folder) -> RunFolder:
    copy = RunFolder(folder)
    copy.root.mkdir(parents=True)
    for name in ("config.json", "env.json", "best.h5", "state.json", "split.csv"):
        (copy.root / name).write_bytes((run.root / name).read_bytes())
    return copy


def test_a_member_fine_tuned_from_a_run_on_another_split_is_refused(pair, tmp_path):
    runs, _ = pair
    start = _copy_run(runs[1], tmp_path / "start")
    split = load_split(start.split)
    train = split.index[split["split"] == "train"][0]
    test = split.index[split["split"] == "test"][0]
    split.loc[[train, test], "split"] = ["test", "train"]  # the start trained on a test image
    save_split(split, start.split)
    tuned = _copy_run(runs[0], tmp_path / "tuned")
    tuned.init_weights.write_text(json.dumps({"path": str(start.best)}))
    assert ensemble.sources(tuned) == [start]
    with pytest.raises(ValueError, match=rf"{start.split}: splits busi otherwise than"):
        ensemble.combine_runs([tuned.root, runs[1].root], "bad", tmp_path / "bad")
    published = tmp_path / "weights" / "x.h5"
    published.parent.mkdir()
    tuned.init_weights.write_text(json.dumps({"path": str(published)}))
    with pytest.raises(ValueError, match="not a run's weights beside its split.csv"):
        ensemble.combine_runs([tuned.root, runs[1].root], "bad", tmp_path / "bad")


def test_ensembles_other_runs_folders_and_other_settings_are_refused(pair, tmp_path):
    runs, root = pair
    with pytest.raises(ValueError, match=rf"{root}: is an ensemble"):
        ensemble.combine_runs([root, runs[0].root], "twice", tmp_path / "twice")
    other = _copy_run(runs[0], tmp_path / "other")
    with pytest.raises(ValueError, match=rf"{other.root}: a run folder that is not an ensemble"):
        ensemble.combine_runs([runs[0].root, runs[1].root], "other", other.root)
    assert (other.root / "best.h5").read_bytes() == runs[0].best.read_bytes()  # left alone
    limited = _copy_run(runs[1], tmp_path / "limited")
    limited_config = limited.load_config().replace(limit=4)
    limited_config.save(limited.config)
    with pytest.raises(ValueError, match=rf"{limited.config}: limit 4, but"):
        ensemble.combine_runs([runs[0].root, limited.root], "lim", tmp_path / "lim")


def test_one_run_or_an_untrained_one_is_refused(pair, tmp_path):
    runs, _ = pair
    with pytest.raises(ValueError, match="at least 2 runs"):
        ensemble.combine_runs([runs[0].root], "one", tmp_path / "one")
    with pytest.raises(FileNotFoundError, match="best.h5: not found"):
        ensemble.combine_runs([runs[0].root, tmp_path / "empty"], "two", tmp_path / "two")
    with pytest.raises(ValueError, match="is one of the members"):
        ensemble.combine_runs([runs[0].root, runs[1].root], "seed1", runs[0].root)


def test_the_joint_split_is_the_union_of_the_members_datasets(pair, tmp_path):
    runs, _ = pair
    busi_split = load_split(runs[0].split)
    other = pd.DataFrame({"id": ["a", "b", "c"], "label": ["benign"] * 3,
                          "group": [1000, 1001, 1002], "split": ["train", "val", "test"],
                          "dataset": "busbra"})
    joint = RunFolder(tmp_path / "joint")
    joint.root.mkdir()
    config = runs[0].load_config().replace(datasets=("busi", "busbra"))
    config.save(joint.config)
    save_split(pd.concat([busi_split.assign(dataset="busi"), other], ignore_index=True),
               joint.split)
    combined = ensemble.combined_split([runs[0], joint])
    assert list(combined["dataset"].unique()) == ["busi", "busbra"]
    assert combined[combined["dataset"] == "busbra"]["split"].tolist() == ["train", "val",
                                                                          "test"]


def test_the_command_prints_the_rows_of_the_ensemble_and_its_evaluated_members(pair, capsys):
    runs, root = pair
    args = ["ensemble", str(runs[0].root), str(runs[1].root), "--name", "pair"]
    assert main(args) in (0, None)
    out = capsys.readouterr().out
    assert out.count("\n| `") == 1 and f"in {root}" in out  # the members were not evaluated
    busi.evaluate(runs[0].root)
    assert main(args) in (0, None)
    out = capsys.readouterr().out
    assert out.count("\n| `") == 2 and "| `seed1`" in out


def test_the_headed_ensemble_publishes_exports_and_predicts_classes(pair, busi_table, tmp_path):
    runs, root = pair
    run = RunFolder(root)
    written = publish(run.root, tmp_path / "weights", export="tflite")
    assert sorted(path.name for path in written) == ["pair.h5", "pair.json", "pair.md",
                                                     "pair.tflite"]
    sidecar = ModelRecord.read(tmp_path / "weights" / "pair.json")
    assert sidecar.postprocess == ModelRecord.read(run.evaluation / POSTPROCESS_FILE).postprocess
    model, lite = open_model(run.best), open_model(tmp_path / "weights" / "pair.tflite")
    x = _inputs()
    for ours, theirs in zip(lite.predict(x), model.predict(x), strict=True):  # mask, classes
        np.testing.assert_allclose(ours, theirs, atol=FLOAT32_ATOL, rtol=0)
    out = tmp_path / "masks"
    table = busi.predict(tmp_path / "weights" / "pair.h5", busi_table["image_path"].iloc[0], out)
    assert len(table) == 1 and "p_lesion" in table and (out / "classes.csv").is_file()
