"""Training step time of the EfficientNet-Lite0 U-Net on each backend (tf-keras, and Keras 3 on
tensorflow, jax, torch), to choose a backend for a machine.

Each backend runs in its own Python process (a process has one Keras backend), and the
processes are interleaved, A B C A B C ..., so that a machine whose load changes during the run
(shared CPUs, thermal limits) affects every backend alike; the figure per backend is the median
over rounds of each round's median step. The first steps (graph tracing, XLA compilation on
jax) are reported apart: they are paid once per input shape.

    python benchmarks/backend_speed.py                            # installed backends, 3 rounds
    python benchmarks/backend_speed.py --rounds 2 --steps 3 --size 128
    python benchmarks/backend_speed.py --python jax=/path/to/venv-with-jax/bin/python

Figures on a shared machine are noisy: compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def child(name: str, size: int, batch: int, steps: int, warmup: int) -> dict:
    """Build, compile and time ``train_on_batch`` in this process on backend ``name``."""
    import numpy as np  # child only: the parent imports no numeric library

    from busi.models import backend

    backend.use(name)
    from busi.config.train_config import TrainConfig  # after use(): nothing has Keras yet
    from busi.models import architectures as models
    from busi.training.trainer import compile_model

    config = TrainConfig(backend=name, architecture="unet", encoder="efficientnet-lite0",
                         encoder_weights=None, image_size=size, batch_size=batch)
    started = time.perf_counter()
    model = models.build(config)
    compile_model(model, config)
    built = time.perf_counter() - started
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    y = (rng.random((batch, size, size, 1)) > 0.8).astype(np.float32)
    first = []
    for _ in range(warmup):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        first.append(time.perf_counter() - start)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    return {"backend": name, "build_s": built, "first_s": first, "step_s": times,
            "tensorflow_imported": "tensorflow" in sys.modules}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", help="default: those installed here (and "
                        "those given --python)")
    parser.add_argument("--python", action="append", default=[], metavar="BACKEND=PYTHON",
                        help="run this backend with another interpreter (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.size, args.batch, args.steps, args.warmup)))
        return
    sys.path.insert(0, SRC)
    from busi.models import backend

    pythons = dict(item.split("=", 1) for item in args.python)
    names = args.backends or [n for n in backend.NAMES if n in backend.installed() or n in pythons]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    results: dict[str, list[dict]] = {name: [] for name in names}
    print(f"lite0 U-Net, {args.size}x{args.size}, batch {args.batch}: {args.rounds} rounds of "
          f"{args.warmup} untimed + {args.steps} timed steps per backend, interleaved",
          flush=True)
    for round_ in range(args.rounds):
        for name in names:
            command = [pythons.get(name, sys.executable), __file__, "--child", name,
                       "--size", str(args.size), "--batch", str(args.batch),
                       "--steps", str(args.steps), "--warmup", str(args.warmup)]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                print(f"round {round_ + 1} {name}: failed\n{done.stderr[-1500:]}", flush=True)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[name].append(result)
            print(f"round {round_ + 1} {name}: median step "
                  f"{statistics.median(result['step_s']):.3f} s, first "
                  f"{', '.join(f'{t:.1f}' for t in result['first_s'])} s", flush=True)
    print(f"\n{'backend':<12}{'median step s':>14}{'first step s':>14}{'build s':>9}  TF imported")
    for name, runs in results.items():
        if not runs:
            continue
        step = statistics.median(statistics.median(r["step_s"]) for r in runs)
        first = statistics.median(r["first_s"][0] for r in runs if r["first_s"])
        build = statistics.median(r["build_s"] for r in runs)
        print(f"{name:<12}{step:>14.3f}{first:>14.1f}{build:>9.1f}  "
              f"{runs[0]['tensorflow_imported']}")


if __name__ == "__main__":
    main()
