"""The cosine learning-rate schedule as a function of the epoch."""

from __future__ import annotations

import math

import pytest

from busi.models.lr_callbacks import CosineSchedule


@pytest.mark.parametrize("epochs, warmup", [(10, 0), (10, 3), (2, 1), (1, 0), (120, 3)])
def test_warm_up_then_decay_to_the_minimum(epochs, warmup):
    schedule = CosineSchedule(base=1e-3, minimum=1e-5, epochs=epochs, warmup=warmup)
    rates = [schedule.rate(epoch) for epoch in range(epochs)]
    assert rates[:warmup] == pytest.approx([1e-3 * (i + 1) / (warmup + 1) for i in range(warmup)])
    decay = rates[warmup:]
    assert decay[0] == pytest.approx(1e-3)
    if len(decay) > 1:
        assert decay[-1] == pytest.approx(1e-5)
        assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    middle = warmup + (epochs - 1 - warmup) / 2
    if middle == int(middle) and len(decay) > 2:  # half way down at the middle of the decay
        assert schedule.rate(int(middle)) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert schedule.rate(epochs + 5) == pytest.approx(1e-5)  # past the end: the minimum
    assert not any(math.isnan(r) for r in rates)
