"""busi on its four backends: tf-keras (Keras 2) and Keras 3 on tensorflow, jax and torch.

The choice is made once per process (Keras 3 reads its backend when first imported), so every
case that trains or loads on a backend runs in a fresh Python process. Backends whose packages
this interpreter lacks are skipped (``pip install busi[backends]`` adds JAX).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from busi.config.train_config import TrainConfig
from busi.inference import h5_compat
from busi.models import backend, encoders, losses, ops_losses
from busi.runs.folder import RunFolder, check_same_config

needs_tf_keras = pytest.mark.skipif(bool(backend.missing(backend.DEFAULT)),
                                    reason="needs TensorFlow and tf-keras")
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _env() -> dict[str, str]:
    """This environment for a child Python: no Keras choice inherited, busi from this tree."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TF_USE_LEGACY_KERAS", "SM_FRAMEWORK", "KERAS_BACKEND", backend.ENV)}
    clean["PYTHONPATH"] = os.pathsep.join([SRC, clean.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    clean["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return clean


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), timeout=900)


def test_an_unknown_backend_names_the_installed_ones():
    with pytest.raises(ValueError, match="unknown backend 'theano'") as caught:
        TrainConfig(backend="theano")
    assert f"installed here: {', '.join(backend.installed())}" in str(caught.value)


def test_a_backend_whose_package_is_missing_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(backend, "PACKAGES", {
        **backend.PACKAGES, "jax": (("busi_no_such_module", "no-such-package"),)})
    with pytest.raises(ValueError, match="backend 'jax' needs no-such-package") as caught:
        backend.check("jax")
    assert f"{sys.executable} -m pip install 'no-such-package'" in str(caught.value)


def test_segmentation_models_encoders_and_devices_are_refused_on_keras_3():
    sm_encoder = encoders.family("segmentation-models")[0]
    with pytest.raises(ValueError, match=f"encoder {sm_encoder} is segmentation-models'") as e:
        TrainConfig(backend="jax", architecture="unet", encoder=sm_encoder)
    assert all(name in str(e.value) for name in encoders.family("busi"))
    with pytest.raises(ValueError, match="devices"):
        TrainConfig(backend="torch", architecture="classic_unet", devices=("/gpu:0",))
    TrainConfig(backend="tf-keras", architecture="unet", encoder=sm_encoder)  # still fine


def test_backend_is_a_runtime_setting_and_round_trips(tmp_path):
    config = TrainConfig(backend="jax", architecture="classic_unet")
    path = tmp_path / "config.yaml"
    config.save(path)
    assert "runtime:\n" in path.read_text() and "backend: jax" in path.read_text()
    assert TrainConfig.load(path) == config


def test_the_cli_passes_backend_to_the_config():
    from busi import cli  # the CLI pulls in every stage; only this test needs it

    parser = cli.parser()
    args = parser.parse_args(["train", "--backend", "torch", "--architecture", "classic_unet"])
    assert cli._train_config(args).backend == "torch"


@needs_tf_keras
@pytest.mark.slow
def test_tf_keras_stays_recognised_after_tensorflow_keras_is_imported_again():
    """`import tensorflow.keras` after tf.keras was resolved (efficientnet does it on every
    model load) binds tf_keras' module under another name: still Keras 2, not "needs Keras 2"."""
    result = _run("import busi, tensorflow as tf\n"
                  "tf.keras.models\n"
                  "import tensorflow.keras\n"
                  "from busi import _keras\n"
                  "assert _keras.tf_keras_version() == 'tf_keras', _keras.tf_keras_version()\n"
                  "print(_keras.keras().__name__)\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("tf_keras")


def _loss_inputs() -> tuple:
    rng = np.random.default_rng(0)
    gt = (rng.random((3, 32, 32, 1)) > 0.7).astype(np.float32)
    gt[1] = 0  # an empty mask, as normal images have
    pr = rng.random((3, 32, 32, 1)).astype(np.float32)
    pr[2, :4] = 1.0  # saturated predictions, where clipping matters
    pr[2, 4:8] = 0.0
    return gt, pr


@needs_tf_keras
@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_ops_losses_match_segmentation_models(name):
    """The Keras 3 losses are sm's formulas: compared on tf-keras, where both run (BCE differs in
    the last digits: tf-keras' own clipping)."""
    gt, pr = _loss_inputs()
    ours = ops_losses.LOSSES[name]()
    theirs = losses.get_loss(name)
    assert ours.__name__ == theirs.__name__
    np.testing.assert_allclose(float(ours(gt, pr)), float(theirs(gt, pr)), rtol=1e-5)


@needs_tf_keras
def test_ops_metrics_match_segmentation_models():
    gt, pr = _loss_inputs()
    for ours, theirs in zip([make() for make in ops_losses.METRICS.values()],
                            losses.get_metrics(), strict=True):
        assert ours.__name__ == theirs.__name__
        np.testing.assert_allclose(float(ours(gt, pr)), float(theirs(gt, pr)), rtol=1e-6)


# Makes `import tensorflow` (and tf_keras) fail in the child process, as if not installed: a
# spec whose loader refuses, so that code asking find_spec() (torch does) sees no origin.
NO_TENSORFLOW = '''
import importlib.machinery, sys
class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tf_keras"):
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ImportError(f"{spec.name} is blocked in this test: the backend must not need it")
    def exec_module(self, module):
        raise ImportError("blocked")
sys.meta_path.insert(0, _NoTensorFlow())
'''

TRAIN = '''
import json, sys
import h5py
import numpy as np
import busi
from busi.config.train_config import TrainConfig
from busi.inference import h5_compat
from busi.runs.folder import RunFolder, check_same_config
from busi.inference import weights
config = TrainConfig.from_dict(json.loads(sys.argv[1]))
run = busi.train(config)
x = np.load(sys.argv[2])
model = weights.load_model(run / "best.h5", compile=False)
outputs = model.predict(x, verbose=0)
mask = outputs[0] if isinstance(outputs, list) else outputs
np.save(sys.argv[3], np.asarray(mask))
print("tensorflow imported:", "tensorflow" in sys.modules)
'''

LOAD = '''
import sys
import h5py
import numpy as np
import busi
import tensorflow as tf
from busi.inference import weights
from busi.models import heads
x = np.load(sys.argv[1])
plain = tf.keras.models.load_model(sys.argv[2], compile=False)  # TensorFlow's own loader
ours = heads.mask_only(weights.load_model(sys.argv[2], compile=False))
first = plain.predict(x, verbose=0)
np.save(sys.argv[3], np.asarray(first[0] if isinstance(first, list) else first))
np.save(sys.argv[4], np.asarray(ours.predict(x, verbose=0)))
'''

KERAS3 = [name for name in backend.NAMES if name != backend.DEFAULT]
MODELS = {
    "classic": {"architecture": "classic_unet", "base_filters": 8, "depth": 2},
    "lite0-head": {"architecture": "unet", "encoder": "efficientnet-lite0",
                   "encoder_weights": None, "image_head": True},
}


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a > 0.5) == (b > 0.5)))


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", KERAS3)
def test_one_epoch_on_each_keras_3_backend_loads_in_tf_keras(name, model, busi_folder, tmp_path):
    """Train one tiny epoch on the backend in a fresh process (on jax and torch with TensorFlow
    unimportable), then read its best.h5 with plain tf.keras and with busi on tf-keras: the
    masks agree with the training process's own prediction."""
    if backend.missing(name):
        pytest.skip(f"backend {name} needs {backend.missing(name)}")
    # the reading side needs TensorFlow and tf-keras: this Python, or the one BUSI_TF_PYTHON names
    reader = os.environ.get("BUSI_TF_PYTHON", sys.executable)
    if reader == sys.executable and backend.missing(backend.DEFAULT):
        pytest.skip("reading back needs tf-keras: set BUSI_TF_PYTHON to a Python that has it")
    size = 32 if model == "classic" else 64
    config = TrainConfig(backend=name, image_size=size, epochs=1, batch_size=4, evaluate=False,
                         precise_bn_batches=1, data=str(busi_folder), run_dir=str(tmp_path / "run"),
                         **MODELS[model])
    x = np.random.default_rng(1).uniform(0, 255, (4, size, size, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    blocked = NO_TENSORFLOW if name in ("jax", "torch") else ""
    trained = subprocess.run(
        [sys.executable, "-c", blocked + TRAIN, json.dumps(config.to_dict()),
         str(tmp_path / "x.npy"), str(tmp_path / "own.npy")],
        capture_output=True, text=True, env=_env(), timeout=900)
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert f"tensorflow imported: {name == 'tensorflow'}" in trained.stdout
    loaded = subprocess.run(
        [reader, "-c", LOAD, str(tmp_path / "x.npy"), str(tmp_path / "run" / "best.h5"),
         str(tmp_path / "plain.npy"), str(tmp_path / "busi.npy")],
        capture_output=True, text=True, env=_env(), timeout=900)
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    own = np.load(tmp_path / "own.npy")
    for reader in ("plain", "busi"):
        assert _agreement(own, np.load(tmp_path / f"{reader}.npy")) >= 0.999, reader


def test_a_keras_3_architecture_the_converter_does_not_know_is_named(tmp_path):
    """Keras 3 architectures outside busi's flat graphs are refused with the file named, never
    written half-converted."""
    path = tmp_path / "nested.h5"
    config = {"class_name": "Functional", "config": {
        "name": "m", "trainable": True, "input_layers": ["image", 0, 0],
        "output_layers": ["inner", 0, 0],
        "layers": [{"class_name": "InputLayer", "name": "image",
                    "config": {"batch_shape": [None, 8, 8, 3], "name": "image"},
                    "inbound_nodes": []},
                   {"class_name": "Functional", "name": "inner", "config": {},
                    "inbound_nodes": []}]}}
    with h5py.File(path, "w") as handle:
        handle.attrs["model_config"] = json.dumps(config).encode()
        handle.attrs["keras_version"] = "3.15.1"
        handle.create_group("model_weights")
    with pytest.raises(h5_compat.NotConvertible, match=f"{path}: .*nested model"):
        h5_compat.make_portable(path)
    assert not list(tmp_path.glob("*.tmp"))


RESUME = '''
import json, sys
import busi
from busi.config.train_config import TrainConfig
from busi.inference import h5_compat
from busi.runs.folder import RunFolder, check_same_config
config = TrainConfig.from_dict(json.loads(sys.argv[1]))
for epochs in (1, 2):  # the second call resumes from last.h5
    run = busi.train(config.replace(epochs=epochs))
    print("steps", int(h5_compat.optimizer_weights(run / "last.h5")[0]))
'''


@pytest.mark.slow
@pytest.mark.parametrize("name", KERAS3)
def test_a_resume_on_keras_3_keeps_the_optimizer_state(name, busi_folder, tmp_path):
    """Keras 3.15 drops the optimizer state of an .h5 it compiles itself; busi restores it, so
    the optimizer's step counter after the resumed epoch counts both epochs' steps."""
    if backend.missing(name):
        pytest.skip(f"backend {name} needs {backend.missing(name)}")
    config = TrainConfig(backend=name, image_size=32, batch_size=4, evaluate=False,
                         precise_bn_batches=1, data=str(busi_folder),
                         run_dir=str(tmp_path / "run"), **MODELS["classic"])
    blocked = NO_TENSORFLOW if name in ("jax", "torch") else ""
    done = subprocess.run([sys.executable, "-c", blocked + RESUME, json.dumps(config.to_dict())],
                          capture_output=True, text=True, env=_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    steps = [int(line.split()[1]) for line in done.stdout.splitlines()
             if line.startswith("steps ")]
    assert len(steps) == 2 and steps[0] > 0 and steps[1] == 2 * steps[0], done.stdout[-2000:]


def test_a_resume_on_another_backend_is_refused_naming_the_runs(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    TrainConfig(backend="torch", architecture="classic_unet").save(run.config)
    with pytest.raises(ValueError, match="trains on backend torch, not jax.*--backend torch"):
        check_same_config(run, TrainConfig(backend="jax", architecture="classic_unet"))
