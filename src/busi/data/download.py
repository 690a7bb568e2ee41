"""Getting BUSI onto disk and finding it again, wherever the user put it.

The dataset is Al-Dhabyani et al., "Dataset of breast ultrasound images", Data in Brief 28 (2020),
as mirrored on Kaggle (``aryashah2k/breast-ultrasound-images-dataset``, public, no credentials).
The unzipped download nests ``Dataset_BUSI_with_GT`` inside a folder of the same name, users
place it by hand in other ways, and CI points ``BUSI_DATA`` at a shared copy: :func:`locate`
accepts all of these.
"""

from __future__ import annotations

import inspect
import os
import textwrap
from pathlib import Path

from busi.data.index import LABELS
from busi.errors import DataError
from busi.utils.paths import DATA_DIR, existing_copy, search_roots

KAGGLE_HANDLE = "aryashah2k/breast-ultrasound-images-dataset"
FOLDER_NAME = "Dataset_BUSI_with_GT"
ENV_VAR = "BUSI_DATA"
DEFAULT_DEST = DATA_DIR / "raw"

MANUAL_STEPS = (
    "Download it by hand from https://www.kaggle.com/datasets/{handle} (or the original site of "
    "Al-Dhabyani et al.), unzip it, and either put the {folder} folder under {dest} or set the "
    "environment variable {env} to its path."
)


def _is_root(folder: Path) -> bool:
    return sum((folder / c).is_dir() for c in LABELS) >= 2


def _candidates(path: Path) -> list[Path]:
    """The folder itself, the folder named Dataset_BUSI_with_GT below it, and the nested copy."""
    found = [path, path / FOLDER_NAME, path / FOLDER_NAME / FOLDER_NAME]
    if path.is_dir():
        found += sorted(p for p in path.glob(f"*/{FOLDER_NAME}") if p.is_dir())
        found += sorted(p for p in path.glob(f"*/*/{FOLDER_NAME}") if p.is_dir())
    return found


def locate(path: str | os.PathLike | None = None) -> Path:
    """Return the ``Dataset_BUSI_with_GT`` folder (the one holding ``benign/`` etc.).

    Args:
        path: the folder itself, a parent of it, or the unzipped Kaggle download. When None,
            ``$BUSI_DATA`` is tried, then ``data/raw`` and ``data`` of the project.

    Raises:
        DataError: naming every place looked at.
    """
    starts = search_roots(path, ENV_VAR, DEFAULT_DEST)
    looked = []
    for start in starts:
        for candidate in _candidates(start):
            looked.append(candidate)
            if candidate.is_dir() and _is_root(candidate):
                return candidate.resolve()
    places = "\n  ".join(str(p) for p in dict.fromkeys(looked))
    raise DataError(
        f"BUSI not found. Looked for folders benign/, malignant/, normal/ in:\n  {places}\n"
        + MANUAL_STEPS.format(
            handle=KAGGLE_HANDLE, folder=FOLDER_NAME, dest=DEFAULT_DEST, env=ENV_VAR
        )
        + " Or call busi.data.download() / `busi download` with internet access."
    )


def download(dest: str | os.PathLike = DEFAULT_DEST, force: bool = False) -> Path:
    """Fetch BUSI from Kaggle with kagglehub into ``dest`` and return its root folder.

    An existing copy under ``dest`` is reused unless ``force``. Needs internet access to Kaggle
    (no account needed, the dataset is public); without it this fails at once with the steps to
    place the folder by hand.
    """
    dest = Path(dest).expanduser()
    if (found := existing_copy(locate, dest, force)) is not None:
        return found
    import kagglehub  # start-up: ~0.3 s, and busi.data imports this module

    kwargs = {"force_download": force}
    if "output_dir" in inspect.signature(kagglehub.dataset_download).parameters:
        kwargs["output_dir"] = str(dest)  # older kagglehub only downloads to its cache
    try:
        downloaded = Path(kagglehub.dataset_download(KAGGLE_HANDLE, **kwargs))
    except Exception as error:  # kagglehub raises requests, OS and its own errors alike
        raise DataError(
            f"Could not download BUSI from Kaggle ({KAGGLE_HANDLE}): "
            f"{type(error).__name__}: {textwrap.shorten(str(error), 400, placeholder=' ...')}\n"
            + MANUAL_STEPS.format(
                handle=KAGGLE_HANDLE, folder=FOLDER_NAME, dest=dest, env=ENV_VAR
            )
        ) from error
    return locate(downloaded)
