"""BUS-BRA: the second dataset, as published (a converter into busi's index, not a core change).

Gómez-Flores W, Gregorio-Calas MJ, Pereira WCA. BUS-BRA: a breast ultrasound dataset for
assessing computer-aided diagnosis systems. Medical Physics, 2024 (citation required by its
licence). 1875 gray images of 1064 patients from four scanners, one binary lesion mask each, every
image a biopsy-proven benign or malignant lesion. Layout of the download (Zenodo record
10.5281/zenodo.7730709)::

    Images/bus_NNNN-V.png    Masks/mask_NNNN-V.png    (V = l, r or s: views of one patient)
    bus_data.csv             ID, Case (= patient), Histology, Pathology, BIRADS, Device, ...
    5-fold-cv.csv            the authors' patient-wise partitions (kFold = the test fold;
    10-fold-cv.csv           valid_k = 1 train, 0 validation, NaN test, in partition k)

The index rows carry the patient (``Case``) in ``patient``, so that :func:`busi.data.add_groups`
keeps a patient's views, and their near duplicates, in one part of any split.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import urllib.request
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from busi.data.index import LABELS, index_pairs
from busi.data.splits import _prepare, split_around_test
from busi.errors import DataError
from busi.utils import progress
from busi.utils.paths import DATA_DIR, existing_copy, search_roots

NAME = "busbra"
ENV_VAR = "BUSBRA_DATA"
ZENODO_RECORD = "7730709"
DOI = "10.5281/zenodo.7730709"
DEFAULT_DEST = DATA_DIR / "raw" / "BUS-BRA"
METADATA = "bus_data.csv"
CITATION = (
    "Gómez-Flores W, Gregorio-Calas MJ, Pereira WCA. BUS-BRA: a breast ultrasound dataset for "
    "assessing computer-aided diagnosis systems. Medical Physics, 2024."
)
MANUAL_STEPS = (
    "Download it by hand from https://doi.org/{doi} (Zenodo), unzip it, and either put the "
    "folder holding Images/, Masks/ and bus_data.csv at {dest} or set the environment variable "
    "{env} to its path."
)
#: bus_data.csv column -> index column (metadata kept for per-scanner or per-histology analysis).
METADATA_COLUMNS = {
    "Case": "patient", "Histology": "histology", "BIRADS": "birads", "Device": "device",
    "Side": "side",
}
LESION_LABELS = ("benign", "malignant")


def _is_root(folder: Path) -> bool:
    return (folder / "Images").is_dir() and (folder / "Masks").is_dir() and (
        folder / METADATA).is_file()


def locate(path: str | os.PathLike | None = None) -> Path:
    """The BUS-BRA folder (the one holding ``Images/``, ``Masks/`` and ``bus_data.csv``).

    Args:
        path: that folder or a parent of it. When None, ``$BUSBRA_DATA`` is tried, then
            ``data/raw/BUS-BRA`` and ``data`` of the project.

    Raises:
        DataError: naming every place looked at and how to get the data.
    """
    starts = search_roots(path, ENV_VAR, DEFAULT_DEST)
    looked = []
    for start in starts:
        candidates = [start]
        if start.is_dir():  # not hidden folders: a killed download leaves .extracting-* half full
            candidates += sorted(p for p in start.iterdir()
                                 if p.is_dir() and not p.name.startswith("."))
        for candidate in candidates:
            looked.append(candidate)
            if _is_root(candidate):
                return candidate.resolve()
    places = "\n  ".join(str(p) for p in dict.fromkeys(looked))
    raise DataError(
        f"BUS-BRA not found. Looked for Images/, Masks/ and {METADATA} in:\n  {places}\n"
        + MANUAL_STEPS.format(doi=DOI, dest=DEFAULT_DEST, env=ENV_VAR)
        + " Or call busi.data.datasets.get('busbra').download() with internet access."
    )


def download(dest: str | os.PathLike = DEFAULT_DEST, force: bool = False) -> Path:
    """Fetch BUS-BRA from Zenodo (public, no account) into ``dest`` and return its folder.

    An existing copy under ``dest`` is reused unless ``force``. Without internet access this
    fails at once with the steps to place the folder by hand.
    """
    dest = Path(dest).expanduser()
    if (found := existing_copy(locate, dest, force)) is not None:
        return found
    api = f"https://zenodo.org/api/records/{ZENODO_RECORD}"
    try:
        with urllib.request.urlopen(api, timeout=30) as response:
            files = json.load(response)["files"]
        archives = [f for f in files if f["key"].lower().endswith(".zip")]
        if not archives:
            raise DataError(
                f"{api}: the record lists no .zip file ({[f['key'] for f in files]})\n"
                + MANUAL_STEPS.format(doi=DOI, dest=dest, env=ENV_VAR))
        dest.mkdir(parents=True, exist_ok=True)
        for entry in archives:
            _fetch_and_extract(entry, dest)
    except DataError:  # already says what is wrong (a ValueError, so it must not be re-wrapped)
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise DataError(
            f"Could not download BUS-BRA from Zenodo ({DOI}): {type(error).__name__}: "
            f"{str(error)[:200]}\n" + MANUAL_STEPS.format(doi=DOI, dest=dest, env=ENV_VAR)
        ) from error
    return locate(dest)


def _fetch_and_extract(entry: dict, dest: Path) -> None:
    """Download one archive of the record (progress bar, Zenodo's MD5 checked), then extract it
    into a hidden folder and move its contents into ``dest``: an interrupted download or
    extraction never leaves a partial ``Images/`` that :func:`locate` would accept."""
    target = dest / Path(entry["key"]).name
    partial = target.with_name(f".{target.name}.partial")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(entry["links"]["self"], timeout=60) as response, \
                open(partial, "wb") as handle, \
                progress.bar(total=entry.get("size"), desc=target.name, unit="B",
                             unit_scale=True) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                handle.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        expected = str(entry.get("checksum", "")).removeprefix("md5:")
        if expected and digest.hexdigest() != expected:
            raise DataError(f"{target.name}: MD5 {digest.hexdigest()} differs from Zenodo's "
                            f"{expected}: the download is damaged, run it again")
        os.replace(partial, target)  # a broken download never looks like a finished one
    finally:
        partial.unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=dest))
    try:
        with zipfile.ZipFile(target) as archive:
            archive.extractall(staging)
        for item in staging.iterdir():
            final = dest / item.name
            if final.is_dir():
                shutil.rmtree(final)
            os.replace(item, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_metadata(root: str | os.PathLike) -> pd.DataFrame:
    """``bus_data.csv`` checked: the columns busi uses are there, IDs are unique."""
    path = Path(root) / METADATA
    if not path.is_file():
        raise DataError(f"{path}: metadata file not found (BUS-BRA ships it beside Images/)")
    meta = pd.read_csv(io.StringIO(path.read_text()), dtype={"ID": str, "Case": str})
    missing = [c for c in ("ID", "Pathology", *METADATA_COLUMNS) if c not in meta]
    if missing:
        raise DataError(f"{path}: lacks columns {missing}")
    twice = sorted(set(meta["ID"][meta["ID"].duplicated()]))
    if twice:
        raise DataError(f"{path}: IDs listed twice: {twice}")
    return meta


def _files(folder: Path, prefix: str) -> dict[str, Path]:
    """``{image id: path}`` of the PNGs named ``<prefix>NNNN-V.png``; the id is ``bus_NNNN-V``."""
    return {"bus_" + p.stem[len(prefix):]: p for p in sorted(folder.glob(f"{prefix}*.png"))
            if not p.name.startswith(".")}


def index(root: str | os.PathLike, strict: bool = False, workers: int = 4) -> pd.DataFrame:
    """Index a BUS-BRA folder: one checked row per image, as :func:`busi.data.index` gives for
    BUSI, plus ``patient`` (``Case``), ``histology``, ``birads``, ``device`` and ``side``.

    Every problem is named by file: an image without its mask or the reverse, an image not in
    ``bus_data.csv``, a row of it without an image file, a pathology other than benign or
    malignant, a mask whose size differs from its image, an empty mask (every BUS-BRA image
    holds a lesion), an unreadable file. ``strict`` raises :class:`DataError` listing them all;
    the default warns and leaves the affected images out. Nothing is written.
    """
    root = Path(root)
    meta = read_metadata(root).set_index("ID", drop=False)
    csv = root / METADATA
    images, masks = _files(root / "Images", "bus_"), _files(root / "Masks", "mask_")
    problems: list[str] = []
    items = []
    for image_id in sorted(set(images) | set(masks) | set(meta.index)):
        image, mask = images.get(image_id), masks.get(image_id)
        mask_name = "mask_" + image_id[len("bus_"):] + ".png"
        if image is None and mask is None:
            problems.append(f"{csv}: row {image_id} has no image (Images/{image_id}.png) and no "
                            f"mask (Masks/{mask_name})")
            continue
        if image is None:
            where = "" if image_id in meta.index else f"; not in {METADATA} either"
            problems.append(f"{mask}: mask has no image (Images/{image_id}.png){where}")
            continue
        if mask is None:
            problems.append(f"{image}: image has no mask (Masks/{mask_name})")
            continue
        if image_id not in meta.index:
            problems.append(f"{image}: image not listed in {csv}")
            continue
        label = str(meta.at[image_id, "Pathology"]).strip().lower()
        if label not in LESION_LABELS:
            problems.append(f"{csv}: row {image_id} has Pathology "
                            f"{meta.at[image_id, 'Pathology']!r}; expected benign or malignant")
            continue
        items.append((image_id, label, image, [mask]))
    table = index_pairs(items, root, problems, strict=strict, workers=workers)
    extra = meta[list(METADATA_COLUMNS)].rename(columns=METADATA_COLUMNS)
    return table.join(extra, on="id")


def authors_split(
    root: str | os.PathLike,
    table: pd.DataFrame,
    fold: int,
    n_folds: int = 5,
    classes: Sequence[str] = LABELS,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> pd.DataFrame:
    """A split whose test part is fold ``fold`` of the authors' ``<n_folds>-fold-cv.csv``.

    The authors' test folds are patient-wise, but their validation columns (``valid_k``) put
    views of one patient in train and validation (210 patients in partition 1 of the 5-fold
    file), so validation is drawn here from the rest, grouped by patient and near duplicate like
    :func:`busi.data.make_split` (the fractions are of the whole, as there). A near-duplicate
    group that crosses patients and straddles the authors' test fold would leak: its images
    outside the test fold are left out, with a warning naming them (none in the published data;
    see the tests).

    Args:
        root: the BUS-BRA folder (for the CSV).
        table: its index with a ``group`` column (:func:`busi.data.add_groups`).
        fold: 1..n_folds.

    Returns:
        DataFrame with ``id``, ``label``, ``group``, ``split``, like :func:`busi.data.make_split`.
    """
    path = Path(root) / f"{n_folds}-fold-cv.csv"
    if not 1 <= fold <= n_folds:
        raise ValueError(f"fold must be in 1..{n_folds}, got {fold}")
    if not path.is_file():
        raise DataError(f"{path}: the authors' partition file is missing")
    folds = pd.read_csv(io.StringIO(path.read_text()), dtype={"ID": str})
    if not {"ID", "kFold"} <= set(folds):
        raise DataError(f"{path}: lacks columns ID and kFold")
    twice = sorted(set(folds["ID"][folds["ID"].duplicated()]))
    if twice:
        raise DataError(f"{path}: IDs listed twice: {twice}")
    table = _prepare(table, classes)
    test_fold = table["id"].map(folds.set_index("ID")["kFold"])
    missing = sorted(table.loc[test_fold.isna(), "id"])
    if missing:
        raise DataError(f"{path}: no fold for {len(missing)} image(s), e.g. {missing[:3]}")
    test = test_fold == fold
    straddling = set(table.loc[test, "group"]) & set(table.loc[~test, "group"])
    if straddling:
        _warn_left_out(path, fold, table, test, straddling)
    keep = test | ~table["group"].isin(straddling)
    table, test = table[keep].reset_index(drop=True), test[keep].reset_index(drop=True)
    return split_around_test(table, test, val_fraction, test_fraction, seed)


def _warn_left_out(
    path: Path, fold: int, table: pd.DataFrame, test: pd.Series, straddling: set
) -> None:
    """Warn, naming the images, that images grouped with test images but outside the authors'
    test fold are left out: the split is smaller than the user may expect, and they should know
    which images it lacks."""
    details = []
    for group in sorted(straddling):
        members = table["group"] == group
        inside = ", ".join(table.loc[members & test, "id"])
        outside = ", ".join(table.loc[members & ~test, "id"])
        details.append(f"{outside} (grouped with test image(s) {inside})")
    count = int((~test & table["group"].isin(straddling)).sum())
    warnings.warn(
        f"{path}: {count} image(s) outside test fold {fold} share a group with images in it (a "
        "near duplicate, or another view of that near duplicate's patient) and are left out of "
        "the split, so that no copy of a test image trains:\n  "
        + "\n  ".join(details),
        stacklevel=3,
    )
