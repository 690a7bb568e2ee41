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
    if os.environ.get("BUSI_DATA"):
        return
    skip = pytest.mark.skip(reason="set BUSI_DATA to the real BUSI dataset to run this test")
    for item in items:
        if "busi_data" in item.keywords:
            item.add_marker(skip)
