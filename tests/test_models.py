"""busi.models.architectures: input convention, normalisation, float32 output, freezing, registry,
errors."""

from __future__ import annotations

import numpy as np
import pytest

from busi._keras import keras as get_keras
from busi._keras import sm as get_sm
from busi.config.train_config import TrainConfig
from busi.models import architectures as models
from busi.models.encoders import sm_unet

keras = get_keras()
sm = get_sm()

TINY_DECODER = (16, 8, 8, 4, 4)


@pytest.fixture(autouse=True)
def _fresh_session():
    keras.backend.clear_session()
    yield
    keras.mixed_precision.set_global_policy("float32")


def gray_batch(shape=(2, 32, 32), seed=0) -> np.ndarray:
    """Gray images in [0, 255] replicated to 3 channels, as the data pipeline feeds them."""
    gray = np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")
    return np.repeat(gray[..., None], 3, axis=-1)


def test_preprocessing_table_covers_every_sm_encoder():
    assert set(sm_unet.PREPROCESSING_MODES) == set(sm.get_available_backbone_names())


@pytest.mark.parametrize("encoder", sorted(sm_unet.PREPROCESSING_MODES))
def test_preprocessing_layer_matches_sm_get_preprocessing(encoder):
    x = gray_batch((2, 4, 4))
    expected = sm.get_preprocessing(encoder)(x.copy())
    layer = sm_unet.preprocessing_layer(encoder)
    got = x if layer is None else np.asarray(layer(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_spliced_preprocessing_and_copied_weights_match_sm():
    # the flat model must compute exactly sm's U-Net applied to sm's preprocessing, with sm's
    # weights (ImageNet ones in real use): a wrong splice or a missed weight copy shows here
    unet = sm.Unet("resnet18", input_shape=(32, 32, 3), encoder_weights=None,
                   decoder_filters=TINY_DECODER)
    flat = sm_unet._flatten_with_preprocessing(
        unet, sm_unet.preprocessing_layer("vgg16"), "unet_test"
    )
    assert [layer.name for layer in flat.layers[:2]] == ["image", "preprocess"]
    assert len(flat.layers) == len(unet.layers) + 1
    x = gray_batch()
    expected = unet.predict(sm.get_preprocessing("vgg16")(x.copy()), verbose=0)
    np.testing.assert_allclose(flat.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)


def test_build_model_structure_and_freezing():
    model = models.build_model("resnet18", input_shape=(32, 32, 3), encoder_weights=None,
                               freeze_encoder=True, decoder_filters=TINY_DECODER)
    assert model.name == "unet_resnet18"
    assert model.input.shape.as_list() == [None, 32, 32, 3]
    assert model.output.shape.as_list() == [None, 32, 32, 1]
    assert model.layers[-1].name == "mask" and model.output.dtype == "float32"
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model.layers)
    out = model.predict(gray_batch(), verbose=0)
    assert out.shape == (2, 32, 32, 1) and out.min() >= 0 and out.max() <= 1

    encoder = models.encoder_layers(model)
    assert "conv0" in {layer.name for layer in encoder}
    assert not any(layer.name.startswith("decoder_") for layer in encoder)
    frozen = [layer for layer in encoder if layer.weights and not layer.trainable]
    assert frozen
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in frozen)
    assert model.get_layer("bn0").trainable  # BatchNorm stays trainable, as in sm
    assert model.get_layer("decoder_stage0a_conv").trainable
    frozen_count = len(model.trainable_weights)

    models.set_encoder_trainable(model, True)
    assert all(layer.trainable for layer in model.layers)
    assert len(model.trainable_weights) > frozen_count
    models.set_encoder_trainable(model, False)
    assert len(model.trainable_weights) == frozen_count


def test_output_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    for model in (
        models.build_model("resnet18", input_shape=(32, 32, 3), encoder_weights=None,
                           decoder_filters=TINY_DECODER),
        models.classic_unet(input_shape=(32, 32, 3), base_filters=4, depth=2),
    ):
        assert model.get_layer("final_conv").compute_dtype == "bfloat16", model.name
        assert model.output.dtype == "float32", model.name
        assert model.predict(gray_batch(), verbose=0).dtype == np.float32


def test_unknown_encoder_lists_the_names():
    with pytest.raises(ValueError, match="resnet34.*efficientnetb0|efficientnetb0.*resnet34"):
        models.build_model("resnet17", encoder_weights=None)


@pytest.mark.parametrize(
    "build",
    [
        lambda: models.build_model("resnet18", input_shape=(48, 48, 3), encoder_weights=None),
        lambda: models.build_model("resnet18", input_shape=(32, 32), encoder_weights=None),
        lambda: models.build_model("resnet18", input_shape=(32, 32, 3), encoder_weights=None,
                                   decoder_filters=(16, 8, 4, 4)),
        lambda: models.classic_unet(input_shape=(36, 36, 3), depth=3),
        lambda: models.classic_unet(input_shape=(32, 32, 3), dropout=1.0),
    ],
    ids=["not-multiple-of-32", "no-channels", "4-decoder-stages", "not-multiple-of-8",
         "dropout-1"],
)
def test_bad_arguments(build):
    with pytest.raises(ValueError):
        build()


def test_classic_unet():
    model = models.classic_unet(input_shape=(40, 40, 3), base_filters=4, depth=3, dropout=0.5)
    assert model.name == "classic_unet"
    assert model.output.shape.as_list() == [None, 40, 40, 1]
    assert model.output.dtype == "float32"
    assert model.get_layer("preprocess").scale == pytest.approx(1 / 255)
    assert model.get_layer("center_conv1").filters == 4 * 2**3
    assert len([layer for layer in model.layers if layer.name.endswith("_upsample")]) == 3
    assert model.get_layer("decoder_block0_up").filters == 4
    assert isinstance(model.get_layer("center_dropout"), keras.layers.Dropout)
    out = model.predict(gray_batch((1, 40, 40)), verbose=0)
    assert out.shape == (1, 40, 40, 1) and 0 <= out.min() and out.max() <= 1
    no_bn = models.classic_unet(input_shape=(16, 16, 3), base_filters=4, depth=1,
                                batch_norm=False)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in no_bn.layers)


def test_make_model_registry():
    assert set(models.ARCHITECTURES) == {"unet", "classic_unet"}
    model = models.build(TrainConfig(architecture="classic_unet", image_size=16, base_filters=2,
                                     depth=2))
    assert model.name == "classic_unet"
    with pytest.raises(ValueError, match="classic_unet"):
        models.architecture("segformer")


def test_imagenet_download_failure_is_explained(monkeypatch, tmp_path):
    import urllib.error

    from tf_keras.src.utils import data_utils

    def no_network(url, filename, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    (tmp_path / ".keras").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))  # an empty Keras cache
    monkeypatch.setattr(data_utils, "urlretrieve", no_network)
    with pytest.raises(models.WeightsDownloadError) as caught:
        models.build_model("resnet18", input_shape=(32, 32, 3), encoder_weights="imagenet")
    message = str(caught.value)
    assert "could not be downloaded" in message
    assert ("https://github.com/qubvel/classification_models/releases/download/0.0.1/"
            "resnet18_imagenet_1000_no_top.h5") in message
    assert str(tmp_path / ".keras" / "models" / "resnet18_imagenet_1000_no_top.h5") in message
    assert "encoder_weights=None" in message and "--encoder-weights none" in message
    assert "--encoder efficientnet-lite0" in message  # ImageNet weights that need no network


def test_the_registries_name_models_as_tables_and_cards_did():
    """Results tables and model cards read an architecture's names from its registry entry; the
    README table must come out as before."""
    classic = TrainConfig(architecture="classic_unet", base_filters=16, depth=4)
    assert models.model_label(classic) == "classic U-Net, 16 filters, depth 4, from scratch"
    assert models.model_details(classic.to_dict()) == "16 base filters, depth 4"
    unet = TrainConfig(encoder="resnet34")
    assert models.model_label(unet) == "U-Net, resnet34, imagenet"
    assert models.model_label(unet.replace(encoder_weights=None)) == "U-Net, resnet34, from scratch"
    assert models.model_details(unet.to_dict()) == "resnet34 encoder (imagenet)"
    assert models.model_details(unet.replace(encoder_weights=None)) == (
        "resnet34 encoder (from scratch)")
    tuned = unet.replace(init_weights="weights/lite0-joint-cpu.h5")  # a fine-tuned model
    assert models.model_label(tuned) == "U-Net, resnet34, fine-tuned from lite0-joint-cpu"
    assert models.model_details(tuned.to_dict()) == (
        "resnet34 encoder (fine-tuned from lite0-joint-cpu)")
    run_checkpoint = unet.replace(init_weights="runs/lite0-joint-cpu/best.h5")
    assert models.model_label(run_checkpoint).endswith("fine-tuned from lite0-joint-cpu/best")


def test_build_reads_the_architecture_options_from_the_config():
    config = TrainConfig(encoder="resnet18", encoder_weights=None, image_size=32,
                         decoder_filters=TINY_DECODER)
    model = models.build(config, freeze_encoder=True)
    assert model.name == "unet_resnet18" and model.input.shape.as_list() == [None, 32, 32, 3]
    assert model.get_layer("decoder_stage4a_conv").filters == TINY_DECODER[-1]
    assert any(layer.weights and not layer.trainable for layer in models.encoder_layers(model))


def test_freezing_is_what_segmentation_models_does():
    """build_model freezes every encoder family the same way after building; for sm's it must
    flag the same layers as sm's own encoder_freeze did."""
    ours = models.build_model("resnet18", input_shape=(32, 32, 3), encoder_weights=None,
                              freeze_encoder=True, decoder_filters=TINY_DECODER)
    theirs = sm.Unet("resnet18", input_shape=(32, 32, 3), encoder_weights=None,
                     encoder_freeze=True, decoder_filters=TINY_DECODER, classes=1,
                     activation="sigmoid")
    flags = {layer.name: layer.trainable for layer in theirs.layers if layer.weights}
    renamed = {"sigmoid": "mask"}
    assert {renamed.get(name, name): flag for name, flag in flags.items()} == {
        layer.name: layer.trainable for layer in ours.layers if layer.weights}


@pytest.mark.parametrize("name", sorted(models.ARCHITECTURES))
def test_an_architecture_entry_names_real_config_fields_and_builder_arguments(name):
    import dataclasses
    import inspect

    spec = models.ARCHITECTURES[name]
    parameters = inspect.signature(spec.builder).parameters
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    assert set(spec.options) <= fields and set(spec.options) <= set(parameters)
    assert "input_shape" in parameters
    assert ("freeze_encoder" in parameters) == spec.uses_encoder


def test_every_encoder_family_has_a_builder():
    from busi.models.encoders import ENCODERS, Family

    assert {spec.family for spec in ENCODERS.values()} == set(models.ENCODER_BUILDERS) == set(
        Family.__args__)
