"""Training: one ``train(config)`` that the CLI, the notebooks and the tests all call.

A run is reproducible and resumable: the split is made (or read) before anything trains and
saved in the run folder; every epoch ends with ``last.h5`` (model and optimizer state) and
``state.json`` written atomically, so an interrupted run continues from its last finished epoch
with its epoch count, optimizer state, learning rate and early-stopping counters.

The model comes from :func:`busi.models.architectures.build`, the callbacks that make a run
resumable and keep its time budget from :mod:`busi.training.callbacks`, devices and precision from
:mod:`busi.training.devices`; this module is the loop that ties them together. XLA (``jit_compile``)
is a GPU option.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from busi import _keras
from busi.config.train_config import TrainConfig
from busi.data import datasets
from busi.data.arrays import load_arrays
from busi.data.augment_config import AugmentConfig
from busi.data.batches import make_batches
from busi.data.cache import Cache, open_cache
from busi.data.run_parts import run_parts
from busi.data.splits import in_classes, load_split
from busi.errors import DataError
from busi.evaluation.evaluator import evaluate
from busi.inference import h5_compat, model_file, weights
from busi.models import architectures as models
from busi.models import backend, heads, losses
from busi.runs.folder import RunFolder, check_same_config
from busi.runs.lock import LOCK_NAME
from busi.training.devices import (
    configure_devices,
    distribution_strategy,
    global_policy,
    make_deterministic,
    precision_policy,
)
from busi.training.init_split import trained_on_scored_images
from busi.training.messages import start_message, time_budget_message
from busi.utils import progress
from busi.utils.digests import file_digest, file_sha1
from busi.utils.paths import PROJ_ROOT

log = logging.getLogger(__name__)

NO_AUGMENTATION = AugmentConfig(flip_horizontal=False, affine=False, intensity=False, speckle=False)


def compile_model(model: Any, config: TrainConfig) -> None:
    """Compile ``model`` with the config's loss, metrics and a fresh optimizer (also after the
    encoder is unfrozen: Keras reads the trainable flags when compiling)."""
    loss, metrics = losses.get_loss(config.loss), losses.get_metrics()
    extra: dict = {}
    if heads.has_image_head(model):  # outputs [mask, label]; metric names get a "mask_" prefix
        loss, metrics = [loss, heads.image_label_loss], [metrics, [heads.class_accuracy]]
        extra["loss_weights"] = [1.0, config.image_head_weight]
    model.compile(
        optimizer=losses.get_optimizer(config.optimizer, config.learning_rate, config.weight_decay),
        loss=loss, metrics=metrics, jit_compile=_jit(config), **extra,
    )


def _jit(config: TrainConfig) -> bool | str:
    """tf-keras: XLA only when asked. Keras 3: "auto" unless asked (jit on jax, where running
    without it is several times slower; torch does not compile)."""
    if backend.is_keras3() and not config.jit_compile:
        return "auto"
    return config.jit_compile


def _datasets(config: TrainConfig, parts: dict[str, pd.DataFrame], done: int,
              cache: Cache | None = None):
    """Training data, and the validation callback with its BatchNorm calibration data.

    The seed moves on with the epochs already done, so a resumed run does not replay the
    shuffles and augmentations of its first epochs. Calibration uses training images as the
    model sees them at inference: not augmented, in a fixed shuffled order. With a ``cache``
    the model-size arrays come from it instead of the image files.
    """
    common = {"size": config.image_size, "mode": config.resize, "batch_size": config.batch_size}
    if cache is None:
        arrays = load_arrays(parts["train"], size=config.image_size, mode=config.resize)
    else:
        arrays = cache.arrays(parts["train"])
    train_labels = val_labels = None
    monitored = _monitored(config, parts["val"])
    if config.image_head:
        balance = heads.class_weights(parts["train"], config.image_head_balance)
        train_labels = heads.label_targets(parts["train"], balance)
        val_labels = heads.label_targets(monitored)
    train_options = {
        "training": True, "labels": train_labels,
        "drop_remainder": len(parts["train"]) > config.batch_size,
        "augment_config": config.augment_config() if config.augment else NO_AUGMENTATION}
    val_arrays = None if cache is None else cache.arrays(monitored)
    if backend.is_keras3():  # no tf.data: NumPy/OpenCV batches (and no TensorFlow on jax/torch)
        if val_arrays is None:
            val_arrays = load_arrays(monitored, size=config.image_size, mode=config.resize)
        size = {"batch_size": config.batch_size}
        # the epoch moves the draws on, so a resumed run does not replay its first epochs'
        train_data = make_batches(*arrays[:2], seed=config.seed, epoch=done, **train_options,
                                  steps=config.steps_per_epoch, **size)
        calibration = make_batches(*arrays[:2], shuffle=True, seed=config.seed, **size)
        monitored_data = make_batches(*val_arrays[:2], labels=val_labels, **size)
    else:
        from busi.data.pipeline import make_dataset  # tf-keras only: imports TensorFlow

        train_data = make_dataset(parts["train"], seed=config.seed + 1000 * done,
                                  cache_arrays=arrays, **train_options, **common)
        if config.steps_per_epoch:  # epochs shorter than the data: keep drawing across epochs
            train_data = train_data.repeat()
        calibration = make_dataset(parts["train"], shuffle=True, seed=config.seed,
                                   cache_arrays=arrays, **common)
        monitored_data = make_dataset(monitored, labels=val_labels, cache_arrays=val_arrays,
                                      **common)
    from busi.training.batchnorm import PreciseValidation  # a Keras class: after backend.use()

    validation = PreciseValidation(calibration, monitored_data, config.precise_bn_batches)
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

    No epoch starts that the time budget predicts not to fit
    (:class:`busi.training.callbacks.TimeLimit`), not even the first of this call.
    """
    from busi.training.callbacks import make_callbacks  # Keras classes: after backend.use()

    callbacks = make_callbacks(config, run, run.read_state(), deadline, validation)
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


def _initial_model(config: TrainConfig, run: RunFolder, freeze_encoder: bool) -> Any:
    """The model a new run starts from: built from the config, with ``init_weights`` loaded
    into it when set (then the ImageNet weights are not read, since they would be
    overwritten). The file's digests go into the run folder (``init_weights.json``), so the run
    says what it started from even if the file later changes; a record left by an earlier
    start with other settings is removed."""
    record = run.init_weights
    if config.init_weights is None:
        record.unlink(missing_ok=True)
        return models.build(config, freeze_encoder=freeze_encoder)
    path = init_weights_path(config)
    head_in_file = config.image_head and weights.has_layer(path, heads.LOGITS_LAYER)
    pool_in_file = (heads.pool_of(model_file.layer_names(path)) if head_in_file
                    else TrainConfig.image_head_pool)
    model = models.build(replace(config, encoder_weights=None, image_head=head_in_file,
                                 image_head_pool=pool_in_file), freeze_encoder=freeze_encoder)
    weights.load_weights_into(model, path)
    if head_in_file and pool_in_file != config.image_head_pool:
        log.warning("%s: its image-level head pools by %s, this run's by %s: the head starts "
                    "afresh", path, pool_in_file, config.image_head_pool)
        model = heads.mask_only(model)
    if config.image_head and not heads.has_image_head(model):  # the head starts afresh
        model = heads.add_image_head(model, pool=config.image_head_pool)
    run.write_record(record, {"path": str(path), "sha256": file_digest(path),
                              "sha1": file_sha1(path)})
    log.info("run %s: starts from the weights of %s", run.root, path)
    return model


def init_weights_path(config: TrainConfig) -> Path:
    """The file ``config.init_weights`` names: as given if it exists (absolute, or relative to
    the working directory), else relative to the project root, like ``weights/`` and
    ``runs/``, so a config of this repo works from ``notebooks/`` too.

    Raises:
        FileNotFoundError: neither exists (the message names the field).
    """
    given = Path(config.init_weights)
    for path in (given, PROJ_ROOT / given):
        if path.is_file():
            return path.resolve()
    raise FileNotFoundError(
        f"init_weights: {given} not found (looked in {Path.cwd()} and {PROJ_ROOT}); give the "
        ".h5 of an earlier busi model of the same architecture, e.g. weights/lite0-joint-cpu.h5"
    )


def _train_epochs(config: TrainConfig, run: RunFolder, parts: dict[str, pd.DataFrame],
                  done: int, deadline: float | None, cache: Cache | None = None) -> str:
    """Train from epoch ``done`` on; returns why training ended: "early", "time" or ""."""
    train_data, validation = _datasets(config, parts, done, cache)
    strategy = distribution_strategy(config.devices)
    # Warm-up with a frozen encoder only makes sense for a pretrained one.
    warmup = 0
    pretrained = config.encoder_weights is not None or config.init_weights is not None
    if models.architecture(config.architecture).uses_encoder and pretrained:
        warmup = min(config.freeze_encoder_epochs, config.epochs)
    with strategy.scope():
        if done:
            model = _resumed_model(config, run)
        else:
            model = _initial_model(config, run, freeze_encoder=done < warmup)
            compile_model(model, config)
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
    run.write_record(run.state, final)
    _keras.keras().backend.clear_session()
    return stopped


def _resumed_model(config: TrainConfig, run: RunFolder) -> Any:
    """The model and optimizer state of ``last.h5``. Keras 3.15 loses the optimizer state of an
    ``.h5`` it compiles itself (it builds the optimizer on no variables, and the next ``fit``
    fails), so there the model loads uncompiled, is compiled as training compiles it, and gets
    the saved optimizer variables set: the steps after match an uninterrupted run's."""
    if not backend.is_keras3():
        return weights.load_model(run.last, compile=True)
    model = weights.load_model(run.last, compile=False)
    compile_model(model, config)
    saved = h5_compat.optimizer_weights(run.last)
    if saved:
        model.optimizer.build(model.trainable_variables)
        model.optimizer.set_weights(saved)
    return model


def train(config: TrainConfig | dict | str | os.PathLike, resume: bool = True,
          cache: str | os.PathLike | None = None) -> Path:
    """Train a model as ``config`` says; return the run folder.

    Args:
        config: a TrainConfig, a mapping of its fields, or the path of a JSON/YAML file.
        resume: continue the run in the folder if one is there (same settings, more epochs
            allowed); with False an existing run folder is an error.
        cache: a file of ``busi cache`` (:mod:`busi.data.cache`) made for this config: the
            images, masks and split come from it and the datasets are not read (nor needed).
            The run's ``split.csv`` and fingerprint are those of the raw data, so it is
            evaluated on them later (``busi evaluate``); right after training only if they are
            at hand.

    A training that fails (or is interrupted) before its first epoch has finished removes what
    it wrote, the folder too if it made it: there is nothing to resume, and a half-made folder
    would be taken for a run (by notebooks looking for ``runs/<name>``, say). Files that were
    in the folder before are never touched.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    elif not isinstance(config, TrainConfig):
        config = TrainConfig.load(config)
    backend.use(config.backend)  # refused if this process already runs another backend
    if config.name is None:  # named after the model; config.json then says which name
        config = config.replace(name=config.run_name)
    run = RunFolder(config.directory)
    if run.config.is_file() and not resume:
        raise FileExistsError(f"{run.root}: a run folder exists and resuming it was refused "
                              "(--restart, resume=False in Python); choose another run name")
    stored = None if cache is None else open_cache(cache, config)  # checked before any writing
    if not run.read_state():  # a new run: settings that cannot train leave no folder behind
        check_settings(config, stored)
    made = _missing_folders(run.root)
    before = {entry.name for entry in run.root.iterdir()} if run.root.is_dir() else set()
    removed = False
    try:
        # One writer per run folder: a second training (or an evaluation) of it is refused.
        with run.lock("training"):
            try:
                return _train_locked(config, run, stored)
            except BaseException:
                removed = _remove_unstarted(run, before)  # under the lock: no one else writes
                raise
    finally:
        if removed:
            _remove_folders(run, before, made)


def _missing_folders(root: Path) -> list[Path]:
    """``root`` and those of its parents that do not exist yet, deepest first: the folders that
    making the run folder creates."""
    missing, path = [], root.absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_unstarted(run: RunFolder, before: set[str]) -> bool:
    """Remove what a training that finished no epoch wrote into the run folder (all entries
    but those in ``before`` and the lock file, which goes once released); False, removing
    nothing, once an epoch has finished (``state.json``): that run resumes."""
    if run.state.is_file() or not run.root.is_dir():
        return False
    for entry in run.root.iterdir():
        if entry.name in before or entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    log.warning("%s: removed what this training wrote; it stopped before its first epoch ended",
                run.root)
    return True


def _remove_folders(run: RunFolder, before: set[str], made: list[Path]) -> None:
    """After :func:`_remove_unstarted`, with the lock released: the lock file, and the folders
    the training made, if they are empty."""
    if LOCK_NAME not in before:
        (run.root / LOCK_NAME).unlink(missing_ok=True)
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty (another writer since), or gone
            break


def check_settings(config: TrainConfig, cache: Cache | None = None) -> None:
    """Check what a config cannot check alone, before a run folder is made: each dataset is
    where the config says, ``split_file`` reads (neither with a ``cache``, which stands in for
    both), the network takes ``image_size`` (its builder says), and ``init_weights`` load into
    the model as training will load them. The model is built once for it, without ImageNet
    weights (seconds), so a run that cannot start writes nothing.

    Raises:
        FileNotFoundError, busi.errors.DataError, ValueError: the message names the problem.
    """
    for name in config.datasets if cache is None else ():
        datasets.get(name).locate(config.data_path(name))
    if config.split_file and cache is None:
        if not Path(config.split_file).is_file():
            raise FileNotFoundError(f"split_file: {config.split_file} not found (looked in "
                                    f"{Path.cwd()})")
        load_split(config.split_file)  # a malformed one is named before anything is written
    try:
        with tempfile.TemporaryDirectory() as scratch:  # init_weights' record goes there
            _initial_model(replace(config, encoder_weights=None), RunFolder(scratch),
                           freeze_encoder=False)
    finally:
        _keras.keras().backend.clear_session()


def _train_locked(config: TrainConfig, run: RunFolder, cache: Cache | None = None) -> Path:
    """:func:`train` with the run folder's lock held: the state is read under the lock."""
    from busi.training.callbacks import settle_pending  # Keras classes: after backend.use()

    settle_pending(run)  # a kill between state.json and a checkpoint's rename
    state = run.read_state()
    if state:
        check_same_config(run, config)
        run.verify_checkpoint(run.last)  # resume only from the bytes the state was written for
    elif run.history.is_file():
        raise ValueError(
            f"{run.root}: history.csv but no state.json or last.h5; the run folder is incomplete. "
            "Delete it or choose another run name."
        )
    if not state and config.init_weights is not None:
        init_weights_path(config)  # a missing file fails before the run folder is written
    # A run without a finished epoch starts afresh: settings that failed (say, ImageNet weights
    # offline) can be changed under the same name.
    run.root.mkdir(parents=True, exist_ok=True)
    config.save(run.config)

    # The budget counts from here: reading the data and building the model are part of it.
    deadline = None if config.max_minutes is None else time.perf_counter() + 60 * config.max_minutes
    gpus = configure_devices()
    done = int(state.get("epoch", 0))
    _keras.keras().utils.set_random_seed(config.seed + 1000 * done)
    if config.deterministic:
        make_deterministic()
    policy = precision_policy(config.mixed_precision)
    log.info("run %s: policy %s, GPUs %s", run.root, policy, gpus or "none")

    parts = run_parts(run, config, new_run=not state, cache=cache)
    if not state and config.init_weights is not None:
        leak = trained_on_scored_images(init_weights_path(config), parts, config.datasets[0])
        if leak:
            raise ValueError(leak)
    finished = bool(state.get("stopped_early")) or done >= config.epochs
    print(start_message(config, run, parts, done, finished, cache), flush=True)
    if not finished:
        with global_policy(policy):
            stopped = _train_epochs(config, run, parts, done, deadline, cache)
        finished = stopped != "time" or int(run.read_state().get("epoch", 0)) >= config.epochs
        if not finished:
            log.warning(time_budget_message(config, run, done))
    if config.evaluate and finished and run.best.is_file():
        missing = [] if cache is None else _missing_datasets(config)
        if missing:
            log.warning("run %s: trained from the cache %s; evaluation skipped, since it scores "
                        "masks at the original resolution and %s: run `busi evaluate %s` where "
                        "the data is", run.root, cache.path, "; ".join(missing), run.root)
        else:
            evaluate(run.root)
    return run.root


def _missing_datasets(config: TrainConfig) -> list[str]:
    """Why each of the config's datasets cannot be found, if it cannot."""
    missing = []
    for name in config.datasets:
        try:
            datasets.get(name).locate(config.data_path(name))
        except DataError as error:
            missing.append(str(error))
    return missing


__all__ = ["compile_model", "train"]
