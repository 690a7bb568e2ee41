"""Exact and near-duplicate images, grouped so that no group straddles train and test.

BUSI holds one exact duplicate across classes (``benign (433)`` is pixel-identical to
``malignant (145)``) and many near duplicates: the same scan saved with and without calliper
marks or text, or two frames a moment apart (Pawłowska et al., Data in Brief 2023). A random
image-level split leaks them between train and test and inflates scores.

Near duplicates are found with a DCT perceptual hash (63 bits: the 8x8 lowest frequencies of a
32x32 thumbnail, DC left out, each bit "above the median"). Threshold: a Hamming distance of at
most 8 bits. Calibrated by eye on BUSI: pairs at distance <= 8 all showed the same scan (often
one with markers), at 10 about a third did, at 12 and more none did. At 8, BUSI has 215 close
pairs in 602 groups, the largest of 7 images. A wrongly joined pair only costs a little split
flexibility; a missed one leaks, so the threshold errs on the joining side.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

NEAR_DUPLICATE_BITS = 8


def perceptual_hash(image: np.ndarray) -> str:
    """DCT perceptual hash of a gray image as 16 hex digits (63 significant bits)."""
    small = cv2.resize(image.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8].flatten()[1:]
    bits = np.concatenate([[False], low > np.median(low)])
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def _hash_bits(hashes: pd.Series) -> np.ndarray:
    values = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
    return np.unpackbits(values.view(np.uint8).reshape(-1, 8), axis=1).astype(bool)


def duplicate_pairs(
    table: pd.DataFrame, max_distance: int = NEAR_DUPLICATE_BITS
) -> pd.DataFrame:
    """All pairs of images that are exact or near duplicates.

    Returns:
        DataFrame with ``id_a``, ``id_b``, ``label_a``, ``label_b``, ``distance`` (Hamming bits of
        the perceptual hash) and ``exact`` (identical pixels), sorted by distance.
    """
    bits = _hash_bits(table["phash"])
    distance = (bits[:, None, :] != bits[None, :, :]).sum(axis=2)
    hashes = table["hash"].to_numpy()
    exact = hashes[:, None] == hashes[None, :]
    close = (distance <= max_distance) | exact
    a, b = np.nonzero(np.triu(close, k=1))
    pairs = pd.DataFrame({
        "id_a": table["id"].to_numpy()[a], "id_b": table["id"].to_numpy()[b],
        "label_a": table["label"].to_numpy()[a], "label_b": table["label"].to_numpy()[b],
        "distance": distance[a, b], "exact": exact[a, b],
    })
    return pairs.sort_values(["distance", "id_a", "id_b"], kind="stable").reset_index(drop=True)


def add_groups(table: pd.DataFrame, max_distance: int = NEAR_DUPLICATE_BITS) -> pd.DataFrame:
    """Copy of ``table`` with a ``group`` column: images linked by duplicate pairs share a group.

    Groups are connected components (A~B and B~C puts A, B, C together), numbered in table order,
    so the numbering is reproducible for the same data. When the table has a ``patient`` column
    (a dataset with several images per patient, such as BUS-BRA), the images of one patient are
    linked too: a patient's other views are as much a leak as a near duplicate. Rows without a
    patient (NaN) are linked by their duplicates only.
    """
    pairs = duplicate_pairs(table, max_distance)
    position = {image_id: i for i, image_id in enumerate(table["id"])}
    rows = pairs["id_a"].map(position).to_numpy()
    cols = pairs["id_b"].map(position).to_numpy()
    if "patient" in table:
        rows, cols = _link_patients(table["patient"], rows, cols)
    n = len(table)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    _, first_seen = np.unique(component, return_index=True)
    renumber = {component[i]: g for g, i in enumerate(sorted(first_seen))}
    grouped = table.copy()
    grouped["group"] = [renumber[c] for c in component]
    return grouped


def _link_patients(
    patients: pd.Series, rows: np.ndarray, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Add an edge from each image to the first image of its patient."""
    codes = pd.factorize(patients, use_na_sentinel=True)[0]
    known = np.flatnonzero(codes >= 0)
    _, first = np.unique(codes[known], return_index=True)
    anchor = known[first][np.searchsorted(np.unique(codes[known]), codes[known])]
    return np.concatenate([rows, known]), np.concatenate([cols, anchor])


def conflicting_groups(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of the duplicate groups whose images carry more than one label."""
    if "group" not in table:
        table = add_groups(table)
    labels_per_group = table.groupby("group")["label"].transform("nunique")
    return table[labels_per_group > 1]


def drop_conflicts(table: pd.DataFrame) -> pd.DataFrame:
    """Leave out every image of a duplicate group with conflicting labels.

    The same scan filed as benign and as malignant cannot be right twice, and keeping either copy
    would be a guess; papers that audit BUSI drop both.
    """
    if "group" not in table:
        table = add_groups(table)
    return table.drop(index=conflicting_groups(table).index).reset_index(drop=True)
