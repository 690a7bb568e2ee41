"""Digests of files: what ties a record to the very bytes it was made for.

SHA-256 is recorded for each checkpoint in ``state.json`` when training writes it, and checked
before the file is published; SHA-1 ties post-processing choices, summaries and sidecars to the
weights they were made for (a choice made for earlier weights of a resumed run is not reused).
"""

from __future__ import annotations

import hashlib
import os


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


__all__ = ["file_digest", "file_digests", "file_sha1"]
