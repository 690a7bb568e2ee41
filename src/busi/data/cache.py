"""A portable cache: what training reads of a config's datasets, in one file.

Training a model on another machine (a GPU box, a cluster node) otherwise means copying the
datasets there (BUSI and BUS-BRA: thousands of PNGs) and indexing them again. The cache holds
the model-size images and masks of the train and val parts, exactly as
:func:`busi.data.pipeline.load_arrays` makes them, the run split
(:func:`busi.data.parts.make_run_split`), the labels and content hashes of every image of the
split, and the dataset fingerprint, so ``busi train --cache FILE`` needs no raw data, and the run
it makes has the ``split.csv`` and fingerprint a run on the raw data would have: it is evaluated
later on the raw data (evaluation scores masks at the original resolution, which the cache does
not hold; so the test images' pixels are not in it either).

The file is a NumPy ``.npz`` read with ``allow_pickle=False``: reading it never runs code.
Images are stored as JPEG (or PNG, lossless) of the image region of each model-size array, the
letterbox padding left out and restored as exact zeros; masks are bit-packed, lossless. A
SHA-256 of the whole payload is stored and checked on reading, and the config fields that
change the content are stored and compared with the run's config, so a damaged cache or one
made for other settings is refused by name instead of training on the wrong images.

Why JPEG by default: 8-bit ultrasound speckle does not compress losslessly below ~3.5 bits per
pixel (PNG ~65 MB, lossless WebP ~58 MB for the train and val images of BUSI + BUS-BRA at
256x256), too much to carry around; JPEG at quality 94 makes that cache 38 MB with a mean
absolute error of 0.9 gray levels (see :data:`DEFAULT_QUALITY`). Decoders of other JPEG library
builds may differ from this one by a gray level here and there.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pandas as pd

from busi import __version__
from busi.data.arrays import decode_workers, load_arrays
from busi.data.geometry import placement_for
from busi.data.index import fingerprint
from busi.data.parts import dataset_table, make_run_split, split_parts, split_seed
from busi.data.splits import DATASET_COLUMN, SPLIT_COLUMNS
from busi.errors import DataError
from busi.utils.atomic import atomic_path

if TYPE_CHECKING:
    from busi.config.train_config import TrainConfig

FORMAT = 1
"""Version of the layout below; raised whenever what a reader expects changes."""

CONTENT_FIELDS = ("datasets", "image_size", "resize", "classes", "drop_conflicts", "seed",
                  "val_fraction", "test_fraction", "authors_fold", "split_file")
"""Config fields that change what the cache holds (images, their size, the split): a run's
config must agree on each. Where the data lies (``data``, ``data_paths``) and what training does
with the parts (``limit``, ``train_classes``, the model) may differ."""

DEFAULT_QUALITY = 94
"""JPEG quality of the images: BUSI + BUS-BRA at 256x256 must fit in 45 MB with a margin (95
would be ~41 MB). Their cache (``configs/lite0_joint_cpu.yaml``) is 38.1 MB, images off by 0.88
gray levels on average, 12 at most (PSNR 45.6 dB). Estimated from 100 of their images: quality
90 ~29 MB (1.5 levels, at most 18), PNG ~65 MB. Fed to the shipped joint model, such images
change its mean test Dice by -0.001 (per image by 0.02 on average), about what adding random
+-1 gray-level noise does; the effect of training on them has not been measured."""

PIXEL_PARTS = ("train", "val")
"""The parts whose pixels the cache holds: those training reads."""

_PLACEMENT = ("orig_h", "orig_w", "top", "left", "inner_h", "inner_w")
_ROW_COLUMNS = ("id", "label", "hash")
_MEMBERS = ("meta", "split_csv", "id", "label", "hash", "pixel_row", "image_bytes",
            "image_offsets", "placement", "masks", "sha256")


def content_fields(config: TrainConfig) -> dict[str, Any]:
    """The values of :data:`CONTENT_FIELDS` as JSON holds them (tuples as lists); ``seed`` is
    the seed of the split (:func:`busi.data.parts.split_seed`), the one that shapes the cache."""
    values = {**config.to_dict(), "seed": split_seed(config)}
    return {name: values[name] for name in CONTENT_FIELDS}


@dataclass(frozen=True, eq=False)  # compared by identity: it holds DataFrames and arrays
class Cache:
    """An opened cache whose digest has been checked: the rows of the split and the means to
    decode their images.

    Attributes:
        path: the file.
        meta: format, busi version, the content fields, fingerprint, image codec and the
            images' error against the exact arrays.
        table: one row per image of the split (in split order): ``id``, ``label``, ``hash``,
            and ``dataset`` for several datasets; what :func:`busi.data.parts.split_parts`
            selects from in place of the indexed datasets.
        split: the run split, as ``split.csv`` holds it.
    """

    path: Path
    meta: dict[str, Any]
    table: pd.DataFrame
    split: pd.DataFrame
    _members: dict[str, np.ndarray] = field(repr=False)

    @property
    def lossless(self) -> bool:
        return self.meta["images"]["codec"] == "png"

    @property
    def codec(self) -> str:
        """How the images are stored, for messages: "lossless PNG" or "JPEG quality Q"."""
        images = self.meta["images"]
        return "lossless PNG" if self.lossless else f"JPEG quality {images.get('quality')}"

    @property
    def size(self) -> tuple[int, int]:
        height, width = self.meta["size"]
        return int(height), int(width)

    def check_config(self, config: TrainConfig) -> None:
        """Refuse a config that would have made another cache (:data:`CONTENT_FIELDS`).

        Raises:
            DataError: naming the file and each field that differs.
        """
        made = self.meta["config"]
        wanted = content_fields(config)
        differs = [name for name in CONTENT_FIELDS if made.get(name) != wanted[name]]
        if differs:
            details = ", ".join(f"{name} {made.get(name)!r} (cache) vs {wanted[name]!r} (config)"
                                for name in differs)
            raise DataError(f"{self.path}: the cache was made for other settings: {details}; "
                            "make it again with `busi cache` and this config")

    def arrays(self, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """The model-size images and masks of ``rows`` (by ``id``, in their order): uint8
        ``[N, H, W, 1]`` each, masks in {0, 1}, as :func:`busi.data.pipeline.load_arrays` gives
        them (up to the JPEG error for a lossy cache).

        Raises:
            DataError: a row the cache holds no pixels for (test images, other data).
        """
        positions = pd.Series(self._members["pixel_row"], index=self.table["id"])
        ids = list(rows["id"])
        found = positions.reindex(ids)
        lacking = [i for i, position in zip(ids, found, strict=True)
                   if pd.isna(position) or position < 0]
        if lacking:
            raise DataError(
                f"{self.path}: no pixels for {len(lacking)} image(s), e.g. {lacking[:3]}; the "
                f"cache holds the {' and '.join(PIXEL_PARTS)} images of its split only (the "
                "test part is evaluated on the raw data)")
        height, width = self.size
        shape = (len(ids), height, width, 1)
        images, masks = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
        offsets, data = self._members["image_offsets"], self._members["image_bytes"]
        placement, packed = self._members["placement"], self._members["masks"]
        order = found.to_numpy(dtype=np.int64)

        def work(i: int) -> None:
            k = order[i]
            _, _, top, left, inner_h, inner_w = (int(v) for v in placement[k])
            image = cv2.imdecode(data[offsets[k]:offsets[k + 1]], cv2.IMREAD_GRAYSCALE)
            if image is None or image.shape != (inner_h, inner_w):
                got = "nothing" if image is None else f"{image.shape[1]}x{image.shape[0]}"
                raise DataError(f"{self.path}: image {ids[i]!r} decodes to {got}, expected "
                                f"{inner_w}x{inner_h}")
            images[i, top:top + inner_h, left:left + inner_w, 0] = image
            masks[i, ..., 0] = np.unpackbits(packed[k], count=height * width).reshape(
                height, width)

        with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
            for _ in pool.map(work, range(len(ids))):  # iterating re-raises a worker's error
                pass
        return images, masks

    def describe(self, path: str | os.PathLike) -> str:
        """What ``busi cache`` wrote, for its user: size, images, codec error, how to use it."""
        parts, error = self.split["split"].value_counts(), self.meta["image_error"]
        loss = "" if self.lossless else (f", mean absolute error {error['mean_abs']:.2f} gray "
                                         f"levels, largest {error['max_abs']}")
        return (f"wrote {path}: {Path(path).stat().st_size / 1e6:.1f} MB; {len(self.table)} "
                f"images at {self.size[1]}x{self.size[0]}, pixels of train "
                f"{parts.get('train', 0)} and val {parts.get('val', 0)} (the test part is "
                f"evaluated on the raw data)\nimages: {self.codec}{loss}; masks lossless; "
                f"fingerprint {self.meta['fingerprint']}; train with --cache {path} and the "
                "same settings")

    def provenance(self) -> dict[str, Any]:
        """What a run trained from this cache records (``env.json``): the file, its payload
        digest and how its images were stored, so a run on JPEG images is told from one on the
        raw data."""
        return {"path": str(self.path), "sha256": str(self._members["sha256"]),
                "format": self.meta["format"], "busi_version": self.meta["busi_version"],
                "images": self.meta["images"], "image_error": self.meta["image_error"]}


def _payload_digest(members: dict[str, np.ndarray]) -> str:
    """SHA-256 of every member but the digest itself: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(members):
        if name == "sha256":
            continue
        array = np.ascontiguousarray(members[name])
        digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _encode(image: np.ndarray, quality: int | None) -> np.ndarray:
    if quality is None:
        ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    else:
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} image")
    return data.reshape(-1)


def _image_error(exact: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """How far the stored images are from the exact ones, over all pixels (padding included)."""
    if len(exact) == 0:
        return {"max_abs": 0, "mean_abs": 0.0, "rmse": 0.0, "psnr_db": None}
    difference = decoded.astype(np.int16) - exact.astype(np.int16)
    mse = float(np.mean(difference.astype(np.float64) ** 2))
    return {"max_abs": int(np.abs(difference).max()),
            "mean_abs": round(float(np.abs(difference).mean()), 4),
            "rmse": round(math.sqrt(mse), 4),
            "psnr_db": None if mse == 0 else round(10 * math.log10(255**2 / mse), 2)}


def write_cache(config: TrainConfig, path: str | os.PathLike,
                quality: int | None = DEFAULT_QUALITY) -> Cache:
    """Index the config's datasets, make its run split and write the cache to ``path``
    (atomically; the datasets are only read).

    Args:
        config: the settings of the runs that will train from it; only
            :data:`CONTENT_FIELDS` and where the data is are read.
        path: the cache file (``.npz`` by convention).
        quality: JPEG quality 1..100 of the images; None stores them losslessly (PNG).

    Returns:
        The cache as :func:`open_cache` reads it back.
    """
    if quality is not None and not (isinstance(quality, int) and 1 <= quality <= 100):
        raise ValueError(f"quality must be an integer in 1..100 (or None: lossless), got "
                         f"{quality!r}")
    table = dataset_table(config)
    split = make_run_split(config, table)
    split_parts(config.replace(limit=None), table, split)  # names missing images, as a run does
    rows = table.set_index("id", drop=False).loc[list(split["id"])].reset_index(drop=True)
    with_pixels = split["split"].isin(PIXEL_PARTS).to_numpy()
    exact, masks, placements = load_arrays(rows[with_pixels], size=config.image_size,
                                           mode=config.resize)
    encoded = [_encode(np.ascontiguousarray(image[p.top:p.top + p.inner_h,
                                                  p.left:p.left + p.inner_w, 0]), quality)
               for image, p in zip(exact, placements, strict=True)]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    offsets[1:] = np.cumsum([len(data) for data in encoded])
    model = placement_for(1, 1, config.image_size, config.resize)
    height, width = model.size_h, model.size_w
    pixel_row = np.full(len(rows), -1, np.int32)
    pixel_row[with_pixels] = np.arange(int(with_pixels.sum()), dtype=np.int32)
    members: dict[str, np.ndarray] = {
        "split_csv": np.array(split[_split_columns(split)].to_csv(index=False)),
        **{name: np.array(rows[name].astype(str).tolist(), dtype=str) for name in _ROW_COLUMNS},
        "pixel_row": pixel_row,
        "image_bytes": (np.concatenate(encoded) if encoded else np.zeros(0, np.uint8)),
        "image_offsets": offsets,
        "placement": np.array([[getattr(p, name) for name in _PLACEMENT] for p in placements],
                              np.int32).reshape(-1, len(_PLACEMENT)),
        "masks": np.packbits(masks.reshape(len(masks), -1), axis=1),
    }
    if DATASET_COLUMN in rows:
        members[DATASET_COLUMN] = np.array(rows[DATASET_COLUMN].astype(str).tolist(), dtype=str)
    meta = {
        "format": FORMAT, "busi_version": __version__, "config": content_fields(config),
        "fingerprint": fingerprint(rows), "size": [int(height), int(width)],
        "images": {"codec": "png"} if quality is None else {"codec": "jpeg", "quality": quality},
        "image_error": None,
        "rows": len(rows), "pixel_parts": list(PIXEL_PARTS), "pixel_rows": len(encoded),
    }
    members["meta"] = np.array(json.dumps(meta))  # error filled in below, from the decoded bytes
    draft = _from_members(Path(path), members, meta)
    meta["image_error"] = _image_error(exact[..., 0], draft.arrays(rows[with_pixels])[0][..., 0])
    members["meta"] = np.array(json.dumps(meta))
    members["sha256"] = np.array(_payload_digest(members))
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **members)
    return open_cache(path)


def _split_columns(split: pd.DataFrame) -> list[str]:
    return SPLIT_COLUMNS + ([DATASET_COLUMN] if DATASET_COLUMN in split else [])


def _from_members(path: Path, members: dict[str, np.ndarray], meta: dict[str, Any]) -> Cache:
    columns = {name: members[name].astype(str) for name in _ROW_COLUMNS}
    if DATASET_COLUMN in members:
        columns[DATASET_COLUMN] = members[DATASET_COLUMN].astype(str)
    table = pd.DataFrame(columns)
    split = pd.read_csv(io.StringIO(str(members["split_csv"])),
                        dtype={"id": str, "label": str, DATASET_COLUMN: str})
    return Cache(path, meta, table, split, members)


def open_cache(path: str | os.PathLike, config: TrainConfig | None = None) -> Cache:
    """Read a cache written by :func:`write_cache`, checking its format version and payload
    digest, and, given ``config``, that it was made for the same :data:`CONTENT_FIELDS`.

    Raises:
        DataError: naming the file: missing, not a busi cache, truncated or damaged (digest
            mismatch), another format version, or made for other settings.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: cache file not found")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: not a busi cache (a single NumPy array, not an .npz)")
        with loaded:
            members = {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{path}: not a readable busi cache; truncated or damaged? ({error}). "
                        "Make it again with `busi cache`") from error
    missing = sorted(set(_MEMBERS) - set(members))
    if "meta" not in members:
        raise DataError(f"{path}: not a busi cache (no meta entry; holds {sorted(members)})")
    try:
        meta = json.loads(str(members["meta"]))
        version = meta["format"]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: the cache's meta entry is damaged ({error})") from error
    if version != FORMAT:
        raise DataError(f"{path}: cache format {version!r} (made by busi "
                        f"{meta.get('busi_version')}); this busi reads format {FORMAT}. Make it "
                        "again with `busi cache`")
    if missing:
        raise DataError(f"{path}: the cache lacks {missing}; damaged, or not made by busi")
    recorded, found = str(members["sha256"]), _payload_digest(members)
    if recorded != found:
        raise DataError(f"{path}: the cache is damaged: its payload's SHA-256 is {found[:16]}..., "
                        f"recorded {recorded[:16]}...; make it again with `busi cache`")
    cache = _from_members(path, members, meta)
    if fingerprint(cache.table) != meta["fingerprint"]:  # a digest over wrong rows: not busi's
        raise DataError(f"{path}: the images' fingerprint differs from the recorded "
                        f"{meta['fingerprint']}")
    if config is not None:
        cache.check_config(config)
    return cache


__all__ = ["CONTENT_FIELDS", "DEFAULT_QUALITY", "FORMAT", "Cache", "content_fields",
           "open_cache", "write_cache"]
