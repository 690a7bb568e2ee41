"""A run's report: the figures and the metrics table that go into ``reports/``.

Everything is computed from the run folder (history, split, best weights, the evaluation's
summary and per-image table), so the report of a run can be rebuilt at any time with
``busi report RUN_FOLDER``; nothing in it is typed by hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from busi.inference.postprocess import PostProcess
from busi.inference.run_models import run_predictions
from busi.models.architectures import model_label
from busi.runs.ensembles import ensemble_kind, ensemble_members
from busi.runs.evaluations import (
    SUMMARY_FILE,
    evaluation_dir,
    per_image,
    per_image_path,
    summary_for,
)
from busi.runs.folder import RunFolder
from busi.utils.atomic import atomic_write_bytes, atomic_write_text

ROWS = ("lesion", "benign", "malignant")


def metrics_table(summary: dict[str, Any], split: str = "test") -> str:
    """Markdown table of a run's summary: Dice and IoU per image, lesion images and per class,
    and the false-positive rate on normal images."""
    part = summary["splits"][split]
    lines = [
        "| images | n | Dice mean | Dice median | IoU mean | IoU median | HD95 median (px) "
        "| missed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ROWS:
        row = part.get(name) or {}
        if not row or not row.get("n"):
            continue
        lines.append(
            f"| {name} | {row['n']} | {_fmt(row.get('dice_mean'))} | "
            f"{_fmt(row.get('dice_median'))} | {_fmt(row.get('iou_mean'))} | "
            f"{_fmt(row.get('iou_median'))} | {_fmt(row.get('hd95_median'), 1)} | "
            f"{row.get('missed', '')} |"
        )
    normal = part.get("normal") or {}
    if normal.get("n"):
        lines.append(
            f"| normal | {normal['n']} | false-positive rate "
            f"{_fmt(normal.get('false_positive_rate'))} | | | | | |"
        )
    return "\n".join(lines) + "\n"


def classification_table(summary: dict[str, Any]) -> str:
    """Markdown lines of the image-level head's scores (:func:`busi.evaluation.classification.
    classification_summary`): each figure with its bootstrap 95% interval, and the confusion
    matrix (rows: truth, columns: answer)."""
    lines = ["| image-level head | value | 95% interval |", "| --- | --- | --- |"]
    for key, name in (("lesion_vs_normal_auc", "lesion vs normal AUC"),
                      ("benign_vs_malignant_auc", "benign vs malignant AUC"),
                      ("accuracy", "accuracy (3 classes)")):
        low, high = summary.get(f"{key}_ci", (None, None))
        lines.append(f"| {name} | {_fmt(summary.get(key))} | {_fmt(low)}-{_fmt(high)} |")
    classes = summary.get("classes", [])
    lines += ["", "| truth \\ answer | " + " | ".join(classes) + " |",
              "| --- |" + " --- |" * len(classes)]
    for name, row in zip(classes, summary.get("confusion", []), strict=False):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def summary_text(summary: dict[str, Any], split: str = "test") -> str:
    """A few lines a person reads after ``busi evaluate`` or ``busi train``: which weights, the
    post-processing chosen on val, and :func:`metrics_table` of ``split`` (``--json`` of the CLI
    prints the whole summary instead)."""
    post = summary.get("postprocess") or {}
    fraction = post.get("min_component_fraction") or 0
    chosen = ", ".join(part for part in (
        f"threshold {_fmt(post.get('threshold'), 2)}",
        f"flip TTA {'on' if post.get('tta') else 'off'}",
        f"components under {fraction:.1%} of the image removed" if fraction else "",
        "largest component kept" if post.get("keep_largest") else "",
        f"image-level gate: empty mask below lesion probability {_fmt(post['gate'], 2)}"
        if post.get("gate") else "",
    ) if part)
    name = summary.get("dataset")
    dataset = f" of {name}" if name not in (None, "busi") else ""  # BUSI: the project's own
    where = f"all images{dataset}" if split == "all" else f"the {split} images{dataset}"
    return (
        f"{summary.get('model', 'model')} on {where} ({summary.get('image_size')} px, "
        f"{summary.get('resize')}); post-processing chosen on val: {chosen}\n"
        "Dice and IoU per image at the original size; lesion = benign + malignant; normal "
        "images count only as false positives (any predicted pixel).\n\n"
        + metrics_table(summary, split)
        + _classification_text(summary, split)
    )


def _classification_text(summary: dict[str, Any], split: str) -> str:
    classification = summary.get("splits", {}).get(split, {}).get("classification")
    return "\n" + classification_table(classification) if classification else ""


def trained_on(run: RunFolder, config: Any) -> str:
    """The classes the run's training part held: the config's, less those its data lacks (BUS-BRA
    has no normal images, so a BUS-BRA run was trained on lesion images whatever it asked for)."""
    classes = list(config.train_classes or config.classes)
    if run.split.is_file():
        split = pd.read_csv(run.split, usecols=["label", "split"])
        present = set(split.loc[split["split"] == "train", "label"])
        classes = [name for name in classes if name in present]
    return "lesion images" if set(classes) == {"benign", "malignant"} else ", ".join(classes)


def results_table(
    run_dirs: list[str | os.PathLike], split: str = "test", dataset: str | None = None
) -> str:
    """Markdown table comparing evaluated runs, one row each, read from their run folders.

    An entry is a run folder (its ``best.h5``) or a model file inside one (``RUN/last.h5``).
    ``dataset``: the results on that dataset (``evaluation-<name>/``, from ``busi evaluate RUN
    --dataset NAME``); default each run's first dataset.

    Built from ``summary.json``, ``history.csv``, ``config.json`` and ``best.h5``, so no figure
    in it is typed by hand (the README's results table is its output). Wall time is the sum of
    the recorded epochs (training and validation; start-up and evaluation excluded);
    an ensemble's row counts those of its members together.
    """
    lines = [
        "| run | model | params | trained on | epochs (kept), wall time "
        "| lesion Dice mean / median | 95% CI of the mean | IoU mean / median "
        "| benign / malignant Dice mean "
        "| missed lesions | normal FP rate | benign vs malignant AUC | made by |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in map(Path, run_dirs):
        is_file = entry.suffix == ".h5"
        run = RunFolder(entry.parent if is_file else entry)
        model_path = run.weights(entry if is_file else None)
        summary_path = evaluation_dir(run, model_path, dataset) / SUMMARY_FILE
        summary = summary_for(run, model_path, dataset)
        command = f"busi evaluate {run.root}" + (f" --dataset {dataset}" if dataset else "")
        if summary is None and summary_path.is_file():
            raise ValueError(f"{summary_path}: evaluated on other weights than {model_path} "
                             f"(training went on); run `{command}` again")
        if summary is None:
            raise FileNotFoundError(f"{summary_path}: run not evaluated; run `{command}`")
        if split not in summary.get("splits", {}):
            raise ValueError(f"{summary_path}: no {split!r} split; run `{command} "
                             f"--split {split}`")
        part = summary["splits"][split]
        config = run.load_config()
        lesion, normal = part["lesion"], part.get("normal") or {}
        benign, malignant = part.get("benign") or {}, part.get("malignant") or {}
        model, training = _training(run, config, model_path)
        data = trained_on(run, config)
        if config.datasets != ("busi",):
            data += f" of {' + '.join(config.datasets)}"
        fp = normal.get("false_positive_rate")
        # a part without normal images (all of BUS-BRA's hold a lesion) has no FP rate to show
        normals = (f"{normal.get('false_positives', 'n/a')} of {normal['n']} ({_fmt(fp, 2)})"
                   if normal.get("n") else "no normal images")
        lines.append(
            f"| `{_label(run, model_path)}` | {model} "
            f"| {_parameter_count(model_path) / 1e6:.1f} M "
            f"| {data} | {training} "
            f"| {_fmt(lesion.get('dice_mean'))} / {_fmt(lesion.get('dice_median'))} "
            f"| {_ci(per_image_path(run, split, model_path, dataset))} "
            f"| {_fmt(lesion.get('iou_mean'))} / {_fmt(lesion.get('iou_median'))} "
            f"| {_fmt(benign.get('dice_mean'))} / {_fmt(malignant.get('dice_mean'))} "
            f"| {lesion.get('missed', 'n/a')} of {lesion['n']} "
            f"| {normals} | {_auc(part)} | {_made_by(run)} |"
        )
    return "\n".join(lines) + "\n"


def _training(run: RunFolder, config: Any, model_path: Path) -> tuple[str, str]:
    """The model and "epochs (kept), wall time" cells of a row: the run's own, or for an
    ensemble (:func:`busi.runs.ensembles.ensemble_members`), which has no history of its own,
    its members' epochs and time together."""
    members = ensemble_members(run)
    if members is None:
        history = pd.read_csv(run.history)
        kept = _kept_epoch(run, config, history, model_path)
        return model_label(config), (f"{len(history)} (kept {kept}), "
                                     f"{history['seconds'].sum() / 60:.0f} min")
    histories = [RunFolder(member).read_history() for member in members]
    minutes = sum(history["seconds"].sum() for history in histories) / 60
    kind = ensemble_kind(run)
    return (f"mean of {len(members)} {kind}' {model_label(config)}",
            f"{sum(map(len, histories))} in {len(members)} {kind}, {minutes:.0f} min")


def _kept_epoch(run: RunFolder, config: Any, history: pd.DataFrame, model_path: Path) -> Any:
    """The epoch whose weights these are: the monitor's best for ``best.h5`` (the last with
    ``keep: last``), the last for ``last.h5``, unknown ("?") for other files."""
    if model_path.name == run.last.name or (model_path.name == run.best.name
                                            and config.keep == "last"):
        return int(history["epoch"].iloc[-1])
    if model_path.name != run.best.name or config.monitor not in history:
        return "?"
    scores = history[config.monitor]
    best = scores.idxmin() if config.monitor_mode == "min" else scores.idxmax()
    return int(history["epoch"].loc[best])


def _ci(per_image_csv: Path, resamples: int = 2000, seed: int = 0) -> str:
    """Bootstrap 95% interval of the mean Dice over the lesion images (images resampled with
    replacement, fixed seed): how far apart two rows must be before the gap means anything."""
    if not per_image_csv.is_file():
        return "n/a"
    table = pd.read_csv(per_image_csv)
    dice = table.loc[table["label"] != "normal", "dice"].to_numpy(dtype=float)
    if len(dice) < 2:
        return "n/a"
    rng = np.random.default_rng(seed)
    means = dice[rng.integers(0, len(dice), size=(resamples, len(dice)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return f"{low:.2f}-{high:.2f}"


def _label(run: RunFolder, model_path: Path) -> str:
    name = run.root.name
    return name if model_path.name == run.best.name else f"{name}/{model_path.name}"


def _parameter_count(h5_path: Path) -> int:
    """Number of weights in a Keras ``.h5`` (BatchNorm statistics included), read without
    building the model."""
    sizes: list[int] = []
    with h5py.File(h5_path, "r") as handle:
        group = handle["model_weights"] if "model_weights" in handle else handle
        group.visititems(
            lambda _, item: sizes.append(int(np.prod(item.shape)))
            if isinstance(item, h5py.Dataset) else None
        )
    return sum(sizes)


def _auc(part: dict[str, Any]) -> str:
    """The image-level head's benign-vs-malignant AUC with its interval, or "-" without one."""
    classification = part.get("classification")
    if not classification:
        return "-"
    low, high = classification.get("benign_vs_malignant_auc_ci", (None, None))
    return f"{_fmt(classification.get('benign_vs_malignant_auc'))} ({_fmt(low, 2)}-{_fmt(high, 2)})"


def _made_by(run: RunFolder) -> str:
    """The command, commit and hardware of a run, from its ``env.json``: what a reader needs to
    make the row again and to weigh its wall time."""
    env = json.loads(run.env.read_text()) if run.env.is_file() else {}
    command = f"`{env['command']}`" if env.get("command") else "command not recorded"
    commit = (env.get("git_commit") or "no commit")[:7] + ("+" if env.get("git_dirty") else "")
    gpus = env.get("gpus") or []
    hardware = f"{len(gpus)} GPU" if gpus else f"{env.get('cpu_count', '?')}-core CPU"
    return f"{command} at {commit}, {hardware}"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{value:.{digits}f}"


def write_report(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, split: str = "test",
    n_overlays: int = 12, n_worst: int = 6, data: str | os.PathLike | None = None,
    model_path: str | os.PathLike | None = None, dataset: str | None = None,
) -> Path:
    """Write curves, overlays, worst cases and ``metrics.md`` of an evaluated run into ``out_dir``.

    ``model_path``: the weights to report on (default the run's ``best.h5``). They are evaluated
    first if they have not been (see :func:`busi.evaluate`). ``dataset``: report on that dataset
    (one of a joint run's, or another one: ``split`` "all" or "test", see
    :mod:`busi.data.cross_dataset`); default the run's first.

    The figures show the masks that were scored: the images of the part, post-processed as the
    summary records (:func:`busi.inference.run_models.run_predictions`).
    """
    from busi.evaluation import plots  # start-up: matplotlib; cli imports report
    from busi.evaluation.evaluator import evaluate  # start-up: matplotlib; cli imports report

    run, out_dir = RunFolder(run_dir), Path(out_dir)
    model_path = run.weights(model_path)
    config = run.load_config()
    summary = summary_for(run, model_path, dataset)
    if summary is None or split not in summary.get("splits", {}):
        summary = evaluate(run.root, split=split, data=data, model_path=model_path,
                           dataset=dataset)
    if run.history.is_file():  # an ensemble has none: its members trained
        history = run.read_history()
        kept = _kept_epoch(run, config, history, model_path)
        plots.training_curves(history, path=out_dir / "curves.png",
                              kept=kept if isinstance(kept, int) else None)
    # the images and masks scored: the run's own (its first dataset's, in a joint run) or
    # another dataset's, post-processed as the summary says
    table, masks = run_predictions(run, split, model_path, data, dataset or config.datasets[0],
                                   PostProcess.from_dict(summary["postprocess"]))
    scores = per_image(run, split, model_path, dataset)
    lesions = table[table["label"] != "normal"]
    plots.overlays(table, masks, ids=list(lesions["id"][:n_overlays]),
                   path=out_dir / f"overlays_{split}.png")
    plots.worst_cases(scores, table, masks, n=n_worst, path=out_dir / f"worst_{split}.png")
    text = (
        f"# {run.root.name} ({model_path.name}): {split} split"
        f"{f' of {dataset}' if dataset else ''}\n\n"
        f"Post-processing chosen on val: {json.dumps(summary.get('postprocess'))}\n\n"
        + metrics_table(summary, split)
    )
    classification = summary["splits"][split].get("classification")
    if classification:  # the image-level head: its figures beside the masks'
        evaluation = evaluation_dir(run, model_path, dataset if dataset != config.datasets[0]
                                    else None)
        for name in ("gate.png", "roc.png"):
            if (evaluation / name).is_file():
                atomic_write_bytes(out_dir / name, (evaluation / name).read_bytes())
        text += "\n" + classification_table(classification)
    atomic_write_text(out_dir / "metrics.md", text)
    return out_dir
