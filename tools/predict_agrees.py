"""Do the masks `busi predict` writes score what `busi evaluate` reported?

A user who predicts with published weights gets the PNG masks of ``busi predict``, not the
in-memory masks ``busi evaluate`` scores. This tool runs ``busi.predict`` on the test images of
a run (through links in a temporary folder: the dataset is never touched), reads the written
masks back, scores each against the merged ground truth at the original size with
``busi.evaluation.scoring``, and compares the mean lesion Dice with the run's ``summary.json``. With
``--against`` it also predicts with a second model file (say the int8 TFLite export of the same
weights) and reports the mean per-image Dice between the two models' masks::

    python tools/predict_agrees.py weights/NAME.h5 runs/NAME
    python tools/predict_agrees.py weights/NAME.h5 runs/NAME --against weights/NAME.int8.tflite

It exits 1 when the two means differ by more than the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

import busi  # noqa: F401  (Keras 2 before TensorFlow)
from busi.data.masks import merge_masks
from busi.data.run_parts import run_parts
from busi.evaluation import scoring
from busi.runs.evaluations import SUMMARY_FILE, evaluation_dir
from busi.runs.folder import RunFolder
from busi.utils.digests import file_sha1


def written_masks(weights: Path, run_dir: Path, split: str = "test"
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(masks ``busi.predict`` writes, merged ground truths) of the run's ``split`` lesion
    images, each at the image's original size."""
    run = RunFolder(run_dir)
    config = run.load_config()
    rows = run_parts(run, config)[split]
    if "dataset" in rows:  # a joint run: evaluation/ holds its first dataset's scores
        rows = rows[rows["dataset"] == config.datasets[0]]
    lesions = rows[rows["label"] != "normal"]
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = Path(tmp) / "in", Path(tmp) / "out"
        inputs.mkdir()
        for i, path in enumerate(lesions["image_path"]):
            (inputs / f"{i:05d}{Path(path).suffix}").symlink_to(Path(path).resolve())
        busi.predict(weights, inputs, outputs)
        predicted = []
        for i, image in enumerate(lesions["image_path"]):
            mask = outputs / f"{i:05d}_pred.png"
            if not mask.is_file():
                raise SystemExit(f"busi predict wrote no mask for {image}")
            predicted.append(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE))
    return predicted, [merge_masks(paths) for paths in lesions["mask_paths"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("weights", type=Path, help="published .h5/.tflite or RUN/best.h5")
    parser.add_argument("run", type=Path, help="the run folder the weights come from")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--against", type=Path, help="a second model file to compare masks with")
    args = parser.parse_args(argv)
    run = RunFolder(args.run)
    summary = json.loads((evaluation_dir(run) / SUMMARY_FILE).read_text())
    if args.weights.suffix == ".h5" and file_sha1(args.weights) != summary["model_sha1"]:
        parser.error(f"{args.weights} is not the model {args.run}/evaluation/summary.json scored "
                     "(SHA-1 differs): evaluate these weights first")
    reported = summary["splits"]["test"]["lesion"]["dice_mean"]
    predicted, truths = written_masks(args.weights, args.run)
    mean = float(np.mean([scoring.dice(t, p) for t, p in zip(truths, predicted, strict=True)]))
    difference = abs(mean - reported)
    print(f"{args.weights}: mean lesion Dice of the written masks {mean:.4f} over "
          f"{len(truths)} test images; busi evaluate reported {reported:.4f}; difference "
          f"{difference:.4f} (tolerance {args.tolerance})")
    if args.against:
        other, _ = written_masks(args.against, args.run)
        agreement = [scoring.dice(a, b) for a, b in zip(predicted, other, strict=True)]
        print(f"{args.against}: per-image Dice with the masks of {args.weights.name}: mean "
              f"{np.mean(agreement):.4f}, worst {np.min(agreement):.4f}")
    return 0 if difference <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
