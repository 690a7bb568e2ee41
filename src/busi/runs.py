"""The run folder: what a training run leaves behind, so it can be resumed, evaluated and
reproduced (after nnU-Net's per-fold output folders).

``runs/<name>/`` holds ``config.json``, ``split.csv``, ``env.json``, ``history.csv``,
``best.h5``, ``last.h5``, ``state.json``, ``logs/`` (TensorBoard), ``evaluation/`` (and
``evaluation-<dataset>/`` for other datasets) and ``figures/``. Every file is written
atomically.

:class:`RunFolder` is the one place that knows these names, and the one place that opens a run:
its config, the images of each part of its split (:meth:`RunFolder.parts`), its weights
(:meth:`RunFolder.open_model`), the masks its model gives (:meth:`RunFolder.predictions`) and its
evaluations (:meth:`RunFolder.evaluation_dir`, :meth:`RunFolder.summary_for`,
:meth:`RunFolder.postprocess_for`). Evaluation, reports, publishing, the notebooks and the
tools go through it, so they all see the same images, weights and settings.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from busi.atomic import atomic_write_text
from busi.config import TrainConfig
from busi.digests import file_sha1
from busi.paths import PROJ_ROOT

if TYPE_CHECKING:
    from busi.data.cache import Cache
    from busi.postprocess import PostProcess
    from busi.runtimes import Predictor

EVALUATION = "evaluation"
"""Folder of a run's results on its (first) dataset; ``evaluation-<name>`` for another one."""
POSTPROCESS_FILE = "postprocess.json"
"""In an evaluation folder: the post-processing chosen on validation for the weights."""
GRID_FILE = "postprocess_grid.csv"
GATE_FILE = "gate_{split}.csv"
"""Lesion Dice and normal false positives across the image-level gate's thresholds, per part."""
"""In an evaluation folder: every post-processing candidate scored on validation."""
SUMMARY_FILE = "summary.json"
"""In an evaluation folder: the weights, the post-processing and the figures of each part."""
PER_IMAGE_FILE = "per_image_{split}.csv"
"""In an evaluation folder: the scores of each image of a part."""


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
        """The run's writer lock (:func:`busi.runlock.run_lock`): ``with run.lock("training"):``.
        Refuses a second writer; cleans temporary files of interrupted writes."""
        from busi.runlock import run_lock

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
            from busi.errors import DataError

            raise DataError(f"{self.state}: not valid JSON ({error}); the run folder is "
                            "damaged") from error
        recorded = (state.get("sha256") or {}).get(path.name) if isinstance(state, dict) else None
        return recorded if isinstance(recorded, str) else None

    def verify_checkpoint(self, path: str | os.PathLike) -> None:
        """Refuse a checkpoint whose bytes are not the ones training recorded in ``state.json``
        (a damaged or replaced ``last.h5`` must not be trained on, nor a ``best.h5``
        published), unless digest checks are skipped (:mod:`busi.bundle`)."""
        from busi.bundle import FileDigest, report_mismatch, verify_default

        recorded = self.recorded_sha256(path)
        if recorded is None:
            return
        which = FileDigest(sha256=recorded).differs(FileDigest.of(path))
        if which:
            report_mismatch(Path(path), self.state, which, verify_default(None),
                            "training recorded in")

    def write_record(self, path: Path, values: dict[str, Any]) -> None:
        """Training's records (``state.json``, ``env.json``): any value, through ``str`` if JSON
        has no type for it. Results use the strict :func:`write_json`."""
        atomic_write_text(path, json.dumps(values, indent=2, default=str) + "\n")

    def read_history(self) -> pd.DataFrame:
        if not self.history.is_file():
            return pd.DataFrame()
        return pd.read_csv(self.history)

    # ------------------------------------------------------------------- config and images

    def load_config(self) -> TrainConfig:
        """The run's settings (``config.json``)."""
        if not self.config.is_file():  # a model file: busi evaluate reads it from its sidecar
            raise FileNotFoundError(f"{self.root}: a file, not a run folder" if self.root.is_file()
                                    else f"{self.config}: not a run folder (no config.json)")
        return TrainConfig.load(self.config)

    def parts(self, config: TrainConfig | None = None, new_run: bool = False,
              cache: Cache | None = None) -> dict[str, pd.DataFrame]:
        """Index and check the dataset and return the rows of each part of the run's split.

        Args:
            config: the run's settings; default its ``config.json`` (give one to point at the
                data elsewhere, see :meth:`with_data`).
            new_run: make the split (or take ``config.split_file``) and write ``split.csv`` and
                ``env.json``. Otherwise (resuming, evaluating) the run's own ``split.csv`` is
                read, nothing is written, and the data must have the fingerprint recorded in
                ``env.json``.
            cache: a :class:`busi.data.cache.Cache` made for ``config``: its rows and split
                stand in for the datasets, which are not read (``env.json`` then names it).

        Returns:
            ``{"train": ..., "val": ..., "test": ...}`` index rows; "train" holds only
            ``config.train_classes`` if set.
        """
        from busi.data.index import fingerprint
        from busi.data.parts import dataset_table, make_run_split, split_parts
        from busi.data.splits import in_classes, load_split, save_split
        from busi.errors import DataError

        config = config if config is not None else self.load_config()
        table = dataset_table(config) if cache is None else cache.table
        if new_run:
            split = make_run_split(config, table) if cache is None else cache.split
        elif self.split.is_file():
            split = load_split(self.split)
        else:
            raise DataError(f"{self.split}: the run folder has no split; was it trained?")
        parts = split_parts(config, table, split)
        found = fingerprint(pd.concat(parts.values()))
        if new_run:
            save_split(split, self.split)
            record = environment(found)
            if cache is not None:
                record["data_cache"] = cache.provenance()
            self.write_record(self.env, record)
        elif self.env.is_file():
            recorded = json.loads(self.env.read_text()).get("dataset_fingerprint")
            if recorded != found:
                raise DataError(
                    f"{self.env}: the run was made with other data (fingerprint {recorded}, "
                    f"this data {found}); point `data` at the dataset it was trained on"
                )
        if config.train_classes is not None:
            train = parts["train"]
            parts["train"] = train[in_classes(train["label"], config.train_classes)].reset_index(
                drop=True)
        return parts

    def with_data(self, data: str | os.PathLike | None, dataset: str | None = None
                  ) -> TrainConfig:
        """The run's config with ``dataset`` (default its first) found at ``data``: the same
        dataset elsewhere (its fingerprint is still checked). None leaves the config as it is."""
        config = self.load_config()
        if data is None:
            return config
        name = dataset or config.datasets[0]
        return config.replace(data_paths={**config.data_paths, name: str(data)})

    # ----------------------------------------------------------------------------- weights

    def weights(self, model_path: str | os.PathLike | None = None) -> Path:
        """The weights file meant: ``model_path``, default the run's ``best.h5``."""
        return Path(model_path) if model_path is not None else self.best

    def open_model(self, model_path: str | os.PathLike | None = None,
                   safe_mode: bool | None = None) -> Predictor:
        """The run's weights (default ``best.h5``) ready to predict, checked against the
        SHA-256 training recorded and carrying their settings (:func:`busi.inference.open_model`,
        the safe loader)."""
        from busi import inference

        path = self.weights(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model file not found")
        return inference.open_model(path, safe_mode=safe_mode)

    def predictions(
        self, split: str = "test", model_path: str | os.PathLike | None = None,
        data: str | os.PathLike | None = None, dataset: str | None = None,
        postprocess: PostProcess | None = None,
    ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
        """The images of one part and the run's binary masks for them, for overlays and worst
        cases: the images and masks evaluation scores.

        Args:
            split: a part of the run's split ("train", "val", "test"); for a dataset the run was
                not trained on, "all" or "test" (:func:`busi.cross_dataset.dataset_rows`).
            model_path: the weights; default ``best.h5``.
            data: the dataset's folder, if not where the run's config says.
            dataset: only the images of this dataset (one of a joint run's, or another one);
                None: every image of the part.
            postprocess: how probabilities become masks; default what evaluation chose on
                validation for these weights (:meth:`postprocess_for`), else the defaults (for
                another dataset, an error: it is scored with the run's own choice).

        Returns:
            ``(table, masks)``: the index rows, and ``{id: uint8 (H, W) mask in {0, 1}}`` at each
            image's original size.
        """
        from busi import heads
        from busi.inference import predict_table
        from busi.postprocess import PostProcess

        config = self.load_config()
        if dataset is None or dataset in config.datasets:
            config = self.with_data(data, dataset)
            rows = self.parts(config)[split]
            if dataset is not None and "dataset" in rows:
                rows = rows[rows["dataset"] == dataset].reset_index(drop=True)
        else:
            from busi.cross_dataset import dataset_rows

            rows = dataset_rows(config, dataset, split, data)
        model = self.open_model(model_path)
        chosen = model.settings.record if model.settings is not None else None
        if chosen is None and postprocess is None and dataset not in (None, *config.datasets):
            # another dataset is scored with the run's own choice; defaults would not be it
            raise ValueError(
                f"{self.weights(model_path)}: no post-processing chosen on validation yet; "
                f"run `busi evaluate {self.root}` first (in Python, or give postprocess=)"
            )
        post = postprocess or (chosen.postprocess if chosen is not None else PostProcess())
        probs, labels = predict_table(model, rows, config.image_size, config.resize,
                                      config.batch_size, post.tta, desc=split)
        lesion = [None] * len(rows) if labels is None else heads.lesion_probability(labels)
        return rows, {image_id: post.apply(prob, p_lesion) for image_id, prob, p_lesion
                      in zip(rows["id"], probs, lesion, strict=True)}

    # ------------------------------------------------------------------------- evaluations

    def evaluation_dir(self, model_path: str | os.PathLike | None = None,
                       dataset: str | None = None) -> Path:
        """Where the evaluation of these weights goes: ``evaluation/`` for the run's ``best.h5``,
        ``evaluation/<model stem>/`` for any other weights (so evaluating ``last.h5`` does not
        overwrite the results of ``best.h5``).

        ``dataset``: results on a dataset other than the run's first go to
        ``evaluation-<name>/`` (the other datasets of a joint run, or a dataset the run never
        saw); None or the run's first dataset is ``evaluation/``, whose folder also holds the
        post-processing chosen on validation.
        """
        first = dataset is None or dataset == self.load_config().datasets[0]
        root = self.root / (EVALUATION if first else f"{EVALUATION}-{dataset}")
        path = self.weights(model_path)
        if path.resolve() == self.best.resolve():
            return root
        return root / path.stem

    def summary_for(self, model_path: str | os.PathLike | None = None,
                    dataset: str | None = None) -> dict[str, Any] | None:
        """The ``summary.json`` of these weights (default ``best.h5``), or None if they have not
        been evaluated, or the summary was made for earlier weights (training went on).
        ``dataset``: as in :meth:`evaluation_dir`."""
        summary = read_json(self.evaluation_dir(model_path, dataset) / SUMMARY_FILE)
        if summary is None or summary.get("model_sha1") != file_sha1(self.weights(model_path)):
            return None
        return summary

    def per_image_path(self, split: str = "test", model_path: str | os.PathLike | None = None,
                       dataset: str | None = None) -> Path:
        """Where evaluation writes the per-image scores of a part (``per_image_<split>.csv``)."""
        return self.evaluation_dir(model_path, dataset) / PER_IMAGE_FILE.format(split=split)

    def per_image(self, split: str = "test", model_path: str | os.PathLike | None = None,
                  dataset: str | None = None) -> pd.DataFrame:
        """The per-image scores evaluation wrote for a part (:meth:`per_image_path`)."""
        return pd.read_csv(self.per_image_path(split, model_path, dataset))

    def postprocess_for(self, model_path: str | os.PathLike | None = None
                        ) -> dict[str, Any] | None:
        """What evaluation chose on validation for these weights (default ``best.h5``), or None:
        :func:`postprocess_for`."""
        return postprocess_for(self.weights(model_path))


def postprocess_for(model_path: str | os.PathLike) -> dict[str, Any] | None:
    """The record of these weights (the post-processing chosen on validation, input size,
    resize mode, ...) as a dict, or None if none was made for these very bytes (the defaults
    apply). Read the settings with :meth:`busi.postprocess.PostProcess.from_dict`.

    Found and checked by :func:`busi.bundle.settings_for`: a file whose digest differs from
    its record raises :class:`busi.bundle.DigestMismatchError`.
    """
    from busi.bundle import settings_for

    record = settings_for(model_path).record
    return None if record is None else record.to_dict()


def json_ready(value: Any) -> Any:
    """NaN and infinities become null: strict JSON has no NaN."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value


def write_json(path: Path, values: Mapping[str, Any]) -> None:
    """A result (``summary.json``, ``postprocess.json``) as strict JSON, atomically."""
    atomic_write_text(path, json.dumps(json_ready(values), indent=2) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None if there is no such file (or it holds no object)."""
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); delete it to recompute") from error
    return values if isinstance(values, dict) else None


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
    """Versions, devices and code version of this run, for its env.json."""
    import tensorflow as tf
    import tf_keras

    from busi._keras import sm

    segmentation_models = sm()  # imported without its "using tf.keras framework" notice

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "tf_keras": tf_keras.__version__,
        "segmentation_models": segmentation_models.__version__,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
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
    free = {"name", "epochs", "evaluate", "data", "data_paths", "run_dir", "max_minutes"}
    differs = sorted(k for k in new if k not in free and old.get(k) != new[k])
    if differs:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in differs)
        raise ValueError(
            f"{run.config}: this run folder was made with other settings ({details}). "
            "Choose another run name, or delete the folder to start over."
        )


__all__ = ["RunFolder", "check_same_config", "environment", "json_ready", "postprocess_for",
           "read_json", "write_json"]
