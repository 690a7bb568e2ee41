"""Digests of files: what ties a record to the very bytes it was made for.

SHA-256 is recorded for each checkpoint in ``state.json`` when training writes it, and checked
before the file is published; SHA-1 ties post-processing choices, summaries and sidecars to the
weights they were made for (a choice made for earlier weights of a resumed run is not reused).

The check of a file against a recorded digest lives here too (:class:`FileDigest`,
:func:`report_mismatch`), below both the run folder, whose ``state.json`` records the digests of
its checkpoints, and the model records of :mod:`busi.inference.bundle`, which find a file's settings
in run folders: both check files, and neither may import the other for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from busi.errors import DataError

log = logging.getLogger(__name__)

SKIP_HINT = ("Pass --skip-digest-check to the busi command (verify=False in Python) to use it "
             "anyway, only if you know why it changed")

_skip_checks = False


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (read in blocks)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(path: str | os.PathLike, algorithms: tuple[str, ...] = ("sha1", "sha256")
                 ) -> dict[str, str]:
    """Hex digests of a file's bytes under several algorithms, in one read: a model file is
    verified by the strongest digest its record holds (old records hold SHA-1 only)."""
    digests = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            for digest in digests.values():
                digest.update(block)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def file_sha1(path: str | os.PathLike) -> str:
    """SHA-1 of a file: the ``model_sha1`` of ``postprocess.json``, ``summary.json`` and
    sidecars."""
    return file_digest(path, "sha1")


class DigestMismatchError(DataError):
    """A model file's bytes are not the ones its record (or ``state.json``) was made for."""


@contextlib.contextmanager
def skipping_digest_checks() -> Iterator[None]:
    """Within the block, a model file whose digest differs from its record is used with a
    warning instead of refused (the ``busi`` command's ``--skip-digest-check``)."""
    global _skip_checks
    before, _skip_checks = _skip_checks, True
    try:
        yield
    finally:
        _skip_checks = before


def verify_default(verify: bool | None) -> bool:
    """``verify``, or when None, True unless inside :func:`skipping_digest_checks`."""
    return (not _skip_checks) if verify is None else bool(verify)


@dataclass(frozen=True)
class FileDigest:
    """Digests of one file's bytes; a record made before SHA-256 was recorded has SHA-1 only."""

    sha1: str | None = None
    sha256: str | None = None

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileDigest:
        return cls(**file_digests(path))

    def differs(self, actual: FileDigest) -> str | None:
        """The name of the strongest digest both hold that differs ("SHA-256", "SHA-1"), or
        None when they agree (or share no digest to compare)."""
        for name, mine, theirs in (("SHA-256", self.sha256, actual.sha256),
                                   ("SHA-1", self.sha1, actual.sha1)):
            if mine is not None and theirs is not None:
                return None if mine == theirs else name
        return None

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in (("sha1", self.sha1), ("sha256", self.sha256)) if v is not None}


def report_mismatch(path: Path, against: Path, which: str, verify: bool,
                    recorded: str = "recorded in") -> None:
    """Refuse (``verify``) or warn about a file whose ``which`` digest differs from the one
    ``recorded`` (e.g. "training recorded in") ``against``."""
    message = (f"{path}: its {which} differs from the one {recorded} {against}; the file is "
               "damaged or was changed since")
    if verify:
        raise DigestMismatchError(f"{message}. Not loaded. {SKIP_HINT}")
    log.warning("%s; used anyway (digest check skipped)", message)


__all__ = ["DigestMismatchError", "FileDigest", "file_digest", "file_digests", "file_sha1",
           "report_mismatch", "skipping_digest_checks", "verify_default"]
