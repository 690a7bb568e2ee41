"""One writer per run folder: a lock held while a run is trained, evaluated or published.

Two trainings started with one run name used to interleave their checkpoints, config and
history in one folder. The lock is an OS file lock (``flock``; ``msvcrt.locking`` on Windows)
on ``<run>/.busi.lock``, taken without waiting: a second writer is refused at once with the
PID, host and purpose of the holder, which the holder writes into the file. The OS drops the
lock when its process ends, ``kill -9`` included, so a dead writer can never block a run; a
lock file still naming one is a stale lock, taken over with a notice. Like the lock files of
git or conda, it guards against mistakes, not malice.

The lock is reentrant within a process (training evaluates its run while holding it). Taking it
also deletes the temporary files a killed atomic write left behind (:mod:`busi.utils.atomic`): with
the lock held, no other writer can be in the middle of one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from busi.utils.atomic import remove_leftover_temp_files

log = logging.getLogger(__name__)

LOCK_NAME = ".busi.lock"

_held: dict[Path, int] = {}  # lock file -> depth, for this process
_guard = threading.Lock()


class RunLockedError(RuntimeError):
    """Another process is writing into the run folder."""


def _try_lock(handle: IO[str]) -> bool:
    try:
        if os.name == "nt":
            import msvcrt  # optional: Windows only

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl  # optional: POSIX only

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return (f"PID {info['pid']} on host {info['host']} ({info['purpose']}, since "
                f"{info['since']})")
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def run_lock(root: str | os.PathLike, purpose: str) -> Iterator[None]:
    """Hold the writer lock of the run folder ``root`` (created) for a ``with`` block.

    Args:
        root: the run folder.
        purpose: what the holder does ("training", "evaluation", "publishing"), for the
            message a refused writer gets.

    Raises:
        RunLockedError: another process holds the lock (the message names it).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = (root / LOCK_NAME).resolve()
    with _guard:
        if path in _held:
            _held[path] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _guard:
                _held[path] -= 1
        return
    handle = open(path, "a+", encoding="utf8")  # noqa: SIM115 (held across the yield)
    try:
        handle.seek(0)
        previous = handle.read().strip()
        if not _try_lock(handle):
            raise RunLockedError(
                f"{root}: another busi process is writing into this run folder: "
                f"{_holder(previous)}. Wait for it to end, or use another run name"
            )
        if previous:
            log.warning("%s: taking over the stale lock of %s, which ended without releasing "
                        "it (killed?)", root, _holder(previous))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "purpose": purpose,
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        handle.flush()
        # only in a run folder: a --run-dir pointed at a parent (runs/, ~) must not clean the
        # in-flight files of other runs
        is_run = (root / "config.json").is_file() or not any(root.iterdir())
        removed = remove_leftover_temp_files(root) if is_run else []
        if removed:
            log.warning("%s: removed %d temporary file(s) left by an interrupted write: %s",
                        root, len(removed), ", ".join(str(p.relative_to(root)) for p in removed))
        with _guard:
            _held[path] = 1
        try:
            yield
        finally:
            with _guard:
                del _held[path]
            handle.seek(0)
            handle.truncate()  # an empty lock file: released cleanly, not stale
            handle.flush()
    finally:
        handle.close()  # closing drops the OS lock


__all__ = ["LOCK_NAME", "RunLockedError", "run_lock"]
