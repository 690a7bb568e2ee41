"""The data layer: find or fetch a dataset, index and check it, find duplicates, split.

Datasets are plug-ins (:mod:`busi.data.datasets`: BUSI, BUS-BRA, a user's folder); the functions
below work on the common index table any of them yields. ``locate``, ``download`` and ``index``
here are BUSI's, as before.

The TensorFlow input pipeline lives in :mod:`busi.data.pipeline` and is imported on use, so that
the data checks run without TensorFlow.
"""

from busi.data import datasets
from busi.data.download import download, locate
from busi.data.duplicates import add_groups, conflicting_groups, drop_conflicts, duplicate_pairs
from busi.data.index import LABELS, fingerprint, index
from busi.data.masks import load_example, merge_masks, read_image, read_mask
from busi.data.parts import make_run_split
from busi.data.splits import (
    LESION_CLASSES,
    cross_validation_splits,
    leaked,
    load_split,
    make_split,
    save_split,
    select,
)

__all__ = [
    "LABELS", "LESION_CLASSES", "add_groups", "conflicting_groups", "cross_validation_splits",
    "datasets", "download", "drop_conflicts", "duplicate_pairs", "fingerprint", "index", "leaked",
    "load_example", "load_split", "locate", "make_run_split", "make_split", "merge_masks",
    "read_image", "read_mask", "save_split", "select",
]
