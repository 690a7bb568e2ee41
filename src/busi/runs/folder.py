"""The run folder: what a training run leaves behind, so it can be resumed, evaluated and
reproduced (after nnU-Net's per-fold output folders).

``runs/<name>/`` holds ``config.json``, ``split.csv``, ``env.json``, ``history.csv``,
``best.h5``, ``last.h5``, ``state.json``, ``logs/`` (TensorBoard), ``evaluation/`` (and
``evaluation-<dataset>/`` for other datasets) and ``figures/``. Every file is written
atomically.

:class:`RunFolder` is only the folder: the names of its files, the records training keeps
there (config, state, history, the digests of its checkpoints) and its writer lock. What a run
is used for lives with the stage that uses it, so that naming a folder pulls in none of them:
the images of each part of its split in :mod:`busi.data.run_parts`, its model and masks in
:mod:`busi.inference.run_models`, its evaluations in :mod:`busi.runs.evaluations`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from busi._keras import sm
from busi.config.train_config import TrainConfig
from busi.errors import DataError
from busi.models import backend
from busi.runs.lock import run_lock
from busi.utils.atomic import atomic_write_text
from busi.utils.digests import FileDigest, report_mismatch, verify_default
from busi.utils.paths import PROJ_ROOT

EVALUATION = "evaluation"
"""Folder of a run's results on its (first) dataset; ``evaluation-<name>`` for another one
(:mod:`busi.runs.evaluations`)."""


@dataclass(frozen=True)
class RunFolder:
    """One run's folder: its files, and what they hold.

    ``RunFolder("runs/NAME")`` (a str or a Path) only names the folder; nothing is read until
    asked for.
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ------------------------------------------------------------------------------ files

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
    def init_weights(self) -> Path:
        """What the run started from when its config has ``init_weights``: path and digests."""
        return self.root / "init_weights.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def evaluation(self) -> Path:
        return self.root / EVALUATION

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def lock(self, purpose: str) -> AbstractContextManager[None]:
        """The run's writer lock (:func:`busi.runs.lock.run_lock`): ``with run.lock("training"):``.
        Refuses a second writer; cleans temporary files of interrupted writes."""
        return run_lock(self.root, purpose)

    def read_state(self) -> dict[str, Any]:
        """What the last finished epoch recorded; empty for a new run."""
        if not self.state.is_file() or not self.last.is_file():
            return {}
        return json.loads(self.state.read_text())

    def recorded_sha256(self, path: str | os.PathLike) -> str | None:
        """The SHA-256 training recorded in ``state.json`` for this checkpoint of the run
        (``best.h5``, ``last.h5``), or None (another file, or a run made before busi recorded
        them)."""
        path = Path(path)
        if path.parent.resolve() != self.root.resolve() or not self.state.is_file():
            return None
        try:
            state = json.loads(self.state.read_text())
        except ValueError as error:
            raise DataError(f"{self.state}: not valid JSON ({error}); the run folder is "
                            "damaged") from error
        recorded = (state.get("sha256") or {}).get(path.name) if isinstance(state, dict) else None
        return recorded if isinstance(recorded, str) else None

    def verify_checkpoint(self, path: str | os.PathLike) -> None:
        """Refuse a checkpoint whose bytes are not the ones training recorded in ``state.json``
        (a damaged or replaced ``last.h5`` must not be trained on, nor a ``best.h5``
        published), unless digest checks are skipped
        (:func:`busi.utils.digests.skipping_digest_checks`)."""
        recorded = self.recorded_sha256(path)
        if recorded is None:
            return
        which = FileDigest(sha256=recorded).differs(FileDigest.of(path))
        if which:
            report_mismatch(Path(path), self.state, which, verify_default(None),
                            "training recorded in")

    def write_record(self, path: Path, values: dict[str, Any]) -> None:
        """Training's records (``state.json``, ``env.json``): any value, through ``str`` if JSON
        has no type for it. Results use the strict :func:`busi.utils.atomic.write_json`."""
        atomic_write_text(path, json.dumps(values, indent=2, default=str) + "\n")

    def read_history(self) -> pd.DataFrame:
        if not self.history.is_file():
            return pd.DataFrame()
        return pd.read_csv(self.history)

    def load_config(self) -> TrainConfig:
        """The run's settings (``config.json``)."""
        if not self.config.is_file():  # a model file: busi evaluate reads it from its sidecar
            raise FileNotFoundError(f"{self.root}: a file, not a run folder" if self.root.is_file()
                                    else f"{self.config}: not a run folder (no config.json)")
        return TrainConfig.load(self.config)

    # ----------------------------------------------------------------------------- weights

    def weights(self, model_path: str | os.PathLike | None = None) -> Path:
        """The weights file meant: ``model_path``, default the run's ``best.h5``."""
        return Path(model_path) if model_path is not None else self.best


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=PROJ_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _command() -> str:
    """The command line of this process as a user typed it (``busi train ...``), or the Python
    script's."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return shlex.join([program if program == "busi" else f"python {program}", *sys.argv[1:]])


def environment(fingerprint: str) -> dict[str, Any]:
    """Versions, devices and code version of this run, for its env.json: on tf-keras
    TensorFlow's, tf-keras' and segmentation-models'; on Keras 3 its version, the backend and
    the jax or torch version (nothing of TensorFlow is imported on jax/torch)."""
    versions: dict[str, Any] = {"backend": backend.name(), "gpus": backend.gpu_names()}
    if backend.uses_tensorflow():
        import tensorflow as tf  # start-up: TensorFlow; cli and bundle import this

        versions["tensorflow"] = tf.__version__
    if backend.is_keras3():
        versions.update(backend.versions())
    else:
        import tf_keras  # start-up: TensorFlow; cli and bundle import this

        versions["tf_keras"] = tf_keras.__version__
        versions["segmentation_models"] = sm().__version__  # imported without its notice
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        **versions,
        # what made the run, for the results table (the first session's: resumes keep it)
        "command": _command(),
        "git_commit": _git("rev-parse", "HEAD") or None,
        # uncommitted changes to tracked files: the commit alone does not say what ran
        "git_dirty": None if _git("rev-parse", "HEAD") is None
        else bool(_git("status", "--porcelain", "--untracked-files=no")),
        "dataset_fingerprint": fingerprint,
    }


def check_same_config(run: RunFolder, config: TrainConfig) -> None:
    """Refuse to resume a run folder that was made with other settings.

    Only ``epochs`` (train longer), ``max_minutes``, ``evaluate``, ``data`` and ``data_paths``
    (the same dataset elsewhere, the fingerprint guards it) may differ, and ``name`` and
    ``run_dir``, which only say where the folder is.
    """
    if not run.config.is_file():
        return
    old = TrainConfig.load(run.config).to_dict()
    new = config.to_dict()
    if old.get("backend") != new["backend"]:  # last.h5's optimizer state is one Keras'
        raise ValueError(
            f"{run.config}: this run trains on backend {old.get('backend')}, not "
            f"{new['backend']}: its last.h5 holds that Keras' optimizer state, which another "
            f"backend cannot continue. Resume with --backend {old.get('backend')}, or choose "
            "another run name (--set init_weights=RUN/best.h5 starts from its weights).")
    free = {"name", "epochs", "evaluate", "data", "data_paths", "run_dir", "max_minutes"}
    differs = sorted(k for k in new if k not in free and old.get(k) != new[k])
    if differs:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in differs)
        raise ValueError(
            f"{run.config}: this run folder was made with other settings ({details}). "
            "Choose another run name, or delete the folder to start over."
        )


__all__ = ["EVALUATION", "RunFolder", "check_same_config", "environment"]
