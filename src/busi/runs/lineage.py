"""Which images a run's weights have seen: its own split and those of the runs it was
fine-tuned from (``init_weights``).

A model fine-tuned from another carries what that one trained on. Two checks need the whole
chain: ``busi ensemble`` (members and their starts must split shared datasets alike) and a new
run's start (:mod:`busi.training.init_split`: it must not have trained on the run's val or test
images). A start is checkable when it is a run's weights beside the run's ``split.csv``; a
published file carries no split.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from busi.data.splits import DATASET_COLUMN, load_split
from busi.runs.folder import RunFolder


def split_of(run: RunFolder) -> pd.DataFrame:
    """``run``'s ``split.csv`` with a ``dataset`` column (a one-dataset run's split has none:
    its dataset is the config's), so the splits of any two runs compare by (dataset, id)."""
    split = load_split(run.split)
    if DATASET_COLUMN not in split:
        split = split.assign(**{DATASET_COLUMN: run.load_config().datasets[0]})
    return split


def run_of(weights: Path) -> RunFolder | None:
    """The run folder whose weights ``weights`` are (the file beside a ``split.csv``), or None
    for a file outside one (a published model)."""
    run = RunFolder(Path(weights).parent)
    return run if run.split.is_file() else None


def ancestors(run: RunFolder) -> tuple[list[RunFolder], Path | None]:
    """The run folders ``run``'s weights descend from through ``init_weights``, nearest first,
    and the first start that is not a run's weights (a published file), where the chain can no
    longer be followed; None when it reaches a run that started from ImageNet or nothing."""
    chain: list[RunFolder] = []
    while run.init_weights.is_file():
        path = Path(json.loads(run.init_weights.read_text())["path"])
        source = run_of(path)
        if source is None:
            return chain, path
        if any(source.root.resolve() == known.root.resolve() for known in chain):
            break
        chain.append(source)
        run = source
    return chain, None


__all__ = ["ancestors", "run_of", "split_of"]
