"""busi: breast-lesion segmentation in ultrasound images (BUSI) with a U-Net.

Importing busi first switches TensorFlow to Keras 2 (tf-keras), which segmentation-models needs;
see :mod:`busi._keras`. The public API is small and loaded lazily, so ``import busi`` does not
import TensorFlow::

    import busi
    root = busi.data.locate()               # or busi.data.download("data")
    table = busi.data.index(root)
    model = busi.build_model(encoder_weights=None)
    run = busi.RunFolder("runs/my-run")     # a trained run's files, records and lock
"""

from __future__ import annotations

from busi import _keras
from busi.utils import lazy_surface

_keras.set_environment()
_keras.check_keras()

__version__ = "0.1.0"

_LAZY: dict[str, tuple[str, str | None]] = {
    "data": ("busi.data", None),
    "build_model": ("busi.models.architectures", "build_model"),
    "classic_unet": ("busi.models.architectures", "classic_unet"),
    "losses": ("busi.models.losses", None),
    "scoring": ("busi.evaluation.scoring", None),
    "load_model": ("busi.inference.weights", "load_model"),
    "save_model": ("busi.inference.weights", "save_model"),
    "TrainConfig": ("busi.config.train_config", "TrainConfig"),
    "train": ("busi.training.trainer", "train"),
    "evaluate": ("busi.evaluation.evaluator", "evaluate"),
    "RunFolder": ("busi.runs.folder", "RunFolder"),
    "PostProcess": ("busi.inference.postprocess", "PostProcess"),
    "postprocess_for": ("busi.inference.bundle", "postprocess_for"),
    "inference": ("busi.inference", None),
    "predict": ("busi.inference.prediction", "predict"),
    "plots": ("busi.evaluation.plots", None),
    "notebook": ("busi.notebook", None),
    "publish_weights": ("busi.inference.publish", "publish_weights"),
    "publish_export": ("busi.inference.publish_exports", "publish_export"),
}

__getattr__, __dir__, __all__ = lazy_surface(__name__, _LAZY)
