"""Atomic file writes: a reader or an interrupted run never sees a half-written output.

Every output of busi (checkpoints, masks, reports, splits) goes through here: it is written to a
temporary file in the destination folder, flushed to disk, then renamed onto its final name, which
is atomic on POSIX and Windows file systems. Results written as JSON (summaries, records) go
through :func:`write_json`, so that every reader of them meets strict JSON, never NaN.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, else it is removed.

    Args:
        path: final destination. Its folder is created if missing.
        suffix: suffix of the temporary file; defaults to that of ``path``, since some writers
            (Keras' ``.h5``, OpenCV's ``imwrite``) choose the format from it.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.name}.", suffix=final.suffix if suffix is None else suffix,
        dir=final.parent,
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; give the usual mode of a new file
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>.*)")


def leftover_temp_file(path: Path) -> bool:
    """Whether ``path`` is named like a temporary file of :func:`atomic_path`
    (``.<final name>.<8 random characters><final suffix>``), which only a killed write leaves."""
    match = _TEMP_NAME.fullmatch(path.name)
    # every output of busi has a suffix (.h5, .json, .csv, .png ...): a dotfile without one
    # (".bashrc.original") is never busi's
    return bool(match) and match["suffix"] != "" and Path(match["name"]).suffix == match["suffix"]


def remove_leftover_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files interrupted atomic writes left in ``folder`` and below; return
    them. Only safe while no other process writes there (see :mod:`busi.runs.lock`)."""
    removed = []
    folder = Path(folder)
    for path in sorted(folder.rglob(".*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts[:-1]):
            continue  # inside a hidden folder (.git, .venv): never busi's
        if path.is_file() and not path.is_symlink() and leftover_temp_file(path):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


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
