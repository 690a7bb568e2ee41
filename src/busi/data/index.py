"""The dataset index: one checked row per image, built before anything trains.

Pairing is by file name inside each class folder (``X.png`` with ``X_mask.png``,
``X_mask_1.png``, ...), never by position in a listing. Every problem (an image with no mask, a
mask with no image, a mask whose size differs from its image, an unreadable file, a normal image
with a lesion marked or a lesion image with an empty mask) is collected and
reported by file name at once, in the manner of nnU-Net's dataset check: ``strict=True`` raises,
the default warns and leaves the affected images out.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from busi.data.duplicates import perceptual_hash
from busi.data.masks import load_example
from busi.errors import DataError
from busi.utils import progress

LABELS = ("benign", "malignant", "normal")
UNLABELLED_LESION = "lesion"
"""The label of an image with a lesion whose kind is unknown (a user's folder without labels)."""
KNOWN_LABELS = (*LABELS, UNLABELLED_LESION)
COLUMNS = [
    "id", "label", "image_path", "mask_paths", "mask_count", "height", "width",
    "lesion_fraction", "hash", "phash",
]
_MASK = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<number>\d+))?$", re.IGNORECASE)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def mask_of(path: Path) -> tuple[str, int] | None:
    """``(image stem, mask number)`` if the file is named like a BUSI mask (``X_mask.png`` ->
    ``("X", 0)``, ``X_mask_1.png`` -> ``("X", 1)``), else None."""
    match = _MASK.match(path.stem)
    if not match:
        return None
    return match["stem"], int(match["number"]) if match["number"] else 0


def content_hash(image: np.ndarray) -> str:
    """SHA-1 of the decoded pixels and their shape, so re-encoded copies of an image match."""
    digest = hashlib.sha1(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def _scan_folder(folder: Path, problems: list[str]) -> dict[str, tuple[Path, list[Path]]]:
    """Pair the images of one class folder with their masks by file stem."""
    images: dict[str, Path] = {}
    masks: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        mask = mask_of(path)
        if mask:
            stem, number = mask
            masks[stem].append((number, path))
        else:
            images[path.stem] = path
    pairs = {}
    for stem, image_path in images.items():
        if stem not in masks:
            problems.append(f"{image_path}: image has no mask ({stem}_mask.png)")
            continue
        pairs[stem] = (image_path, [p for _, p in sorted(masks[stem])])
    for stem in sorted(set(masks) - set(images)):
        for _, mask_path in masks[stem]:
            problems.append(f"{mask_path}: mask has no image ({stem}.png)")
    return pairs


def _describe(item: tuple[str, str | None, Path, list[Path]]) -> dict | str:
    """Read one image and its masks; return its row, or the problem as a message.

    A label of None (a user's folder without labels) is read off the mask: "lesion" if it marks
    anything, else "normal". A given label is checked against the mask instead.
    """
    stem, label, image_path, mask_paths = item
    row = {
        "id": stem, "label": label, "image_path": str(image_path),
        "mask_paths": tuple(str(p) for p in mask_paths), "mask_count": len(mask_paths),
    }
    try:
        image, mask = load_example(row)
    except DataError as error:
        return str(error)
    if label is None:
        row["label"] = label = UNLABELLED_LESION if mask.any() else "normal"
    if label == "normal" and mask.any():
        return f"{mask_paths[0]}: a normal image's mask marks {int(mask.sum())} lesion pixels"
    if label != "normal" and not mask.any():
        return f"{mask_paths[0]}: the mask of a {label} image is empty"
    height, width = image.shape
    return {
        **row, "height": height, "width": width,
        "lesion_fraction": float(mask.mean()), "hash": content_hash(image),
        "phash": perceptual_hash(image),
    }


def index_pairs(
    items: Sequence[tuple[str, str | None, Path, list[Path]]],
    root: str | os.PathLike,
    problems: list[str] | None = None,
    strict: bool = False,
    workers: int = 4,
) -> pd.DataFrame:
    """Read and check paired images and masks, the step every dataset adapter ends with.

    Args:
        items: ``(id, label or None, image path, mask paths)`` per image, paired by the adapter.
        root: the dataset folder, named in the problem report.
        problems: problems the adapter found while pairing (file names included); the checks of
            the images and masks are added to them.
        strict: raise :class:`DataError` listing every problem instead of warning.
        workers: threads for decoding (OpenCV releases the GIL).

    Returns:
        The index table (:data:`COLUMNS`), sorted by label then natural id order; images with a
        problem are left out (with a warning) unless ``strict``.
    """
    problems = list(problems or [])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        described = list(progress.bar(pool.map(_describe, items), total=len(items),
                                      desc=f"indexing {Path(root).name}"))
    rows = [d for d in described if isinstance(d, dict)]
    problems += [d for d in described if isinstance(d, str)]
    if problems:
        report = f"{len(problems)} problem(s) in {root}:\n  " + "\n  ".join(problems)
        if strict:
            raise DataError(report)
        warnings.warn(report + "\nThese images are left out.", stacklevel=3)
    table = pd.DataFrame(rows, columns=COLUMNS)
    if table.empty:
        raise DataError(f"{root}: no usable images (see the problems above, if any)")
    return sort_table(table)


def index(root: str | os.PathLike, strict: bool = False, workers: int = 4) -> pd.DataFrame:
    """Index a BUSI folder (``benign/``, ``malignant/``, ``normal/``): one row per image.

    Args:
        root: the ``Dataset_BUSI_with_GT`` folder (see :func:`busi.data.locate`).
        strict: raise :class:`DataError` listing every problem instead of warning.
        workers: threads for decoding (OpenCV releases the GIL).

    Returns:
        DataFrame sorted by label then natural id order, with columns ``id``, ``label``,
        ``image_path``, ``mask_paths`` (tuple, ``_mask`` first), ``mask_count``, ``height``,
        ``width``, ``lesion_fraction`` (of the merged mask), ``hash`` (of the gray pixels) and
        ``phash`` (perceptual hash, for near duplicates).
    """
    root = Path(root)
    folders = [root / label for label in LABELS if (root / label).is_dir()]
    if not folders:
        raise DataError(
            f"{root}: no class folder found; expected {', '.join(LABELS)} inside "
            "(the Dataset_BUSI_with_GT folder of the Kaggle download)"
        )
    problems: list[str] = []
    items = []
    for folder in folders:
        for stem, (image_path, mask_paths) in _scan_folder(folder, problems).items():
            items.append((stem, folder.name, image_path, mask_paths))
    if not items:
        raise DataError(
            f"{root}: no usable images in {', '.join(f.name + '/' for f in folders)}; expected "
            "'<class> (N).png' files, each with its '<class> (N)_mask.png'"
        )
    table = index_pairs(items, root, problems, strict=strict, workers=workers)
    _warn_missing_classes(root, table)
    return table


def _warn_missing_classes(root: Path, table: pd.DataFrame) -> None:
    """Warn for each class with no images: an empty ``normal/`` would otherwise go unnoticed
    until a run's summary quietly lacks the false-positive rate on normal images."""
    counts = table["label"].value_counts()
    for label in LABELS:
        if not counts.get(label, 0):
            where = "folder is empty" if (root / label).is_dir() else "folder is missing"
            warnings.warn(
                f"{root / label}: no {label} images (the {where}); runs on this data have no "
                f"{label} images to train on or to score"
                + (", and no false-positive rate on normal images" if label == "normal" else ""),
                stacklevel=3,
            )


def _natural_key(value: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", value))


def sort_table(table: pd.DataFrame) -> pd.DataFrame:
    """Sort rows by label, then id in natural order ("benign (2)" before "benign (10)")."""
    order = sorted(
        range(len(table)),
        key=lambda i: (table["label"].iat[i], _natural_key(table["id"].iat[i])),
    )
    return table.iloc[order].reset_index(drop=True)


def fingerprint(table: pd.DataFrame) -> str:
    """A short hash of which images (by content) are in a table, so a run can tell whether the
    data it is evaluated on is the data it was split and trained on."""
    digest = hashlib.sha1()
    for image_id, image_hash in sorted(zip(table["id"], table["hash"], strict=True)):
        digest.update(f"{image_id}:{image_hash};".encode())
    return digest.hexdigest()[:16]
