"""How fast does the training input pipeline deliver augmented batches? (A script, not a test.)

Training a U-Net on CPU consumes a few images per second, so the pipeline must be far faster, or
the model waits for data. This measures, on the real BUSI lesion images (benign + malignant):

1. the one-off cost of decoding and resizing everything (``load_arrays``, the cache), and
2. images per second from ``make_dataset(..., training=True)`` (shuffle + augmentation +
   batching) over a few epochs, once the arrays are cached.

Usage::

    python benchmarks/pipeline_throughput.py [--data PATH] [--image-size 256] [--batch-size 8]
        [--epochs 3] [--mode letterbox]

``--data`` defaults to ``$BUSI_DATA`` (see ``busi.data.locate``).
"""

from __future__ import annotations

import argparse
import time

from _common import print_header

import busi  # first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported
from busi.data.geometry import MODES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="BUSI folder (default: $BUSI_DATA)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--mode", default="letterbox", choices=MODES)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from busi.data.pipeline import load_arrays, make_dataset

    print_header(args.data is not None)

    start = time.perf_counter()
    table = busi.data.index(busi.data.locate(args.data))
    table = table[table["label"] != "normal"].reset_index(drop=True)
    print(f"index: {len(table)} lesion images in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    arrays = load_arrays(table, size=args.image_size, mode=args.mode)
    seconds = time.perf_counter() - start
    megabytes = (arrays[0].nbytes + arrays[1].nbytes) / 1e6
    print(
        f"cache (decode + resize to {args.image_size}x{args.image_size}, {args.mode}): "
        f"{seconds:.1f} s, "
        f"{len(table) / seconds:.0f} img/s, {megabytes:.0f} MB"
    )

    dataset = make_dataset(
        table,
        size=args.image_size,
        mode=args.mode,
        batch_size=args.batch_size,
        training=True,
        seed=args.seed,
        cache_arrays=arrays,
    )
    total_images, total_seconds = 0, 0.0
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        count = sum(int(image.shape[0]) for image, _ in dataset)
        seconds = time.perf_counter() - start
        total_images += count
        total_seconds += seconds
        print(f"epoch {epoch}: {count} images in {seconds:.2f} s = {count / seconds:.0f} img/s")
    print(
        f"training pipeline (shuffle + augment, batch {args.batch_size}): "
        f"{total_images / total_seconds:.0f} img/s over {args.epochs} epochs "
        f"(first epoch includes tf.data tracing and warm-up)"
    )


if __name__ == "__main__":
    main()
