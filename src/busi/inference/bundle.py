"""The model record: what prediction needs to use a model file as it was evaluated, tied to the
file's very bytes.

A ``.h5`` (or its ``.tflite``/``.onnx`` export) alone does not say how it was evaluated: the
threshold and flip TTA chosen on validation, the component rules, the input size and resize
mode it was trained with. Used without them its masks are not the masks that were scored; used
with the settings of other weights (a file damaged or replaced since), they are wrong without a
sign. So each model file is read through one :class:`ModelRecord`, which holds those settings
and the digest of every file it covers, and a file whose digest differs from its record is
refused before any of its bytes reach TensorFlow or LiteRT (:func:`settings_for`), unless the
user says to go on (``verify=False``, ``--skip-digest-check``; the check itself is
:mod:`busi.utils.digests`).

Where records are:

- published weights (:mod:`busi.inference.publish`): ``<name>.json`` beside ``<name>.h5`` and its
exports
  (``<name>.int8.tflite``); the record names each file it covers, so a file is matched to a
  record by name and digest, never by its name alone;
- a run folder's weights: ``state.json`` holds the SHA-256 training wrote for ``best.h5`` and
  ``last.h5``, and evaluation writes the record of the weights it evaluated
  (``evaluation[/<stem>]/postprocess.json``). A record made for earlier weights of the run
  (training went on) is not used: the weights get the run's input size and resize mode and the
  default post-processing until they are evaluated.

Versions: 1 is the sidecar busi wrote before records had a version (flat keys, SHA-1 of the
weights in ``model_sha1`` and of each export in ``exports``); 2 adds ``version``, ``files``
(SHA-1 and SHA-256 of every file covered) and ``classes``, and still writes ``model_sha1`` and
``exports`` so that a busi reading version 1 finds its settings. Both are read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from busi.config import sections
from busi.errors import DataError
from busi.inference.postprocess import PostProcess
from busi.runs.evaluations import POSTPROCESS_FILE, evaluation_dir
from busi.runs.folder import RunFolder
from busi.utils.atomic import atomic_write_text, json_ready
from busi.utils.digests import FileDigest, report_mismatch, verify_default

log = logging.getLogger(__name__)

VERSION = 2
"""The record version this busi writes; it reads every version up to it."""

INPUT_CONVENTION = ("gray image replicated to 3 channels, float32 in [0, 255]; output: lesion "
                    "probability (sigmoid), float32")
"""What every busi model takes and gives (:mod:`busi.models.architectures`), as records state it."""

RESIZES = ("letterbox", "stretch")


def _text(values: Mapping[str, Any], key: str, source: Path | str, required: bool = True
          ) -> str | None:
    value = values.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise DataError(f"{source}: {key!r} must be a non-empty string, got {value!r}; not a "
                        "model record written by busi")
    return value


def _digest(value: Any, name: str, source: Path | str) -> FileDigest:
    if isinstance(value, str):
        value = {"sha1": value}
    if not isinstance(value, Mapping) or not (value.get("sha1") or value.get("sha256")):
        raise DataError(f"{source}: the digest of {name!r} must hold 'sha1' or 'sha256', got "
                        f"{value!r}")
    for key in ("sha1", "sha256"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise DataError(f"{source}: {key} of {name!r} must be a hex string")
    return FileDigest(value.get("sha1"), value.get("sha256"))


#: Keys the record reads into fields; every other key is provenance, kept as written.
_FIELDS = frozenset({"version", "model", "model_sha1", "files", "exports", "image_size",
                     "resize", "input", "classes", "chosen_on", *PostProcess.keys()})


@dataclass(frozen=True)
class ModelRecord:
    """Everything prediction needs to use the files of one model as they were evaluated.

    Attributes:
        model: the weights file's name (``X.h5``).
        files: the digests of every file the record covers: the weights and their exports.
        image_size: the side of the square model input (None: not recorded, take the model's).
        resize: how images are fitted to it: "letterbox" or "stretch".
        postprocess: how probabilities become masks.
        chosen_on: where the post-processing was chosen ("val"); None: defaults, not chosen.
        classes: the image classes of the data the model was trained on.
        input: the input and output convention of the files.
        provenance: the rest (training config, metrics, run weights, dataset fingerprint, code
            commit, ...), kept as written.
        version: the format version it was read from, :data:`VERSION` when written.
    """

    model: str
    files: Mapping[str, FileDigest]
    image_size: int | None = None
    resize: str = "letterbox"
    postprocess: PostProcess = field(default_factory=PostProcess)
    chosen_on: str | None = None
    classes: tuple[str, ...] | None = None
    input: str = INPUT_CONVENTION
    provenance: Mapping[str, Any] = field(default_factory=dict)
    version: int = VERSION

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: Path | str = "record") -> ModelRecord:
        """A record from its JSON form, any version up to :data:`VERSION`.

        Raises:
            DataError: a missing or malformed field, or a newer version; ``source`` is named.
        """
        if not isinstance(values, Mapping):
            raise DataError(f"{source}: a model record is a JSON object")
        version = values.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise DataError(f"{source}: 'version' must be a positive integer, got {version!r}")
        if version > VERSION:
            raise DataError(f"{source}: record version {version} was written by a newer busi "
                            f"(this one reads up to {VERSION}); update busi")
        model = _text(values, "model", source)
        if version == 1:
            files = {model: _digest(values.get("model_sha1"), model, source)}
            exports = values.get("exports") or {}
            if not isinstance(exports, Mapping):
                raise DataError(f"{source}: 'exports' must map file names to SHA-1 digests")
            files.update({name: _digest(sha1, name, source) for name, sha1 in exports.items()})
        else:
            listed = values.get("files")
            if not isinstance(listed, Mapping) or model not in listed:
                raise DataError(f"{source}: 'files' must map file names to digests and list "
                                f"the model {model!r}")
            files = {str(name): _digest(value, name, source) for name, value in listed.items()}
        size = values.get("image_size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)
                                 or size < 1):
            raise DataError(f"{source}: 'image_size' must be a positive integer, got {size!r}")
        resize = values.get("resize", "letterbox")
        if resize not in RESIZES:
            raise DataError(f"{source}: 'resize' must be one of {RESIZES}, got {resize!r}")
        try:
            post = PostProcess.from_dict(values)
        except (TypeError, ValueError) as error:
            raise DataError(f"{source}: post-processing: {error}") from error
        classes = values.get("classes")
        if classes is None and isinstance(values.get("config"), Mapping):
            classes = sections.flatten(values["config"]).get("classes")
        if classes is not None and (not isinstance(classes, (list, tuple))
                                    or not all(isinstance(c, str) for c in classes)):
            raise DataError(f"{source}: 'classes' must be a list of class names")
        return cls(
            model=model, files=files, image_size=size, resize=resize, postprocess=post,
            chosen_on=_text(values, "chosen_on", source, required=False),
            classes=None if classes is None else tuple(classes),
            input=_text(values, "input", source, required=False) or INPUT_CONVENTION,
            provenance={k: v for k, v in values.items() if k not in _FIELDS},
            version=version,
        )

    @classmethod
    def read(cls, path: str | os.PathLike) -> ModelRecord:
        """The record in ``path``; DataError naming the file if it is not valid JSON or not a
        record."""
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: not a valid JSON model record: {error}") from error
        return cls.from_dict(values, path)

    def to_dict(self) -> dict[str, Any]:
        """The version-2 JSON form (with the version-1 keys ``model_sha1`` and ``exports``)."""
        weights = self.files.get(self.model, FileDigest())
        return {
            **self.postprocess.to_dict(),
            "chosen_on": self.chosen_on,
            "model": self.model,
            "model_sha1": weights.sha1,
            "version": VERSION,
            "files": {name: digest.to_dict() for name, digest in self.files.items()},
            "image_size": self.image_size,
            "resize": self.resize,
            "input": self.input,
            "classes": None if self.classes is None else list(self.classes),
            **self.provenance,
            "exports": {name: digest.sha1 for name, digest in self.files.items()
                        if name != self.model},
        }

    def write(self, path: str | os.PathLike) -> Path:
        """Write the record to ``path`` atomically."""
        atomic_write_text(path, json.dumps(json_ready(self.to_dict()), indent=2) + "\n")
        return Path(path)

    def covers(self, name: str) -> FileDigest | None:
        """The recorded digests of the file named ``name``, or None if the record does not
        cover it."""
        return self.files.get(name)

    def with_file(self, path: str | os.PathLike) -> ModelRecord:
        """The record also covering the file at ``path`` (an export), by its current bytes."""
        path = Path(path)
        return replace(self, files={**self.files, path.name: FileDigest.of(path)})


def record_candidates(model_path: Path) -> list[Path]:
    """The JSON files that may be the record of a published file: ``X.json`` for ``X.h5``, and
    for an export ``X.int8.tflite`` also ``X.int8.json`` then ``X.json``. Only one that lists
    the file by name is its record (:func:`published_record`)."""
    names = model_path.name.split(".")
    return [model_path.with_name(".".join(names[:end]) + ".json")
            for end in range(len(names) - 1, 0, -1)]


def published_record(model_path: str | os.PathLike) -> tuple[Path, ModelRecord] | None:
    """The record beside ``model_path`` that lists it (see :func:`record_candidates`), or None.

    A JSON file there that is not a model record (no ``model`` key) is passed over; one that
    is, but is damaged, is an error naming it.
    """
    model_path = Path(model_path)
    for candidate in record_candidates(model_path):
        if not candidate.is_file():
            continue
        try:
            values = json.loads(candidate.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise DataError(f"{candidate}: the record of {model_path.name} is not valid JSON: "
                            f"{error}") from error
        if not isinstance(values, Mapping) or "model" not in values:
            continue
        record = ModelRecord.from_dict(values, candidate)
        if record.covers(model_path.name) is not None:
            return candidate, record
    return None


@dataclass(frozen=True)
class ModelSettings:
    """How a model file is used, and what vouches for it.

    Attributes:
        image_size: model input side (None: the model's own, or the caller's).
        resize: "letterbox" or "stretch".
        postprocess: how probabilities become masks.
        digest: the digests of the file as it was checked.
        record: the record the settings come from, if any.
        source: where the settings come from (a record or a run's ``config.json``); None for
            the defaults.
        verified_by: the file whose digest the model file matched (a record or ``state.json``);
            None if nothing recorded one, or the check was skipped.
    """

    image_size: int | None
    resize: str
    postprocess: PostProcess
    digest: FileDigest
    record: ModelRecord | None = None
    source: Path | None = None
    verified_by: Path | None = None

    def provenance(self) -> dict[str, Any]:
        """What vouches for the file, for the records of outputs (``busi predict``'s
        ``predict.json``): its digests and the files they were checked against."""
        return {
            "sha1": self.digest.sha1, "sha256": self.digest.sha256,
            "settings_from": None if self.source is None else str(self.source),
            "verified_by": None if self.verified_by is None else str(self.verified_by),
        }


def settings_for(model_path: str | os.PathLike, verify: bool | None = None) -> ModelSettings:
    """The settings of a model file and the check of its digest: the one place busi looks for
    them (module docstring). Nothing here reads the file but to digest it.

    Args:
        model_path: a ``.h5``, ``.tflite`` or ``.onnx``.
        verify: refuse a file whose digest differs from its record; None: True unless inside
            :func:`busi.utils.digests.skipping_digest_checks`.

    Raises:
        busi.utils.digests.DigestMismatchError: ``verify`` and a digest that differs (the message
            names the file and the record).
        DataError: a damaged record.
    """
    path = Path(model_path)
    verify = verify_default(verify)
    digest = FileDigest.of(path)
    found = published_record(path)
    if found is not None:
        record_path, record = found
        which = record.covers(path.name).differs(digest)
        if which:
            report_mismatch(path, record_path, which, verify)
        return ModelSettings(record.image_size, record.resize, record.postprocess, digest,
                             record, record_path, None if which else record_path)
    run = RunFolder(path.parent)
    if run.config.is_file():
        return _run_settings(run, path, digest, verify)
    log.warning("%s: no model record beside it (busi publish writes one) and not in a run "
                "folder: its digest is not checked and the default post-processing applies",
                path)
    return ModelSettings(None, "letterbox", PostProcess(), digest)


def verify_file(model_path: str | os.PathLike, verify: bool | None = None) -> Path | None:
    """The digest check of :func:`settings_for` alone, for loaders that need no settings
    (:func:`busi.inference.weights.load_model`): against the record that lists the file, or the
    SHA-256 training recorded in its run's ``state.json``.

    Returns:
        The file that vouched for it, or None (nothing recorded a digest for it, or the check
        was skipped).

    Raises:
        busi.utils.digests.DigestMismatchError: as :func:`settings_for`.
    """
    path = Path(model_path)
    verify = verify_default(verify)
    found = published_record(path)
    if found is not None:
        against, expected, recorded = found[0], found[1].covers(path.name), "recorded in"
    else:
        run = RunFolder(path.parent)
        sha256 = run.recorded_sha256(path)
        if sha256 is None:
            return None
        against, expected, recorded = run.state, FileDigest(sha256=sha256), "training recorded in"
    which = expected.differs(FileDigest.of(path))
    if which:
        report_mismatch(path, against, which, verify, recorded)
        return None
    return against


def _run_settings(run: RunFolder, path: Path, digest: FileDigest, verify: bool
                  ) -> ModelSettings:
    """:func:`settings_for` of a file in a run folder."""
    verified_by = None
    recorded = run.recorded_sha256(path)
    if recorded is not None:
        which = FileDigest(sha256=recorded).differs(digest)
        if which:
            report_mismatch(path, run.state, which, verify, "training recorded in")
        else:
            verified_by = run.state
    config = run.load_config()
    record_path = evaluation_dir(run, path) / POSTPROCESS_FILE
    if record_path.is_file():
        record = ModelRecord.read(record_path)
        covered = record.covers(path.name)
        if covered is not None and covered.differs(digest) is None:
            return ModelSettings(record.image_size or config.image_size, record.resize,
                                 record.postprocess, digest, record, record_path,
                                 verified_by or record_path)
        log.warning("%s was chosen for other weights than %s (training went on since?); the "
                    "default post-processing applies until they are evaluated", record_path,
                    path)
    return ModelSettings(config.image_size, config.resize, PostProcess(), digest, None,
                         run.config, verified_by)


def postprocess_for(model_path: str | os.PathLike) -> dict[str, Any] | None:
    """The record of these weights (the post-processing chosen on validation, input size,
    resize mode, ...) as a dict, or None if none was made for these very bytes (the defaults
    apply). Read the settings with :meth:`busi.inference.postprocess.PostProcess.from_dict`.

    Found and checked by :func:`settings_for`: a file whose digest differs from its record
    raises :class:`busi.utils.digests.DigestMismatchError`.
    """
    record = settings_for(model_path).record
    return None if record is None else record.to_dict()


__all__ = [
    "INPUT_CONVENTION", "VERSION", "ModelRecord", "ModelSettings", "postprocess_for",
    "published_record", "record_candidates", "settings_for", "verify_file",
]
