"""Training: one ``train(config)`` that the CLI, the notebooks and the tests all call.

A run is reproducible and resumable: the split is made (or read) before anything trains and
saved in the run folder; every epoch ends with ``last.h5`` (model and optimizer state) and
``state.json`` written atomically, so an interrupted run continues from its last finished epoch
with its epoch count, optimizer state, learning rate and early-stopping counters.

The model comes from :func:`busi.models.build`, the callbacks that make a run resumable and
keep its time budget from :mod:`busi.callbacks`, devices and precision from
:mod:`busi.devices`; this module is the loop that ties them together. XLA (``jit_compile``) is a
GPU option.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pandas as pd
import tensorflow as tf

from busi import _keras, data, losses, models, progress, weights
from busi.batchnorm import PreciseValidation
from busi.callbacks import format_duration, make_callbacks
from busi.config import TrainConfig
from busi.data import datasets
from busi.data.augment import AugmentConfig
from busi.data.pipeline import load_arrays, make_dataset
from busi.data.splits import in_classes
from busi.devices import configure_devices, distribution_strategy, global_policy, precision_policy
from busi.errors import DataError
from busi.runs import RunFolder, check_same_config, environment

keras = _keras.keras()
log = logging.getLogger(__name__)

NO_AUGMENTATION = AugmentConfig(flip_horizontal=False, affine=False, intensity=False, speckle=False)


def prepare_data(
    config: TrainConfig, run: RunFolder, new_run: bool = False
) -> dict[str, pd.DataFrame]:
    """Index and check the dataset and return the rows of each part of the run's split.

    Args:
        config: the run's settings.
        run: the run folder.
        new_run: make the split (or take ``config.split_file``) and write ``split.csv`` and
            ``env.json``. Otherwise (resuming, evaluating) the run's own ``split.csv`` is read,
            nothing is written, and the data must have the fingerprint recorded in ``env.json``.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` index rows; "train" holds only
        ``config.train_classes`` if set.
    """
    table = dataset_table(config)
    if new_run:
        split = make_run_split(config, table)
    elif run.split.is_file():
        split = data.load_split(run.split)
    else:
        raise DataError(f"{run.split}: the run folder has no split; was it trained?")
    parts = split_parts(config, table, split)
    fingerprint = data.fingerprint(pd.concat(parts.values()))
    if new_run:
        data.save_split(split, run.split)
        run.write_json(run.env, environment(fingerprint))
    elif run.env.is_file():
        recorded = json.loads(run.env.read_text()).get("dataset_fingerprint")
        if recorded != fingerprint:
            raise DataError(
                f"{run.env}: the run was made with other data (fingerprint {recorded}, this "
                f"data {fingerprint}); point `data` at the dataset it was trained on"
            )
    if config.train_classes is not None:
        train = parts["train"]
        parts["train"] = train[in_classes(train["label"], config.train_classes)].reset_index(
            drop=True)
    return parts


def dataset_table(config: TrainConfig) -> pd.DataFrame:
    """The checked index of the run's datasets with duplicate (and patient) groups,
    label-conflicting groups left out if ``config.drop_conflicts``: the table a run's split is
    made from and selects in. Several datasets give one table with a ``dataset`` column
    (:func:`busi.data.datasets.combine`)."""
    tables = {name: single_dataset_table(config, name) for name in config.datasets}
    if len(tables) == 1:
        return tables[config.datasets[0]]
    return datasets.combine(tables)


def single_dataset_table(config: TrainConfig, name: str) -> pd.DataFrame:
    """The grouped index of one dataset, where ``config`` says it is (see
    :meth:`TrainConfig.data_path`), label-conflicting groups left out if the config says so."""
    adapter = datasets.get(name)
    table = data.add_groups(adapter.index(adapter.locate(config.data_path(name))))
    return data.drop_conflicts(table) if config.drop_conflicts else table


def split_parts(
    config: TrainConfig, table: pd.DataFrame, split: pd.DataFrame
) -> dict[str, pd.DataFrame]:
    """The index rows of each part of ``split`` (in split-file order), ``config.limit`` applied.

    Their :func:`busi.data.fingerprint` is the run's dataset fingerprint (``env.json``).

    Raises:
        DataError: the split names images ``table`` lacks; the message tells whether they are
            label-conflicting duplicates the run leaves out or images of another dataset.
    """
    missing = sorted(set(split["id"]) - set(table["id"]))
    if missing:
        raise DataError(_missing_images(config, missing))
    parts = {name: data.select(table, split, name) for name in ("train", "val", "test")}
    if config.limit:
        parts = {name: stratified_head(part, config.limit) for name, part in parts.items()}
    return parts


def _missing_images(config: TrainConfig, missing: list[str]) -> str:
    """Why a split names images a run's table lacks, for the error message (an error path, so
    indexing the dataset again to find the label-conflicting images is affordable)."""
    source = f"{config.split_file}: " if config.split_file else ""
    if config.drop_conflicts:
        conflicting: set[str] = set()
        for name in config.datasets:
            kept = single_dataset_table(config.replace(drop_conflicts=False), name)
            conflicting |= set(data.conflicting_groups(kept)["id"])
        if set(missing) <= conflicting:
            return (
                f"{source}the split holds {len(missing)} image(s) of label-conflicting duplicate "
                f"groups, e.g. {missing[:3]}, which training leaves out (drop_conflicts=True, "
                "the default). Make the split from busi.data.drop_conflicts(table), as "
                "busi.training.make_run_split does, or set drop_conflicts=False to keep them."
            )
    return (
        f"{source}the split names {len(missing)} image(s) not in this dataset, e.g. "
        f"{missing[:3]}; was it made for other data than {', '.join(config.datasets)}?"
    )


def make_run_split(config: TrainConfig, table: pd.DataFrame) -> pd.DataFrame:
    """The split a new run with ``config`` trains on: ``config.split_file`` if given, else each
    dataset's own split (:func:`dataset_split`); with several datasets they are stacked, with a
    ``dataset`` column."""
    if config.split_file:
        return data.load_split(config.split_file)
    if len(config.datasets) == 1:
        return dataset_split(config, config.datasets[0], table)
    return pd.concat([
        dataset_split(config, name, table[table["dataset"] == name]).assign(dataset=name)
        for name in config.datasets
    ], ignore_index=True)


def dataset_split(config: TrainConfig, name: str, table: pd.DataFrame) -> pd.DataFrame:
    """The split of one dataset: the published partition if ``config.authors_fold`` is set and
    the dataset has one, else a grouped, stratified split (label-conflicting duplicates left out
    first when ``config.drop_conflicts``). The same for a dataset alone and in a joint run."""
    if config.drop_conflicts:
        table = data.drop_conflicts(table)
    options = {"classes": config.classes, "val_fraction": config.val_fraction,
               "test_fraction": config.test_fraction, "seed": config.seed}
    adapter = datasets.get(name)
    if config.authors_fold is not None and adapter.authors_split is not None:
        root = adapter.locate(config.data_path(name))
        return adapter.authors_split(root, table, config.authors_fold, **options)
    return data.make_split(table, **options)


def stratified_head(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """The first ``n`` rows with the classes interleaved in proportion, so that a small subset
    (quick runs, CI) still holds every class (of every dataset, in a joint run); rows keep their
    relative order within a class."""
    kind = table["label"] if "dataset" not in table else table["dataset"] + "/" + table["label"]
    rank = kind.groupby(kind).cumcount() / kind.groupby(kind).transform("size")
    order = sorted(range(len(table)), key=lambda i: (rank.iat[i], kind.iat[i]))
    return table.iloc[sorted(order[:n])].reset_index(drop=True)


def compile_model(model: keras.Model, config: TrainConfig) -> None:
    """Compile ``model`` with the config's loss, metrics and a fresh optimizer (also after the
    encoder is unfrozen: Keras reads the trainable flags when compiling)."""
    model.compile(
        optimizer=losses.get_optimizer(config.optimizer, config.learning_rate),
        loss=losses.get_loss(config.loss), metrics=losses.get_metrics(),
        jit_compile=config.jit_compile,
    )


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

    No epoch starts that the time budget predicts not to fit
    (:class:`busi.callbacks.TimeLimit`), not even the first of this call.
    """
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


def _train_epochs(config: TrainConfig, run: RunFolder, parts: dict[str, pd.DataFrame],
                  done: int, deadline: float | None) -> str:
    """Train from epoch ``done`` on; returns why training ended: "early", "time" or ""."""
    train_data, validation = _datasets(config, parts, done)
    strategy = distribution_strategy(config.devices)
    # Warm-up with a frozen encoder only makes sense for a pretrained one.
    warmup = 0
    if models.architecture(config.architecture).uses_encoder and config.encoder_weights is not None:
        warmup = min(config.freeze_encoder_epochs, config.epochs)
    with strategy.scope():
        if done:
            model = weights.load_model(run.last, compile=True)
        else:
            model = models.build(config, freeze_encoder=done < warmup)
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

    parts = prepare_data(config, run, new_run=not state)
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
    epoch = format_duration(float(seconds.max())) if len(seconds) else "unknown"
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


def history(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The per-epoch history of a run (for plots and notebooks)."""
    return RunFolder(Path(run_dir)).read_history()


__all__ = [
    "compile_model", "dataset_split", "dataset_table", "history", "make_run_split",
    "prepare_data", "single_dataset_table", "split_parts", "train",
]
