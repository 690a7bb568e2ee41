"""A run folder: its file names and records (:mod:`.folder`) and the lock that keeps two
processes from writing it at once (:mod:`.lock`), where its evaluations are kept
(:mod:`.evaluations`), and an ensemble's record of its members (:mod:`.ensembles`).

The names below are the package's public surface, imported on first use."""

from __future__ import annotations

from busi.utils import lazy_surface

__getattr__, __dir__, __all__ = lazy_surface(__name__, {
    "RunFolder": "busi.runs.folder",
    "run_lock": "busi.runs.lock",
    "RunLockedError": "busi.runs.lock",
})
