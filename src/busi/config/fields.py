"""Type and range checks of :class:`busi.config.train_config.TrainConfig` fields, from the type
hints.

A config comes from YAML, JSON, ``--set`` or Python, and each lets through values a dataclass
does not check: ``batch_size: 2.5``, ``epochs: "two"``, a quoted ``evaluate: "no"`` (a
non-empty string, so true), ``classes: benign`` (a string, iterated letter by letter). Left to
TensorFlow they fail after the run folder exists, with a traceback, or not at all. Here every
field is checked against its annotation and a range when the config is made, and the one
message names the field, the value and what is allowed.

pydantic would do the type part, but it converts where busi wants to refuse (``"no"`` to
False, ``"2"`` to 2) and would replace the dataclass that the rest of busi and saved runs rely
on; the checks below are the few lines the hints need.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any

_INT = "an integer"
_NUMBER = "a number"

#: field -> (test, what is allowed), applied after the type check (None passes where allowed).
RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "name": (lambda v: v not in ("", ".", "..") and not set(v) & set("/\\"),
             "a plain folder name (no '/' or '\\', not empty, '.' or '..')"),
    "val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    # the test part is one of round(1 / test_fraction) grouped folds: at least 2
    "test_fraction": (lambda v: 0 < v < 1 and round(1 / v) >= 2, "in (0, 0.66]"),
    "authors_fold": (lambda v: 1 <= v <= 5, "in 1..5 (a fold of the authors' 5-fold file)"),
    "seed": (lambda v: v >= 0, ">= 0"),
    "split_seed": (lambda v: v >= 0, ">= 0"),
    "freeze_encoder_epochs": (lambda v: v >= 0, ">= 0"),
    "base_filters": (lambda v: v >= 1, ">= 1"),
    "decoder_filters": (lambda v: len(v) == 5 and min(v) >= 1,
                        "5 integers >= 1, one per decoder stage"),
    "depth": (lambda v: 1 <= v <= 8, "in [1, 8]"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "image_size": (lambda v: v >= 1, ">= 1"),
    "learning_rate": (lambda v: v > 0, "> 0"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "epochs": (lambda v: v >= 1, ">= 1"),
    "steps_per_epoch": (lambda v: v >= 1, ">= 1 (or null: one pass over the data)"),
    "early_stopping_patience": (lambda v: v >= 0, ">= 0"),
    "warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "reduce_lr_patience": (lambda v: v >= 0, ">= 0"),
    "reduce_lr_factor": (lambda v: 0 < v < 1, "in (0, 1)"),
    "min_learning_rate": (lambda v: v >= 0, ">= 0"),
    "limit": (lambda v: v >= 1, ">= 1 images per split part (or null: all)"),
    "max_minutes": (lambda v: v > 0, "> 0 (or null: no time limit)"),
    "precise_bn_batches": (lambda v: v >= 0, ">= 0"),
    "image_head_weight": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0 (or null: the optimizer's default)"),
}


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")


def _number(name: str, value: Any, integer: bool) -> int | float:
    """An int or float field's value; integral floats (2.0) pass as ints, numeric strings as
    floats (PyYAML reads ``1e-4`` without a dot as a string), nothing else converts."""
    if isinstance(value, bool):
        raise _fail(name, value, _INT if integer else _NUMBER)
    if integer:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _fail(name, value, _INT)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _fail(name, value, _NUMBER) from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(name, value, "a finite number")
    return float(value)


def check_value(name: str, hint: Any, value: Any) -> Any:
    """``value`` checked against the type hint ``hint`` of field ``name``, in its one form
    (tuples for ``tuple[str, ...]``, floats for ``float``); raises ValueError naming all three."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [arg for arg in args if arg is not type(None)]
        args = typing.get_args(hint)
    origin = typing.get_origin(hint) or hint
    if hint is bool:
        if not isinstance(value, bool):
            raise _fail(name, value, "true or false (unquoted in YAML)")
        return value
    if hint in (int, float):
        return _number(name, value, integer=hint is int)
    if hint is str:
        if isinstance(value, os.PathLike):  # data=Path(...) from Python
            return os.fspath(value)
        if not isinstance(value, str):
            raise _fail(name, value, "a string")
        return value
    if origin is tuple:
        if args and args[0] is int:
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise _fail(name, value, "a list of integers, e.g. [128, 64, 32, 16, 16]")
            return tuple(_number(name, item, integer=True) for item in value)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _fail(name, value, "a list of strings, e.g. [benign, malignant]")
        if not all(isinstance(item, str) for item in value):
            raise _fail(name, value, "a list of strings")
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(name, value, "a mapping")
        if args and args[1] is str:  # e.g. data_paths: names -> folders (saved as JSON)
            checked = {}
            for key, item in value.items():
                if isinstance(item, os.PathLike):
                    item = os.fspath(item)
                if not isinstance(key, str) or not isinstance(item, str):
                    raise _fail(name, value, "a mapping of names to strings (folders)")
                checked[key] = item
            return checked
        return value
    raise TypeError(f"no check for the type {hint} of field {name}")  # a new field's type


def check_fields(config: Any) -> None:
    """Check and normalise every field of the dataclass ``config`` in place (type, then range).

    Raises:
        ValueError: naming the first bad field, its value and what is allowed.
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = check_value(field.name, hints[field.name], getattr(config, field.name))
        if value is not None and field.name in RANGES:
            test, allowed = RANGES[field.name]
            if not test(value):
                raise _fail(field.name, value, allowed)
        setattr(config, field.name, value)
