"""Training stage: one run (:mod:`.trainer`) with its callbacks, precise BatchNorm
statistics and devices, k-fold cross-validation with its ensemble (:mod:`.cv`), and finished
runs averaged into one model (:mod:`.ensemble`).

The names below are the package's public surface, imported on first use."""

from __future__ import annotations

from busi.utils import lazy_surface

__getattr__, __dir__, __all__ = lazy_surface(__name__, {
    "train": "busi.training.trainer",
    "check_settings": "busi.training.trainer",
    "cross_validate": "busi.training.cv",
    "combine_runs": "busi.training.ensemble",
})
