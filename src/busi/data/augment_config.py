"""How strong the training augmentation is: a plain dataclass, so configs are checked without
TensorFlow (the ops that apply it are in :mod:`busi.data.augment`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations are on and how strong they are. Ranges are ``(low, high)``.

    Defaults are mild on purpose: BUSI has ~650 training images and lesions whose shape and
    echo texture carry the diagnosis, so strong distortions would teach the wrong invariances.
    """

    flip_horizontal: bool = True
    flip_vertical: bool = False
    affine: bool = True
    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shift: float = 0.1  # fraction of image height/width
    intensity: bool = True
    brightness_range: tuple[float, float] = (0.85, 1.15)  # multiplicative gain
    contrast_range: tuple[float, float] = (0.8, 1.2)
    gamma_range: tuple[float, float] = (0.8, 1.25)  # sampled log-uniformly
    speckle: bool = True
    max_speckle_std: float = 0.1  # std of the multiplicative noise, drawn from [0, max]

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("scale_range", "brightness_range", "contrast_range", "gamma_range"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(
                    f"AugmentConfig.{name} must satisfy 0 < low <= high, got "
                    f"{getattr(self, name)!r}"
                )
        if not 0 <= self.max_rotation_deg <= 180:
            raise ValueError(
                f"AugmentConfig.max_rotation_deg must be in [0, 180], got {self.max_rotation_deg!r}"
            )
        if not 0 <= self.max_shift < 1:
            raise ValueError(f"AugmentConfig.max_shift must be in [0, 1), got {self.max_shift!r}")
        if not 0 <= self.max_speckle_std <= 1:
            raise ValueError(
                f"AugmentConfig.max_speckle_std must be in [0, 1], got {self.max_speckle_std!r}"
            )

    def _check_types(self) -> None:
        """Switches must be booleans (the string "false" is truthy) and strengths finite
        numbers; a ``(low, high)`` range may come as a list (YAML, JSON) and is stored as a
        tuple."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "bool":
                ok = isinstance(value, bool)
                wanted = "true or false"
            elif field.type == "float":
                ok = _number(value)
                wanted = "a finite number"
            else:
                ok = (isinstance(value, tuple | list) and len(value) == 2
                      and all(_number(v) for v in value))
                wanted = "two finite numbers (low, high)"
                if ok:
                    object.__setattr__(self, field.name, tuple(value))
            if not ok:
                raise ValueError(f"AugmentConfig.{field.name} must be {wanted}, got {value!r}")

    @property
    def geometric(self) -> bool:
        """Whether any geometric transform is on (else the resampling is skipped)."""
        return self.flip_horizontal or self.flip_vertical or self.affine
