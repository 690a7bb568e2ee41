"""The Keras callbacks of a training run: what makes it resumable and keeps its time budget.

Every epoch ends with ``last.h5`` (model and optimizer state), ``history.csv`` and
``state.json`` written atomically (:class:`RunCheckpoint`), and the counters of early stopping
and the learning-rate schedule are part of that state, so an interrupted run continues from its
last finished epoch as if it had not stopped. :class:`TimeLimit` keeps a session within
``max_minutes``. The training loop itself is :mod:`busi.training.trainer`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from busi import _keras
from busi.config.train_config import TrainConfig
from busi.inference import weights
from busi.models import backend, schedules
from busi.models.lr_callbacks import Resumable
from busi.runs.folder import RunFolder
from busi.training.batchnorm import PreciseValidation
from busi.training.messages import format_duration
from busi.utils.atomic import atomic_write_text
from busi.utils.digests import file_digest

keras = _keras.keras()
log = logging.getLogger(__name__)


def _unprefix_mask_metrics(logs: dict) -> None:
    """The mask's metrics of a model with the image head under their one-output names
    (``mask_iou_score`` -> ``iou_score``), so that ``monitor``, history and plots read the same
    keys for every model; the head's own keep theirs (``label_loss``, ...)."""
    for key in [key for key in logs if "mask_" in key and not key.endswith("mask_loss")]:
        logs[key.replace("mask_", "", 1)] = logs.pop(key)


class _EpochInfo(keras.callbacks.Callback):
    """Adds the learning rate and the epoch's wall time to the logs the other callbacks see, and
    names the mask's metrics as a one-output model does."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            _unprefix_mask_metrics(logs)
            logs["lr"] = backend.get_value(self.model.optimizer.learning_rate)
            logs["seconds"] = round(time.perf_counter() - self._start, 2)


class EpochProgress(keras.callbacks.ProgbarLogger):
    """Keras' progress output with an ``Epoch k/N`` header at every epoch, N the run's epochs.

    Keras prints no header when one ``fit`` call trains a single epoch (a run of one epoch, a
    frozen-encoder warm-up epoch, the last epoch of a resumed run) and counts a warm-up call's
    epochs as if they were the run's: without this a run could start with no sign of which
    epoch it is in.
    """

    def __init__(self, epochs: int) -> None:
        if backend.is_keras3():  # Keras 3 counts steps always and takes no count_mode
            super().__init__()
        else:
            super().__init__(count_mode="steps")
        self.total = epochs

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._reset_progbar()
        self._maybe_init_progbar()
        if self.verbose:
            print(f"Epoch {epoch + 1}/{self.total}", flush=True)


class TimeLimit(keras.callbacks.Callback):
    """Keeps training within the run's time budget (``max_minutes``) to within one epoch.

    An epoch is never cut short (a finished epoch is never thrown away; the stopped run resumes
    from ``last.h5``), so the budget is kept by not starting an epoch that is predicted to end
    past the deadline. The prediction is the slowest epoch measured so far, in this session or,
    on resuming, recorded in ``history.csv`` (``seconds``). Only an epoch with nothing measured
    before it, the first of a new run, can overrun; a few batches into it, its projected length
    is compared with the time left and a warning says at once that it will overrun.
    """

    def __init__(self, deadline: float | None, durations: list[float] | None = None):
        super().__init__()
        self.deadline = deadline
        self.durations = list(durations or [])
        self.epoch_start = time.perf_counter()
        self.stopped = False
        self.warned = False

    def predicted(self) -> float:
        """Seconds the next epoch is expected to take (0 with nothing measured yet)."""
        return max(self.durations, default=0.0)

    def next_epoch_fits(self) -> bool:
        """Whether an epoch started now is predicted to end by the deadline. With nothing
        measured (a new run's first epoch) it cannot be told, and the epoch starts: a run always
        gets one epoch further."""
        if self.deadline is None or not self.durations:
            return True
        return time.perf_counter() + self.predicted() <= self.deadline

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.deadline is None or self.durations or self.warned or batch < 2:
            return
        steps = (self.params or {}).get("steps")
        if not steps:
            return
        now = time.perf_counter()
        projected = self.epoch_start + (now - self.epoch_start) * steps / (batch + 1)
        if projected > self.deadline:
            self.warned = True
            left = self.deadline - now
            log.warning(
                "time budget: this epoch will take about %s (training alone), past the time "
                "budget (%s); it will be finished, then training stops",
                format_duration(projected - self.epoch_start),
                f"{format_duration(left)} left" if left > 0 else "already used up",
            )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.durations.append(time.perf_counter() - self.epoch_start)
        # After the last epoch of the fit nothing is stopped: a run that did all its epochs is
        # finished (and evaluated), whatever another epoch would have cost.
        epochs = (getattr(self, "params", None) or {}).get("epochs")
        last = epochs is not None and epoch + 1 >= epochs
        if not last and not self.next_epoch_fits():
            self.stopped = self.model.stop_training = True


class EarlyStopping(Resumable, keras.callbacks.EarlyStopping):
    pass


def pending_path(checkpoint: Path) -> Path:
    """Where a checkpoint is written before ``state.json`` records it: ``<stem>.pending.h5``."""
    return checkpoint.with_name(f"{checkpoint.stem}.pending.h5")


def settle_pending(run: RunFolder) -> None:
    """Checkpoints a kill left as ``<stem>.pending.h5`` between ``state.json`` and their rename:
    promoted if the state recorded them (their epoch finished), else dropped (it did not). So
    ``best.h5`` and ``last.h5`` are always the files whose SHA-256 ``state.json`` holds, which
    resuming and publishing check (:meth:`busi.runs.folder.RunFolder.verify_checkpoint`); call it
    before the state is read to resume."""
    for checkpoint in (run.best, run.last):
        pending = pending_path(checkpoint)
        if pending.is_file():
            if file_digest(pending) == run.recorded_sha256(checkpoint):
                os.replace(pending, checkpoint)
            else:
                pending.unlink()


class RunCheckpoint(keras.callbacks.Callback):
    """Saves best.h5 (float32), last.h5 (training precision, with the optimizer), history.csv
    and state.json at each epoch end, atomically.

    Each checkpoint is written as ``<stem>.pending.h5``, its SHA-256 recorded in ``state.json``,
    and only then renamed into place (:func:`settle_pending` finishes the rename after a kill):
    the state never names an epoch whose model is not on disk, nor a file it did not record.
    Runs after the callbacks whose counters it records.
    """

    def __init__(self, run: RunFolder, config: TrainConfig, history: pd.DataFrame,
                 best: float | None, tracked: list):
        super().__init__()
        self.run, self.config, self.history = run, config, history
        self.monitor, self.mode = config.monitor, config.monitor_mode
        self.best = best
        self.tracked = tracked
        settle_pending(run)
        self.checkpoints: dict[str, str] = dict(run.read_state().get("sha256", {}))

    def _improved(self, value: float) -> bool:
        if self.config.keep == "last":
            return True
        if self.best is None or math.isnan(self.best):
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        value = logs.get(self.monitor)
        if value is None:
            raise KeyError(
                f"monitor {self.monitor!r} is not among the logged metrics {sorted(logs)}"
            )
        if not math.isnan(value) and self._improved(value):
            self.best = float(value)
            # best.h5 is for evaluation and prediction: float32 whatever the training precision,
            # so that reported scores are float32 scores and the file runs fast on any device.
            # It becomes best.h5 only after state.json records its hash: a kill in between
            # leaves best.h5 and the recorded hash in step (see settle_pending).
            best = weights.with_policy(self.model, "float32")
            weights.save_model(best, pending_path(self.run.best), include_optimizer=False)
            self.checkpoints[self.run.best.name] = file_digest(pending_path(self.run.best))
        weights.save_model(self.model, pending_path(self.run.last), include_optimizer=True)
        self.checkpoints[self.run.last.name] = file_digest(pending_path(self.run.last))
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}}
        self.history = pd.concat([self.history, pd.DataFrame([row])], ignore_index=True)
        atomic_write_text(self.run.history, self.history.to_csv(index=False))
        self.run.write_record(self.run.state, {
            "epoch": epoch + 1, "best": self.best, "monitor": self.monitor,
            "callbacks": [cb.counters() for cb in self.tracked],
            "stopped_early": False,
            # what was written, so that publishing can tell a damaged or replaced checkpoint
            "sha256": dict(self.checkpoints),
        })
        for checkpoint in (self.run.best, self.run.last):
            if pending_path(checkpoint).is_file():
                os.replace(pending_path(checkpoint), checkpoint)


@dataclass
class Callbacks:
    """The callbacks of one ``model.fit`` call, with the two whose outcome says why it ended."""

    early: EarlyStopping
    time_limit: TimeLimit
    all: list


def make_callbacks(config: TrainConfig, run: RunFolder, state: dict[str, Any],
                   deadline: float | None, validation: PreciseValidation) -> Callbacks:
    """The callbacks of a ``model.fit`` call, their counters restored from ``state`` (the run's
    ``state.json``), in the order they must run: validation first (its scores are what the
    others read), the checkpoint after the callbacks whose counters it records."""
    restored = state.get("callbacks", [{}, {}])
    mode = config.monitor_mode
    early = EarlyStopping(
        monitor=config.monitor, mode=mode, patience=config.early_stopping_patience,
        restore=restored[0],
    )
    schedule = schedules.schedule(config.lr_schedule).make(config, restored[1])
    # Rows past the last recorded epoch come from an epoch whose state was never written.
    history = run.read_history()
    if len(history):
        history = history[history["epoch"] <= int(state.get("epoch", 0))]
    checkpoint = RunCheckpoint(run, config, history, state.get("best"), [early, schedule])
    recorded = history["seconds"].dropna().tolist() if "seconds" in history else []
    time_limit = TimeLimit(deadline, recorded)
    # TensorBoard writes with tf.summary: on jax/torch history.csv is the record
    board = ([keras.callbacks.TensorBoard(log_dir=str(run.logs), profile_batch=0,
                                          write_graph=False)] if backend.uses_tensorflow() else [])
    return Callbacks(early, time_limit, [
        validation, _EpochInfo(), keras.callbacks.TerminateOnNaN(), early, schedule, checkpoint,
        time_limit, *board,
        EpochProgress(config.epochs),  # last: it prints the epoch's logs as the others left them
    ])


