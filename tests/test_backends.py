"""busi on its four backends: tf-keras (Keras 2) and Keras 3 on tensorflow, jax and torch.

The choice is made once per process (Keras 3 reads its backend when first imported), so every
case that trains or loads on a backend runs in a fresh Python process. Backends whose packages
this interpreter lacks are skipped (``pip install busi[backends]`` adds JAX).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from busi.config.train_config import TrainConfig
from busi.models import backend, encoders, losses, ops_losses

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TF_USE_LEGACY_KERAS", "SM_FRAMEWORK", "KERAS_BACKEND", backend.ENV)}
    clean["PYTHONPATH"] = os.pathsep.join([SRC, clean.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    clean["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**clean, **env}, timeout=900)


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


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_ops_losses_match_segmentation_models(name):
    """The Keras 3 losses are sm's formulas: compared on tf-keras, where both run (BCE differs in
    the last digits: tf-keras' own clipping)."""
    gt, pr = _loss_inputs()
    ours = ops_losses.LOSSES[name]()
    theirs = losses.get_loss(name)
    assert ours.__name__ == theirs.__name__
    np.testing.assert_allclose(float(ours(gt, pr)), float(theirs(gt, pr)), rtol=1e-5)


def test_ops_metrics_match_segmentation_models():
    gt, pr = _loss_inputs()
    for ours, theirs in zip([make() for make in ops_losses.METRICS.values()],
                            losses.get_metrics(), strict=True):
        assert ours.__name__ == theirs.__name__
        np.testing.assert_allclose(float(ours(gt, pr)), float(theirs(gt, pr)), rtol=1e-6)
