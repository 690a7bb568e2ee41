"""What a model is: the U-Net architectures (:mod:`.architectures`), their encoders
(:mod:`.encoders`, one registry), the image-level head (:mod:`.heads`) and the losses and
optimisers training uses (:mod:`.losses`).

The names below are the package's public surface, imported on first use."""

from __future__ import annotations

from busi.utils import lazy_surface

__getattr__, __dir__, __all__ = lazy_surface(__name__, {
    "build_model": "busi.models.architectures",
    "classic_unet": "busi.models.architectures",
    "build": "busi.models.architectures",
    "architecture": "busi.models.architectures",
    "custom_objects": "busi.models.architectures",
    "add_image_head": "busi.models.heads",
    "has_image_head": "busi.models.heads",
    "get_loss": "busi.models.losses",
    "get_optimizer": "busi.models.losses",
    "get_metrics": "busi.models.losses",
})
