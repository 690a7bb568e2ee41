"""An ensemble's run folder: which runs it averages (:data:`ENSEMBLE_FILE`) and whether they
are still the weights it was made of.

Only reads and names files, so reports and tables find an ensemble's members without loading a
model (the ensembles themselves are made in :mod:`busi.training.ensemble` and
:mod:`busi.training.cv`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from busi.errors import DataError
from busi.runs.folder import RunFolder
from busi.utils.digests import file_digest

ENSEMBLE_FILE = "ensemble.json"
"""In an ensemble's run folder: its members (run folders, as paths from the ensemble's parent
folder) and their digests, and what its post-processing was chosen on."""

CHOSEN_ON_VAL = "val"
"""``postprocess_chosen_on`` of an ensemble of runs: their shared validation part."""


def member_records(members: Sequence[RunFolder], parent: Path) -> list[dict[str, str]]:
    """The ``members`` list of :data:`ENSEMBLE_FILE`: each run folder as a path from the
    ensemble's parent folder (its name, for runs beside it) and the SHA-256 of its ``best.h5``."""
    return [{"run": os.path.relpath(member.root, parent), "sha256": file_digest(member.best)}
            for member in members]


def ensemble_members(run: RunFolder, expected: Sequence[dict[str, str]] | None = None,
                     image_head: bool | None = None) -> list[Path] | None:
    """The member run folders of an ensemble's run folder, or None if it is not a complete
    ensemble (no :data:`ENSEMBLE_FILE`, no ``best.h5`` with its digest in ``state.json``) or,
    given ``expected`` (``[{"run", "sha256"}]``), not one of those members, or, given
    ``image_head``, not an ensemble that keeps the image-level head (True) or drops it (False)."""
    path = run.root / ENSEMBLE_FILE
    if not path.is_file() or not run.best.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        listed = record["members"]
        names = [member["run"] for member in listed]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: not an ensemble record written by busi ({error}); delete the "
                        "folder and make the ensemble again") from error
    if expected is not None and listed != list(expected):
        return None
    # records without the key say it in their output text only
    has_head = bool(record.get("image_head", "class probabilities" in record.get("output", "")))
    if image_head is not None and has_head != image_head:
        return None
    if run.recorded_sha256(run.best) != file_digest(run.best):
        return None
    return [run.root.parent / name for name in names]


def ensemble_kind(run: RunFolder) -> str:
    """"folds" for a ``busi cv`` ensemble, "runs" for one of
    :func:`busi.training.ensemble.combine_runs`."""
    record = json.loads((run.root / ENSEMBLE_FILE).read_text())
    return "runs" if record.get("postprocess_chosen_on") == CHOSEN_ON_VAL else "folds"


__all__ = ["CHOSEN_ON_VAL", "ENSEMBLE_FILE", "ensemble_kind", "ensemble_members",
           "member_records"]
