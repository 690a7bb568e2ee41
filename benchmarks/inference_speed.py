"""How fast, and how faithfully, does each inference backend run the U-Net on CPU? (A script.)

Keras float32 ``model.predict`` is the baseline. Every other candidate goes through
:mod:`busi.inference.export` and :func:`busi.inference.predictor.load`, so what is measured is what
``busi predict`` and the evaluation get. For each candidate it prints:

- images/s on one fixed batch of real BUSI images (default 8 at 256x256), timed in interleaved
  rounds (every candidate once per round, median over rounds), and the ratio to Keras float32
  from the same run: the machine is shared, so only ratios within one run compare;
- agreement with Keras float32 on ``--images`` real images: max and mean |probability
  difference|, Dice of the masks thresholded at 0.5 (pooled over all pixels, and the worst
  single image), and with ``--weights`` the mean Dice against the ground truth.

Without ``--weights`` the model has random weights. Its BatchNorm statistics are then set from
real images (one pass with momentum 0), otherwise every logit is in the thousands and every
probability exactly 0 or 1. Such a network still amplifies rounding much more than a trained
one, so its agreement figures are pessimistic for reduced precision: use ``--weights best.h5``
for the figures that matter.

Usage::

    python benchmarks/inference_speed.py [--weights runs/x/best.h5] [--data PATH] [--images 32]
        [--batch-size 8] [--rounds 5] [--only keras-fp32,onnx-bf16-openvino] [--keep DIR]

``--data`` defaults to ``$BUSI_DATA``, then ``/work/shared/data/busi`` (see busi.data.locate).
Optional runtimes that are not installed are reported and skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import print_header

import busi  # first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported

DEFAULT_DATA = "/work/shared/data/busi"

# name -> (backend, quantize, runtime); backend None = the .h5 itself, quantize = precision.
CANDIDATES: dict[str, tuple[str | None, str | None, str | None]] = {
    "keras-fp32-tf.function": (None, None, None),
    "keras-bf16": (None, "bfloat16", None),
    "onnx-fp32-onnxruntime": ("onnx", None, "onnxruntime"),
    "onnx-fp32-openvino": ("onnx", None, "openvino"),
    "onnx-bf16-openvino": ("onnx", "bfloat16", "openvino"),
    "onnx-int8-onnxruntime": ("onnx", "int8", "onnxruntime"),
    "onnx-int8-openvino": ("onnx", "int8", "openvino"),
    "tflite-fp32": ("tflite", None, None),
    "tflite-fp16": ("tflite", "float16", None),
    "tflite-dynamic-int8": ("tflite", "dynamic", None),
    "tflite-int8": ("tflite", "int8", None),
}
BASELINE = "keras-fp32-predict"


@dataclass
class Result:
    name: str
    run: Callable[[np.ndarray], np.ndarray] | None = None
    times: list[float] = field(default_factory=list)
    export_seconds: float = 0.0
    error: str = ""
    probabilities: np.ndarray | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=None, help="trained busi .h5 (default: random)")
    parser.add_argument("--encoder", default="resnet34", help="encoder of the random model")
    parser.add_argument("--image-size", type=int, default=256,
                        help="input side of the random model")
    parser.add_argument("--data", default=None, help="BUSI folder (default: $BUSI_DATA)")
    parser.add_argument("--images", type=int, default=32, help="real images for agreement")
    parser.add_argument("--calibration", type=int, default=32, help="images for int8 ranges")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds (median is kept)")
    parser.add_argument("--only", default=None, help="comma-separated candidate names")
    parser.add_argument("--threads", type=int, default=None, help="default: all usable cores")
    parser.add_argument("--keep", default=None, help="folder to keep the exported files in")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_images(args: argparse.Namespace, size: tuple[int, int]):
    """Disjoint, seeded samples of real images (all three classes) for agreement and int8.

    Returns float32 [N, H, W, 3] evaluation images, their {0, 1} masks, and the calibration
    images, letterboxed to the model size as busi does for prediction.
    """
    from busi.data.pipeline import load_arrays

    data = args.data or os.environ.get("BUSI_DATA") or DEFAULT_DATA
    table = busi.data.index(busi.data.locate(data))
    wanted = args.images + args.calibration
    if len(table) < wanted:
        raise SystemExit(f"{data}: {len(table)} images, fewer than the {wanted} asked for")
    rows = table.sample(wanted, random_state=args.seed).reset_index(drop=True)
    gray, masks, _ = load_arrays(rows, size=size, mode="letterbox")
    images = np.repeat(gray.astype(np.float32), 3, axis=-1)
    return images[: args.images], masks[: args.images, ..., 0], images[args.images :]


def calibrate_batchnorm(model: Any, images: np.ndarray) -> None:
    """Moving BatchNorm statistics := batch statistics of ``images`` (random-weights mode only).

    Why: untrained statistics (mean 0, variance 1) on 0-255 input give logits in the thousands,
    so every probability is exactly 0 or 1 and no comparison of probabilities means anything.
    """
    from busi.training.batchnorm import recalibrate

    recalibrate(model, [images])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (sm's convention)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def predict_all(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int):
    return np.concatenate([run(images[i : i + batch]) for i in range(0, len(images), batch)])


def make_candidate(name: str, h5: Path, folder: Path, calibration: np.ndarray,
                   threads: int | None) -> Result:
    """Export (timed) and open one candidate; failures are recorded, not raised."""
    from busi.inference import export as bx
    from busi.inference import predictor as inference

    backend, quantize, runtime = CANDIDATES[name]
    result = Result(name)
    try:
        start = time.perf_counter()
        if backend is None:
            predictor = inference.load(h5, precision=quantize or "float32")
        else:
            out = folder / f"model_{quantize or 'fp32'}.{backend}"
            if not out.exists():
                bx.export(h5, out, backend=backend, quantize=quantize, calibration=calibration)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                predictor = inference.load(out, runtime=runtime, threads=threads)
        result.export_seconds = time.perf_counter() - start
        result.run = predictor.predict
        if quantize == "bfloat16" and predictor.precision != "bfloat16":
            result.error = f"ran in {predictor.precision} (no bfloat16 on this CPU/runtime)"
    except ImportError as error:
        result.error = f"skipped: {error}"
    except Exception as error:  # report and go on: one broken backend must not hide the rest
        result.error = f"FAILED: {type(error).__name__}: {str(error)[:300]}"
    return result


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return " ".join(flag for flag in wanted if flag in flags) or "none of avx2/avx512/amx"


def versions() -> str:
    from importlib import metadata

    names = ("tensorflow", "tf-keras", "onnxruntime", "tf2onnx", "onnx", "openvino",
             "ai-edge-litert", "numpy", "protobuf")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import tensorflow as tf

    print_header(args.data is not None)
    print(f"cpu flags: {cpu_flags()}")
    print(f"versions: {versions()}")

    names = [BASELINE, *CANDIDATES]
    if args.only:
        unknown = set(args.only.split(",")) - set(names)
        if unknown:
            raise SystemExit(f"unknown candidates {sorted(unknown)}; choose from {names}")
        names = [BASELINE] + [n for n in CANDIDATES if n in args.only.split(",")]

    with tempfile.TemporaryDirectory(prefix="busi-speed-") as scratch:
        folder = Path(args.keep) if args.keep else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        if args.weights:
            model = busi.load_model(args.weights, compile=False)
            size = tuple(int(s) for s in model.input_shape[1:3])
        else:
            size = (args.image_size, args.image_size)
            busi._keras.keras().utils.set_random_seed(args.seed)  # same random model each run
            model = busi.build_model(args.encoder, input_shape=(*size, 3), encoder_weights=None)
        images, truth, calibration = load_images(args, size)
        if args.weights:
            h5 = Path(args.weights)
            print(f"model: {h5} (trained weights), input {size}")
        else:
            calibrate_batchnorm(model, tf.constant(calibration[: max(8, args.batch_size)]))
            h5 = busi.save_model(model, folder / "random.h5", include_optimizer=False)
            print(
                f"model: {args.encoder} U-Net, input {size}, RANDOM weights (BatchNorm statistics "
                "set from real images). Random networks amplify rounding far more than trained "
                "ones: the agreement figures below are pessimistic for bfloat16/int8; rerun with "
                "--weights best.h5 for the figures that matter."
            )
        print(f"images: {len(images)} for agreement, {len(calibration)} for int8 calibration, "
              f"timing batch {args.batch_size}")

        results = {BASELINE: Result(BASELINE)}
        results[BASELINE].run = lambda x: model.predict(x, batch_size=len(x), verbose=0)
        for name in names[1:]:
            print(f"  preparing {name} ...", flush=True)
            results[name] = make_candidate(name, h5, folder, calibration, args.threads)

        live = [r for r in results.values() if r.run is not None]
        for result in live:  # agreement, which also warms every runtime up
            result.probabilities = predict_all(result.run, images, args.batch_size)
        batch = images[: args.batch_size]
        for _ in range(args.rounds):
            for result in live:
                time.sleep(0.2)  # let the previous runtime's spinning threads go idle
                start = time.perf_counter()
                result.run(batch)
                result.times.append(time.perf_counter() - start)
        report(results, truth, args, bool(args.weights))


def report(results: dict[str, Result], truth: np.ndarray, args: argparse.Namespace,
           trained: bool) -> None:
    """Print one table: speed, ratio to Keras float32, agreement with Keras float32."""
    base = results[BASELINE]
    reference = base.probabilities
    base_speed = args.batch_size / statistics.median(base.times)
    reference_masks = reference[..., 0] > 0.5
    base_best = args.batch_size / min(base.times)
    header = (f"{'candidate':24s} {'img/s':>6s} {'x keras':>7s} {'best':>6s} {'x best':>6s} "
              f"{'prep s':>6s} "
              f"{'max|dp|':>8s} {'mean|dp|':>8s} {'Dice':>7s} {'mean img':>8s} {'min img':>7s}")
    if trained:
        header += f" {'Dice GT':>7s}"
    print("\n" + header)
    for result in results.values():
        if result.run is None:
            print(f"{result.name:24s} {result.error}")
            continue
        speed = args.batch_size / statistics.median(result.times)
        best = args.batch_size / min(result.times)
        probabilities = result.probabilities
        masks = probabilities[..., 0] > 0.5
        diff = np.abs(probabilities - reference)
        per_image = [dice(masks[i], reference_masks[i]) for i in range(len(masks))]
        line = (f"{result.name:24s} {speed:6.1f} {speed / base_speed:7.2f} {best:6.1f} "
                f"{best / base_best:6.2f} {result.export_seconds:6.1f} {diff.max():8.4f} "
                f"{diff.mean():8.5f} {dice(masks, reference_masks):7.4f} "
                f"{np.mean(per_image):8.4f} {min(per_image):7.4f}")
        if trained:
            line += f" {np.mean([dice(masks[i], truth[i] > 0) for i in range(len(masks))]):7.4f}"
        if result.error:
            line += f"  ({result.error})"
        print(line)
    print(
        f"\nimg/s: median of {args.rounds} interleaved rounds on one batch of {args.batch_size}; "
        f"'x keras' = ratio to {BASELINE} in this run; 'best', 'x best' = the same from the "
        "fastest round (others' load only ever slows a run down); prep s = export + load time. "
        "Dice = masks at 0.5 vs Keras float32, pooled over all pixels; 'mean img', 'min img' = "
        "mean and worst per-image Dice (empty vs empty = 1; small masks make single images "
        "swing)."
        + (" Dice GT = mean per-image Dice vs ground truth at model resolution." if trained
           else " Random weights: agreement is pessimistic for reduced precision (see above).")
    )


if __name__ == "__main__":
    main()
