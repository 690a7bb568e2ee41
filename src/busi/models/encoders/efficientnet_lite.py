"""EfficientNet-Lite0/1/2 in Keras, layer for layer the reference PyTorch port's network.

EfficientNet-Lite (Google, 2020) is EfficientNet without squeeze-and-excitation, with ReLU6
instead of swish and an unscaled stem and head, made for integer inference. Its ImageNet
weights install with pip (:mod:`busi.models.encoders.imagenet`), which makes it the encoder busi can
pretrain offline. The network follows ``efficientnet-lite-pytorch`` (lukemelas' EfficientNet-
PyTorch adapted by ML Illustrated): TensorFlow "same" padding, batch-norm epsilon 1e-3, input
normalised as ``(x - 127) / 128``. That port pads statically (``Conv2dStaticSamePadding``): each
convolution's padding is computed once, for the variant's ImageNet input size (224, 240 or 260).
Keras' ``padding="same"`` is TensorFlow's dynamic "same" padding, computed from the actual input
(the extra pixel of an even input at the bottom and right). At the reference sizes the two
agree, so no explicit padding layer is needed; the reference test in
``tests/test_efficientnet_lite.py`` proves it against the PyTorch model at those sizes. At other
sizes the two differ wherever a stride-2 convolution meets a feature map of the other parity
(lite1 built for 240 pads a 15-pixel map 2+2, which at 256 is 16 pixels and padded 1+2; lite0
at 256 happens to agree). Keras' dynamic padding is then the right one, not the port's: it is
the padding of Google's original TensorFlow model, which the weights were trained with, so the
U-Net at 256 (or any size) pads as EfficientNet-Lite does.

Everything is a standard Keras layer (``Conv2D``, ``DepthwiseConv2D``, ``BatchNormalization``,
``ReLU``, ``Add``, ``Dropout``, ``Rescaling``), so a model built on it saves to ``.h5`` that loads
in tf-keras and in Keras 3 and that busi's safe loader accepts. Layer names mirror the
PyTorch state dict's modules (``block3_dw_conv`` for ``_blocks.3._depthwise_conv``), which keeps
the weight conversion a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from busi import _keras

# (repeats, kernel, stride, expand ratio, input filters, output filters) of the seven stages,
# before width and depth scaling: the reference's 'r1_k3_s11_e1_i32_o16', ...
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# name -> (width coefficient, depth coefficient, ImageNet training resolution)
VARIANTS = {
    "efficientnet-lite0": (1.0, 1.0, 224),
    "efficientnet-lite1": (1.0, 1.1, 240),
    "efficientnet-lite2": (1.1, 1.2, 260),
}
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
STEM_FILTERS = 32
HEAD_FILTERS = 1280
IMAGENET_CLASSES = 1000
MEAN, STD = 127.0, 128.0
"""Input normalisation of the ImageNet weights: (x - 127) / 128 for x in [0, 255]."""


@dataclass(frozen=True)
class Block:
    """One MBConv block after scaling: what the Keras and the PyTorch networks both build."""

    index: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def round_filters(filters: int, width: float) -> int:
    """The reference's channel rounding: scale, round to a multiple of 8, never 10% below."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def blocks(variant: str) -> list[Block]:
    """The variant's MBConv blocks in order; the first and last stage are not depth-scaled and
    the first takes the unscaled 32-channel stem (the "fixed head and stem" of the Lite family)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of "
                         f"{', '.join(VARIANTS)}")
    width, depth, _ = VARIANTS[variant]
    result: list[Block] = []
    for stage, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(STAGES):
        fixed = stage in (0, len(STAGES) - 1)
        repeats = repeats if fixed else int(math.ceil(depth * repeats))
        filters_in = STEM_FILTERS if stage == 0 else round_filters(filters_in, width)
        filters_out = round_filters(filters_out, width)
        for repeat in range(repeats):
            result.append(Block(len(result), kernel, stride if repeat == 0 else 1, expand,
                                filters_in if repeat == 0 else filters_out, filters_out))
    return result


def _conv_bn_relu6(x: Any, filters: int, kernel: int, stride: int, name: str,
                   depthwise: bool = False, activation: bool = True) -> Any:
    layers = _keras.keras().layers
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False,
                                   name=f"{name}_conv")(x)
    else:
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False,
                          name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    if activation:
        x = layers.ReLU(max_value=6.0, name=f"{name}_relu")(x)
    return x


def encoder(x: Any, variant: str = "efficientnet-lite0",
            drop_connect_rate: float = 0.2) -> tuple[Any, dict[int, Any]]:
    """Build the encoder on the normalised image tensor ``x``.

    Args:
        x: a Keras tensor (N, H, W, 3), already ``(x - 127) / 128``.
        variant: a key of :data:`VARIANTS`.
        drop_connect_rate: stochastic depth of the residual blocks, rising linearly with the
            block index as in the reference (0.2); a ``Dropout`` that drops whole samples.

    Returns:
        The head output (stride 32, 1280 channels) and the skip features by stride (2, 4, 8,
        16): the expanded activation of the first block of each down-sampling stage, the
        features segmentation-models' U-Net takes from EfficientNet.
    """
    layers = _keras.keras().layers
    all_blocks = blocks(variant)
    x = _conv_bn_relu6(x, STEM_FILTERS, 3, 2, "stem")
    skips: dict[int, Any] = {}
    stride = 2
    for block in all_blocks:
        name = f"block{block.index}"
        inputs = x
        if block.expand != 1:
            x = _conv_bn_relu6(x, block.filters_in * block.expand, 1, 1, f"{name}_expand")
        if block.stride == 2:
            skips[stride] = x
            stride *= 2
        x = _conv_bn_relu6(x, 0, block.kernel, block.stride, f"{name}_dw", depthwise=True)
        x = _conv_bn_relu6(x, block.filters_out, 1, 1, f"{name}_project", activation=False)
        if block.residual:
            rate = drop_connect_rate * block.index / len(all_blocks)
            if rate > 0:
                x = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
            x = layers.Add(name=f"{name}_add")([x, inputs])
    x = _conv_bn_relu6(x, HEAD_FILTERS, 1, 1, "head")
    return x, skips


def preprocessing_layer() -> Any:
    """[0, 255] -> (x - 127) / 128, in float32 under any precision policy."""
    return _keras.keras().layers.Rescaling(1 / STD, offset=-MEAN / STD, name="preprocess",
                                           dtype="float32")


def classifier(variant: str = "efficientnet-lite0", input_size: int | None = None) -> Any:
    """The ImageNet classifier (encoder, pooling, dense logits): what the reference test and the
    ImageNet sanity test run. Takes [0, 255] RGB images."""
    keras = _keras.keras()
    size = input_size or VARIANTS[variant][2]
    inputs = keras.Input((size, size, 3), name="image")
    x, _ = encoder(preprocessing_layer()(inputs), variant)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    logits = keras.layers.Dense(IMAGENET_CLASSES, name="classifier")(x)
    return keras.Model(inputs, logits, name=variant.replace("-", "_"))


# PyTorch module -> Keras layer, per block and for the stem and head.
_BLOCK_MODULES = {"_expand_conv": "expand_conv", "_bn0": "expand_bn",
                  "_depthwise_conv": "dw_conv", "_bn1": "dw_bn",
                  "_project_conv": "project_conv", "_bn2": "project_bn"}
_TOP_MODULES = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "head_conv",
                "_bn1": "head_bn", "_fc": "classifier"}


def keras_weights(state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The reference state dict as Keras layer weights, by layer name.

    Conv kernels go from (out, in, kh, kw) to (kh, kw, in, out), depthwise ones from
    (channels, 1, kh, kw) to (kh, kw, channels, 1), dense ones are transposed; BatchNorm gives
    gamma, beta, moving mean and variance (``num_batches_tracked`` has no Keras counterpart).
    """
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        module, _, field = key.rpartition(".")
        modules.setdefault(module, {})[field] = value
    result: dict[str, list[np.ndarray]] = {}
    for module, fields in modules.items():
        parts = module.split(".")
        if len(parts) == 3 and parts[0] == "_blocks" and parts[2] in _BLOCK_MODULES:
            layer = f"block{int(parts[1])}_{_BLOCK_MODULES[parts[2]]}"
        elif len(parts) == 1 and parts[0] in _TOP_MODULES:
            layer = _TOP_MODULES[parts[0]]
        else:
            raise ValueError(f"unexpected module {module!r} in the EfficientNet-Lite weights")
        if "running_mean" in fields:
            result[layer] = [fields["weight"], fields["bias"], fields["running_mean"],
                             fields["running_var"]]
        elif layer == "classifier":
            result[layer] = [fields["weight"].T, fields["bias"]]
        elif layer.endswith("dw_conv"):
            result[layer] = [fields["weight"].transpose(2, 3, 0, 1)]
        else:
            result[layer] = [fields["weight"].transpose(2, 3, 1, 0)]
    return {name: [np.ascontiguousarray(w, dtype=np.float32) for w in ws]
            for name, ws in result.items()}


def set_weights(model: Any, weights: dict[str, list[np.ndarray]], strict: bool = True) -> int:
    """Copy converted weights into the encoder layers of ``model`` (and its classifier, if it
    has one); every encoder layer with weights must receive some. Returns how many layers."""
    names = {layer.name for layer in model.layers}
    missing = [layer.name for layer in model.layers if layer.weights
               and layer.name.startswith(("stem_", "block", "head_")) and layer.name not in weights]
    if strict and missing:
        raise ValueError(f"the ImageNet weights lack layers {missing[:5]} of {model.name}")
    copied = 0
    for name, values in weights.items():
        if name not in names:
            continue
        layer = model.get_layer(name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if expected != [v.shape for v in values]:
            raise ValueError(f"layer {name}: ImageNet weights have shapes "
                             f"{[v.shape for v in values]}, the model {expected}")
        layer.set_weights(values)
        copied += 1
    return copied
