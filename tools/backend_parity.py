"""Does a config train to the same validation Dice on every backend? The parity table of the
README: one config (by default the 40-epoch Lite0 recipe from ImageNet, cut to a few epochs and a
``limit`` of images per part) trained once per backend and seed, each in its own process (a
process has one Keras), then scored on the validation part by ``busi evaluate --split val`` in
one tf-keras process, so every run is read by the same code. Two seeds per backend show how far
a seed alone moves the figure.

    python tools/backend_parity.py                                  # installed backends
    python tools/backend_parity.py --epochs 4 --limit 96 --seeds 0 1 --out runs/parity
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"tf-keras": "tf_keras", "tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def installed() -> list[str]:
    return [name for name, module in BACKENDS.items() if importlib.util.find_spec(module)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "lite0_40ep_cpu.yaml"))
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--limit", type=int, default=96)
    parser.add_argument("--out", default=str(ROOT / "runs" / "parity"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows = []
    for seed in args.seeds:  # interleaved: a machine's load changes touch every backend alike
        for name in args.backends or installed():
            run = out / f"{name}-seed{seed}"
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "busi.cli", "train", "--config", args.config,
                            "--backend", name, "--run-dir", str(run), "--name", run.name,
                            "--set", f"epochs={args.epochs}", "--set", f"limit={args.limit}",
                            "--set", f"seed={seed}", "--set", "evaluate=false",
                            "--set", "max_minutes=null"], check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - started
            scored = subprocess.run([sys.executable, "-m", "busi.cli", "evaluate", str(run),
                                     "--split", "val", "--json"], check=True,
                                    capture_output=True, text=True).stdout
            lesion = json.loads(scored)["splits"]["val"]["lesion"]
            rows.append({"backend": name, "seed": seed, "val_lesion_dice_mean":
                         round(lesion["dice_mean"], 3), "val_lesion_dice_median":
                         round(lesion["dice_median"], 3), "n": lesion["n"],
                         "train_and_val_s": round(seconds)})
            print(rows[-1], flush=True)
    with open(out / "parity.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n| backend | seed | val lesion Dice mean | median | val lesion images | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['backend']} | {row['seed']} | {row['val_lesion_dice_mean']:.3f} | "
              f"{row['val_lesion_dice_median']:.3f} | {row['n']} | {row['train_and_val_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
