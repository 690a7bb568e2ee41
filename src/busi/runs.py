"""The run folder: what a training run leaves behind, so it can be resumed, evaluated and
reproduced (after nnU-Net's per-fold output folders).

``runs/<name>/`` holds ``config.json``, ``split.csv``, ``env.json``, ``history.csv``,
``best.h5``, ``last.h5``, ``state.json``, ``logs/`` (TensorBoard), ``evaluation/`` and
``figures/``. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from busi.atomic import atomic_write_text
from busi.config import TrainConfig
from busi.paths import PROJ_ROOT


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run's files."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def split(self) -> Path:
        return self.root / "split.csv"

    @property
    def env(self) -> Path:
        return self.root / "env.json"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def best(self) -> Path:
        return self.root / "best.h5"

    @property
    def last(self) -> Path:
        return self.root / "last.h5"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def lock(self, purpose: str) -> AbstractContextManager[None]:
        """The run's writer lock (:func:`busi.runlock.run_lock`): ``with run.lock("training"):``.
        Refuses a second writer; cleans temporary files of interrupted writes."""
        from busi.runlock import run_lock

        return run_lock(self.root, purpose)

    def read_state(self) -> dict[str, Any]:
        """What the last finished epoch recorded; empty for a new run."""
        if not self.state.is_file() or not self.last.is_file():
            return {}
        return json.loads(self.state.read_text())

    def write_json(self, path: Path, values: dict[str, Any]) -> None:
        atomic_write_text(path, json.dumps(values, indent=2, default=str) + "\n")

    def read_history(self) -> pd.DataFrame:
        if not self.history.is_file():
            return pd.DataFrame()
        return pd.read_csv(self.history)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (read in blocks). SHA-256 is recorded for each checkpoint in
    ``state.json`` when training writes it and checked before the file is published; SHA-1
    ties post-processing choices and sidecars to weights (:func:`busi.evaluation.file_sha1`)."""
    import hashlib

    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=PROJ_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def environment(fingerprint: str) -> dict[str, Any]:
    """Versions, devices and code version of this run, for its env.json."""
    import segmentation_models
    import tensorflow as tf
    import tf_keras

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "tf_keras": tf_keras.__version__,
        "segmentation_models": segmentation_models.__version__,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "git_commit": _git("rev-parse", "HEAD") or None,
        # uncommitted changes to tracked files: the commit alone does not say what ran
        "git_dirty": None if _git("rev-parse", "HEAD") is None
        else bool(_git("status", "--porcelain", "--untracked-files=no")),
        "dataset_fingerprint": fingerprint,
    }


def check_same_config(run: RunFolder, config: TrainConfig) -> None:
    """Refuse to resume a run folder that was made with other settings.

    Only ``epochs`` (train longer), ``max_minutes``, ``evaluate``, ``data`` and ``data_paths``
    (the same dataset elsewhere, the fingerprint guards it) may differ.
    """
    if not run.config.is_file():
        return
    old = TrainConfig.load(run.config).to_dict()
    new = config.to_dict()
    free = {"epochs", "evaluate", "data", "data_paths", "run_dir", "max_minutes"}
    differs = sorted(k for k in new if k not in free and old.get(k) != new[k])
    if differs:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in differs)
        raise ValueError(
            f"{run.config}: this run folder was made with other settings ({details}). "
            "Choose another run name, or delete the folder to start over."
        )
