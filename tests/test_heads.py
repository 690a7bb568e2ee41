"""The image-level head: model, targets and loss, gate, classification scores."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from test_weights import clean_env

import busi
from busi.evaluation import classification
from busi.inference.postprocess import PostProcess
from busi.models import architectures as models
from busi.models import heads

# ------------------------------------------------------------------ targets and loss (no model)


def _table(labels, datasets=None):
    table = pd.DataFrame({"label": labels})
    if datasets is not None:
        table["dataset"] = datasets
    return table


def test_targets_weigh_classes_and_flag_lesion_only_datasets():
    table = _table(["normal", "benign", "benign", "malignant"], ["busi", "busi", "busbra",
                                                                  "busi"])
    weights = heads.class_weights(table, balance=True)
    # inverse frequency, mean 1 over the rows: 4 / (3 * count)
    assert weights == pytest.approx({"normal": 4 / 3, "benign": 2 / 3, "malignant": 4 / 3})
    targets = heads.label_targets(table, weights)
    np.testing.assert_allclose(targets, [[4 / 3, 0, 0, 0], [0, 2 / 3, 0, 0], [0, 2 / 3, 0, 1],
                                         [0, 0, 4 / 3, 0]], rtol=1e-6)
    assert heads.class_weights(table, balance=False) == dict.fromkeys(heads.CLASSES, 1.0)
    with pytest.raises(ValueError, match="lesion"):
        heads.label_targets(_table(["lesion"]))


def test_loss_of_lesion_only_rows_ignores_the_normal_class():
    """A BUS-BRA row is scored on benign vs malignant only: moving probability between normal
    and the lesion classes in proportion leaves its loss unchanged, and a BUSI row's does not."""
    loss = heads.image_label_loss
    flagged = np.array([[0, 1, 0, 1]], np.float32)
    plain = np.array([[0, 1, 0, 0]], np.float32)
    confident = np.array([[0.0, 0.8, 0.2]], np.float32)
    unsure = np.array([[0.5, 0.4, 0.1]], np.float32)  # same benign share among lesions
    assert float(loss(flagged, confident)[0]) == pytest.approx(float(loss(flagged, unsure)[0]),
                                                               rel=1e-5)
    assert float(loss(plain, unsure)[0]) > float(loss(plain, confident)[0]) + 0.5
    assert float(loss(plain, confident)[0]) == pytest.approx(-np.log(0.8), rel=1e-5)
    weighted = np.array([[0, 2, 0, 0]], np.float32)
    assert float(loss(weighted, confident)[0]) == pytest.approx(-2 * np.log(0.8), rel=1e-5)


def test_probability_table_names_the_class_and_conditional_malignancy():
    table = heads.probability_table(["a.png", "b.png"], np.array([[0.7, 0.2, 0.1],
                                                                   [0.1, 0.3, 0.6]]))
    assert list(table["class"]) == ["normal", "malignant"]
    np.testing.assert_allclose(table["p_lesion"], [0.3, 0.9])
    np.testing.assert_allclose(table["p_malignant_given_lesion"], [1 / 3, 2 / 3])


# ------------------------------------------------------------------------------------ the gate


def _per_image():
    return pd.DataFrame({
        "id": list("abcde"), "label": ["benign", "malignant", "benign", "normal", "normal"],
        # d: a false positive on a normal image, e: a normal image left empty (score_image's
        # conventions: Dice 0 and 1)
        "dice": [0.9, 0.8, 0.7, 0.0, 1.0], "iou": [0.8, 0.7, 0.6, 0.0, 1.0],
        "precision": [0.9] * 3 + [0.0, 1.0], "recall": [0.9] * 3 + [np.nan, 1.0],
        "hd95": [3.0] * 3 + [np.nan, 0.0], "pred_pixels": [10, 10, 10, 5, 0],
        "empty_truth": [False, False, False, True, True],
        "empty_pred": [False, False, False, False, True],
    })


def test_gate_empties_masks_below_it_and_the_curve_counts_the_cost():
    per_image, p_lesion = _per_image(), [0.9, 0.6, 0.2, 0.3, 0.1]
    curve = classification.gate_curve(per_image, p_lesion, thresholds=(0.0, 0.25, 0.5))
    assert list(curve["normal_fp"]) == [1, 1, 0]
    np.testing.assert_allclose(curve["lesion_dice"], [0.8, 1.7 / 3, 1.7 / 3])  # c: Dice 0
    assert list(curve["lesions_gated"]) == [0, 1, 1]
    after = classification.gated(per_image, p_lesion, 0.5).set_index("id")
    # a gated lesion image is a missed lesion, a gated normal image a correct "nothing"
    assert after.loc["c", "dice"] == 0 and after.loc["c", "empty_pred"]
    assert after.loc["d", "dice"] == 1 and after.loc["d", "empty_pred"]
    assert after.loc["a", "dice"] == 0.9  # above the gate: unchanged
    # the loss of Dice at 0.25 and 0.5 is beyond tolerance: no gate
    assert classification.choose_gate(curve) == 0.0
    assert classification.choose_gate(curve, tolerance=0.3) == 0.5

    post = PostProcess(gate=0.5)
    prob = np.full((4, 4), 0.9, np.float32)
    assert post.apply(prob, lesion_probability=0.49).sum() == 0
    assert post.apply(prob, lesion_probability=0.5).sum() == 16
    with pytest.raises(ValueError, match="image-level head"):
        post.apply(prob)
    assert PostProcess().apply(prob).sum() == 16  # no gate: no probability needed
    assert PostProcess.from_dict({"threshold": 0.4}).gate == 0.0  # older records: no gate


def test_pooled_gate_curves_are_the_curve_of_all_the_images():
    per_image, p_lesion = _per_image(), np.array([0.9, 0.6, 0.2, 0.3, 0.1])
    thresholds = (0.0, 0.25, 0.5, 0.95)
    whole = classification.gate_curve(per_image, p_lesion, thresholds)
    parts = [[0, 3], [1, 2, 4]]  # disjoint image sets, as a cross-validation's folds
    curves = [classification.gate_curve(per_image.iloc[rows].reset_index(drop=True),
                                        p_lesion[rows], thresholds) for rows in parts]
    pooled = classification.pool_gate_curves(curves)
    # the pooled mean is a weighted sum of means, the whole's a plain one: float64 reorders
    pd.testing.assert_frame_equal(pooled, whole, check_dtype=False, rtol=1e-12)
    assert classification.choose_gate(pooled) == classification.choose_gate(whole)
    lesions, normals = ([classification.gate_curve(per_image.iloc[rows].reset_index(drop=True),
                                                   p_lesion[rows], thresholds)]
                        for rows in ([0, 1, 2], [3, 4]))
    assert normals[0]["lesion_dice"].isna().all()  # a fold without lesion images weighs nothing
    pd.testing.assert_frame_equal(classification.pool_gate_curves(normals + lesions), whole,
                                  check_dtype=False, rtol=1e-12)
    other = classification.gate_curve(per_image, p_lesion, (0.0, 0.5))
    with pytest.raises(ValueError, match="fold1.csv: other gate thresholds than fold0.csv"):
        classification.pool_gate_curves([whole, other], ["fold0.csv", "fold1.csv"])
    with pytest.raises(ValueError, match="no gate curves"):
        classification.pool_gate_curves([])


# ---------------------------------------------------------------------- classification scores


def test_classification_summary_against_known_answers():
    labels = ["normal"] * 4 + ["benign"] * 4 + ["malignant"] * 4
    perfect = np.array([[0.9, 0.05, 0.05]] * 4 + [[0.1, 0.8, 0.1]] * 4 + [[0.1, 0.2, 0.7]] * 4)
    summary = classification.classification_summary(labels, perfect, draws=200)
    assert summary["lesion_vs_normal_auc"] == 1.0
    assert summary["benign_vs_malignant_auc"] == 1.0
    assert summary["accuracy"] == 1.0
    assert summary["confusion"] == [[4, 0, 0], [0, 4, 0], [0, 0, 4]]
    low, high = summary["accuracy_ci"]
    assert low == high == 1.0

    rng = np.random.default_rng(0)
    noise = rng.dirichlet([1, 1, 1], size=300)
    labels = rng.choice(heads.CLASSES, size=300)
    summary = classification.classification_summary(labels, noise, draws=300)
    # random scores: AUC near 0.5 and the interval holds it (300 images: CI width ~0.13)
    for key in ("lesion_vs_normal_auc", "benign_vs_malignant_auc"):
        low, high = summary[f"{key}_ci"]
        assert low < 0.5 < high and high - low < 0.3
    assert np.asarray(summary["confusion"]).sum() == 300
    with pytest.raises(ValueError, match="expected"):
        classification.classification_summary(labels, noise[:, :2])


def test_roc_points_of_both_questions():
    labels = ["normal", "benign", "malignant", "benign"]
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1]])
    curves = classification.roc_points(labels, probs)
    assert set(curves) == {"lesion_vs_normal", "benign_vs_malignant"}
    for curve in curves.values():
        assert curve["fpr"].iloc[0] == 0 and curve["tpr"].iloc[-1] == 1


# ---------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("architecture", ["classic_unet", "unet"])
def test_head_on_both_architectures_saves_and_reloads(architecture, tmp_path):
    """Two outputs, mask first; the head sits on the bottleneck; the .h5 reloads in tf.keras
    without busi's custom objects, and mask_only gives the mask alone."""
    if architecture == "unet":
        model = models.build_model("efficientnet-lite0", (64, 64, 3), None,
                                   decoder_filters=(8, 8, 8, 8, 8))
    else:
        model = models.classic_unet((64, 64, 3), base_filters=4, depth=2)
    headed = heads.add_image_head(model)
    assert heads.has_image_head(headed) and not heads.has_image_head(model)
    assert heads.bottleneck(headed).shape[1] == 64 // (32 if architecture == "unet" else 4)
    image = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    mask, label = headed.predict(image, verbose=0)
    assert mask.shape == (2, 64, 64, 1) and label.shape == (2, 3)
    np.testing.assert_allclose(label.sum(axis=1), 1.0, rtol=1e-5)
    path = tmp_path / "headed.h5"
    busi.inference.weights.save_model(headed, path, include_optimizer=False)
    keras = busi._keras.keras()
    reloaded = keras.models.load_model(path, compile=False)
    again = reloaded.predict(image, verbose=0)
    np.testing.assert_allclose(again[1], label, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(heads.mask_only(reloaded).predict(image, verbose=0), mask,
                               rtol=1e-5, atol=1e-6)
    if architecture == "classic_unet":  # a Keras 3 user without busi (see test_weights.py)
        np.save(tmp_path / "x.npy", image)
        script = ("import sys, keras, numpy as np; m = keras.models.load_model(sys.argv[1], "
                  "compile=False); out = m(np.load(sys.argv[2]), training=False); "
                  "np.save(sys.argv[3], np.asarray(out[1]))")
        subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"),
                        str(tmp_path / "k3.npy")], env=clean_env(), check=True,
                       capture_output=True, timeout=240)
        # same bound and reason as the masks in test_weights.py
        np.testing.assert_allclose(np.load(tmp_path / "k3.npy"), label, atol=1e-3)
    # the head is not part of the encoder: freezing the encoder leaves it trainable
    models.set_encoder_trainable(headed, False)
    assert headed.get_layer(heads.LOGITS_LAYER).trainable


def test_the_avgmax_head_pools_the_mean_and_the_maximum_and_loads_safely(tmp_path):
    """``image_head_pool: avgmax``: the dense layer sees the bottleneck's mean and maximum over
    positions, side by side (checked against numpy on the bottleneck's own output), and the
    saved file opens in busi's safe loader with the same answers."""
    from busi.config.train_config import TrainConfig

    model = heads.add_image_head(models.classic_unet((32, 32, 3), base_filters=4, depth=2),
                                 pool="avgmax")
    keras = busi._keras.keras()
    image = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    probe = keras.Model(model.inputs, [heads.bottleneck(model),
                                       model.get_layer("label_pools").output])
    features, pooled = probe.predict(image, verbose=0)
    expected = np.concatenate([features.mean(axis=(1, 2)), features.max(axis=(1, 2))], axis=-1)
    # float32 sums of a few values: far below any difference the pooling choice makes
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)
    assert model.get_layer(heads.LOGITS_LAYER).kernel.shape[0] == 2 * features.shape[-1]
    path = busi.inference.weights.save_model(model, tmp_path / "avgmax.h5",
                                             include_optimizer=False)
    loaded = busi.load_model(path, compile=False)
    np.testing.assert_allclose(loaded.predict(image, verbose=0)[1],
                               model.predict(image, verbose=0)[1], rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="pool must be one of"):
        heads.add_image_head(models.classic_unet((32, 32, 3), base_filters=4, depth=2),
                             pool="max")
    with pytest.raises(ValueError, match="image_head_pool must be one of"):
        TrainConfig(image_head=True, image_head_pool="max")
    with pytest.raises(ValueError, match="image_head_pool applies to image_head true"):
        TrainConfig(image_head_pool="avgmax")


@pytest.mark.parametrize("pool", list(heads.POOLS))
def test_a_head_in_the_start_file_is_kept_or_made_afresh_for_the_other_pooling(pool, tmp_path):
    """``init_weights`` with a mean-pooled head: a run of the same pooling starts from all of
    its weights, head included; a run of the other pooling keeps the rest and gives the head a
    fresh start (its dense layer takes twice or half the features)."""
    from busi.config.train_config import TrainConfig
    from busi.runs.folder import RunFolder
    from busi.training import trainer as training

    start = heads.add_image_head(models.classic_unet((32, 32, 3), base_filters=4, depth=2))
    path = busi.inference.weights.save_model(start, tmp_path / "start.h5",
                                             include_optimizer=False)
    config = TrainConfig(architecture="classic_unet", base_filters=4, depth=2, image_size=32,
                         image_head=True, image_head_pool=pool, init_weights=str(path),
                         run_dir=str(tmp_path / "run"))
    run = RunFolder(config.directory)
    run.root.mkdir(parents=True)
    model = training._initial_model(config, run, freeze_encoder=False)
    assert heads.pool_of(layer.name for layer in model.layers) == pool
    for layer in start.layers:
        if not layer.get_weights():
            continue
        if layer.name == heads.LOGITS_LAYER and pool != "avg":
            kernel = model.get_layer(layer.name).get_weights()[0]
            assert kernel.shape[0] == 2 * layer.get_weights()[0].shape[0]
            continue
        for built, saved in zip(model.get_layer(layer.name).get_weights(), layer.get_weights(),
                                strict=True):
            np.testing.assert_array_equal(built, saved)


@pytest.mark.slow
def test_a_run_with_the_head_trains_resumes_evaluates_and_predicts(busi_folder, tmp_path,
                                                                   monkeypatch):
    """The whole path of a model with the head: training (and a resume), evaluation with the
    gate chosen on val, its curves and the classification scores, and busi predict writing
    classes.csv beside the masks (and refusing a gate for a model without the head)."""
    import json

    from busi.config.train_config import TrainConfig
    from busi.evaluation.evaluator import evaluate

    config = TrainConfig(
        name="head", data=str(busi_folder), run_dir=str(tmp_path / "run"),
        architecture="classic_unet", base_filters=4, depth=2, image_size=32, batch_size=4,
        epochs=1, learning_rate=1e-2, augment=False, evaluate=False, seed=1, image_head=True,
    )
    run = busi.train(config)
    history = pd.read_csv(run / "history.csv")
    assert {"iou_score", "val_iou_score", "label_loss", "val_label_loss"} <= set(history)
    config.epochs = 2
    busi.train(config)
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    model = busi.load_model(run / "best.h5", compile=False)
    assert heads.has_image_head(model)

    from busi.evaluation import evaluator as evaluation

    calls = []

    def recording(per_image, p_lesion, *args, **kwargs):
        calls.append(set(per_image["id"]))
        return classification.gate_curve(per_image, p_lesion, *args, **kwargs)

    monkeypatch.setattr(evaluation, "gate_curve", recording)
    summary = evaluate(run)
    split = pd.read_csv(run / "split.csv")
    assert calls[0] <= set(split.loc[split["split"] == "val", "id"])  # the choice: val only
    out = run / "evaluation"
    for name in ("gate_val.csv", "gate_test.csv", "gate.png", "roc.png"):
        assert (out / name).is_file(), name
    record = json.loads((out / "postprocess.json").read_text())
    gate = record.get("gate", 0.0)  # written when set (PostProcess.to_dict)
    assert gate in classification.GATE_THRESHOLDS
    test = summary["splits"]["test"]
    assert {"lesion_vs_normal_auc", "benign_vs_malignant_auc", "accuracy", "confusion"} <= set(
        test["classification"])
    per_image = pd.read_csv(out / "per_image_test.csv")
    assert {"p_normal", "p_benign", "p_malignant", "p_lesion", "predicted_class"} <= set(
        per_image)
    gated = per_image["p_lesion"] < gate
    assert per_image.loc[gated, "empty_pred"].all()  # the gate emptied what it should

    from busi.evaluation.report import results_table, write_report

    report = write_report(run, tmp_path / "report")
    assert (report / "roc.png").is_file() and (report / "gate.png").is_file()
    assert "| benign vs malignant AUC |" in (report / "metrics.md").read_text()
    row = results_table([run]).splitlines()[2]
    assert "image-level head" in row
    auc = test["classification"]["benign_vs_malignant_auc"]
    assert f"| {auc:.3f} (" in row

    masks = tmp_path / "masks"
    table = busi.predict(run / "best.h5", busi_folder / "benign", masks, threshold=0.0)
    classes = pd.read_csv(masks / "classes.csv")
    assert len(classes) == len(table) and set(classes["class"]) <= set(heads.CLASSES)
    # threshold 0: every pixel is lesion unless the gate empties the image; a gate between the
    # images' lesion probabilities empties those below it and only those
    ordered = np.sort(table["p_lesion"].to_numpy())
    middle = float(ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    gated = busi.predict(run / "best.h5", busi_folder / "benign", tmp_path / "gated",
                         threshold=0.0, gate=middle)
    below = gated["p_lesion"] < middle
    assert below.any() and (~below).any()
    assert (gated.loc[below, "lesion_pixels"] == 0).all()
    assert (gated.loc[~below, "lesion_pixels"] > 0).all()

    from busi.inference.publish import publish

    files = publish(run, tmp_path / "published", export="tflite")
    card = next(path for path in files if path.suffix == ".md").read_text()
    assert "Image-level head" in card and "benign vs malignant AUC" in card
    exported = busi.predict(next(path for path in files if path.suffix == ".tflite"),
                            busi_folder / "benign", tmp_path / "exported", threshold=0.0,
                            gate=middle)
    # the float32 export gives the same probabilities (other kernels: the bound and reason of
    # test_weights.py) and so the same gate decisions wherever they are not within that bound
    columns = [f"p_{name}" for name in heads.CLASSES]
    np.testing.assert_allclose(exported[columns], gated[columns], atol=1e-3)
    clear = (gated["p_lesion"] - middle).abs() > 1e-3
    assert list((exported["lesion_pixels"] == 0)[clear]) == list(below[clear])
    with pytest.raises(busi.errors.DataError, match="no image-level head"):
        plain = busi.train(TrainConfig(**{**config.to_dict(), "image_head": False,
                                          "run_dir": str(tmp_path / "plain"), "epochs": 1}))
        busi.predict(plain / "best.h5", busi_folder / "normal",
                     tmp_path / "plain_masks", gate=0.5)

    with pytest.raises(ValueError, match="image_head needs normal images"):
        TrainConfig(image_head=True, train_classes=("benign", "malignant"))


@pytest.mark.parametrize(("backend", "quantize"), [("tflite", None), ("onnx", None)])
def test_exports_of_a_model_with_the_head_give_both_outputs(backend, quantize, tmp_path):
    """Converters reorder outputs; the runtimes tell mask from labels by rank, so an exported
    head model predicts what its Keras model does."""
    pytest.importorskip("tf2onnx" if backend == "onnx" else "tensorflow")
    from busi.inference import export, runtimes

    model = heads.add_image_head(models.classic_unet((32, 32, 3), base_filters=4, depth=2))
    out = export.export(model, tmp_path / f"m.{backend}", backend, quantize)
    predictor = busi.inference.predictor.open_model(out, verify=False)
    assert predictor.has_head
    image = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    mask, label = predictor.predict_with_labels(image)
    keras_mask, keras_label = model.predict(image, verbose=0)
    # float32 exports: the same graph under other kernels (see test_weights.py's bound)
    np.testing.assert_allclose(mask, keras_mask, atol=1e-3)
    np.testing.assert_allclose(label, keras_label, atol=1e-3)
    with pytest.raises(busi.errors.DataError, match="shapes"):
        runtimes._mask_and_labels([np.zeros((1, 3)), np.zeros((1, 2))])


@pytest.mark.slow
def test_the_head_added_to_a_mask_only_model_trains_on_joint_data(busi_folder, busbra_folder,
                                                                   tmp_path):
    """The second stage of lite0_joint_head_ft_cpu.yaml: a mask-only model's weights start a
    joint BUSI + BUS-BRA run with the head (the head alone starts afresh, here with the other
    pooling, which the mask-only file knows nothing of)."""
    from busi.config.train_config import TrainConfig

    common = dict(data=str(busi_folder), architecture="classic_unet", base_filters=4, depth=2,
                  image_size=32, batch_size=4, epochs=1, learning_rate=1e-2, augment=False,
                  evaluate=False, seed=1)
    first = busi.train(TrainConfig(name="mask", run_dir=str(tmp_path / "mask"), **common))
    config = TrainConfig(name="joint", run_dir=str(tmp_path / "joint"),
                         datasets=("busi", "busbra"), data_paths={"busbra": str(busbra_folder)},
                         image_head=True, image_head_pool="avgmax",
                         init_weights=str(first / "best.h5"), **common)
    from busi.runs.folder import RunFolder
    from busi.training import trainer as training

    run = RunFolder(config.directory)
    run.root.mkdir(parents=True)
    model = training._initial_model(config, run, freeze_encoder=False)
    assert heads.has_image_head(model) and model.get_layer("label_max_pool")
    source = busi.load_model(first / "best.h5", compile=False)
    for layer in source.layers:
        for built, saved in zip(model.get_layer(layer.name).get_weights(), layer.get_weights(),
                                strict=True):
            np.testing.assert_array_equal(built, saved)
    trained = busi.train(config)
    history = pd.read_csv(trained / "history.csv")
    assert np.isfinite(history["label_loss"]).all()


def test_the_gate_is_chosen_on_the_datasets_that_hold_normal_images():
    from busi.evaluation.evaluator import _with_normal_images

    table = pd.DataFrame({"dataset": ["busi", "busi", "busbra", "busbra"],
                          "label": ["normal", "benign", "benign", "malignant"]})
    assert list(_with_normal_images(table)) == [True, True, False, False]
    assert _with_normal_images(table.drop(columns="dataset")).all()
