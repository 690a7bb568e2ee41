"""A run that starts from another model's weights must not be scored on what that model learnt.

``init_weights`` fine-tunes a model trained earlier. If that model, or one it was itself
fine-tuned from, trained on another split (another ``seed`` with no ``split_seed``, other
fractions, another dataset mix), some of the new run's validation and test images were its
training images, and every score of the new run is inflated with nothing in the numbers to
show it. So the run refuses to start.

What each start trained on is read from the ``split.csv`` of its run folder, following the
chain of starts (:func:`busi.runs.lineage.ancestors`). Published weights (``weights/*.h5``)
carry no split: the chain cannot be followed past one, which is logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from busi.data.splits import DATASET_COLUMN
from busi.runs.lineage import ancestors, run_of, split_of

log = logging.getLogger(__name__)


def _keys(frame: pd.DataFrame, dataset: str) -> pd.Index:
    datasets = frame[DATASET_COLUMN] if DATASET_COLUMN in frame else pd.Series(dataset,
                                                                              index=frame.index)
    return pd.Index(zip(datasets.astype(str), frame["id"].astype(str), strict=True))


def trained_on_scored_images(init_weights: Path, parts: dict[str, pd.DataFrame],
                             dataset: str) -> str | None:
    """What is wrong, in words, when the model in ``init_weights`` (or a start of its) trained
    on images of the new run's val or test part (``parts``, from
    :func:`busi.data.run_parts.run_parts`; ``dataset`` names the rows of a part without a
    ``dataset`` column); None when none did, as far as the run folders tell."""
    start = run_of(init_weights)
    chain, unchecked = ([], init_weights) if start is None else ancestors(start)
    if unchecked is not None:
        log.warning("%s is not a run's weights beside its split.csv: whether it trained on this "
                    "run's val or test images cannot be checked", unchecked)
    for run in ([start] if start is not None else []) + chain:
        split = split_of(run)
        seen = _keys(split[split["split"] == "train"], dataset)
        overlaps = {name: int(_keys(parts[name], dataset).isin(seen).sum())
                    for name in ("val", "test")}
        if any(overlaps.values()):
            counts = " and ".join(f"{count} of its {len(parts[name])} {name} images"
                                  for name, count in overlaps.items() if count)
            which = "" if run is start else f", through {run.root}, which it was fine-tuned from,"
            return (f"init_weights {init_weights}{which} trained on {counts} (split: "
                    f"{run.split}), so this run's scores on them would be inflated. Start from "
                    "weights that never trained on them: a run of this run's split (the same "
                    "seed, split_seed and fractions, or split_file), and in busi cv none of a "
                    "single split's runs, since each fold validates on some of their training "
                    "images")
    return None


__all__ = ["trained_on_scored_images"]
