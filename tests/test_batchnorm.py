"""Precise BatchNorm statistics: the moving averages become the plain batch-statistics mean."""

from __future__ import annotations

import numpy as np

import busi  # noqa: F401
from busi import _keras
from busi.training.batchnorm import batchnorm_layers, recalibrate


def test_recalibrate_sets_the_average_of_the_batches():
    keras = _keras.keras()
    inputs = keras.Input((4,))
    outputs = keras.layers.BatchNormalization(momentum=0.99)(inputs)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc, 1.0, (16, 4)).astype(np.float32) for loc in (0.0, 10.0, 20.0)]
    assert recalibrate(model, batches) == 3
    layer = batchnorm_layers(model)[0]
    expected_mean = np.mean([b.mean(axis=0) for b in batches], axis=0)
    np.testing.assert_allclose(layer.moving_mean.numpy(), expected_mean, rtol=1e-5)
    # Keras keeps the biased (ddof=0) batch variance
    expected_var = np.mean([b.var(axis=0) for b in batches], axis=0)
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected_var, rtol=1e-3)
    assert layer.momentum == 0.99  # restored


def test_recalibrate_measures_the_inference_variance_behind_dropout():
    """Dropout on during recalibration would inflate the variance (here ~2x at rate 0.5)."""
    keras = _keras.keras()
    inputs = keras.Input((4,))
    dropped = keras.layers.Dropout(0.5)(inputs)
    outputs = keras.layers.BatchNormalization()(dropped)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 1.0, (64, 4)).astype(np.float32) for _ in range(4)]
    recalibrate(model, batches)
    expected_var = np.mean([b.var(axis=0) for b in batches], axis=0)
    layer = batchnorm_layers(model)[0]
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected_var, rtol=1e-3)
    assert model.layers[1].rate == 0.5  # restored
