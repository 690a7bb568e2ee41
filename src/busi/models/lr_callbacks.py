"""The Keras callbacks of the learning-rate schedules (:mod:`busi.models.schedules`), whose
state survives a resume. Apart from the run-folder callbacks (:mod:`busi.training.callbacks`)
because the schedule registry, which config checking reads, makes them: they need Keras and
nothing of a run.
"""

from __future__ import annotations

import math
from typing import Any

from busi import _keras
from busi.models import backend

keras = _keras.keras()


class Resumable:
    """Mixin restoring a callback's counters (best, wait, ...) after a resume."""

    def __init__(self, *args: Any, restore: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._restore = restore or {}

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        for name, value in self._restore.items():
            setattr(self, name, value)

    def counters(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ("best", "wait", "cooldown_counter")
                if hasattr(self, name)}


class ReduceLROnPlateau(Resumable, keras.callbacks.ReduceLROnPlateau):
    pass


class CosineSchedule(keras.callbacks.Callback):
    """Sets each epoch's learning rate from the epoch number alone: linear warm-up, then a
    cosine decay from ``base`` that reaches ``minimum`` at the last epoch (a single epoch after
    the warm-up runs at ``base``).

    Being a function of the epoch, it needs no state to resume. A run on a fixed budget needs
    its learning rate to reach a low value within the budget; halving on plateaus instead reacts
    to validation scores that swung by 0.2 IoU between epochs in this project's CPU runs.
    """

    def __init__(self, base: float, minimum: float, epochs: int, warmup: int = 0):
        super().__init__()
        self.base, self.minimum, self.epochs, self.warmup = base, minimum, epochs, warmup

    def rate(self, epoch: int) -> float:
        """The learning rate of epoch ``epoch`` (counted from 0)."""
        if epoch < self.warmup:
            return self.base * (epoch + 1) / (self.warmup + 1)
        span = max(self.epochs - 1 - self.warmup, 1)
        progress = min((epoch - self.warmup) / span, 1.0)
        return self.minimum + 0.5 * (self.base - self.minimum) * (1 + math.cos(math.pi * progress))

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        backend.set_value(self.model.optimizer.learning_rate, self.rate(epoch))

    def counters(self) -> dict[str, Any]:
        return {}


__all__ = ["CosineSchedule", "ReduceLROnPlateau", "Resumable"]
