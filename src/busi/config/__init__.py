"""Settings of a training run: :class:`TrainConfig` (:mod:`.train_config`), the fields it
checks (:mod:`.fields`) and the YAML/JSON files it reads (:mod:`.files`).

The names below are the package's public surface, imported on first use."""

from __future__ import annotations

from busi.utils import lazy_surface

__getattr__, __dir__, __all__ = lazy_surface(__name__, {
    "TrainConfig": "busi.config.train_config",
})
