"""k-fold cross-validation of a config, and its fold models as one ensemble model.

One run's validation part is ~70 BUSI images: too few to say whether a recipe beats another, and
its test score moves by about +-0.02 Dice with the seed. Cross-validation trains k models of one
config, each validated on another fold of train+val, while the test part stays the config's own
(the same test images as every other run of the project, so results compare). Folds are grouped
and stratified like every busi split (:func:`busi.data.splits.cross_validation_splits`):
duplicate groups, and BUS-BRA's patients, stay whole.

Each fold is an ordinary run folder (``runs/<name>-cv/<name>-fold<k>/``): it resumes, keeps its
time budget, and is evaluated, reported and published like any run, so each fold gives a row of
the results table. The folders carry the run's name because tables and published files are
named after the folder. The k models together are one Keras model (:func:`ensemble_model`): the
mean of their probability maps, in one ``.h5`` that busi's loader, evaluation, prediction,
publishing and export take as they take any model. It sits in a run folder of its own
(``<name>-ensemble/``) whose split has the config's test part and, as training part, all of
train+val (every image of it trained k-1 of the members); it has no validation part.

Post-processing of the ensemble is chosen on out-of-fold predictions: every train+val image is
predicted by the one fold model that did not train on it, which is a validation set k times as
large as a single run's, with no image scored by a model that saw it. Each fold's evaluation
scores every candidate on its own validation part (``postprocess_grid.csv``); as those parts
partition train+val, pooling the k tables weighted by their image counts is the table of all
out-of-fold predictions (:func:`pool_grids`), and nothing is predicted again. The choice is
written as the ensemble's record (``postprocess.json``) before its evaluation, which then
scores the test part once with it. The maps behind the choice are single models' while the
ensemble averages k of them (smoother maps), so its best threshold may differ a little: the
price of never choosing on data a model trained on, as nnU-Net also pays.

The ensemble model is :func:`busi.training.ensemble.ensemble_model`. Folds of a config with the
image-level head make an ensemble that keeps it (the mean of their class probabilities), and its
gate is chosen out of fold the same way: the folds' gate curves on their validation parts
(``gate_val.csv``) pooled (:func:`busi.evaluation.classification.pool_gate_curves`). There every
normal image of train+val votes, where one run's validation part has a handful (BUSI: 13),
which cannot tell gates apart once none of them is masked. As with the pixel settings, the
curves are single fold models' at their own post-processing, not the ensemble's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from busi.config.train_config import TrainConfig
from busi.data.parts import dataset_table, split_seed
from busi.data.splits import cross_validation_splits, load_split, save_split
from busi.evaluation.classification import choose_gate, pool_gate_curves
from busi.evaluation.evaluator import chosen_postprocess, evaluate
from busi.evaluation.postprocess_choice import GRID_COLUMNS, select_postprocess
from busi.inference.bundle import ModelRecord
from busi.inference.postprocess import PostProcess
from busi.runs.ensembles import ensemble_members, member_records
from busi.runs.evaluations import (
    GATE_FILE,
    GRID_FILE,
    OUT_OF_FOLD,
    POSTPROCESS_FILE,
    evaluation_dir,
    summary_with_test,
    tested,
)
from busi.runs.folder import RunFolder, check_same_config
from busi.training.ensemble import write_ensemble
from busi.training.trainer import train
from busi.utils.atomic import atomic_write_text
from busi.utils.digests import FileDigest

log = logging.getLogger(__name__)

MIN_FOLDS, MAX_FOLDS = 2, 10

CHOSEN_ON = "out-of-fold val"
"""``chosen_on`` of an ensemble's record: the folds' validation parts, each predicted by the
fold model that did not train on it."""

_GRID_KEYS = ["tta", "threshold", "min_component_fraction", "keep_largest"]


@dataclass(frozen=True)
class CrossValidation:
    """Where a :func:`cross_validate` call got to.

    Attributes:
        root: the cross-validation's folder (``runs/<name>-cv``).
        folds: the fold run folders trained and evaluated so far, in fold order.
        total: the number of folds.
        ensemble: the ensemble's run folder once every fold is done, else None.
    """

    root: Path
    folds: tuple[Path, ...]
    total: int
    ensemble: Path | None


def cv_root(config: TrainConfig) -> Path:
    """The folder of a config's cross-validation: ``runs/<name>-cv`` (beside its run folder)."""
    return config.directory.parent / f"{config.directory.name}-cv"


def fold_splits(config: TrainConfig, folds: int) -> list[pd.DataFrame]:
    """The k splits: one test part (the config's own), fold k of the rest as validation.

    Several datasets are split each on its own and stacked, as a joint run's split is.
    """
    if not isinstance(folds, int) or isinstance(folds, bool) or \
            not MIN_FOLDS <= folds <= MAX_FOLDS:
        raise ValueError(f"folds (--folds) must be a whole number from {MIN_FOLDS} to "
                         f"{MAX_FOLDS}, got {folds!r}")
    if config.split_file or config.authors_fold is not None:
        raise ValueError("busi cv makes its own folds around the config's test part; unset "
                         "split_file and authors_fold")
    table = dataset_table(config)
    options = {"n_folds": folds, "classes": config.classes,
               "test_fraction": config.test_fraction, "seed": split_seed(config)}
    if len(config.datasets) == 1:
        return cross_validation_splits(table, **options)
    per_dataset = [
        [split.assign(dataset=name) for split in
         cross_validation_splits(table[table["dataset"] == name], **options)]
        for name in config.datasets
    ]
    return [pd.concat(splits, ignore_index=True) for splits in zip(*per_dataset, strict=True)]


def _member_name(config: TrainConfig, part: str) -> str:
    return f"{config.directory.name}-{part}"


def fold_config(config: TrainConfig, fold: int) -> TrainConfig:
    """The config of fold ``fold``: the same settings on that fold's split, in its own folder."""
    root = cv_root(config)
    name = _member_name(config, f"fold{fold}")
    return config.replace(name=name, run_dir=str(root / name),
                          split_file=str(root / "splits" / f"fold{fold}.csv"))


def ensemble_config(config: TrainConfig) -> TrainConfig:
    """The config the ensemble's run folder records: the folds' settings, with the split of
    :func:`ensemble_split`."""
    root = cv_root(config)
    name = _member_name(config, "ensemble")
    return config.replace(name=name, run_dir=str(root / name),
                          split_file=str(root / "splits" / "ensemble.csv"))


def prepare(config: TrainConfig, folds: int) -> list[TrainConfig]:
    """Write the fold splits (once: a cross-validation resumed finds them) and return the folds'
    configs.

    The splits are made again each time and must equal the saved ones: folds made with other
    settings or data, or another number of them, would mix two cross-validations in one folder.
    """
    splits = fold_splits(config, folds)
    folder = cv_root(config) / "splits"
    saved = sorted(folder.glob("fold*.csv"))
    if saved:
        if len(saved) != folds:
            raise ValueError(f"{folder}: holds {len(saved)} fold splits, {folds} asked for "
                             "(--folds); give the same number, or delete "
                             f"{cv_root(config)} to start over")
        for k, split in enumerate(splits):
            path = folder / f"fold{k}.csv"
            old = load_split(path)
            columns = ["id", "split"] + (["dataset"] if "dataset" in split else [])
            if not old[columns].equals(split[columns].reset_index(drop=True)):
                raise ValueError(
                    f"{path}: made with other settings or data than this config gives (split_seed, "
                    f"classes, test_fraction, drop_conflicts, data); use those, or delete "
                    f"{cv_root(config)} to start over")
    else:
        configs = [fold_config(config, k) for k in range(folds)]
        orphans = [c.directory for c in configs if RunFolder(c.directory).split.is_file()]
        if orphans:
            raise ValueError(f"{orphans[0]}: a fold run without the fold splits it was made "
                             f"with ({folder}); delete {cv_root(config)} to start over")
        for k, split in enumerate(splits):
            save_split(split, folder / f"fold{k}.csv")
    return [fold_config(config, k) for k in range(folds)]


def trained(run: RunFolder, config: TrainConfig) -> bool:
    """Whether the run folder's training is over (all epochs, or stopped early)."""
    state = run.read_state()
    return bool(state.get("stopped_early")) or int(state.get("epoch", 0)) >= config.epochs


def cross_validate(config: TrainConfig, folds: int = 5) -> CrossValidation:
    """Train and evaluate the k fold runs of ``config`` one after the other, then build,
    choose post-processing for and evaluate their ensemble (:func:`build_ensemble`).

    ``max_minutes`` is the budget of the whole call, shared out as the folds go: a fold stopped
    by it stops the call, and the same call later resumes that fold and goes on with the next.
    A fold already trained is not trained again (its settings are still checked against the
    config); one trained but not evaluated is evaluated. Each fold is evaluated on the test
    part, for its row of the results table, and its choice of post-processing on its own
    validation part is what the ensemble's choice pools.

    Raises:
        ValueError: ``folds`` out of range, a config with ``split_file`` or ``authors_fold``,
            or a cross-validation folder made with other settings.
    """
    configs = prepare(config, folds)
    root = cv_root(config)
    deadline = None if config.max_minutes is None else time.monotonic() + 60 * config.max_minutes
    done: list[Path] = []
    for number, fold in enumerate(configs, 1):
        run = RunFolder(fold.directory)
        where = f"busi cv: fold {number} of {len(configs)} ({run.root})"
        if trained(run, fold):
            check_same_config(run, fold)
        else:
            if deadline is not None:
                left = (deadline - time.monotonic()) / 60
                if left <= 0:
                    log.warning("%s: time budget used up before it; run the same command to "
                                "continue", where)
                    break
                fold = fold.replace(max_minutes=left)
            print(f"{where}: training", flush=True)
            train(fold)
            if not trained(run, fold):
                log.warning("%s: stopped by the time budget; run the same command to continue",
                            where)
                break
        if not tested(run):
            print(f"{where}: evaluating", flush=True)
            evaluate(run.root)
        print(f"{where}: done", flush=True)
        done.append(run.root)
    if len(done) < len(configs):
        return CrossValidation(root, tuple(done), len(configs), None)
    print(f"busi cv: ensemble of the {len(done)} fold models", flush=True)
    return CrossValidation(root, tuple(done), len(configs), build_ensemble(config, done))


def ensemble_split(fold_runs: Sequence[Path]) -> pd.DataFrame:
    """The ensemble's split: the folds' test part, and all of train+val as training part (each
    of its images trained k-1 members), with no validation part."""
    splits = [load_split(RunFolder(run).split) for run in fold_runs]
    for run, split in zip(fold_runs[1:], splits[1:], strict=True):
        if not split[split["split"] == "test"]["id"].equals(
                splits[0][splits[0]["split"] == "test"]["id"]):
            raise ValueError(f"{RunFolder(run).split}: another test part than "
                             f"{RunFolder(fold_runs[0]).split}; not folds of one config")
    split = splits[0].copy()
    split.loc[split["split"] == "val", "split"] = "train"
    return split


def build_ensemble(config: TrainConfig, fold_runs: Sequence[Path]) -> Path:
    """Make (or bring up to date) the ensemble's run folder and evaluate it; return the folder.

    Writes the folder (:func:`busi.training.ensemble.write_ensemble`: config, split, env,
    ``best.h5``, ``state.json``, the member record; so ``busi evaluate``, ``report`` and
    ``publish`` open it as a run), and the out-of-fold choice of post-processing
    (``evaluation/postprocess.json`` and the pooled ``postprocess_grid.csv``), then evaluates
    the test part with that choice. Members whose ``best.h5`` changed since (a fold trained
    further) make a new ensemble.
    """
    ensemble = ensemble_config(config)
    run = RunFolder(ensemble.directory)
    members = [RunFolder(path) for path in fold_runs]
    listed = member_records(members, run.root.parent)
    run.root.mkdir(parents=True, exist_ok=True)
    with run.lock("building the cross-validation ensemble"):
        if ensemble_members(run, listed, image_head=config.image_head) is None:
            save_split(ensemble_split(fold_runs), ensemble.split_file)
            write_ensemble(run, ensemble, members, listed, CHOSEN_ON, config.image_head)
        post = write_choice(run, members, ensemble)
        summary = summary_with_test(run)  # hashes the k-model file once
        if summary is None or summary["postprocess"] != post.to_dict():
            evaluate(run.root)
    return run.root


def pool_grids(grids: Sequence[pd.DataFrame], sources: Sequence[Any] = ()) -> pd.DataFrame:
    """One :func:`busi.evaluation.postprocess_choice.postprocess_grid` table from tables of disjoint
    image sets: each candidate's mean Dice and false-positive rate weighted by the images behind it,
    which is the table of all the images together.

    ``sources`` names the tables in errors (e.g. their files).
    """
    if not grids:
        raise ValueError("no post-processing tables to pool")
    names = list(sources) or [f"table {k}" for k in range(len(grids))]
    first = grids[0][_GRID_KEYS].reset_index(drop=True)
    for grid, name in zip(grids, names, strict=True):
        missing = sorted(set(GRID_COLUMNS) - set(grid))
        if missing:
            raise ValueError(f"{name}: lacks the columns {missing}")
        if not grid[_GRID_KEYS].reset_index(drop=True).equals(first):
            raise ValueError(f"{name}: scores other post-processing candidates than {names[0]}")
    n_lesion = sum(grid["n_lesion"].to_numpy() for grid in grids)
    n_normal = sum(grid["n_normal"].to_numpy() for grid in grids)
    dice = sum(grid["lesion_dice"].to_numpy() * grid["n_lesion"].to_numpy() for grid in grids)
    false_positives = sum(grid["normal_fp_rate"].fillna(0.0).to_numpy()
                          * grid["n_normal"].to_numpy() for grid in grids)
    pooled = first.copy()
    pooled["lesion_dice"] = dice / n_lesion
    pooled["normal_fp_rate"] = pd.Series(false_positives).where(n_normal > 0) / n_normal
    pooled["n_lesion"] = n_lesion
    pooled["n_normal"] = n_normal
    return pooled[GRID_COLUMNS]


def out_of_fold_grid(fold_runs: Sequence[RunFolder]) -> pd.DataFrame:
    """The post-processing candidates scored on every fold's validation part, each predicted by
    its own fold model (:func:`pool_grids` of the folds' ``postprocess_grid.csv``).

    A fold's table is taken only with the choice it was made for, for its current ``best.h5``
    (evaluating its validation part first if there is none) and only if it gives that choice
    again: a table of other weights would score another model.
    """
    grids, paths = [], []
    for run in fold_runs:
        chosen = PostProcess.from_dict(chosen_postprocess(run.root))
        path = evaluation_dir(run) / GRID_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing beside the choice it was made with; "
                                    f"delete {evaluation_dir(run) / POSTPROCESS_FILE} and run "
                                    "busi cv again")
        grid = pd.read_csv(path)
        again = PostProcess.from_dict(select_postprocess(grid))
        if again != chosen.override(gate=0.0):
            raise ValueError(f"{path}: does not give the choice saved beside it ({again} vs "
                             f"{chosen}); delete both and run busi cv again")
        grids.append(grid)
        paths.append(path)
    return pool_grids(grids, paths)


def out_of_fold_gate_curve(fold_runs: Sequence[RunFolder], config: TrainConfig) -> pd.DataFrame:
    """The gate's curve on every fold's validation part, each predicted by its own fold model
    (:func:`busi.evaluation.classification.pool_gate_curves` of the folds' ``gate_val.csv``, of
    the datasets that hold normal images, where a fold chose its gate).

    A fold's curve is taken only if it gives the gate saved in the fold's choice: a curve of
    other weights would score another model.
    """
    curves, paths = [], []
    for run in fold_runs:
        fold_curves, fold_paths = [], []
        for name in config.datasets:
            path = evaluation_dir(run, None, name) / GATE_FILE.format(split="val")
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; delete "
                                        f"{evaluation_dir(run) / POSTPROCESS_FILE} and run busi "
                                        "cv again")
            curve = pd.read_csv(path)
            if "n_normal" not in curve:
                raise ValueError(f"{path}: not a gate curve (no n_normal column)")
            if curve["n_normal"].max() > 0:
                fold_curves.append(curve)
                fold_paths.append(path)
        if not fold_curves:
            raise ValueError(f"{run.root}: no validation curve with normal images to choose "
                             "the gate on")
        gate = PostProcess.from_dict(chosen_postprocess(run.root)).gate
        pooled = fold_curves[0] if len(fold_curves) == 1 else \
            pool_gate_curves(fold_curves, fold_paths)
        if choose_gate(pooled) != gate:
            named = fold_paths[0] if len(fold_paths) == 1 else evaluation_dir(run).parent
            raise ValueError(f"{named}: the validation gate curve does not give the gate "
                             f"{gate} saved in {evaluation_dir(run) / POSTPROCESS_FILE}; "
                             "delete that file and run busi cv again")
        curves.extend(fold_curves)
        paths.extend(fold_paths)
    return pool_gate_curves(curves, paths)


def write_choice(run: RunFolder, fold_runs: Sequence[RunFolder],
                 config: TrainConfig) -> PostProcess:
    """Write the ensemble's out-of-fold choice of post-processing (:func:`out_of_fold_grid`)
    and, for folds with the image-level head, of the gate (:func:`out_of_fold_gate_curve`) as
    the record of its ``best.h5`` (``evaluation/postprocess.json``, which evaluation then
    reuses), with the pooled tables beside it; return the choice."""
    grid = out_of_fold_grid(fold_runs)
    chosen = select_postprocess(grid)
    post = PostProcess.from_dict(chosen)
    out_dir = evaluation_dir(run)
    atomic_write_text(out_dir / GRID_FILE, grid.to_csv(index=False))
    if config.image_head:
        curve = out_of_fold_gate_curve(fold_runs, config)
        atomic_write_text(out_dir / GATE_FILE.format(split=OUT_OF_FOLD),
                          curve.to_csv(index=False))
        post = post.override(gate=choose_gate(curve))
    ModelRecord(
        model=run.best.name, files={run.best.name: FileDigest.of(run.best)},
        image_size=config.image_size, resize=config.resize,
        postprocess=post, chosen_on=CHOSEN_ON,
        classes=tuple(config.classes),
        provenance={**{k: v for k, v in chosen.items() if k not in PostProcess.keys()},
                    "folds": [fold.root.name for fold in fold_runs]},
    ).write(out_dir / POSTPROCESS_FILE)
    return post


__all__ = ["CHOSEN_ON", "CrossValidation", "build_ensemble", "cross_validate",
           "cv_root", "ensemble_config", "ensemble_split", "fold_config", "fold_splits",
           "out_of_fold_gate_curve", "out_of_fold_grid", "pool_grids", "prepare", "trained",
           "write_choice"]
