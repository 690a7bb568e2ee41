"""Reading a config file: JSON or YAML as the user wrote it, with its mistakes named where
they are, and the keys of older configs turned into today's fields.

Apart from :class:`busi.config.train_config.TrainConfig`, which says what a run is: how a file
becomes a mapping (a key given twice refused rather than the last one winning unseen, a syntax error
at ``file:line:column``) and how saved run folders of earlier busi versions still load are
questions of the file, not of the settings.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)


def legacy_extra(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the ``extra`` mapping of older configs (saved by every run until
    ``devices`` became a field, ``{}`` mostly) turned into fields, so old run folders still load
    and resume. ``devices`` was the only key busi read; others are dropped with a warning."""
    if "extra" not in values:
        return values
    values = dict(values)
    extra = values.pop("extra")
    if extra is None:  # "extra:" left empty in YAML
        extra = {}
    if not isinstance(extra, dict):
        raise ValueError(f"extra must be a mapping (older configs), got {extra!r}")
    extra = dict(extra)
    if "devices" in extra:
        devices = extra.pop("devices")
        if values.get("devices") not in (None, devices):
            raise ValueError(f"devices given twice: {values['devices']!r} and extra.devices "
                             f"{devices!r}")
        values["devices"] = devices
    if extra:
        log.warning("config: extra keys %s are not used by busi; ignored", sorted(extra))
    return values


def _where(path: Path, error: Exception) -> str:
    """``file:line:column`` of a JSON or YAML syntax error (1-based, as editors count), else the
    file: PyYAML's own message names ``<unicode string>``, not the file."""
    mark = getattr(error, "problem_mark", None)  # yaml.MarkedYAMLError
    if mark is not None:
        return f"{path}:{mark.line + 1}:{mark.column + 1}"
    if hasattr(error, "lineno") and hasattr(error, "colno"):  # json.JSONDecodeError
        return f"{path}:{error.lineno}:{error.colno}"
    return str(path)


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<", resolved by the base class
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                line = first.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if line is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {line + 1})",
                    key_node.start_mark)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _unique_keys_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping: PyYAML keeps the last
    silently, so a second ``epochs:`` further down a long config would win unseen. Keys merged
    in with ``<<`` may still be overridden, as YAML intends."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _unique_keys_json(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of :func:`json.loads` that refuses a key given twice (json keeps
    the last silently)."""
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise ValueError(f"key {key!r} is given twice")
        values[key] = value
    return values


def _problem(error: Exception) -> str:
    """What a parser says is wrong, without its position (given by :func:`_where`)."""
    if getattr(error, "problem_mark", None) is not None:
        return " ".join(filter(None, (getattr(error, "context", None), error.problem)))
    return getattr(error, "msg", None) or str(error)


def read_mapping(path: Path) -> dict[str, Any]:
    """The mapping of config keys in a JSON or YAML file (YAML if it ends in .yaml/.yml), keys
    as written; a syntax error, a key given twice or a file that holds no mapping is a
    ValueError naming the file (and the line and column where the parser stopped)."""
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            values = _unique_keys_yaml(text) or {}
        else:
            values = json.loads(text, object_pairs_hook=_unique_keys_json)
    except (ValueError, yaml.YAMLError) as error:
        raise ValueError(f"{_where(path, error)}: not valid {path.suffix[1:].upper()}: "
                         f"{_problem(error)}") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return values


__all__ = ["legacy_extra", "read_mapping"]
