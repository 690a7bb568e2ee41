"""Training: one ``train(config)`` that the CLI, the notebooks and the tests all call.

A run is reproducible and resumable: the split is made (or read) before anything trains and
saved in the run folder; every epoch ends with ``last.h5`` (model and optimizer state) and
``state.json`` written atomically, so an interrupted run continues from its last finished epoch
with its epoch count, optimizer state, learning rate and early-stopping counters.

Devices: on a GPU, memory growth is switched on and ``mixed_precision="auto"`` trains in float16;
with several GPUs the model is replicated with ``tf.distribute.MirroredStrategy`` (the batch size
is the global batch). On a CPU, "auto" keeps float32, the precision results are reported in;
``mixed_bfloat16`` is an opt-in on CPUs with bf16 units (1.6x faster training of the ResNet34
U-Net on this project's Zen 5 machine, ``benchmarks/speed.py``). XLA (``jit_compile``) is a GPU
option.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import tensorflow as tf

from busi import _keras, losses, models, progress, weights
from busi.atomic import atomic_write_text
from busi.batchnorm import PreciseValidation
from busi.config import TrainConfig
from busi.data.augment import AugmentConfig
from busi.data.pipeline import load_arrays, make_dataset
from busi.data.splits import in_classes
from busi.digests import file_digest
from busi.runs import RunFolder, check_same_config

keras = _keras.keras()
log = logging.getLogger(__name__)

NO_AUGMENTATION = AugmentConfig(flip_horizontal=False, affine=False, intensity=False, speckle=False)


def configure_devices() -> list[str]:
    """Switch on GPU memory growth (so TensorFlow does not grab all GPU memory); list GPUs."""
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # GPUs already initialised: the setting cannot change any more
            pass
    return [gpu.name for gpu in gpus]


def distribution_strategy(devices: list[str] | None = None) -> tf.distribute.Strategy:
    """MirroredStrategy over several GPUs (or the given devices), else the default strategy."""
    if devices:
        return tf.distribute.MirroredStrategy(devices=devices)
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def precision_policy(name: str) -> str:
    """The Keras mixed-precision policy for a config value ("auto" picks by device)."""
    if name == "auto":
        return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    return name


def _optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=config.learning_rate)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=config.learning_rate, momentum=0.9)
    return keras.optimizers.Adam(learning_rate=config.learning_rate)


def build(config: TrainConfig, frozen: bool = False) -> keras.Model:
    """The model of a config, compiled with its loss, metrics and optimizer."""
    shape = (config.image_size, config.image_size, 3)
    if config.architecture == "unet":
        options = {"encoder": config.encoder, "encoder_weights": config.encoder_weights,
                   "freeze_encoder": frozen, "decoder_filters": config.decoder_filters}
    else:
        options = {"base_filters": config.base_filters, "depth": config.depth,
                   "dropout": config.dropout}
    model = models.make_model(config.architecture, input_shape=shape, **options)
    compile_model(model, config)
    return model


def compile_model(model: keras.Model, config: TrainConfig) -> None:
    model.compile(
        optimizer=_optimizer(config), loss=losses.get_loss(config.loss),
        metrics=losses.get_metrics(), jit_compile=config.jit_compile,
    )


class _EpochInfo(keras.callbacks.Callback):
    """Adds the learning rate and the epoch's wall time to the logs the other callbacks see."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["lr"] = float(keras.backend.get_value(self.model.optimizer.learning_rate))
            logs["seconds"] = round(time.perf_counter() - self._start, 2)


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
                _minutes(projected - self.epoch_start),
                f"{_minutes(left)} left" if left > 0 else "already used up",
            )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.durations.append(time.perf_counter() - self.epoch_start)
        if not self.next_epoch_fits():
            self.stopped = self.model.stop_training = True


def _minutes(seconds: float) -> str:
    """A duration as people say it: "45 s", "6.2 min"."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class _Resumable:
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


class EarlyStopping(_Resumable, keras.callbacks.EarlyStopping):
    pass


class ReduceLROnPlateau(_Resumable, keras.callbacks.ReduceLROnPlateau):
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
        keras.backend.set_value(self.model.optimizer.learning_rate, self.rate(epoch))

    def counters(self) -> dict[str, Any]:
        return {}


class RunCheckpoint(keras.callbacks.Callback):
    """Saves best.h5 (float32), last.h5 (training precision, with the optimizer), history.csv
    and state.json at each epoch end, atomically.

    ``last.h5`` is written before ``state.json``: the state never names an epoch whose model is
    not on disk. Runs after the callbacks whose counters it records.
    """

    def __init__(self, run: RunFolder, config: TrainConfig, history: pd.DataFrame,
                 best: float | None, tracked: list):
        super().__init__()
        self.run, self.config, self.history = run, config, history
        self.monitor, self.mode = config.monitor, config.monitor_mode
        self.best = best
        self.tracked = tracked
        self.checkpoints: dict[str, str] = dict(run.read_state().get("sha256", {}))
        self._settle_pending_best()

    @property
    def _pending(self) -> Path:
        return self.run.best.with_name("best.pending.h5")

    def _settle_pending_best(self) -> None:
        """A ``best.pending.h5`` left by a kill between ``state.json`` and its rename: promoted
        if the state recorded it (its epoch finished), else dropped (its epoch did not)."""
        pending = self._pending
        if pending.is_file():
            if file_digest(pending) == self.checkpoints.get(self.run.best.name):
                os.replace(pending, self.run.best)
            else:
                pending.unlink()

    def _improved(self, value: float) -> bool:
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
            # leaves best.h5 and the recorded hash in step (see _settle_pending_best).
            best = weights.with_policy(self.model, "float32")
            weights.save_model(best, self._pending, include_optimizer=False)
            self.checkpoints[self.run.best.name] = file_digest(self._pending)
        weights.save_model(self.model, self.run.last, include_optimizer=True)
        self.checkpoints[self.run.last.name] = file_digest(self.run.last)
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}}
        self.history = pd.concat([self.history, pd.DataFrame([row])], ignore_index=True)
        atomic_write_text(self.run.history, self.history.to_csv(index=False))
        self.run.write_json(self.run.state, {
            "epoch": epoch + 1, "best": self.best, "monitor": self.monitor,
            "callbacks": [cb.counters() for cb in self.tracked],
            "stopped_early": False,
            # what was written, so that publishing can tell a damaged or replaced checkpoint
            "sha256": dict(self.checkpoints),
        })
        if self._pending.is_file():
            os.replace(self._pending, self.run.best)


@dataclass
class _Callbacks:
    early: EarlyStopping
    time_limit: TimeLimit
    all: list


def _callbacks(config: TrainConfig, run: RunFolder, state: dict[str, Any],
               deadline: float | None, validation: PreciseValidation) -> _Callbacks:
    restored = state.get("callbacks", [{}, {}])
    mode = config.monitor_mode
    early = EarlyStopping(
        monitor=config.monitor, mode=mode, patience=config.early_stopping_patience,
        restore=restored[0],
    )
    if config.lr_schedule == "cosine":
        schedule: CosineSchedule | ReduceLROnPlateau = CosineSchedule(
            config.learning_rate, config.min_learning_rate, config.epochs, config.warmup_epochs
        )
    else:
        schedule = ReduceLROnPlateau(
            monitor=config.monitor, mode=mode, factor=config.reduce_lr_factor,
            patience=config.reduce_lr_patience, min_lr=config.min_learning_rate,
            restore=restored[1],
        )
    # Rows past the last recorded epoch come from an epoch whose state was never written.
    history = run.read_history()
    if len(history):
        history = history[history["epoch"] <= int(state.get("epoch", 0))]
    checkpoint = RunCheckpoint(run, config, history, state.get("best"), [early, schedule])
    recorded = history["seconds"].dropna().tolist() if "seconds" in history else []
    time_limit = TimeLimit(deadline, recorded)
    return _Callbacks(early, time_limit, [
        validation, _EpochInfo(), keras.callbacks.TerminateOnNaN(), early, schedule, checkpoint,
        time_limit,
        keras.callbacks.TensorBoard(log_dir=str(run.logs), profile_batch=0, write_graph=False),
    ])


def _datasets(config: TrainConfig, parts: dict[str, pd.DataFrame], done: int):
    """Training data, and the validation callback with its BatchNorm calibration data.

    The seed moves on with the epochs already done, so a resumed run does not replay the
    shuffles and augmentations of its first epochs. Calibration uses training images as the
    model sees them at inference: not augmented, in a fixed shuffled order.
    """
    common = {"size": config.image_size, "mode": config.resize, "batch_size": config.batch_size}
    arrays = load_arrays(parts["train"], size=config.image_size, mode=config.resize)
    train_data = make_dataset(
        parts["train"], training=True, seed=config.seed + 1000 * done, cache_arrays=arrays,
        drop_remainder=len(parts["train"]) > config.batch_size,
        augment_config=config.augment_config() if config.augment else NO_AUGMENTATION, **common,
    )
    if config.steps_per_epoch:  # epochs shorter than the data: keep drawing across epochs
        train_data = train_data.repeat()
    calibration = make_dataset(parts["train"], shuffle=True, seed=config.seed,
                               cache_arrays=arrays, **common)
    validation = PreciseValidation(calibration, make_dataset(_monitored(config, parts["val"]),
                                                             **common),
                                   config.precise_bn_batches)
    return train_data, validation


def _monitored(config: TrainConfig, val: pd.DataFrame) -> pd.DataFrame:
    """The validation images whose score picks ``best.h5``: those of ``train_classes``, if set.

    A model trained on lesion images only marks something on normal images; counted in the
    pooled validation IoU, those false positives swamped the lesion scores and made the
    checkpoint choice follow noise (the first run trained on lesions, ``classic-unet-lesions-
    cpu``, kept epoch 53 of 120 for a one-epoch jump of the pooled IoU to 0.63 from ~0.40).
    Post-processing and the reported scores still use every validation and test image.
    """
    if config.train_classes is None:
        return val
    return val[in_classes(val["label"], config.train_classes)].reset_index(drop=True)


def _fit(model, config, run, train_data, validation, initial_epoch, epochs, deadline) -> str:
    """One call of ``model.fit``; returns why it ended: "early", "time" or "" (all epochs).

    No epoch starts that the time budget predicts not to fit (:class:`TimeLimit`), not even the
    first of this call.
    """
    callbacks = _callbacks(config, run, run.read_state(), deadline, validation)
    if not callbacks.time_limit.next_epoch_fits():
        return "time"
    model.fit(
        train_data, epochs=epochs, initial_epoch=initial_epoch,
        steps_per_epoch=config.steps_per_epoch, callbacks=callbacks.all,
        verbose=progress.keras_verbose(),
    )
    if callbacks.early.stopped_epoch:
        return "early"
    return "time" if callbacks.time_limit.stopped else ""


@contextmanager
def global_policy(policy: str) -> Iterator[None]:
    """Keras' global precision policy set to ``policy`` for a block, then put back, so that a
    mixed-precision run does not leak its policy into models built after it (notebooks, tests).
    """
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _train_epochs(config: TrainConfig, run: RunFolder, parts: dict[str, pd.DataFrame],
                  done: int, deadline: float | None) -> str:
    """Train from epoch ``done`` on; returns why training ended: "early", "time" or ""."""
    train_data, validation = _datasets(config, parts, done)
    strategy = distribution_strategy(config.extra.get("devices"))
    # Warm-up with a frozen encoder only makes sense for a pretrained one.
    warmup = 0
    if config.architecture == "unet" and config.encoder_weights is not None:
        warmup = min(config.freeze_encoder_epochs, config.epochs)
    with strategy.scope():
        if done:
            model = weights.load_model(run.last, compile=True)
        else:
            model = build(config, frozen=done < warmup)
        stopped = ""
        if done < warmup:
            stopped = _fit(model, config, run, train_data, validation, done, warmup, deadline)
            stopped = "" if stopped == "early" else stopped  # fine-tuning still to come
            done = int(run.read_state().get("epoch", done))
        frozen = warmup and any(not layer.trainable for layer in models.encoder_layers(model))
        if frozen and not stopped:
            models.set_encoder_trainable(model, True)
            compile_model(model, config)  # a new optimizer for the whole network
        if not stopped and done < config.epochs:
            stopped = _fit(model, config, run, train_data, validation, done, config.epochs,
                           deadline)
    final = run.read_state()
    final["stopped_early"] = stopped == "early"
    run.write_json(run.state, final)
    keras.backend.clear_session()
    return stopped


def train(config: TrainConfig | dict | str | os.PathLike, resume: bool = True) -> Path:
    """Train a model as ``config`` says; return the run folder.

    Args:
        config: a TrainConfig, a mapping of its fields, or the path of a JSON/YAML file.
        resume: continue the run in the folder if one is there (same settings, more epochs
            allowed); with False an existing run folder is an error.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    elif not isinstance(config, TrainConfig):
        config = TrainConfig.load(config)
    run = RunFolder(config.directory)
    if run.config.is_file() and not resume:
        raise FileExistsError(f"{run.root}: run folder exists; pass resume=True or a new name")
    # One writer per run folder: a second training (or an evaluation) of it is refused.
    with run.lock("training"):
        return _train_locked(config, run)


def _train_locked(config: TrainConfig, run: RunFolder) -> Path:
    """:func:`train` with the run folder's lock held: the state is read under the lock."""
    state = run.read_state()
    if state:
        check_same_config(run, config)
    elif run.history.is_file():
        raise ValueError(
            f"{run.root}: history.csv but no state.json or last.h5; the run folder is incomplete. "
            "Delete it or choose another run name."
        )
    # A run without a finished epoch starts afresh: settings that failed (say, ImageNet weights
    # offline) can be changed under the same name.
    run.root.mkdir(parents=True, exist_ok=True)
    config.save(run.config)

    # The budget counts from here: reading the data and building the model are part of it.
    deadline = None if config.max_minutes is None else time.perf_counter() + 60 * config.max_minutes
    gpus = configure_devices()
    done = int(state.get("epoch", 0))
    keras.utils.set_random_seed(config.seed + 1000 * done)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    policy = precision_policy(config.mixed_precision)
    log.info("run %s: policy %s, GPUs %s", run.root, policy, gpus or "none")

    parts = run.parts(config, new_run=not state)
    finished = bool(state.get("stopped_early")) or done >= config.epochs
    if not finished:
        with global_policy(policy):
            stopped = _train_epochs(config, run, parts, done, deadline)
        finished = stopped != "time"
        if not finished:
            log.warning(time_budget_message(config, run, done))
    if config.evaluate and finished and run.best.is_file():
        from busi.evaluation import evaluate

        evaluate(run.root)
    return run.root


def time_budget_message(config: TrainConfig, run: RunFolder, done_before: int) -> str:
    """What a run stopped by its time budget tells the user: how far it got, how to go on,
    and that evaluation was skipped (it runs once training has finished)."""
    history = run.read_history()
    done = int(run.read_state().get("epoch", done_before))
    budget = f"{config.max_minutes:g} min"
    seconds = history["seconds"].dropna() if "seconds" in history else pd.Series(dtype=float)
    epoch = _minutes(float(seconds.max())) if len(seconds) else "unknown"
    skipped = "; evaluation skipped" if config.evaluate else ""
    if done == done_before:
        return (
            f"stopped by the time budget ({budget}) before epoch {done + 1} of {config.epochs}: "
            f"an epoch takes about {epoch}, more than the budget allows; raise max_minutes "
            f"(e.g. --set max_minutes=...) to continue{skipped}"
        )
    message = (
        f"stopped by the time budget ({budget}) after {done - done_before} epoch(s) "
        f"(epoch {done} of {config.epochs}; the slowest took {epoch}); run the same command "
        f"(or train again with the same config) to continue{skipped}"
    )
    if done - done_before == 1 and len(seconds) and seconds.iloc[-1] > 60 * config.max_minutes:
        message += (". That epoch alone took longer than the whole budget: an epoch is never "
                    "cut short; raise max_minutes to train more than one epoch per session")
    return message


__all__ = ["build", "compile_model", "train"]
