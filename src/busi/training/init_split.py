"""A run that starts from another model's weights must not be scored on what that model learnt.

``init_weights`` fine-tunes a model trained earlier. If that model was trained on another split
(another ``seed`` with no ``split_seed``, other fractions, another dataset mix), some of the new
run's validation and test images were its training images, and every score of the new run is
inflated: a head fine-tuned from a 40-epoch model of another split scored BUSI test lesion
Dice 0.87 here, against 0.73 on its own split. Nothing in the numbers shows it, so the run
refuses to start.

The check reads the ``split.csv`` beside the weights, which every run folder has. Published
weights (``weights/*.h5``) do not carry their split, so they are not checked; their model card
names the split settings to match.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from busi.data.splits import DATASET_COLUMN, load_split


def _keys(frame: pd.DataFrame, with_dataset: bool) -> pd.Index:
    if with_dataset:
        return pd.Index(zip(frame[DATASET_COLUMN].astype(str), frame["id"].astype(str),
                            strict=True))
    return pd.Index(frame["id"].astype(str))


def trained_on_scored_images(init_weights: Path, parts: dict[str, pd.DataFrame]) -> str | None:
    """What is wrong, in words, when the model in ``init_weights`` was trained on images of the
    new run's val or test part (``parts``, from :func:`busi.data.run_parts.run_parts`); None when
    it was not, or when its split is unknown (no ``split.csv`` beside it)."""
    split_file = init_weights.parent / "split.csv"
    if not split_file.is_file():
        return None
    trained = load_split(split_file)
    trained = trained[trained["split"] == "train"]
    with_dataset = DATASET_COLUMN in trained and all(
        DATASET_COLUMN in parts[name] for name in ("val", "test"))
    seen = _keys(trained, with_dataset)
    overlaps = {name: int(_keys(parts[name], with_dataset).isin(seen).sum())
                for name in ("val", "test")}
    if not any(overlaps.values()):
        return None
    counts = " and ".join(f"{count} of its {len(parts[name])} {name} images"
                          for name, count in overlaps.items() if count)
    return (f"init_weights {init_weights} was trained on {counts} (its split: {split_file}), so "
            "this run's scores on them would be inflated; train on the split that model was "
            f"trained on: the same seed, split_seed and fractions, or split_file={split_file}")


__all__ = ["trained_on_scored_images"]
