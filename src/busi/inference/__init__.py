"""Inference stage: model files and what they need to run as evaluated (:mod:`.bundle`,
:mod:`.weights`, :mod:`.model_file`, :mod:`.runtimes`), probabilities from a model
(:mod:`.predictor`), post-processing (:mod:`.postprocess`), masks of new images
(:mod:`.prediction`), and publishing and exporting a trained model (:mod:`.publish`,
:mod:`.export`).

The names below are the package's public surface, imported on first use."""

from __future__ import annotations

from busi.utils import lazy_surface

__getattr__, __dir__, __all__ = lazy_surface(__name__, {
    "open_model": "busi.inference.predictor",
    "predict_images": "busi.inference.predictor",
    "predict_images_and_labels": "busi.inference.predictor",
    "predict_probabilities": "busi.inference.predictor",
    "predict_table": "busi.inference.predictor",
    "model_batch": "busi.inference.predictor",
    "ModelRecord": "busi.inference.bundle",
    "postprocess_for": "busi.inference.bundle",
    "PostProcess": "busi.inference.postprocess",
    "load_model": "busi.inference.weights",
    "save_model": "busi.inference.weights",
    "predict": "busi.inference.prediction",
    "publish_weights": "busi.inference.publish",
})
