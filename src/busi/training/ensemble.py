"""Several trained models as one: the mean of their outputs, in one ``.h5`` and one run folder.

Two ways make one. ``busi cv`` averages its fold models (:mod:`busi.training.cv`), whose
post-processing is chosen on out-of-fold predictions. ``busi ensemble`` (:func:`combine_runs`)
averages finished runs that share a split, such as a BUSI model and a joint BUSI + BUS-BRA model,
or two seeds of one config: none of them trained on the shared validation and test parts, so the
ensemble's post-processing is chosen on that validation part like any run's, and its test part
is scored once. Averaging helps most where the members err differently; on one split of ~150
test images it is the cheapest way past the +-0.02 Dice a single run moves with its seed.

When every member has the image-level head, the ensemble keeps one: the mean of their class
probabilities, so the gate (an empty mask below a lesion probability chosen on validation)
works on an ensemble as on a single model (a cv ensemble's gate is chosen out of fold:
:mod:`busi.training.cv`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from busi import _keras
from busi.config.train_config import TrainConfig
from busi.data.parts import dataset_table, make_run_split, split_seed
from busi.data.run_parts import run_parts
from busi.data.splits import save_split
from busi.evaluation.evaluator import evaluate
from busi.inference import weights
from busi.models import heads
from busi.runs.ensembles import (
    CHOSEN_ON_VAL,
    ENSEMBLE_FILE,
    ensemble_members,
    member_records,
)
from busi.runs.evaluations import tested
from busi.runs.folder import RunFolder
from busi.runs.lineage import ancestors, split_of
from busi.utils.atomic import write_json
from busi.utils.digests import file_digest


def ensemble_model(paths: Sequence[str | os.PathLike], name: str = "ensemble",
                   keep_head: bool = False) -> Any:
    """One Keras model whose output is the mean of the models' masks (float32 sigmoid maps),
    and with ``keep_head`` (every member must have the image-level head) a second output, the
    mean of their class probabilities.

    The members are loaded through :func:`busi.inference.weights.load_for_inference` (digest
    checked, safe loading: no code from the files, float32) and called side by side on the one
    input; each is a nested model named ``fold<k>``, so their layers keep their own names and the
    ``.h5`` holds only standard layers.

    Raises:
        ValueError: fewer than 2 models, models of different input sizes, or ``keep_head``
            with a member without the head.
    """
    keras = _keras.keras()
    if len(paths) < 2:
        raise ValueError(f"an ensemble needs at least 2 models, got {len(paths)}")
    members = []
    for index, path in enumerate(paths):
        model = weights.load_for_inference(path)
        if keep_head and not heads.has_image_head(model):
            raise ValueError(f"{path}: has no image-level head, so the ensemble cannot keep one")
        if not keep_head:
            model = heads.mask_only(model)
        members.append(keras.Model(model.inputs, model.outputs, name=f"fold{index}"))
    shapes = {tuple(member.input_shape) for member in members}
    if len(shapes) != 1:
        raise ValueError(f"the models take different inputs {sorted(shapes)}: "
                         f"{[str(path) for path in paths]}")
    inputs = keras.Input(shape=members[0].input_shape[1:], name="image")
    outputs = [member(inputs) for member in members]
    if not keep_head:
        mean = keras.layers.Average(name="mask", dtype="float32")(outputs)
        return keras.Model(inputs, mean, name=name)
    mask = keras.layers.Average(name="mask", dtype="float32")([out[0] for out in outputs])
    label = keras.layers.Average(name=heads.LABEL_LAYER, dtype="float32")(
        [out[1] for out in outputs])
    return keras.Model(inputs, [mask, label], name=name)


SAME_SETTINGS = ("image_size", "resize", "classes", "drop_conflicts", "limit")
"""Settings the members must share: how images are prepared, and which images make the parts."""


def sources(run: RunFolder) -> list[RunFolder]:
    """The run folders ``run``'s weights descend from through ``init_weights``, nearest first
    (:func:`busi.runs.lineage.ancestors`).

    Raises:
        ValueError: a start that is not a run's weights beside its ``split.csv`` (a published
            file, say): what it trained on cannot be checked against the ensemble's parts.
    """
    chain, unchecked = ancestors(run)
    if unchecked is not None:
        started = chain[-1] if chain else run
        raise ValueError(f"{started.init_weights}: started from {unchecked}, which is not a "
                         "run's weights beside its split.csv, so whether it trained on the "
                         "ensemble's validation or test images cannot be checked")
    return chain


def combined_split(members: Sequence[RunFolder]) -> pd.DataFrame:
    """The ensemble's split: per dataset, the split its members share (a dataset only some of
    them trained on keeps theirs: the others never saw it).

    The runs the members were fine-tuned from (:func:`sources`) must split the datasets they
    share alike too: their training images are in the members' weights.

    Raises:
        ValueError: two of these runs split a dataset differently; then an image of one
            member's validation or test part may be another's (or its start's) training image.
    """
    per_dataset: dict[str, tuple[RunFolder, pd.DataFrame]] = {}
    lineage = [*members, *(source for member in members for source in sources(member))]
    for run in lineage:
        for name, rows in split_of(run).groupby("dataset", sort=False):
            rows = rows.sort_values("id").reset_index(drop=True)
            if name not in per_dataset:
                if run in members:  # a start's other datasets are not the ensemble's
                    per_dataset[name] = (run, rows)
                continue
            first, seen = per_dataset[name]
            if not rows[["id", "split"]].equals(seen[["id", "split"]]):
                raise ValueError(
                    f"{run.split}: splits {name} otherwise than {first.split}; the runs of an "
                    "ensemble, and those they were fine-tuned from, must split each dataset "
                    "they share alike (the same split_seed, e.g. --set split_seed=0, fractions, "
                    "classes, drop_conflicts and data)")
    split = pd.concat([rows for _, rows in per_dataset.values()], ignore_index=True)
    return split if len(per_dataset) > 1 else split.drop(columns="dataset")


def ensemble_config(members: Sequence[RunFolder], name: str, directory: Path,
                    keep_head: bool) -> TrainConfig:
    """The config the ensemble's folder records: the first member's model settings, all the
    members' datasets (where each lies) and the split seed of the first; ``split_file`` is
    left for :func:`combine_runs` to set when that seed does not make the combined split.

    Raises:
        ValueError: members that differ in a setting of :data:`SAME_SETTINGS`.
    """
    configs = [member.load_config() for member in members]
    for member, config in zip(members[1:], configs[1:], strict=True):
        for key in SAME_SETTINGS:
            if getattr(config, key) != getattr(configs[0], key):
                raise ValueError(f"{member.config}: {key} {getattr(config, key)!r}, but "
                                 f"{members[0].config} has {getattr(configs[0], key)!r}; the "
                                 "members of an ensemble must agree on it")
    datasets = tuple(dict.fromkeys(name for config in configs for name in config.datasets))
    paths = {dataset: config.data_path(dataset) for config in configs
             for dataset in config.datasets if config.data_path(dataset)}
    return configs[0].replace(
        name=name, run_dir=str(directory), datasets=datasets, data_paths=paths,
        split_file=None, split_seed=split_seed(configs[0]), init_weights=None,
        image_head=keep_head,
    )


def _same_split(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    keys = ["dataset", "id"] if "dataset" in a else ["id"]
    columns = [*keys, "split"]
    if list(a.columns[a.columns.isin(columns)]) != list(b.columns[b.columns.isin(columns)]):
        return False
    return a[columns].sort_values(keys, ignore_index=True).equals(
        b[columns].sort_values(keys, ignore_index=True))


def _check_folders(members: Sequence[RunFolder], run: RunFolder) -> None:
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 runs, got {len(members)}")
    for member in members:
        if not member.best.is_file():
            raise FileNotFoundError(f"{member.best}: not found; is {member.root} trained?")
        if (member.root / ENSEMBLE_FILE).is_file():
            raise ValueError(f"{member.root}: is an ensemble; give the runs it averages instead")
        if member.root.resolve() == run.root.resolve():
            raise ValueError(f"{run.root}: is one of the members; give the ensemble another name")
    if run.config.is_file() and not (run.root / ENSEMBLE_FILE).is_file():
        raise ValueError(f"{run.root}: a run folder that is not an ensemble; give the ensemble "
                         "another name")


def write_ensemble(run: RunFolder, config: TrainConfig, members: Sequence[RunFolder],
                   listed: list[dict[str, str]], chosen_on: str, keep_head: bool = False) -> None:
    """Write an ensemble's run folder, as both kinds have it: ``config.json``, ``split.csv``
    and ``env.json`` (as a new run's, from ``config``: its ``split_file`` must already hold the
    split if it names one), ``best.h5`` (:func:`ensemble_model`), ``state.json`` with its
    SHA-256 (checked before it is loaded or published, as a trained run's) and
    :data:`ENSEMBLE_FILE` (``listed`` members, what the post-processing is ``chosen_on``)."""
    config.save(run.config)
    run_parts(run, config, new_run=True)
    keras = _keras.keras()
    try:
        model = ensemble_model([member.best for member in members], keep_head=keep_head)
        weights.save_model(model, run.best, include_optimizer=False)
    finally:
        keras.backend.clear_session()
    run.write_record(run.state, {"sha256": {run.best.name: file_digest(run.best)}})
    write_json(run.root / ENSEMBLE_FILE, {
        "members": listed,
        "output": "mean of the members' lesion probabilities"
                  + (" and of their class probabilities" if keep_head else ""),
        "postprocess_chosen_on": chosen_on,
        "image_head": keep_head,
    })


def combine_runs(run_dirs: Sequence[str | os.PathLike], name: str,
                 directory: str | os.PathLike | None = None) -> Path:
    """Make the run folder of the ensemble of finished runs, evaluate it, return the folder.

    Writes ``split.csv`` (:func:`combined_split`), ``config.json`` (:func:`ensemble_config`),
    ``env.json``, ``best.h5`` (:func:`ensemble_model`; it keeps the image-level head when
    every member has one), ``state.json`` with its SHA-256 and :data:`ENSEMBLE_FILE`, then
    evaluates it like any run: post-processing (and the gate) chosen on the validation part,
    the test part scored once. Made and evaluated again only if a member's ``best.h5`` changed.
    The config makes its split again from the datasets (so a published ensemble is scored from
    its sidecar like any model) unless only the combined file gives it (``split_file``).

    Args:
        run_dirs: at least two run folders (evaluated or not) with their ``best.h5``.
        name: the ensemble's name.
        directory: its folder; default ``NAME`` beside the first member.

    Raises:
        ValueError: runs that cannot form one (see :func:`combined_split`,
            :func:`ensemble_config`, :func:`ensemble_model`), an ensemble given as a run, or a
            folder of another run as the ensemble's.
        FileNotFoundError: a run without ``best.h5``.
    """
    members = [RunFolder(path) for path in run_dirs]
    folder = Path(directory) if directory is not None else members[0].root.parent / name
    run = RunFolder(folder)
    _check_folders(members, run)
    listed = member_records(members, run.root.parent)
    keep_head = all(member.load_config().image_head for member in members)
    config = ensemble_config(members, name, run.root, keep_head)
    run.root.mkdir(parents=True, exist_ok=True)
    with run.lock("building the ensemble"):
        if ensemble_members(run, listed, image_head=keep_head) is None:
            split = combined_split(members)
            if not _same_split(make_run_split(config, dataset_table(config)), split):
                save_split(split, run.root / "members_split.csv")
                config = config.replace(split_file=str(run.root / "members_split.csv"))
            write_ensemble(run, config, members, listed, CHOSEN_ON_VAL, keep_head)
        if not tested(run):
            evaluate(run.root)
    return run.root


__all__ = ["SAME_SETTINGS", "combine_runs", "combined_split", "ensemble_config", "ensemble_model",
           "sources", "write_ensemble"]
