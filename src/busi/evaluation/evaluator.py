"""Evaluation of a trained model the way published BUSI results should be compared.

The protocol, and why:

- **Original resolution.** The model sees a 256x256 letterboxed (or stretched) copy, but the
  delivered mask is at the image's own size, so probabilities are mapped back
  (:func:`busi.inference.predictor.predict_images`) and thresholded *there*; every metric is
  computed per image at original resolution (:func:`busi.evaluation.scoring.score_image`).
- **Post-processing is chosen on validation only.** The threshold, flip test-time augmentation
  (TTA) and small-component removal are picked on the validation images
  (:func:`busi.evaluation.postprocess_choice.postprocess_grid`,
  :func:`busi.evaluation.postprocess_choice.select_postprocess`, whose module says the rule); the
  test images are scored once with the chosen settings.
- **Lesion figures as published; normal images apart.** Dice, IoU, ... are averaged over the
  lesion images (benign + malignant) and per class. Normal images have no lesion, so a Dice of 1
  for "predicted nothing" would flatter the mean; they are reported separately as a
  false-positive rate (fraction of normal images with any predicted pixel).
- **Another dataset with the run's own settings.** A dataset the run was not trained on (BUS-BRA
  for a BUSI model, a user's folder) is scored with the post-processing chosen on the run's own
  validation images, never re-tuned on it (that would report a best case), and its results go
  to ``evaluation-<dataset>/`` (:func:`evaluate_dataset`; which images:
  :mod:`busi.data.cross_dataset`).

The run-level entry point :func:`evaluate` reads a run folder (:class:`busi.runs.folder.RunFolder`)
and writes ``evaluation/`` (where: :mod:`busi.runs.evaluations`); the per-image tables and their
summaries, shared with published models and the tools, are :mod:`busi.evaluation.score_tables`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from busi.data.cross_dataset import dataset_rows
from busi.data.index import fingerprint
from busi.data.masks import load_truths
from busi.data.run_parts import run_parts, with_data
from busi.evaluation import plots
from busi.evaluation.classification import choose_gate, gate_curve, roc_points
from busi.evaluation.postprocess_choice import postprocess_grid, select_postprocess
from busi.evaluation.score_tables import evaluate_model, score_table, summarize, summary_record
from busi.inference.bundle import ModelRecord
from busi.inference.postprocess import PostProcess
from busi.inference.predictor import predict_table
from busi.inference.run_models import open_run_model
from busi.models import heads
from busi.runs.evaluations import (
    GATE_FILE,
    GRID_FILE,
    OUT_OF_FOLD,
    PER_IMAGE_FILE,
    POSTPROCESS_FILE,
    SUMMARY_FILE,
    evaluation_dir,
)
from busi.runs.folder import RunFolder
from busi.utils.atomic import atomic_write_text, json_ready, read_json, write_json
from busi.utils.digests import FileDigest, file_sha1

log = logging.getLogger(__name__)


def evaluate(
    run_dir: str | os.PathLike,
    split: str = "test",
    model_path: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    batch_size: int | None = None,
    rechoose: bool = False,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run's model on one part of its split, with post-processing chosen on val.

    Reads ``config.json`` (image size, resize mode, dataset) and ``split.csv`` of the run, takes
    the same images training used (:func:`busi.data.run_parts.run_parts`, which also checks the
    dataset fingerprint against ``env.json``), and loads ``best.h5`` unless ``model_path`` is
    given. Post-processing is chosen on the validation images and saved as
    ``postprocess.json`` (plus the whole candidate table, ``postprocess_grid.csv``); a saved
    choice is reused if it was made for the same weights (SHA-1) and ``rechoose`` is False.

    Writes (atomically) into :func:`busi.runs.evaluations.evaluation_dir`: ``per_image_val.csv``,
    ``per_image_<split>.csv`` and ``summary.json`` (summaries of the evaluated parts; parts
    evaluated earlier with the same weights and post-processing are kept).

    Args:
        run_dir: the run folder.
        split: "test" (default), "val" or "train".
        model_path: weights to evaluate; default the run's ``best.h5``.
        data: dataset root, if not where the run's config says.
        batch_size: prediction batch size; default the run's.
        rechoose: choose post-processing again even if a matching choice is saved.
        dataset: which dataset's results to return (default the run's first). A joint run
            chooses post-processing on all its val parts together and writes each dataset's
            results apart. A dataset the run was not trained on is evaluated with
            :func:`evaluate_dataset` (``split`` "all" or "test"; ``data`` is then that
            dataset's folder).

    Returns:
        The content of ``summary.json``: model, post-processing, dataset, and per part the
        :func:`busi.evaluation.score_tables.summarize` dict.
    """
    run = RunFolder(run_dir)
    config = run.load_config()
    if dataset is not None and dataset not in config.datasets:
        return evaluate_dataset(run.root, dataset, split, model_path, data, batch_size)
    with run.lock("evaluation"):  # one writer: not while the run trains or is published
        return _evaluate(run, split, model_path, data, batch_size, rechoose, dataset)


def _evaluate(
    run: RunFolder, split: str, model_path: str | os.PathLike | None,
    data: str | os.PathLike | None, batch_size: int | None, rechoose: bool,
    dataset: str | None,
) -> dict[str, Any]:
    """:func:`evaluate` of the run's own datasets, with the run folder's lock held."""
    if split not in ("train", "val", "test"):
        hint = (" ('all' scores a whole dataset the run did not train on: give it with "
                "--dataset)" if split == "all" else "")
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}{hint}")
    config = with_data(run, data, dataset)
    model_path = run.weights(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: model file not found")
    parts = run_parts(run, config)
    size, mode = config.image_size, config.resize
    batch_size = batch_size or config.batch_size
    model = open_run_model(run, model_path)  # checked against the SHA-256 training recorded
    digest = model.settings.digest
    sha1 = digest.sha1

    val_table = parts["val"]
    val_truths = load_truths(val_table)
    saved = None if rechoose else _saved_choice(evaluation_dir(run, model_path), model_path,
                                                digest)
    if val_table.empty and (saved is None or split == "val"):  # a busi cv ensemble's split
        what = "score" if saved else "score or to choose post-processing on"
        raise ValueError(f"{run.split}: no validation images to {what}; a busi cv ensemble's "
                         "choice is made on its folds' out-of-fold predictions: run the same "
                         "busi cv command again")
    variants = (False, True) if saved is None else (saved.postprocess.tta,)
    val_predictions = {
        tta: predict_table(model, val_table, size, mode, batch_size, tta, desc="val")
        for tta in variants
    }
    val_probs = {tta: maps for tta, (maps, _) in val_predictions.items()}
    val_labels = {tta: labels for tta, (_, labels) in val_predictions.items()}
    if saved is None:
        grid = postprocess_grid(val_table, val_probs[False], val_probs[True], truths=val_truths)
        chosen = select_postprocess(grid)
        post = PostProcess.from_dict(chosen)
        if val_labels[post.tta] is not None:  # the image-level head: its gate, chosen on val
            rows = _with_normal_images(val_table)
            scored = score_table(val_table, val_probs[post.tta], post, truths=val_truths)
            curve = gate_curve(scored[rows].reset_index(drop=True),
                               heads.lesion_probability(val_labels[post.tta])[rows])
            post = post.override(gate=choose_gate(curve))
        saved = ModelRecord(
            model=model_path.name, files={model_path.name: digest}, image_size=size,
            resize=mode, postprocess=post, chosen_on="val",
            classes=tuple(config.classes),
            provenance={k: v for k, v in chosen.items() if k not in PostProcess.keys()},
        )
        out_dir = evaluation_dir(run, model_path)
        atomic_write_text(out_dir / GRID_FILE, grid.to_csv(index=False))
        saved.write(out_dir / POSTPROCESS_FILE)
        log.info("post-processing chosen on val: %s", saved.postprocess)
    post = saved.postprocess

    per_image = {} if val_table.empty else {
        "val": score_table(val_table, val_probs[post.tta], post, truths=val_truths,
                           labels=val_labels[post.tta])}
    ungated = None
    if split != "val":
        probs, labels = predict_table(model, parts[split], size, mode, batch_size, post.tta,
                                      desc=split)
        truths = load_truths(parts[split])
        per_image[split] = score_table(parts[split], probs, post, truths=truths, labels=labels)
        if labels is not None:
            ungated = {split: score_table(parts[split], probs, post.override(gate=0.0),
                                          truths=truths)}
            if not val_table.empty:
                ungated["val"] = score_table(val_table, val_probs[post.tta],
                                             post.override(gate=0.0), truths=val_truths)

    # Each dataset of a joint run is reported apart (never one pooled figure that hides one);
    # the first goes to evaluation/, the others to evaluation-<name>/.
    records = {}
    for name in config.datasets:
        frames, plain = per_image, ungated
        if len(config.datasets) > 1:
            frames, plain = ({part: frame[frame["id"].isin(_ids_of(parts[part], name))]
                              .reset_index(drop=True) for part, frame in tables.items()}
                             for tables in (per_image, ungated or {}))
        out_dir = evaluation_dir(run, model_path, name)
        records[name] = _write_summary(out_dir, frames, model_path, sha1, post, size, mode, name)
        if ungated is not None:  # the head's figures, of this dataset's images
            _head_figures(out_dir, frames, plain, split, post.gate,
                          records[name]["splits"][split].get("classification", {}))
    return records[dataset or config.datasets[0]]


def _with_normal_images(table: pd.DataFrame) -> np.ndarray:
    """The rows of datasets that hold normal images, where the gate is chosen: the head learns
    P(normal) on those only (BUS-BRA rows train benign vs malignant), so on the others its
    lesion probability means nothing and gating their lesions would count as a cost that no
    gate can avoid."""
    if "dataset" not in table:
        return np.ones(len(table), bool)
    with_normal = set(table.loc[table["label"] == "normal", "dataset"])
    return table["dataset"].isin(with_normal).to_numpy()


def _head_figures(out_dir: Path, per_image: Mapping[str, pd.DataFrame],
                  ungated: Mapping[str, pd.DataFrame], split: str, gate: float,
                  classification: Mapping[str, Any]) -> None:
    """The gate's cost across thresholds (val, where it was chosen, and ``split`` for show) and
    the ROC curves of ``split``: ``gate_<part>.csv``, ``gate.png`` and ``roc.png`` beside the
    summary. A ``busi cv`` ensemble has no val part: its plot shows the out-of-fold curve its
    gate was chosen on (``gate_out_of_fold.csv``, of all its datasets with normal images)
    instead. ``ungated``: the parts' per-image scores without the gate; ``classification``:
    the summary's scores of ``split``
    (:func:`busi.evaluation.classification.classification_summary`), whose AUCs title the ROC
    curves. In a joint run each dataset gets its own; the gate itself was chosen on the val parts of
    the datasets that hold normal images."""
    curves = {part: gate_curve(ungated[part], per_image[part]["p_lesion"])
              for part in dict.fromkeys(("val", split)) if part in ungated}
    for part, curve in curves.items():
        atomic_write_text(out_dir / GATE_FILE.format(split=part), curve.to_csv(index=False))
    pooled = out_dir / GATE_FILE.format(split=OUT_OF_FOLD)
    chosen_on = {OUT_OF_FOLD: pd.read_csv(pooled)} if "val" not in curves and pooled.is_file() \
        else {}
    plots.gate_curves({**chosen_on, **curves}, gate, out_dir / "gate.png")
    frame = per_image[split]
    known = frame["label"].isin(heads.CLASSES)
    probabilities = frame.loc[known, [f"p_{name}" for name in heads.CLASSES]].to_numpy()
    rocs = roc_points(frame.loc[known, "label"], probabilities)
    plots.roc_curves(rocs, {name: classification.get(f"{name}_auc") for name in rocs},
                     out_dir / "roc.png")


def _saved_choice(out_dir: Path, model_path: Path, digest: FileDigest) -> ModelRecord | None:
    """The record in ``postprocess.json`` if it was made for these very weights, else None."""
    path = out_dir / POSTPROCESS_FILE
    saved = read_json(path)
    if saved is None:
        return None
    if not set(PostProcess.required_keys()) <= set(saved):
        raise ValueError(
            f"{path}: lacks some of {list(PostProcess.required_keys())}; fix it or delete it "
            "to choose again"
        )
    record = ModelRecord.from_dict(saved, path)
    covered = record.covers(model_path.name)
    if covered is None or covered.differs(digest):
        log.info("%s was chosen for other weights; choosing again", path)
        return None
    return record


def chosen_postprocess(run_dir: str | os.PathLike, model_path: str | os.PathLike | None = None
                       ) -> dict[str, Any]:
    """The post-processing the run chose on its own validation data for these weights
    (``evaluation[/<stem>]/postprocess.json``); chosen first (by evaluating the run's val part)
    if it has not been, or was chosen for earlier weights."""
    run = RunFolder(run_dir)
    model_path = run.weights(model_path)
    out_dir, digest = evaluation_dir(run, model_path), FileDigest.of(model_path)
    saved = _saved_choice(out_dir, model_path, digest)
    if saved is None:
        evaluate(run.root, split="val", model_path=model_path)
        saved = _saved_choice(out_dir, model_path, digest)
    if saved is None:
        raise RuntimeError(f"{out_dir / POSTPROCESS_FILE}: evaluating the val part recorded no "
                           f"post-processing for {model_path}")
    return saved.to_dict()


def evaluate_dataset(
    run_dir: str | os.PathLike,
    dataset: str,
    part: str = "all",
    model_path: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Evaluate a run's model on another dataset, with the run's own post-processing.

    Writes (atomically) ``per_image_<part>.csv`` and ``summary.json`` into
    ``evaluation-<dataset>/`` (``evaluation-<dataset>/<stem>/`` for weights other than
    ``best.h5``); the summary records the dataset, the part, the post-processing and where it was
    chosen, and the fingerprint of the images scored.

    Args:
        run_dir, model_path, batch_size: as for :func:`evaluate`.
        dataset: a registered dataset the run was not trained on.
        part: "all" or "test" (:func:`busi.data.cross_dataset.dataset_rows`).
        data: that dataset's folder; default where its adapter looks.

    Returns:
        The content of ``summary.json``, its ``splits[part]`` a
        :func:`busi.evaluation.score_tables.summarize` dict.
    """
    run = RunFolder(run_dir)
    with run.lock("evaluation"):  # one writer (reentrant: evaluate() may hold it already)
        config = run.load_config()
        model_path = run.weights(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: model file not found")
        rows = dataset_rows(config, dataset, part, data)
        post = PostProcess.from_dict(chosen_postprocess(run.root, model_path))
        per_image, _ = evaluate_model(open_run_model(run, model_path), rows, post,
                                      config.image_size, config.resize,
                                      batch_size or config.batch_size)
        out_dir = evaluation_dir(run, model_path, dataset)
        return _write_summary(out_dir, {part: per_image}, model_path, file_sha1(model_path),
                              post, config.image_size, config.resize, dataset, extra={
                                  "part": part, "dataset_fingerprint": fingerprint(rows),
                                  "postprocess_chosen_on": "val of the run's own datasets "
                                                           f"({', '.join(config.datasets)})",
                              })


def _ids_of(rows: pd.DataFrame, dataset: str) -> pd.Series:
    return rows.loc[rows["dataset"] == dataset, "id"]


def _write_summary(
    out_dir: Path, per_image: Mapping[str, pd.DataFrame], model_path: Path, sha1: str,
    post: PostProcess, size: Any, mode: str, dataset: str, extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``per_image_<part>.csv`` and ``summary.json`` (with the ``extra`` keys: one
    write) into ``out_dir``; parts evaluated earlier with the same weights and post-processing
    are kept in the summary."""
    record = summary_record(model_path, sha1, post, size, mode)
    record["dataset"] = dataset
    record.update(extra or {})
    previous = read_json(out_dir / SUMMARY_FILE)
    if previous and all(previous.get(k) == record[k] for k in ("model_sha1", "postprocess")):
        record["splits"].update(previous.get("splits", {}))
    for name, frame in per_image.items():
        atomic_write_text(out_dir / PER_IMAGE_FILE.format(split=name), frame.to_csv(index=False))
        record["splits"][name] = summarize(frame)
    record = json_ready(record)
    write_json(out_dir / SUMMARY_FILE, record)
    return record


__all__ = ["chosen_postprocess", "evaluate", "evaluate_dataset"]
