"""busi.inference.weights: .h5 round trips, clear errors, and loading by plain Keras 3 / tf.keras
users."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from busi._keras import keras as get_keras
from busi.errors import DataError
from busi.inference import weights
from busi.models import architectures as models
from busi.models import losses

keras = get_keras()

TINY_DECODER = (16, 8, 8, 4, 4)

BUILDERS = {
    "unet_resnet18": lambda: models.build_model(
        "resnet18", input_shape=(64, 64, 3), encoder_weights=None, decoder_filters=TINY_DECODER
    ),
    "unet_efficientnet_lite0": lambda: models.build_model(
        "efficientnet-lite0", input_shape=(64, 64, 3), encoder_weights=None,
        decoder_filters=TINY_DECODER
    ),
    "classic_unet": lambda: models.classic_unet(input_shape=(64, 64, 3), base_filters=4,
                                                depth=2, dropout=0.2),
}


def images(seed: int = 0) -> np.ndarray:
    """Smooth gray images in [0, 255] (gradient + blob), replicated to 3 channels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64] / 63.0
    batch = []
    for _ in range(2):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
        batch.append(255 * (0.6 * xx * rng.uniform() + 0.4 * blob))
    gray = np.clip(np.array(batch, dtype="float32"), 0, 255)
    return np.repeat(gray[..., None], 3, axis=-1)


def predict(model) -> np.ndarray:
    """Inference on images(); a direct call, cheaper than tracing ``model.predict``."""
    return np.asarray(model(images(), training=False))


def trained_like(model, seed: int = 0):
    """Compile ``model`` and make it look trained: perturbed weights, and BatchNorm statistics
    set to those of images(), so activations have realistic magnitudes (a fresh BatchNorm is
    the identity, which would both hide loading mistakes and let 0-255 inputs blow up)."""
    rng = np.random.default_rng(seed)
    batch_norms = [layer for layer in model.layers
                   if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in batch_norms:
        layer.set_weights([value + rng.normal(0.0, 0.1, value.shape)
                           for value in layer.get_weights()[:2]] + layer.get_weights()[2:])
        layer.momentum = 0.0  # the next training-mode call replaces the moving statistics
    model(images(), training=True)
    for layer in batch_norms:
        layer.momentum = 0.99
    model.compile(keras.optimizers.Adam(1e-3), loss=losses.get_loss(), metrics=losses.get_metrics())
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """Each model saved compiled (``<name>.h5``) and weights only (``<name>_weights.h5``),
    with its predictions on images()."""
    folder = tmp_path_factory.mktemp("models")
    result = {}
    for name, build in BUILDERS.items():
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)  # the same weights every run: no draw decides the test
        model = trained_like(build())
        path = weights.save_model(model, folder / f"{name}.h5")
        model.save_weights(folder / f"{name}_weights.h5")
        result[name] = (path, predict(model))
    np.save(folder / "images.npy", images())
    return result


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_reload_gives_identical_predictions(saved, name):
    path, expected = saved[name]
    keras.backend.clear_session()
    model = weights.load_model(path)
    assert model.name == name and model.optimizer is not None
    assert model.loss.__name__ == losses.get_loss().__name__
    np.testing.assert_array_equal(predict(model), expected)
    uncompiled = weights.load_model(path, compile=False)
    assert uncompiled.optimizer is None
    np.testing.assert_array_equal(predict(uncompiled), expected)


def test_a_file_without_training_state_loads_without_a_warning(saved, tmp_path, caplog):
    """best.h5 and published weights are saved without the optimizer: load_model's default
    compile=True must not make Keras warn "No training configuration found"."""
    path, expected = saved["classic_unet"]
    model = weights.load_model(path, compile=False)
    bare = weights.save_model(model, tmp_path / "best.h5", include_optimizer=False)
    caplog.clear()
    loaded = weights.load_model(bare)
    np.testing.assert_array_equal(predict(loaded), expected)
    assert not [r for r in caplog.records if "training configuration" in r.getMessage()]


def test_save_is_atomic_and_needs_h5(saved, tmp_path):
    path, _ = saved["classic_unet"]
    model = weights.load_model(path, compile=False)
    target = weights.save_model(model, tmp_path / "sub" / "m.h5", include_optimizer=False)
    assert target.exists() and sorted(p.name for p in target.parent.iterdir()) == ["m.h5"]
    assert target.stat().st_size < path.stat().st_size  # no optimizer state
    with pytest.raises(ValueError, match=r"\.h5"):
        weights.save_model(model, tmp_path / "m.keras")


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_weights_only_round_trip(saved, name):
    path, expected = saved[name]
    keras.backend.clear_session()
    fresh = BUILDERS[name]()
    assert not np.allclose(predict(fresh), expected)
    assert weights.load_weights_into(fresh, path.with_name(f"{name}_weights.h5")) is fresh
    np.testing.assert_array_equal(predict(fresh), expected)


def test_weights_from_a_full_model_file(saved):
    path, expected = saved["classic_unet"]
    model = weights.load_weights_into(BUILDERS["classic_unet"](), path)
    np.testing.assert_array_equal(predict(model), expected)


def test_load_model_explains_weights_only_files(saved):
    weights_file = saved["classic_unet"][0].with_name("classic_unet_weights.h5")
    with pytest.raises(DataError, match=r"weights only.*load_weights_into"):
        weights.load_model(weights_file)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        weights.load_model(tmp_path / "nope.h5")
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        weights.load_weights_into(BUILDERS["classic_unet"](), tmp_path / "nope.h5")
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(DataError, match="not an HDF5"):
        weights.load_model(text)
    import h5py

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle["x"] = np.zeros(3)
    with pytest.raises(DataError, match="no Keras model"):
        weights.load_model(other)


@pytest.mark.parametrize(
    "name, build, expect",
    [
        ("unet_resnet18",
         lambda: models.build_model("resnet18", input_shape=(64, 64, 3), encoder_weights=None,
                                    decoder_filters=(16, 8, 8, 4, 8)),
         r"first difference .*'decoder_stage4a_conv'"),
        ("classic_unet",
         lambda: models.classic_unet(input_shape=(64, 64, 3), base_filters=8, depth=2),
         r"first difference at weighted layer #0: file 'encoder_block0_conv1'"),
        ("classic_unet",
         lambda: models.classic_unet(input_shape=(64, 64, 3), base_filters=4, depth=3),
         r"first difference|layers with weights"),
    ],
    ids=["decoder-filters", "base-filters", "depth"],
)
def test_architecture_mismatch_is_explained(saved, name, build, expect):
    path, _ = saved[name]
    keras.backend.clear_session()
    with pytest.raises(ValueError, match=expect) as caught:
        weights.load_weights_into(build(), path)
    assert str(path) in str(caught.value)


def test_layer_count_mismatch_message():
    saved = [("a", [(3, 3)]), ("b", [(2,)])]
    assert "2 layers with weights, the model 1" in weights._describe_mismatch(saved, saved[:1])
    assert weights._describe_mismatch(saved, list(saved)) is None


LOADER = """
import json, sys
import numpy as np
{setup}
x = np.load(sys.argv[1])
result = {{}}
for path in sys.argv[2:]:
    model = load(path, compile=False)
    result[path] = np.asarray(model(x, training=False)).tolist()
print("RESULT" + json.dumps({{"keras": keras_name, "outputs": result}}))
"""

# A plain Keras 3 user: no busi, no TF_USE_LEGACY_KERAS; Keras 3 reads the legacy .h5 itself.
KERAS3 = """
import keras
load, keras_name = keras.models.load_model, "keras " + keras.__version__
"""

# A tf.keras user of TensorFlow >= 2.16 who knows about TF_USE_LEGACY_KERAS, without busi.
TF_KERAS = """
import tensorflow as tf
load, keras_name = tf.keras.models.load_model, tf.keras.__name__
"""


def clean_env(**extra: str) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("TF_USE_LEGACY_KERAS", "SM_FRAMEWORK", "KERAS_BACKEND")}
    # one thread each: they run beside the other tests on a small shared machine
    env.update(TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1",
               **extra)
    return env


@pytest.fixture(scope="module", autouse=True)
def external(saved) -> Iterator[dict]:
    """Both fresh-process loaders, started at once in the background (importing TensorFlow
    takes seconds) while the other tests of this module run; collected by the tests below."""
    folder = Path(next(iter(saved.values()))[0]).parent
    paths = [str(path) for path, _ in saved.values()]
    processes = {}
    for kind, setup, env in (("keras3", KERAS3, clean_env()),
                             ("tf_keras", TF_KERAS, clean_env(TF_USE_LEGACY_KERAS="1"))):
        script = textwrap.dedent(LOADER.format(setup=textwrap.dedent(setup)))
        processes[kind] = subprocess.Popen(
            [sys.executable, "-c", script, str(folder / "images.npy"), *paths],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def collect(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    line = [row for row in stdout.splitlines() if row.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


# What matters to a user of the file is the mask, then the probabilities. Keras 3 computes the
# same float32 graph with other kernels and another operation order (BatchNorm folded
# differently, other conv algorithms), so each value carries a rounding error of a few float32
# ulps per layer, amplified by the trained-like BatchNorm scales: measured up to 1.2e-5 through
# the ~20 layers of the ResNet18 U-Net and 1.04e-4 (with unseeded weights) through the ~120 of
# the EfficientNet-Lite0 one, and the size depends on the CPU's instruction set. 1e-3 is ~10x
# the deepest model's and still 100x below any difference a real loading mistake makes (a wrong
# or missing layer moves probabilities by > 0.1). The weights are seeded, so only the CPU's
# kernels vary. A plain tf.keras process runs busi's code, but with one thread (see clean_env),
# and oneDNN may then pick other kernels and summation orders: same bound. Masks (threshold 0.5)
# must agree exactly wherever the probability is farther from 0.5 than that.
@pytest.mark.parametrize(("user", "version", "atol"), [
    ("keras3", "keras 3", 1e-3),
    ("tf_keras", "tf_keras", 1e-3),
])
def test_other_keras_users_load_the_h5(saved, external, user, version, atol):
    result = collect(external[user])
    assert result["keras"].startswith(version)
    for path, expected in saved.values():
        got = np.array(result["outputs"][str(path)], dtype="float32")
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol, err_msg=str(path))
        decided = np.abs(expected - 0.5) > atol
        np.testing.assert_array_equal(got[decided] > 0.5, expected[decided] > 0.5,
                                      err_msg=str(path))


def test_with_policy_float32_undoes_mixed_precision():
    """A model saved from mixed-precision training must run in float32 when asked for it."""
    from busi.training.devices import global_policy

    with global_policy("mixed_bfloat16"):
        mixed = models.classic_unet(input_shape=(32, 32, 3), base_filters=4, depth=2)
    assert mixed.layers[2].compute_dtype == "bfloat16"
    plain = weights.with_policy(mixed, "float32")
    assert {layer.compute_dtype for layer in plain.layers} == {"float32"}
    assert weights.with_policy(plain, "float32") is plain  # nothing to do: no rebuild
    images = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(plain.predict(images, verbose=0),
                               mixed.predict(images, verbose=0), atol=0.05)
