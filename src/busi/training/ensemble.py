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
works on an ensemble as on a single model. A cv ensemble keeps masks only, since its gate could
only be chosen on predictions of single fold models.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from busi import _keras
from busi.config.train_config import TrainConfig
from busi.data.run_parts import run_parts
from busi.data.splits import load_split, save_split
from busi.evaluation.evaluator import evaluate
from busi.inference import weights
from busi.models import heads
from busi.runs.ensembles import CHOSEN_ON_VAL, ENSEMBLE_FILE, ensemble_members, member_records
from busi.runs.evaluations import tested
from busi.runs.folder import RunFolder
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


def _split_of(run: RunFolder, config: TrainConfig) -> pd.DataFrame:
    split = load_split(run.split)
    if "dataset" not in split:
        split = split.assign(dataset=config.datasets[0])
    return split


def combined_split(members: Sequence[RunFolder]) -> pd.DataFrame:
    """The ensemble's split: per dataset, the split its members share (a dataset only some of
    them trained on keeps theirs: the others never saw it).

    Raises:
        ValueError: two members split a dataset differently; then an image of one member's
            validation or test part may be another's training image.
    """
    per_dataset: dict[str, tuple[RunFolder, pd.DataFrame]] = {}
    for member in members:
        split = _split_of(member, member.load_config())
        for name, rows in split.groupby("dataset", sort=False):
            rows = rows.sort_values("id").reset_index(drop=True)
            if name not in per_dataset:
                per_dataset[name] = (member, rows)
                continue
            first, seen = per_dataset[name]
            if not rows[["id", "split"]].equals(seen[["id", "split"]]):
                raise ValueError(f"{member.split}: splits {name} otherwise than {first.split}; "
                                 "an ensemble of runs needs one split of each dataset (the same "
                                 "seed, test_fraction and data)")
    split = pd.concat([rows for _, rows in per_dataset.values()], ignore_index=True)
    return split if len(per_dataset) > 1 else split.drop(columns="dataset")


def ensemble_config(members: Sequence[RunFolder], name: str, directory: Path,
                    keep_head: bool) -> TrainConfig:
    """The config the ensemble's folder records: the first member's model settings, all the
    members' datasets, and the combined split (saved as the folder's own ``split.csv``).

    Raises:
        ValueError: members that prepare images differently (size or resizing).
    """
    configs = [member.load_config() for member in members]
    for member, config in zip(members[1:], configs[1:], strict=True):
        for key in ("image_size", "resize"):
            if getattr(config, key) != getattr(configs[0], key):
                raise ValueError(f"{member.config}: {key} {getattr(config, key)!r}, but "
                                 f"{members[0].config} has {getattr(configs[0], key)!r}; the "
                                 "members of an ensemble take the same input")
    datasets = list(dict.fromkeys(name for config in configs for name in config.datasets))
    return configs[0].replace(
        name=name, run_dir=str(directory), datasets=tuple(datasets),
        data_paths={k: v for config in configs for k, v in config.data_paths.items()},
        split_file=str(RunFolder(directory).split), init_weights=None, image_head=keep_head,
    )


def combine_runs(run_dirs: Sequence[str | os.PathLike], name: str,
                 directory: str | os.PathLike | None = None) -> Path:
    """Make the run folder of the ensemble of finished runs, evaluate it, return the folder.

    Writes ``split.csv`` (:func:`combined_split`), ``config.json`` (:func:`ensemble_config`),
    ``env.json``, ``best.h5`` (:func:`ensemble_model`; it keeps the image-level head when
    every member has one), ``state.json`` with its SHA-256 and :data:`ENSEMBLE_FILE`, then
    evaluates it like any run: post-processing (and the gate) chosen on the validation part,
    the test part scored once. Made and evaluated again only if a member's ``best.h5`` changed.

    Args:
        run_dirs: at least two run folders (evaluated or not) with their ``best.h5``.
        name: the ensemble's name.
        directory: its folder; default ``NAME`` beside the first member.

    Raises:
        ValueError: fewer than two runs, or runs that cannot form one (see
            :func:`combined_split`, :func:`ensemble_config`, :func:`ensemble_model`).
        FileNotFoundError: a run without ``best.h5``.
    """
    members = [RunFolder(path) for path in run_dirs]
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 runs, got {len(members)}")
    for member in members:
        if not member.best.is_file():
            raise FileNotFoundError(f"{member.best}: not found; is {member.root} trained?")
    folder = Path(directory) if directory is not None else members[0].root.parent / name
    run = RunFolder(folder)
    if run.root.resolve() in {member.root.resolve() for member in members}:
        raise ValueError(f"{run.root}: is one of the members; give the ensemble another name")
    listed = member_records(members, run.root.parent)
    keep_head = all(member.load_config().image_head for member in members)
    config = ensemble_config(members, name, run.root, keep_head)
    run.root.mkdir(parents=True, exist_ok=True)
    with run.lock("building the ensemble"):
        if ensemble_members(run, listed) is None:
            save_split(combined_split(members), run.split)
            config.save(run.config)
            run_parts(run, config, new_run=True)  # split.csv read back, env.json written
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
                "postprocess_chosen_on": CHOSEN_ON_VAL,
            })
        if not tested(run):
            evaluate(run.root)
    return run.root


__all__ = ["combine_runs", "combined_split", "ensemble_config", "ensemble_model"]
