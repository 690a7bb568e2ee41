"""A user's own images and masks as a dataset: evaluate a model on them, or train with them.

Layout (the simplest one a hospital export or a labelling tool gives)::

    root/images/NAME.png          any of .png .jpg .jpeg .bmp
    root/masks/NAME.png           same name (NAME_mask.png is accepted too), one mask per image
    root/labels.csv               optional: columns id (= NAME), label, and optionally patient

Without ``labels.csv`` an image whose mask marks something is labelled "lesion" (its kind is
unknown; it counts with the benign and malignant images in every lesion figure) and an image
with an empty mask "normal" (it counts as a normal image: any predicted pixel is a false
positive). With it, labels must be benign, malignant, normal or lesion and must agree with the
masks. A ``patient`` column keeps a patient's images in one part of any split.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd

from busi.data.index import IMAGE_SUFFIXES, KNOWN_LABELS, index_pairs
from busi.errors import DataError

NAME = "folder"
ENV_VAR = "BUSI_FOLDER_DATA"
LABELS_FILE = "labels.csv"


def locate(path: str | os.PathLike | None = None) -> Path:
    """The folder holding ``images/`` and ``masks/`` (``path``, else ``$BUSI_FOLDER_DATA``)."""
    if path is None and not os.environ.get(ENV_VAR):
        raise DataError(
            f"the folder dataset needs a path: the folder holding images/ and masks/ (set "
            f"data_paths: {{folder: PATH}} in the config, --data, or {ENV_VAR})"
        )
    root = Path(path if path is not None else os.environ[ENV_VAR]).expanduser()
    missing = [name for name in ("images", "masks") if not (root / name).is_dir()]
    if missing:
        raise DataError(f"{root}: no {' or '.join(f'{m}/' for m in missing)} folder inside "
                        "(expected images/ and masks/ with matching file names)")
    return root.resolve()


def _files(folder: Path) -> dict[str, list[Path]]:
    """The image files of ``folder`` by stem, as lists: ``a.png`` and ``a.jpg`` are two files
    for one image, a fault to report, not something to settle by picking one."""
    files: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES:
            files.setdefault(path.stem, []).append(path)
    return files


def _labels(root: Path, problems: list[str]) -> pd.DataFrame | None:
    """``labels.csv`` checked, or None without one. Read as ``utf-8-sig``: Excel writes a byte
    order mark that would otherwise become part of the first column's name (``\ufeffid``).
    Labels are compared lower-cased and stripped (``Benign `` is benign), as for BUS-BRA."""
    path = root / LABELS_FILE
    if not path.is_file():
        return None
    try:
        labels = pd.read_csv(io.StringIO(path.read_text(encoding="utf-8-sig")), dtype=str)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error}); save it as CSV UTF-8") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None
    labels.columns = [str(column).strip() for column in labels.columns]
    if not {"id", "label"} <= set(labels):
        raise DataError(f"{path}: needs columns id and label (and optionally patient); found "
                        f"{list(labels.columns)}")
    labels["id"] = labels["id"].str.strip()
    labels["label"] = labels["label"].str.strip().str.lower()
    twice = sorted(set(labels["id"][labels["id"].duplicated()]))
    if twice:
        raise DataError(f"{path}: ids listed twice: {twice}")
    bad = labels[~labels["label"].isin(KNOWN_LABELS)]
    for image_id, label in zip(bad["id"], bad["label"], strict=True):
        problems.append(f"{path}: {image_id} has label {label!r}; use one of {list(KNOWN_LABELS)}")
    return labels.set_index("id", drop=False)


def index(root: str | os.PathLike, strict: bool = False, workers: int = 4) -> pd.DataFrame:
    """Index a folder of images and masks: one checked row per image (see the module docstring).

    Problems named by file: an image without a mask, a mask without an image, several files for
    one image (``a.png`` and ``a.jpg``, or masks ``a.png`` and ``a_mask.png``), an id of
    ``labels.csv`` with no image or an image missing from it, an unknown label, a mask whose size
    differs from its image, a label the mask contradicts, an unreadable file. ``strict`` raises
    listing them all; the default warns and leaves those images out. Nothing is written.
    """
    root = locate(root)
    problems: list[str] = []
    images = _files(root / "images")
    masks: dict[str, list[Path]] = {}
    for stem, paths in _files(root / "masks").items():
        key = stem[: -len("_mask")] if stem.endswith("_mask") and stem not in images else stem
        masks.setdefault(key, []).extend(paths)
    several = {key for found in (images, masks) for key, paths in found.items() if len(paths) > 1}
    for key in sorted(several):
        for found in (images, masks):
            if len(found.get(key, [])) > 1:
                problems.append(f"{', '.join(map(str, found[key]))}: several files for image "
                                f"{key}; keep one")
    labels = _labels(root, problems)
    items = []
    for stem in sorted(set(images) | set(masks)):
        if stem in several:
            continue  # reported above
        if stem not in masks:
            problems.append(f"{images[stem][0]}: image has no mask (masks/{stem}.png)")
        elif stem not in images:
            problems.append(f"{masks[stem][0]}: mask has no image (images/{stem}.png)")
        elif labels is not None and stem not in labels.index:
            problems.append(f"{images[stem][0]}: image not listed in {root / LABELS_FILE}")
        else:
            label = None if labels is None else labels.at[stem, "label"]
            if label is None or label in KNOWN_LABELS:
                items.append((stem, label, images[stem][0], [masks[stem][0]]))
    if labels is not None:
        for image_id in sorted(set(labels.index) - set(images)):
            problems.append(f"{root / LABELS_FILE}: {image_id} has no image (images/{image_id}.*)")
    table = index_pairs(items, root, problems, strict=strict, workers=workers)
    if labels is not None and "patient" in labels:
        table = table.join(labels["patient"], on="id")
    return table
