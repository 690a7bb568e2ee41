"""Score a published model (``weights/NAME.h5`` with its sidecar) and keep the per-image scores.

``busi evaluate weights/NAME.h5`` prints the table; this script is the same scoring
(:func:`busi.evaluation.published.evaluate_published`: the split made again from the sidecar and
confirmed, the sidecar's post-processing) with the per-image scores written to ``--out``, for a
model whose run folder is gone or one downloaded from a release, on BUSI, BUS-BRA or a folder of
one's own images and masks::

    python tools/score_published.py weights/NAME.h5 --dataset busi --part test --out scores.csv
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
from busi.data import datasets
from busi.errors import DataError
from busi.evaluation.published import evaluate_published
from busi.evaluation.report import summary_text
from busi.utils.atomic import atomic_write_text


def score(weights: Path, dataset: str | None = None, part: str = "test",
          data: str | None = None):
    """(per-image table, summary dict in ``busi evaluate``'s form) of ``weights`` on ``part`` of
    ``dataset`` (default the model's first), with the sidecar's config and post-processing."""
    return evaluate_published(weights, split=part, dataset=dataset, data=data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("weights", type=Path, help="published .h5 (or export) with its .json "
                        "sidecar")
    parser.add_argument("--dataset", choices=datasets.names(),
                        help="default: the model's first dataset")
    parser.add_argument("--part", choices=("train", "val", "test", "all"), default="test",
                        help="test (default): the model's own test part on a dataset it was "
                        "trained on, else that dataset's test part split with the model's "
                        "settings; train, val: its own parts; all: every image of another "
                        "dataset")
    parser.add_argument("--data", help="the dataset's folder, if not where its adapter looks")
    parser.add_argument("--out", type=Path, help="write the per-image scores to this CSV")
    args = parser.parse_args(argv)
    try:
        per_image, record = score(args.weights, args.dataset, args.part, args.data)
    except (DataError, ValueError, OSError) as error:  # bad input: the message says what to do
        raise SystemExit(f"score_published: error: {error}") from None
    print(summary_text(record, args.part), end="")
    if args.out:
        atomic_write_text(args.out, per_image.to_csv(index=False))
        print(f"per-image scores in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
