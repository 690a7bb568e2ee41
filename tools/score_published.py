"""Score a published model (``weights/NAME.h5`` with its sidecar) on another dataset.

``busi evaluate RUN --dataset NAME`` needs the run folder; a published model carries what that
needs in its sidecar (training config, post-processing chosen on the run's validation images),
so a model whose run folder is gone, or one downloaded from a release, can still be scored on
BUS-BRA or on a folder of one's own images and masks, with the same rows, metrics and table::

    python tools/score_published.py weights/NAME.h5 --dataset busbra --part test
    python tools/score_published.py weights/NAME.h5 --dataset folder --data my_data --part all

The per-image scores go to ``--out`` (a CSV, written atomically) when given; nothing else is
written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import busi  # noqa: F401  (Keras 2 before TensorFlow)
from busi import inference
from busi.atomic import atomic_write_text
from busi.config import TrainConfig
from busi.cross_dataset import PARTS, dataset_rows
from busi.data import datasets
from busi.digests import file_sha1
from busi.evaluation import evaluate_model, summary_record
from busi.postprocess import PostProcess
from busi.report import summary_text
from busi.runs import json_ready, postprocess_for, read_json


def score(weights: Path, dataset: str, part: str = "test", data: str | None = None):
    """(per-image table, summary dict in ``busi evaluate``'s form) of ``weights`` on ``part`` of
    ``dataset``, with the sidecar's config and post-processing."""
    sidecar_path = weights.with_suffix(".json")
    sidecar = read_json(sidecar_path)
    if sidecar is None:
        raise SystemExit(f"{weights}: no sidecar {sidecar_path.name} beside it (busi publish "
                         "writes one); without it the split settings and post-processing are "
                         "unknown")
    if not isinstance(sidecar.get("config"), dict):
        raise SystemExit(f"{sidecar_path}: no training config in it; not a sidecar written by "
                         "busi publish")
    chosen = postprocess_for(weights)
    if chosen is None:
        raise SystemExit(f"{sidecar_path}: recorded for other weights (SHA-1 differs from "
                         f"{weights.name}); it cannot be used to score this file")
    config = TrainConfig.from_dict(sidecar["config"])
    post = PostProcess.from_dict(chosen)
    rows = dataset_rows(config, dataset, part, data)
    per_image, summary = evaluate_model(inference.load(weights), rows, post, config.image_size,
                                        config.resize, config.batch_size)
    record = summary_record(weights, file_sha1(weights), post, config.image_size, config.resize)
    record.update({"dataset": dataset, "part": part, "splits": {part: summary}})
    return per_image, json_ready(record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path, help="published .h5 with its .json sidecar")
    parser.add_argument("--dataset", required=True, choices=datasets.names())
    parser.add_argument("--part", choices=PARTS, default="test",
                        help="test: the dataset's own test part (split with the model's "
                        "settings); all: every image (default test)")
    parser.add_argument("--data", help="the dataset's folder, if not where its adapter looks")
    parser.add_argument("--out", type=Path, help="write the per-image scores to this CSV")
    args = parser.parse_args(argv)
    per_image, record = score(args.weights, args.dataset, args.part, args.data)
    print(summary_text(record, args.part), end="")
    if args.out:
        atomic_write_text(args.out, per_image.to_csv(index=False))
        print(f"per-image scores in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
