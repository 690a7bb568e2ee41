"""A config's settings grouped by component: what data, which model, how it is optimised, and
where and how long it runs.

Config files and the ``config`` of published sidecars are written in these sections
(:func:`nest`); a reader takes them or the flat one-level form that run folders and sidecars of
earlier busi versions hold, and that ``--set NAME=VALUE`` and Python keyword arguments use
(:func:`flatten`), so old runs still load and resume. Inside busi a config stays one
:class:`~busi.config.train_config.TrainConfig` with a field per setting: sections are how a file
reads, not another object to pass around.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TOP = ("name", "seed")
"""Settings of the run as a whole, kept at the top of a file."""

SECTIONS: dict[str, tuple[str, ...]] = {
    "data": ("datasets", "root", "data_paths", "authors_fold", "split_file", "split_seed",
             "classes", "train_classes", "drop_conflicts", "val_fraction", "test_fraction",
             "image_size", "resize", "augment", "augmentation", "limit"),
    "model": ("architecture", "encoder", "encoder_weights", "init_weights", "decoder_filters",
              "base_filters", "depth", "dropout", "image_head", "image_head_weight",
              "image_head_balance", "image_head_pool"),
    "optimisation": ("loss", "optimizer", "learning_rate", "weight_decay", "batch_size",
                     "epochs", "steps_per_epoch", "freeze_encoder_epochs", "lr_schedule",
                     "warmup_epochs", "reduce_lr_patience", "reduce_lr_factor",
                     "min_learning_rate", "early_stopping_patience", "monitor", "keep",
                     "precise_bn_batches"),
    "runtime": ("run_dir", "backend", "mixed_precision", "jit_compile", "devices", "deterministic",
                "max_minutes", "evaluate"),
}
"""Section -> its keys, in the order a file lists them."""

RENAMED = {"root": "data"}
"""Section keys whose field has another name: the dataset root is the field ``data``, which as a
section name means the whole data section."""

_FIELD = {key: RENAMED.get(key, key) for keys in SECTIONS.values() for key in keys}
_SECTION_OF = {field: section for section, keys in SECTIONS.items()
               for field in (RENAMED.get(key, key) for key in keys)}


def fields() -> tuple[str, ...]:
    """Every field the sections and the top level name."""
    return TOP + tuple(_FIELD.values())


def is_sectioned(values: Mapping[str, Any]) -> bool:
    """Whether ``values`` uses sections: it has a section key other than ``data``, or ``data``
    holds a mapping (the flat ``data`` is a folder or None)."""
    return (any(section in values for section in SECTIONS if section != "data")
            or isinstance(values.get("data"), Mapping))


def flatten(values: Mapping[str, Any]) -> dict[str, Any]:
    """One flat mapping of fields from a sectioned or a flat (older, ``--set``) mapping.

    Keys outside any section are passed on as they are (the config names unknown ones). A key
    given in a section and flat, or in the wrong section, is an error that says where it
    belongs.
    """
    if not is_sectioned(values):
        return dict(values)
    flat = {key: value for key, value in values.items() if key not in SECTIONS}
    for key, value in values.items():
        if key not in SECTIONS or value is None:  # "model:" left empty in YAML
            continue
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a mapping of {key} settings, got {value!r}")
        for inner, setting in value.items():
            if inner not in SECTIONS[key]:
                home = _SECTION_OF.get(RENAMED.get(inner, inner))
                where = (f"; {inner} belongs in {home}" if home
                         else f"; {inner} is a top-level key" if inner in TOP else "")
                raise ValueError(f"unknown {key} key {inner!r}{where}; known {key} keys: "
                                 f"{', '.join(SECTIONS[key])}")
            field = _FIELD[inner]
            if field in flat:
                raise ValueError(f"{key}.{inner} is given twice: in its section and as "
                                 f"{field!r} outside it")
            flat[field] = setting
    return flat


def nest(flat: Mapping[str, Any], leave_out: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The sectioned form of a flat mapping of fields, without the fields in ``leave_out``
    (options of components the config does not use) and without empty sections."""
    nested: dict[str, Any] = {key: flat[key] for key in TOP if key in flat}
    for section, keys in SECTIONS.items():
        part = {key: flat[_FIELD[key]] for key in keys
                if _FIELD[key] in flat and _FIELD[key] not in leave_out}
        if part:
            nested[section] = part
    nested.update({key: value for key, value in flat.items()
                   if key not in _SECTION_OF and key not in TOP})
    return nested


__all__ = ["SECTIONS", "TOP", "fields", "flatten", "is_sectioned", "nest"]
