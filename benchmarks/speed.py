"""Speed of the default model on this machine against its theoretical limit.

Measures, for a U-Net (default: ResNet34 encoder, 256x256, batch 8, float32 unless --policy):
training images/s in steady state, inference images/s, input-pipeline images/s on real BUSI
data with augmentation, and peak memory (max RSS of this process). Counts the model's FLOPs
from the Keras graph (TensorFlow's profiler on the frozen forward graph; a training step is
counted as 3x the forward pass: forward, gradient w.r.t. activations, w.r.t. weights), and
states the machine's theoretical peak:

    peak = cores x clock x FLOPs per cycle per core

with the clock from /proc/cpuinfo (the nominal "cpu MHz"; turbo may be higher, so the fraction
of peak is an upper estimate) and FLOPs per cycle from the CPU family: AMD Zen 5 (family 26) has
two 512-bit FMA pipes, i.e. 2 x 16 float32 lanes x 2 FLOPs = 64 float32 FLOPs per cycle (bf16
dot products: twice that); Zen 4 (family 25 with AVX-512) executes 512-bit ops on 256-bit
pipes: 32. Other CPUs: give --flops-per-cycle.

    python benchmarks/speed.py                       # default model, float32
    python benchmarks/speed.py --policy mixed_bfloat16
    python benchmarks/speed.py --architecture classic_unet --base-filters 16
    python benchmarks/speed.py --encoder efficientnet-lite0 --decoder-filters 128 64 32 16 16

Figures on a shared machine are noisy: compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import tensorflow as tf
from _common import print_header, usable_cores

import busi  # noqa: F401  (Keras 2 before TensorFlow)
from busi import _keras
from busi.config.train_config import TrainConfig
from busi.models import architectures as models
from busi.training.trainer import compile_model

FLOPS_PER_CYCLE = {("AuthenticAMD", 26): 64, ("AuthenticAMD", 25): 32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--architecture", default="unet", choices=list(models.ARCHITECTURES))
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--base-filters", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--decoder-filters", type=int, nargs=5, default=[256, 128, 64, 32, 16],
                        metavar="F", help="filters of the U-Net's 5 decoder stages")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--policy", default="float32",
                        choices=["float32", "mixed_bfloat16", "mixed_float16"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is kept")
    parser.add_argument("--data", default=None, help="BUSI folder for the pipeline figure")
    parser.add_argument("--flops-per-cycle", type=float, default=None)
    return parser.parse_args(argv)


def cpu_peak(flops_per_cycle: float | None) -> tuple[float | None, str]:
    """Theoretical float32 peak in FLOP/s, and how it was worked out."""
    info = open("/proc/cpuinfo").read()
    fields = {}
    for line in info.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())  # the first processor's values
    vendor, family = fields.get("vendor_id", "?"), int(fields.get("cpu family", "0"))
    mhz = float(fields.get("cpu MHz", "0"))
    cores = usable_cores()
    per_cycle = flops_per_cycle or FLOPS_PER_CYCLE.get((vendor, family))
    if per_cycle is None or not mhz:
        return None, f"{vendor} family {family}: unknown FLOPs/cycle (give --flops-per-cycle)"
    peak = cores * mhz * 1e6 * per_cycle
    method = (f"{cores} cores x {mhz:.0f} MHz x {per_cycle:g} float32 FLOPs/cycle "
              f"({vendor} family {family}, {fields.get('model name', '?')})")
    return peak, method


def forward_flops(model, size: int) -> float:
    """FLOPs of one forward pass of one image, from the frozen Keras graph."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    spec = tf.TensorSpec([1, size, size, 3], tf.float32)
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(concrete)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=frozen.graph, options=options)
    return float(profile.total_float_ops)


def timed(step, steps: int, rounds: int, images_per_step: int) -> float:
    """Median images/s over ``rounds`` of ``steps`` calls, after two warm-up calls."""
    step()
    step()
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * images_per_step / (time.perf_counter() - start))
    return statistics.median(rates)


def pipeline_rate(data: str | None, size: int, batch_size: int) -> tuple[float, int] | None:
    """Images/s of the augmented training pipeline over two passes of the lesion images."""
    try:
        root = busi.data.locate(data)
    except busi.errors.DataError:
        return None
    from busi.data.pipeline import load_arrays, make_dataset

    table = busi.data.index(root)
    table = table[table["label"] != "normal"]
    arrays = load_arrays(table, size=size)
    dataset = make_dataset(table, size=size, batch_size=batch_size, training=True,
                           cache_arrays=arrays)
    for _ in dataset.take(2):
        pass
    start, count = time.perf_counter(), 0
    for _ in range(2):
        for images, _masks in dataset:
            count += int(images.shape[0])
    return count / (time.perf_counter() - start), len(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print_header(args.data is not None)
    keras = _keras.keras()
    keras.mixed_precision.set_global_policy(args.policy)
    config = TrainConfig(
        architecture=args.architecture, encoder=args.encoder, encoder_weights=None,
        base_filters=args.base_filters, depth=args.depth, image_size=args.image_size,
        batch_size=args.batch_size, decoder_filters=args.decoder_filters,
    )
    model = models.build(config)
    compile_model(model, config)
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size)
    images = tf.constant(rng.uniform(0, 255, (*shape, 3)).astype(np.float32))
    masks = tf.constant((rng.random((*shape, 1)) > 0.9).astype(np.float32))

    train = timed(lambda: model.train_on_batch(images, masks), args.steps, args.rounds,
                  args.batch_size)
    predict_fn = tf.function(lambda x: model(x, training=False))
    infer = timed(lambda: predict_fn(images).numpy(), args.steps, args.rounds, args.batch_size)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB

    flops = forward_flops(model, args.image_size)
    peak, method = cpu_peak(args.flops_per_cycle)
    pipeline = pipeline_rate(args.data, args.image_size, args.batch_size)

    print(f"model: {model.name}, {model.count_params() / 1e6:.1f} M parameters, "
          f"{args.image_size}x{args.image_size}, batch {args.batch_size}, policy {args.policy}")
    threading = tf.config.threading
    print(f"TensorFlow {tf.__version__}, threads intra "
          f"{threading.get_intra_op_parallelism_threads()} inter "
          f"{threading.get_inter_op_parallelism_threads()} (0 = all cores)")
    print(f"forward FLOPs per image: {flops / 1e9:.1f} G; training step: {3 * flops / 1e9:.1f} G")
    print(f"training:  {train:6.2f} img/s = {train * 3 * flops / 1e9:6.1f} GFLOP/s")
    print(f"inference: {infer:6.2f} img/s = {infer * flops / 1e9:6.1f} GFLOP/s")
    if peak:
        print(f"theoretical float32 peak: {peak / 1e9:.0f} GFLOP/s = {method}")
        print(f"fraction of peak: training {train * 3 * flops / peak:.0%}, "
              f"inference {infer * flops / peak:.0%}")
    else:
        print(f"theoretical peak: {method}")
    print(f"peak memory (max RSS of this process): {peak_rss:.0f} MiB")
    if pipeline:
        rate, n = pipeline
        print(f"input pipeline (augmented, {n} lesion images, cached arrays): {rate:.0f} img/s "
              f"= {rate / train:.0f}x what training consumes")
    else:
        print("input pipeline: BUSI not found (set BUSI_DATA or --data)")


if __name__ == "__main__":
    main()
