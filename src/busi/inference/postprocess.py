"""Post-processing: from a probability map to the delivered mask.

:class:`PostProcess` holds the settings (threshold, flip TTA, small-component removal, keep the
largest component, the image-level gate) and their defaults, once: evaluation, ``busi predict``,
the run's figures and published sidecars all read and write it, so a mask scored and a mask
delivered come from the same rule. Its dict form (:meth:`PostProcess.to_dict`) is what
``postprocess.json``, the ``postprocess`` entry of ``summary.json`` and weight sidecars hold.
How the settings are chosen (on validation only) is evaluation's part:
:mod:`busi.evaluation.postprocess_choice`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class PostProcess:
    """How a probability map becomes a mask; the defaults are what an unevaluated model gets.

    Attributes:
        threshold: a pixel is lesion if its probability is strictly greater (as in
            segmentation-models' metrics); in [0, 1].
        tta: predict the mirrored image too and average the maps. It acts at prediction time
            (:func:`busi.inference.predictor.predict_images`), so :meth:`apply` does not see it.
        min_component_fraction: connected components (8-connected) smaller than this fraction
            of the image's area are removed (isolated false-positive specks, mostly on normal
            images); in [0, 1), 0 keeps every component.
        keep_largest: keep only the largest remaining component (the first of equal largest
            ones). Most BUSI images show one lesion; this trades the rare second lesion for fewer
            false positives, so it is only used if validation says so.
        gate: an image whose lesion probability (from the model's image-level head,
            :mod:`busi.models.heads`) is below this gets an empty mask; in [0, 1], 0 is no gate.
            Chosen on validation by :func:`busi.evaluation.classification.choose_gate`.
    """

    threshold: float = 0.5
    tta: bool = False
    min_component_fraction: float = 0.0
    keep_largest: bool = False
    gate: float = 0.0

    def __post_init__(self) -> None:
        # the types JSON gives back are the types written: 1 and 1.0 are one threshold
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "tta", bool(self.tta))
        object.__setattr__(self, "min_component_fraction", float(self.min_component_fraction))
        object.__setattr__(self, "keep_largest", bool(self.keep_largest))
        object.__setattr__(self, "gate", float(self.gate))
        if not 0.0 <= self.gate <= 1.0:
            raise ValueError(f"gate must be in [0, 1], got {self.gate}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.min_component_fraction < 1.0:
            raise ValueError(
                f"min_component_fraction must be in [0, 1), got {self.min_component_fraction}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The keys of the dict form, in the order files hold them."""
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def required_keys(cls) -> tuple[str, ...]:
        """The keys a saved choice must hold: all but ``gate``, which records made before the
        image-level head lack (no gate, the default)."""
        return tuple(key for key in cls.keys() if key != "gate")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> PostProcess:
        """The settings in ``postprocess.json``, a summary's ``postprocess`` or a sidecar: other
        keys there (the weights' SHA-1, validation scores, ...) are ignored, missing ones take
        the defaults; None is the defaults."""
        values = values or {}
        return cls(**{key: values[key] for key in cls.keys() if key in values})

    def to_dict(self) -> dict[str, Any]:
        """``{"threshold", "tta", "min_component_fraction", "keep_largest"}``, as files hold it,
        and ``gate`` when one is set: the records of models without the image-level head stay
        as they were, and compare equal to those written before the gate existed."""
        values = dataclasses.asdict(self)
        if not self.gate:
            del values["gate"]
        return values

    def override(self, **changes: Any) -> PostProcess:
        """A copy with the settings given changed; None leaves a setting as it is (an option
        the user did not set keeps the value chosen on validation)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def apply(self, prob: np.ndarray, lesion_probability: float | None = None) -> np.ndarray:
        """uint8 ``(H, W)`` mask in {0, 1} of a ``(H, W)`` or ``(H, W, 1)`` probability map (a
        {0, 1} mask works too); with a ``gate``, empty when the image's ``lesion_probability``
        (required then) is below it."""
        prob = np.asarray(prob)
        if prob.ndim == 3 and prob.shape[-1] == 1:
            prob = prob[..., 0]
        if prob.ndim != 2:
            raise ValueError(f"prob must be (H, W) or (H, W, 1), got shape {prob.shape}")
        if self.gate > 0:
            if lesion_probability is None:
                raise ValueError(f"gate {self.gate} set, but no lesion probability given: the "
                                 "gate needs a model with the image-level head")
            if lesion_probability < self.gate:
                return np.zeros(prob.shape, np.uint8)
        mask = (prob > self.threshold).astype(np.uint8)
        if (self.min_component_fraction > 0 or self.keep_largest) and mask.any():
            count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            areas = stats[1:, cv2.CC_STAT_AREA]
            keep = areas >= self.min_component_fraction * mask.size
            if self.keep_largest and keep.any():
                largest = int(np.argmax(np.where(keep, areas, -1)))
                keep = np.zeros_like(keep)
                keep[largest] = True
            lookup = np.zeros(count, np.uint8)
            lookup[1:] = keep
            mask = lookup[labels]
        return mask


__all__ = ["PostProcess"]
