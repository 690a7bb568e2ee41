"""Learning-rate schedules a config can name, each with the settings it reads.

A schedule is one entry of :data:`SCHEDULES`: the config fields it takes (``options``: set for
another schedule they are refused, since they would silently do nothing), a check of their
values, and the Keras callback it becomes. Config checking reads this module, so it loads no
TensorFlow; the callbacks are made only when a run starts. A new schedule is a callback class
(:mod:`busi.models.lr_callbacks`) and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from busi.config.train_config import TrainConfig


def _no_check(config: TrainConfig) -> None:
    """A schedule whose options need no more than their field ranges."""


@dataclass(frozen=True)
class Schedule:
    """One learning-rate schedule: what it does, the fields it takes, and how it starts."""

    description: str
    """One line for ``busi train --help`` and model cards."""
    options: tuple[str, ...]
    """The :class:`~busi.config.train_config.TrainConfig` fields it reads, beyond the learning
    rate and the number of epochs."""
    make: Callable[[TrainConfig, dict[str, Any]], Any]
    """``make(config, restored)``: the Keras callback, its counters restored from ``state.json``
    (``restored``, empty for a new run)."""
    check: Callable[[TrainConfig], None] = _no_check
    """Raises ValueError for option values that cannot go together."""
    card: Callable[[dict[str, Any]], str] = lambda config: ""
    """How a model card describes it, from a config's fields."""


def _plateau(config: TrainConfig, restored: dict[str, Any]) -> Any:
    from busi.models.lr_callbacks import ReduceLROnPlateau  # start-up: loads TensorFlow

    return ReduceLROnPlateau(
        monitor=config.monitor, mode=config.monitor_mode, factor=config.reduce_lr_factor,
        patience=config.reduce_lr_patience, min_lr=config.min_learning_rate, restore=restored,
    )


def _cosine(config: TrainConfig, restored: dict[str, Any]) -> Any:
    from busi.models.lr_callbacks import CosineSchedule  # start-up: loads TensorFlow

    return CosineSchedule(config.learning_rate, config.min_learning_rate, config.epochs,
                          config.warmup_epochs)


def _check_cosine(config: TrainConfig) -> None:
    if config.warmup_epochs >= config.epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs), got {config.warmup_epochs} "
                         f"(epochs {config.epochs})")
    if config.min_learning_rate > config.learning_rate:
        raise ValueError(
            f"min_learning_rate ({config.min_learning_rate}) must not exceed learning_rate "
            f"({config.learning_rate}): the cosine schedule decays from one to the other")


SCHEDULES: dict[str, Schedule] = {
    "plateau": Schedule(
        description="halve the rate when the monitored score stalls",
        options=("reduce_lr_patience", "reduce_lr_factor", "min_learning_rate"),
        make=_plateau,
        card=lambda c: f"halved after {c['reduce_lr_patience']} epochs without improvement",
    ),
    "cosine": Schedule(
        description="linear warm-up, then cosine decay to min_learning_rate at the last epoch",
        options=("warmup_epochs", "min_learning_rate"),
        make=_cosine,
        check=_check_cosine,
        card=lambda c: (f"cosine decay to {c.get('min_learning_rate', 0)} after "
                        f"{c.get('warmup_epochs', 0)} warm-up epochs"),
    ),
}
"""Schedule name (as a config's ``lr_schedule`` writes it) -> :class:`Schedule`."""


def schedule(name: str) -> Schedule:
    """The registry entry of ``name``; an unknown name is an error that lists the known ones."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {name!r}; choose one of {list(SCHEDULES)}")
    return SCHEDULES[name]


__all__ = ["SCHEDULES", "Schedule", "schedule"]
