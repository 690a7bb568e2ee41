"""Shared fixtures: a tiny synthetic BUSI-like folder with the real dataset's quirks, and access
to the real BUSI data when ``BUSI_DATA`` is set (those tests are skipped otherwise)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

import busi  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any test imports TensorFlow)

# (class, number, height, width, lesion?, colour image?) for the synthetic dataset
_SHAPES = {"benign": 10, "malignant": 6, "normal": 5}


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smoothed noise: every synthetic image gets its own perceptual hash."""
    noise = rng.random((height // 4 + 1, width // 4 + 1)).astype(np.float32)
    big = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(60 + 150 * big, 0, 255).astype(np.uint8)


def _lesion(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    centre = (int(rng.integers(width // 3, 2 * width // 3)),
              int(rng.integers(height // 3, 2 * height // 3)))
    axes = (int(rng.integers(3, width // 5)), int(rng.integers(3, height // 5)))
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 255, -1)
    return mask


def write_busi_like(root: Path, seed: int = 0) -> Path:
    """Write a small BUSI-like folder (``root/Dataset_BUSI_with_GT``) and return its root.

    Quirks of the real data reproduced here: masks as 1-bit, 8-bit gray, RGB and RGBA PNG;
    images with two and three masks; colour images with a coloured overlay; empty normal masks;
    odd and varying sizes; an exact duplicate across classes (``malignant (6)`` is
    ``benign (10)``).
    """
    rng = np.random.default_rng(seed)
    base = root / "Dataset_BUSI_with_GT"
    saved = {}
    for label, count in _SHAPES.items():
        folder = base / label
        folder.mkdir(parents=True)
        for number in range(1, count + 1):
            stem = f"{label} ({number})"
            height, width = int(rng.integers(37, 61)), int(rng.integers(41, 77))
            if label == "malignant" and number == 6:
                image, mask = saved["benign (10)"]
            else:
                image = _texture(rng, height, width)
                mask = np.zeros_like(image) if label == "normal" else _lesion(rng, height, width)
                image[mask > 0] //= 3  # lesions are dark
            saved[stem] = (image, mask)
            if label == "malignant" and number == 2:  # colour image with a coloured overlay
                colour = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
                cv2.line(colour, (0, 0), (width - 1, height - 1), (0, 255, 255), 1)
                cv2.imwrite(str(folder / f"{stem}.png"), colour)
            else:
                cv2.imwrite(str(folder / f"{stem}.png"), image)
            _write_masks(folder, stem, label, number, mask, rng)
    return base


def _write_masks(folder: Path, stem: str, label: str, number: int, mask: np.ndarray,
                 rng: np.random.Generator) -> None:
    if label == "normal":  # BUSI stores normal masks as empty RGB images
        cv2.imwrite(str(folder / f"{stem}_mask.png"), cv2.cvtColor(mask, cv2.COLOR_GRAY2BGR))
        return
    if label == "benign" and number in (2, 3):  # two or three masks: one lesion each
        parts = [mask.copy()]
        extra = _lesion(rng, *mask.shape)
        parts.append(extra)
        if number == 3:
            parts.append(_lesion(rng, *mask.shape))
        cv2.imwrite(str(folder / f"{stem}_mask.png"), parts[0])
        rgba = np.dstack([extra, extra, extra, np.full_like(extra, 255)])
        cv2.imwrite(str(folder / f"{stem}_mask_1.png"), rgba)  # RGBA, opaque alpha
        if number == 3:
            cv2.imwrite(str(folder / f"{stem}_mask_2.png"), parts[2])
        return
    if number % 2:  # 1-bit PNG, like most of BUSI
        cv2.imwrite(str(folder / f"{stem}_mask.png"), mask, [cv2.IMWRITE_PNG_BILEVEL, 1])
    else:
        cv2.imwrite(str(folder / f"{stem}_mask.png"), cv2.cvtColor(mask, cv2.COLOR_GRAY2BGR))


@pytest.fixture(scope="session")
def busi_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the synthetic BUSI-like dataset (read only: tests must not change it)."""
    return write_busi_like(tmp_path_factory.mktemp("busi"))


@pytest.fixture(scope="session")
def busi_table(busi_folder: Path):
    """Index of the synthetic dataset."""
    return busi.data.index(busi_folder, strict=True)


@pytest.fixture(scope="session")
def real_root() -> Path:
    """Root of the real BUSI dataset; the test is skipped unless BUSI_DATA is set."""
    if not os.environ.get("BUSI_DATA"):
        pytest.skip("set BUSI_DATA to the real BUSI dataset to run this test")
    return busi.data.locate(os.environ["BUSI_DATA"])


@pytest.fixture(scope="session")
def real_table(real_root: Path):
    """Index of the real BUSI dataset (strict: the real data must index cleanly)."""
    return busi.data.index(real_root, strict=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker, variable, name in (("busi_data", "BUSI_DATA", "BUSI"),
                                   ("busbra_data", "BUSBRA_DATA", "BUS-BRA")):
        if os.environ.get(variable):
            continue
        skip = pytest.mark.skip(reason=f"set {variable} to the real {name} dataset to run this "
                                       "test")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


def write_busbra_like(root: Path, patients: int = 12, seed: int = 1) -> Path:
    """Write a small BUS-BRA-like folder (``root/BUS-BRA``: ``Images/``, ``Masks/``,
    ``bus_data.csv``, ``5-fold-cv.csv``) and return it.

    Patients alternate benign and malignant; every third has three views (l, r, s), the others
    two. Masks are 1-bit PNGs as in the published data. ``bus_0003-l`` is ``bus_0001-l`` with a
    few pixels changed: a near duplicate across patients (both benign). The 5-fold file assigns
    patient k to test fold ``k % 5 + 1``.
    """
    rng = np.random.default_rng(seed)
    base = root / "BUS-BRA"
    (base / "Images").mkdir(parents=True)
    (base / "Masks").mkdir()
    meta, folds = [], []
    first = None
    for case in range(1, patients + 1):
        label = "benign" if case % 2 else "malignant"
        for view in ("l", "r", "s")[: 3 if case % 3 == 0 else 2]:
            image_id = f"bus_{case:04d}-{view}"
            height, width = int(rng.integers(40, 56)), int(rng.integers(44, 64))
            image = _texture(rng, height, width)
            mask = _lesion(rng, height, width)
            image[mask > 0] //= 3
            if image_id == "bus_0001-l":
                first = (image.copy(), mask.copy())
            if image_id == "bus_0003-l":
                image, mask = first[0].copy(), first[1].copy()
                image[:2, :2] = 255
                height, width = image.shape
            cv2.imwrite(str(base / "Images" / f"{image_id}.png"), image)
            cv2.imwrite(str(base / "Masks" / f"mask_{case:04d}-{view}.png"), mask,
                        [cv2.IMWRITE_PNG_BILEVEL, 1])
            meta.append(f"{image_id},{case},fibroadenoma,{label},4,GE Logiq 7,{width},{height},"
                        f"{dict(l='left', r='right', s='left')[view]},\"[1,2,3,4]\"")
            folds.append(f"{image_id},{label},{case % 5 + 1},1,1,1,0,NaN")
    (base / "bus_data.csv").write_text(
        "ID,Case,Histology,Pathology,BIRADS,Device,Width,Height,Side,BBOX\n"
        + "\n".join(meta) + "\n")
    (base / "5-fold-cv.csv").write_text(
        "ID,Pathology,kFold,valid_1,valid_2,valid_3,valid_4,valid_5\n" + "\n".join(folds) + "\n")
    return base


@pytest.fixture(scope="session")
def busbra_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the synthetic BUS-BRA-like dataset (read only)."""
    return write_busbra_like(tmp_path_factory.mktemp("busbra"))
