"""Project folders, derived from the project root so no path is hard-coded in notebooks.

``BUSI_DATA`` overrides where the dataset is looked for (see :func:`busi.data.locate`);
``BUSI_RUNS`` and ``BUSI_WEIGHTS`` override the output folders (Colab users point them at Drive).
In an installed (non-editable) package the project root is the current directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from busi.errors import DataError


def _project_root() -> Path:
    here = Path(__file__).resolve().parents[3]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


PROJ_ROOT = _project_root()
DATA_DIR = PROJ_ROOT / "data"
WEIGHTS_DIR = Path(os.environ.get("BUSI_WEIGHTS", PROJ_ROOT / "weights"))
RUNS_DIR = Path(os.environ.get("BUSI_RUNS", PROJ_ROOT / "runs"))
SHIPPED_MODEL = PROJ_ROOT / "weights" / "lite0-head-ft-avgmax-cpu.h5"
"""The model committed with the project for BUSI-like images (see its model card and the README):
the U-Net with the image-level gate that keeps normal images clean; the default of prediction
with no training."""


def search_roots(path: str | os.PathLike | None, env_var: str, default: Path) -> list[Path]:
    """Where a dataset adapter looks for its folder, in order: ``path`` alone if given, else
    ``$<env_var>``, the adapter's download folder and the project's ``data/``."""
    if path is not None:
        return [Path(path).expanduser()]
    starts = [Path(os.environ[env_var]).expanduser()] if os.environ.get(env_var) else []
    return [*starts, default, DATA_DIR]


def existing_copy(locate: Callable[[Path], Path], dest: Path, force: bool) -> Path | None:
    """The copy of a dataset a download would replace, or None: downloads reuse what is there
    (gigabytes, minutes) unless forced. ``locate`` is the adapter's; its "not found" error
    means no usable copy, so the download goes ahead and its own errors are the ones reported."""
    if force:
        return None
    try:
        return locate(dest)
    except DataError:
        return None
