"""Evaluation: post-processing, exact scores of controlled predictions, summaries, and the rule
that post-processing is chosen on validation images only."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import busi
from busi.data.geometry import to_model
from busi.data.masks import load_example, load_truths
from busi.evaluation import evaluator as ev
from busi.evaluation import score_tables as st
from busi.evaluation.postprocess_choice import postprocess_grid, select_postprocess
from busi.inference.bundle import postprocess_for
from busi.inference.postprocess import PostProcess
from busi.inference.predictor import predict_probabilities

SIZE = 32


def lesion_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["label"] != "normal"]


@pytest.fixture(scope="module")
def truths(busi_table: pd.DataFrame) -> list[np.ndarray]:
    return load_truths(busi_table)


class LookupModel:
    """A fake "perfect" model: returns the model-size mask of each image it was built with.

    Images are recognised by their exact bytes at model size, mirrored ones too, so flip TTA
    gets the mirrored mask. The only error left is the resize back to the original size.
    """

    def __init__(self, table: pd.DataFrame, size: int = SIZE, mode: str = "letterbox"):
        self.masks: dict[bytes, np.ndarray] = {}
        self.calls = 0
        for row in table.to_dict("records"):
            image, mask = load_example(row)
            for im, ma in ((image, mask), (image[:, ::-1], mask[:, ::-1])):
                small, small_mask, _ = to_model(im, ma, size=size, mode=mode)
                self.masks[small.tobytes()] = small_mask.astype(np.float32)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        keys = [image[..., 0].astype(np.uint8).tobytes() for image in batch]
        return np.stack([self.masks[key] for key in keys])[..., np.newaxis]


def darkness_model(input_size: int = SIZE):
    """A real Keras model whose output we know: p = sigmoid((100 - mean(rgb)) / 20).

    The synthetic lesions are dark, so it segments them roughly and its probabilities vary
    smoothly, which makes the choice of threshold matter. Only standard layers: it saves to .h5.
    """
    keras = busi._keras.keras()
    inputs = keras.Input((input_size, input_size, 3))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    outputs = conv(inputs)
    model = keras.Model(inputs, outputs)
    conv.set_weights([np.full((1, 1, 3, 1), -1 / 60, np.float32), np.array([5.0], np.float32)])
    return model


# ------------------------------------------------------------------------ postprocess


def test_postprocess_threshold_is_strict_and_accepts_a_channel_axis() -> None:
    prob = np.array([[0.2, 0.5], [0.51, 0.9]], np.float32)
    assert PostProcess(threshold=0.5).apply(prob).tolist() == [[0, 0], [1, 1]]
    assert PostProcess(threshold=0.1).apply(prob[..., None]).tolist() == [[1, 1], [1, 1]]
    assert PostProcess(threshold=0.5).apply(prob).dtype == np.uint8


def test_postprocess_removes_small_components_and_keeps_the_largest() -> None:
    prob = np.zeros((100, 100), np.float32)
    prob[10:40, 10:40] = 0.9  # 900 px
    prob[60:70, 60:70] = 0.9  # 100 px = 1% of the image
    prob[90:92, 5:7] = 0.9  # 4 px
    assert PostProcess().apply(prob).sum() == 1004
    assert PostProcess(min_component_fraction=0.001).apply(prob).sum() == 1000
    assert PostProcess(min_component_fraction=0.02).apply(prob).sum() == 900
    largest = PostProcess(keep_largest=True).apply(prob)
    assert largest.sum() == 900 and largest[10:40, 10:40].all()
    assert PostProcess(min_component_fraction=0.5, keep_largest=True).apply(prob).sum() == 0


def test_postprocess_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="threshold"):
        PostProcess(threshold=1.5).apply(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="shape"):
        PostProcess().apply(np.zeros((2, 4, 4)))


def test_postprocess_dict_form_is_what_files_hold() -> None:
    """postprocess.json, summaries and sidecars hold these four keys; other keys are ignored."""
    recorded = {"threshold": 0.3, "tta": True, "min_component_fraction": 0.001,
                "keep_largest": False, "model_sha1": "0" * 40, "val_lesion_dice": 0.7}
    post = PostProcess.from_dict(recorded)
    assert post.to_dict() == {"threshold": 0.3, "tta": True, "min_component_fraction": 0.001,
                              "keep_largest": False}
    assert list(post.to_dict()) == list(PostProcess.required_keys())
    gated = PostProcess.from_dict({**recorded, "gate": 0.35})
    assert gated.to_dict()["gate"] == 0.35 and list(gated.to_dict()) == list(PostProcess.keys())
    assert PostProcess.from_dict(None) == PostProcess.from_dict({}) == PostProcess()
    assert PostProcess.from_dict({"threshold": 1}).to_dict()["threshold"] == 1.0
    changed = post.override(threshold=None, tta=False)  # None: keep the recorded value
    assert (changed.threshold, changed.tta) == (0.3, False)


# ------------------------------------------------------- exact scores of known predictions


def test_perfect_predictions_score_one(busi_table: pd.DataFrame, truths) -> None:
    probs = [t.astype(np.float32) for t in truths]
    per_image = st.score_table(busi_table, probs, PostProcess(threshold=0.5))
    assert list(per_image.columns) == st.PER_IMAGE_COLUMNS
    assert list(per_image["id"]) == list(busi_table["id"])
    assert np.allclose(per_image["dice"], 1.0) and np.allclose(per_image["iou"], 1.0)
    summary = st.summarize(per_image)
    n_lesion = len(lesion_rows(busi_table))
    assert summary["lesion"]["n"] == n_lesion
    assert summary["lesion"]["dice_mean"] == pytest.approx(1.0)
    assert summary["lesion"]["hd95_median"] == pytest.approx(0.0)
    assert summary["lesion"]["missed"] == 0
    assert summary["benign"]["n"] + summary["malignant"]["n"] == n_lesion
    assert summary["normal"] == {"n": 5, "false_positives": 0, "false_positive_rate": 0.0}


def test_empty_predictions_miss_every_lesion(busi_table: pd.DataFrame, truths) -> None:
    probs = [np.zeros(t.shape, np.float32) for t in truths]
    per_image = st.score_table(busi_table, probs, truths=truths)
    summary = st.summarize(per_image)
    n_lesion = len(lesion_rows(busi_table))
    assert summary["lesion"]["missed"] == n_lesion
    assert summary["lesion"]["dice_mean"] == pytest.approx(0.0)
    assert summary["lesion"]["recall_mean"] == pytest.approx(0.0)
    assert summary["lesion"]["hd95_undefined"] == n_lesion
    assert math.isnan(summary["lesion"]["hd95_median"])
    assert summary["normal"]["false_positive_rate"] == 0.0
    assert per_image["empty_pred"].all()


def test_false_positive_rate_on_normals_stays_out_of_lesion_figures(
    busi_table: pd.DataFrame, truths
) -> None:
    probs = [t.astype(np.float32) for t in truths]
    normal_positions = [i for i, label in enumerate(busi_table["label"]) if label == "normal"]
    for i in normal_positions[:2]:  # a speck on two of the five normal images
        probs[i] = probs[i].copy()
        probs[i][3:6, 3:6] = 0.9
    summary = st.summarize(st.score_table(busi_table, probs, truths=truths))
    assert summary["normal"] == {"n": 5, "false_positives": 2, "false_positive_rate": 0.4}
    assert summary["lesion"]["dice_mean"] == pytest.approx(1.0)
    # component filtering removes the 9-pixel specks (< 1% of a ~50x60 image)
    filtered = st.summarize(
        st.score_table(busi_table, probs, PostProcess(min_component_fraction=0.01), truths=truths)
    )
    assert filtered["normal"]["false_positives"] == 0


def test_half_lesion_prediction_has_known_scores(busi_table: pd.DataFrame, truths) -> None:
    row = next(i for i, label in enumerate(busi_table["label"]) if label == "benign")
    truth = truths[row]
    half = truth.copy()
    ys, _ = np.nonzero(truth)
    half[ys.min() + (ys.max() - ys.min()) // 2 + 1 :] = 0  # keep the top part only
    table = busi_table.iloc[[row]]
    scores = st.score_table(table, [half.astype(np.float32)], truths=[truth]).iloc[0]
    kept, total = half.sum(), truth.sum()
    assert scores["precision"] == pytest.approx(1.0)
    assert scores["recall"] == pytest.approx(kept / total)
    assert scores["dice"] == pytest.approx(2 * kept / (kept + total))
    assert scores["iou"] == pytest.approx(kept / total)


def test_score_table_rejects_model_size_maps(busi_table: pd.DataFrame, truths) -> None:
    probs = [np.zeros((SIZE, SIZE), np.float32) for _ in truths]
    with pytest.raises(ValueError, match="original size"):
        st.score_table(busi_table, probs, truths=truths)
    with pytest.raises(ValueError, match="rows"):
        st.score_table(busi_table, probs[:3], truths=truths)


# -------------------------------------------------------------------- predictions


def test_predictions_come_back_at_original_size(busi_table: pd.DataFrame, truths) -> None:
    model = LookupModel(busi_table)
    for tta in (False, True):
        probs = predict_probabilities(model, busi_table, image_size=SIZE, batch_size=4, tta=tta)
        assert [p.shape for p in probs] == [t.shape for t in truths]
        assert all(p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1 for p in probs)
        summary = st.summarize(st.score_table(busi_table, probs, truths=truths))
        # 32x32 loses detail, but a perfect model must still look nearly perfect
        assert summary["lesion"]["dice_mean"] > 0.8
        assert summary["normal"]["false_positive_rate"] == 0.0


def test_tta_averages_the_mirrored_prediction(busi_table: pd.DataFrame) -> None:
    rows = busi_table.head(3)

    def left_half(batch: np.ndarray) -> np.ndarray:  # "lesion" = the left half of the input
        out = np.zeros(batch.shape[:3] + (1,), np.float32)
        out[:, :, : batch.shape[2] // 2] = 1.0
        return out

    plain = predict_probabilities(left_half, rows, image_size=SIZE, resize="stretch")
    averaged = predict_probabilities(left_half, rows, image_size=SIZE, resize="stretch", tta=True)
    for p, a in zip(plain, averaged, strict=True):
        assert p[:, 0].min() == pytest.approx(1.0) and p[:, -1].max() == pytest.approx(0.0)
        assert np.allclose(a[:, [0, -1]], 0.5)  # left and mirrored-left disagree at the edges


def test_untrained_unet_runs_end_to_end(busi_table: pd.DataFrame) -> None:
    model = busi.classic_unet(input_shape=(SIZE, SIZE, 3), base_filters=4, depth=2)
    per_image, summary = st.evaluate_model(model, busi_table, PostProcess(threshold=0.5, tta=True))
    assert len(per_image) == len(busi_table)
    assert summary["lesion"]["n"] == len(lesion_rows(busi_table))
    assert 0 <= summary["normal"]["false_positive_rate"] <= 1
    assert per_image["dice"].between(0, 1).all()


def test_model_without_a_fixed_size_needs_size(busi_table: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="size"):
        predict_probabilities(LookupModel(busi_table), busi_table.head(1))


# ------------------------------------------------------------ choosing on validation


def test_selection_rule_prefers_dice_then_fewer_false_positives_then_simplicity() -> None:
    rows = [
        # tta, threshold, min_fraction, keep_largest, dice, fp
        (False, 0.5, 0.0, False, 0.800, 0.6),
        (False, 0.3, 0.0, False, 0.803, 0.6),
        (True, 0.5, 0.0, False, 0.804, 0.2),
        (False, 0.6, 0.001, False, 0.802, 0.2),
        (False, 0.7, 0.0, False, 0.700, 0.0),
    ]
    columns = ["tta", "threshold", "min_component_fraction", "keep_largest", "lesion_dice",
               "normal_fp_rate"]
    grid = pd.DataFrame(rows, columns=columns).assign(n_lesion=10, n_normal=5)
    chosen = select_postprocess(grid, tolerance=0.005)
    # among the tied (>= 0.799): fewest false positives (0.2: rows 3 and 4), then no TTA
    assert (chosen["threshold"], chosen["tta"], chosen["min_component_fraction"]) == (
        0.6, False, 0.001)
    # no normals in val: simplicity decides among the tied
    chosen = select_postprocess(grid.assign(normal_fp_rate=math.nan), tolerance=0.005)
    assert (chosen["threshold"], chosen["tta"]) == (0.5, False)
    assert chosen["val_normal_fp_rate"] is None
    # with no tolerance the best Dice wins outright
    assert select_postprocess(grid, tolerance=0.0)["tta"] is True


def test_grid_needs_lesion_images(busi_table: pd.DataFrame) -> None:
    normals = busi_table[busi_table["label"] == "normal"]
    probs = [np.zeros((h, w), np.float32) for h, w in zip(normals["height"], normals["width"],
                                                          strict=True)]
    with pytest.raises(ValueError, match="no lesion"):
        postprocess_grid(normals, probs)


def test_choosing_on_val_finds_the_threshold_of_the_masks(busi_table: pd.DataFrame) -> None:
    """If the val masks are the model's own prediction at 0.7, threshold 0.7 scores Dice 1
    (the grid search and selection rule evaluate() uses)."""
    model = darkness_model()
    lesions = lesion_rows(busi_table).head(6)
    probs = predict_probabilities(model, lesions)
    truths = [PostProcess(threshold=0.7).apply(p) for p in probs]
    grid = postprocess_grid(lesions, probs, truths=truths)
    chosen = select_postprocess(grid)
    assert chosen["threshold"] == 0.7 and chosen["val_lesion_dice"] == pytest.approx(1.0)
    assert (chosen["tta"], chosen["min_component_fraction"], chosen["keep_largest"]) == (
        False, 0.0, False)


# ------------------------------------------------------------------------ run folders


def _write_masks(table: pd.DataFrame, masks: list[np.ndarray]) -> None:
    """Replace the masks of some images in a copied dataset (extra mask files removed)."""
    for row, mask in zip(table.to_dict("records"), masks, strict=True):
        for path in row["mask_paths"]:
            Path(path).unlink()
        first = Path(row["mask_paths"][0])
        cv2.imwrite(str(first), mask * 255)


def make_run(tmp_path: Path, busi_folder: Path) -> tuple[Path, Path]:
    """A run folder (config, split, best.h5 = the darkness model) on a copy of the dataset."""
    from busi.config.train_config import TrainConfig

    root = tmp_path / "data"
    shutil.copytree(busi_folder, root / busi_folder.name)
    data_root = root / busi_folder.name
    run = tmp_path / "run"
    run.mkdir()
    config = TrainConfig(name="t", data=str(data_root), run_dir=str(run), image_size=SIZE,
                         architecture="classic_unet", encoder_weights=None, batch_size=4)
    config.save(run / "config.json")
    table = busi.data.add_groups(busi.data.index(data_root))
    split = busi.data.make_split(busi.data.drop_conflicts(table), val_fraction=0.25,
                                 test_fraction=0.25, seed=0)
    busi.data.save_split(split, run / "split.csv")
    busi.save_model(darkness_model(), run / "best.h5")
    return run, data_root


def _set_lesion_masks(run: Path, data_root: Path, part: str, threshold: float) -> None:
    """Make the lesion masks of one part equal to the model's prediction at ``threshold``."""
    table = busi.data.index(data_root)
    split = busi.data.load_split(run / "split.csv")
    rows = lesion_rows(busi.data.select(table, split, part))
    probs = predict_probabilities(darkness_model(), rows, batch_size=4)
    _write_masks(rows, [PostProcess(threshold=threshold).apply(p) for p in probs])


def test_evaluate_chooses_on_val_and_ignores_test_masks(
    tmp_path: Path, busi_folder: Path
) -> None:
    run, data_root = make_run(tmp_path, busi_folder)
    _set_lesion_masks(run, data_root, "val", 0.8)
    _set_lesion_masks(run, data_root, "test", 0.3)
    summary = ev.evaluate(run)
    chosen = json.loads((run / "evaluation" / "postprocess.json").read_text())
    assert chosen["threshold"] == 0.8  # the val optimum, not the test one (0.3)
    assert chosen["chosen_on"] == "val"
    assert summary["postprocess"]["threshold"] == 0.8
    assert summary["splits"]["val"]["lesion"]["dice_mean"] == pytest.approx(1.0, abs=0.01)
    assert summary["splits"]["test"]["lesion"]["dice_mean"] < 0.99
    for name in ("per_image_val.csv", "per_image_test.csv", "summary.json",
                 "postprocess_grid.csv"):
        assert (run / "evaluation" / name).is_file()
    per_test = pd.read_csv(run / "evaluation" / "per_image_test.csv")
    split = busi.data.load_split(run / "split.csv")
    assert set(per_test["id"]) == set(split.loc[split["split"] == "test", "id"])
    json.loads((run / "evaluation" / "summary.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))

    # Changing the test masks again changes test scores, never the choice.
    _set_lesion_masks(run, data_root, "test", 0.5)
    again = ev.evaluate(run, rechoose=True)
    assert again["postprocess"] == summary["postprocess"]
    assert again["splits"]["test"] != summary["splits"]["test"]
    # ...while changing the val masks does change it (the test above can fail).
    _set_lesion_masks(run, data_root, "val", 0.4)
    moved = ev.evaluate(run, rechoose=True)
    assert moved["postprocess"]["threshold"] == 0.4


def test_evaluate_reuses_a_saved_choice_for_the_same_weights(
    tmp_path: Path, busi_folder: Path
) -> None:
    run, _ = make_run(tmp_path, busi_folder)
    ev.evaluate(run, split="val")
    saved = run / "evaluation" / "postprocess.json"
    values = json.loads(saved.read_text())
    values["threshold"] = 0.9  # an edited (or earlier) choice for the same weights is reused
    saved.write_text(json.dumps(values))
    assert ev.evaluate(run, split="val")["postprocess"]["threshold"] == 0.9
    assert postprocess_for(run / "best.h5")["threshold"] == 0.9
    # other weights: a separate folder, and the saved choice is not used for them
    busi.save_model(darkness_model(), run / "other.h5")
    other = ev.evaluate(run, split="val", model_path=run / "other.h5")
    assert (run / "evaluation" / "other" / "postprocess.json").is_file()
    assert other["model"] == "other.h5"
    assert json.loads(saved.read_text())["threshold"] == 0.9


def test_evaluation_writes_the_record_of_the_weights_it_evaluated(
    tmp_path: Path, busi_folder: Path
) -> None:
    """postprocess.json is the weights' model record (version 2, their digests): prediction
    takes its settings only for those very bytes, and the run's state.json guards the file."""
    from busi.inference.bundle import VERSION, ModelRecord
    from busi.inference.predictor import open_model
    from busi.runs.folder import RunFolder
    from busi.utils.digests import DigestMismatchError, file_digest

    run, _ = make_run(tmp_path, busi_folder)
    RunFolder(run).write_record(run / "state.json",
                                {"epoch": 1, "sha256": {"best.h5": file_digest(run / "best.h5")}})
    ev.evaluate(run, split="val")
    record = ModelRecord.read(run / "evaluation" / "postprocess.json")
    assert record.version == VERSION and record.chosen_on == "val"
    assert record.covers("best.h5").sha256 == file_digest(run / "best.h5")
    assert (record.image_size, record.resize) == (SIZE, "letterbox")
    model = open_model(run / "best.h5")
    assert model.settings.record == record and model.settings.verified_by == run / "state.json"
    import h5py

    with h5py.File(run / "best.h5", "r+") as handle:  # a weight changed: the file still loads
        weights = []
        handle["model_weights"].visititems(
            lambda _, obj: weights.append(obj) if isinstance(obj, h5py.Dataset) else None)
        weights[0][...] = np.asarray(weights[0]) + 1.0
    with pytest.raises(DigestMismatchError, match=r"best\.h5: its SHA-256 differs from the one "
                                                  r"training recorded in .*state\.json"):
        ev.evaluate(run, split="val")


def test_the_runs_masks_are_the_masks_evaluation_scored(tmp_path: Path, busi_folder: Path) -> None:
    """run_predictions opens the run as evaluate does: same images, weights and
    post-processing, so figures show what was scored."""
    from busi.inference.run_models import run_predictions
    from busi.runs.evaluations import per_image, summary_for
    from busi.runs.folder import RunFolder

    run, data_root = make_run(tmp_path, busi_folder)
    _set_lesion_masks(run, data_root, "val", 0.7)
    ev.evaluate(run)
    folder = RunFolder(run)
    table, masks = run_predictions(folder, "test")
    scores = per_image(folder, "test")
    assert list(table["id"]) == list(scores["id"])
    rescored = st.score_table(table, [masks[i].astype(np.float32) for i in table["id"]])
    assert np.allclose(rescored["dice"], scores["dice"])
    assert summary_for(folder)["postprocess"] == PostProcess.from_dict(
        postprocess_for(folder.best)).to_dict()


def test_masks_on_another_dataset_wait_for_the_runs_own_choice(
    tmp_path: Path, busi_folder: Path, busbra_folder: Path
) -> None:
    """Another dataset is scored with the post-processing chosen on the run's validation data;
    before that choice exists, figures of it would show default masks, so they are refused."""
    from busi.inference.run_models import run_predictions
    from busi.runs.folder import RunFolder

    run, _ = make_run(tmp_path, busi_folder)
    with pytest.raises(ValueError, match="no post-processing chosen on validation yet"):
        run_predictions(RunFolder(run), "all", dataset="busbra", data=busbra_folder)
    ev.evaluate(run, split="val")
    table, masks = run_predictions(RunFolder(run), "all", dataset="busbra", data=busbra_folder)
    assert len(masks) == len(table) > 0


@pytest.mark.busi_data
def test_real_images_are_scored_at_their_own_size(real_table: pd.DataFrame) -> None:
    rows = real_table.groupby("label").head(2)
    model = LookupModel(rows, size=64)
    probs = predict_probabilities(model, rows, image_size=64, tta=True)
    assert [p.shape for p in probs] == list(zip(rows["height"], rows["width"], strict=True))
    summary = st.summarize(st.score_table(rows, probs))
    assert summary["lesion"]["n"] == 4 and summary["lesion"]["dice_mean"] > 0.85
    assert summary["normal"]["false_positive_rate"] == 0.0
