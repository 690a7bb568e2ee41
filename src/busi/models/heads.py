"""The image-level head: is there a lesion, and is it malignant, from the U-Net's own encoder.

Masks on normal images are the error users see first, and a pixel threshold or a minimum area
cannot remove them without removing small lesions too: the decision "is there a lesion at all"
belongs to the whole image. The head pools the deepest encoder features (the input of the first
decoder block, the same for every architecture) and classifies the image as normal, benign or
malignant. It shares the encoder with the mask, costs a pooling (two with ``avgmax``) and one
dense layer, and is trained with the mask.

Targets are 4 numbers per image (:func:`label_targets`): the one-hot class scaled by its class
weight, then a flag for images whose "normal" answer is unknown. BUS-BRA has no normal images, so
a plain cross-entropy on its rows would teach the head that its scanners never show a normal
breast; flagged rows are scored on benign vs malignant only, the probability of their class
among the two lesion classes (:func:`image_label_loss`). Putting the class weight into the
target keeps the loss free of parameters, so a run resumes from ``last.h5`` with the same loss.

The model's outputs are ``[mask, label]``: ``model.predict(x)[0]`` is the mask as before, and
:func:`mask_only` gives a one-output model for code that expects one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from busi import _keras
from busi.models import backend, ops_losses

CLASSES = ("normal", "benign", "malignant")
"""The head's classes, in the order of its outputs."""

LABEL_LAYER = "label"
"""Name of the head's output layer (a float32 softmax over :data:`CLASSES`)."""

LOGITS_LAYER = "label_logits"
"""The head's dense layer: the one with weights, by which a weights file shows it has a head."""

MAX_POOL_LAYER = "label_max_pool"
"""The maximum's pooling layer of an ``avgmax`` head."""

LESION_ONLY_DATASETS = ("busbra",)
"""Datasets without normal images: their rows train benign vs malignant only."""

_EPS = 1e-7


def bottleneck(model: Any) -> Any:
    """The deepest encoder features of a busi U-Net: the input of its first decoder layer.

    Both architectures open the decoder with an upsampling of the bottleneck (``decoder_*``
    names, see :mod:`busi.models.architectures`), so this needs no per-encoder table of layer names.
    """
    for layer in model.layers:
        if layer.name.startswith("decoder_") and not isinstance(layer.input, list):
            return layer.input
    raise ValueError(f"model {model.name!r} has no decoder_* layer: not a busi U-Net")


POOLS = {"avg": "their mean", "avgmax": "their mean and their maximum"}
"""How the head may pool the deepest encoder features (``image_head_pool`` in a config), in the
words a model card uses. A lesion fills a few positions of that map (8x8 at 256x256 on a
stride-32 encoder), and the mean alone mixes their evidence with the tissue around them; the
maximum keeps the strongest."""


def add_image_head(model: Any, dropout: float = 0.2, pool: str = "avg") -> Any:
    """``model`` with a second output, ``label``: softmax over :data:`CLASSES`.

    Global pooling of :func:`bottleneck` (``pool``, one of :data:`POOLS`), dropout, one dense
    layer; the softmax in float32 under a mixed-precision policy, like the mask's sigmoid. Only
    standard layers, so the ``.h5`` loads in tf.keras and Keras 3 alike.
    """
    keras = _keras.keras()
    if len(model.outputs) != 1:
        raise ValueError(f"model {model.name!r} already has {len(model.outputs)} outputs")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {list(POOLS)}, got {pool!r}")
    features = bottleneck(model)
    x = keras.layers.GlobalAveragePooling2D(name="label_pool")(features)
    if pool == "avgmax":
        peak = keras.layers.GlobalMaxPooling2D(name=MAX_POOL_LAYER)(features)
        x = keras.layers.Concatenate(name="label_pools")([x, peak])
    if dropout:
        x = keras.layers.Dropout(dropout, name="label_dropout")(x)
    x = keras.layers.Dense(len(CLASSES), name=LOGITS_LAYER)(x)
    label = keras.layers.Activation("softmax", dtype="float32", name=LABEL_LAYER)(x)
    return keras.Model(_input(model), [model.outputs[0], label], name=model.name)


def pool_of(layer_names: Iterable[str]) -> str:
    """Which of :data:`POOLS` a head model with these layer names pools by (the maximum's
    layer has no weights, so it shows in the names, not in the weights)."""
    return "avgmax" if MAX_POOL_LAYER in set(layer_names) else "avg"


def has_image_head(model: Any) -> bool:
    """Whether ``model`` gives the image-level output besides the mask."""
    return len(model.outputs) == 2 and model.output_names[1] == LABEL_LAYER


def mask_only(model: Any) -> Any:
    """A one-output view of ``model`` (same layers, same weights) for code that wants masks."""
    if not has_image_head(model):
        return model
    keras = _keras.keras()
    return keras.Model(_input(model), model.outputs[0], name=model.name)


def _input(model: Any) -> Any:
    """The input a derived model takes: Keras 3 wants the one tensor (given the list, it expects
    a list at every call and warns); tf-keras keeps the list its saved configs were made with."""
    return model.inputs[0] if backend.is_keras3() else model.inputs


def class_weights(table: pd.DataFrame, balance: bool) -> dict[str, float]:
    """Weights of :data:`CLASSES` for the head's loss: inverse class frequency in ``table``
    (normalised to a mean of 1 over its rows) with ``balance``, else 1. BUSI has about twice as
    many benign as malignant images and few normal ones; unbalanced, the head's threshold
    drifts toward the majority class."""
    if not balance:
        return dict.fromkeys(CLASSES, 1.0)
    counts = table["label"].value_counts()
    present = [name for name in CLASSES if counts.get(name, 0)]
    raw = {name: len(table) / (len(present) * counts[name]) for name in present}
    return {name: raw.get(name, 1.0) for name in CLASSES}


def label_targets(table: pd.DataFrame, weights: Mapping[str, float] | None = None) -> np.ndarray:
    """The head's targets of ``table``'s rows, float32 (N, 4): weighted one-hot, lesion-only flag.

    Rows whose ``label`` is not a class of :data:`CLASSES` are an error naming the label.
    """
    weights = dict.fromkeys(CLASSES, 1.0) if weights is None else weights
    labels = table["label"].astype(str).to_numpy()
    unknown = sorted(set(labels) - set(CLASSES))
    if unknown:
        raise ValueError(f"image head: labels {unknown} are not among {list(CLASSES)}")
    targets = np.zeros((len(table), len(CLASSES) + 1), dtype=np.float32)
    for index, name in enumerate(CLASSES):
        targets[labels == name, index] = weights[name]
    if "dataset" in table:
        targets[:, -1] = table["dataset"].isin(LESION_ONLY_DATASETS).to_numpy()
    return targets


def image_label_loss(y_true: Any, y_pred: Any) -> Any:
    """Weighted cross-entropy of the head; flagged rows count benign vs malignant only."""
    return ops_losses.image_label_loss(y_true, y_pred)


def class_accuracy(y_true: Any, y_pred: Any) -> Any:
    """Share of images whose most probable class is their class (a training metric)."""
    return ops_losses.class_accuracy(y_true, y_pred)


def lesion_probability(probabilities: np.ndarray) -> np.ndarray:
    """P(lesion) = 1 - P(normal) of head outputs (N, 3): what the gate thresholds."""
    return 1.0 - np.asarray(probabilities, dtype=np.float64)[:, 0]


def malignancy_probability(probabilities: np.ndarray) -> np.ndarray:
    """P(malignant | lesion) of head outputs (N, 3): the benign-vs-malignant score."""
    p = np.asarray(probabilities, dtype=np.float64)
    return p[:, 2] / np.maximum(p[:, 1] + p[:, 2], _EPS)


def probability_table(names: Sequence[str], probabilities: np.ndarray) -> pd.DataFrame:
    """One row per image: its class (argmax) and the probabilities, as ``busi predict`` writes
    them beside the masks."""
    p = np.asarray(probabilities, dtype=np.float64)
    table = pd.DataFrame({"image": list(names), "class": [CLASSES[i] for i in p.argmax(axis=1)]})
    for index, name in enumerate(CLASSES):
        table[f"p_{name}"] = p[:, index]
    table["p_lesion"] = lesion_probability(p)
    table["p_malignant_given_lesion"] = malignancy_probability(p)
    return table


CUSTOM_OBJECTS = {"image_label_loss": image_label_loss, "class_accuracy": class_accuracy}
"""What a compiled ``.h5`` with the head needs to reload with its loss and metric."""
