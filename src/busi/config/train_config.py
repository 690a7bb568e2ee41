"""Training settings as one dataclass that reads and writes JSON or YAML.

One config describes one run completely; it is saved into the run folder so that a run can be
resumed, evaluated and reproduced from it. Every field is checked for type and range when the
config is made (:mod:`busi.config.fields`), from YAML, JSON, ``--set`` or Python alike, so a bad
value fails with one message before a run folder exists. The defaults reproduce the main
notebook: a ResNet34 U-Net at 256x256 with Dice + focal loss and Adam.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from busi.config import sections
from busi.config.fields import check_fields
from busi.config.files import legacy_extra, read_mapping
from busi.data import datasets
from busi.data.augment_config import AugmentConfig
from busi.data.geometry import MODES
from busi.data.index import KNOWN_LABELS, LABELS
from busi.models import architectures as models
from busi.models import backend, encoders, heads, losses, schedules
from busi.utils import paths
from busi.utils.atomic import atomic_write_text

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
LR_SCHEDULES = tuple(schedules.SCHEDULES)
KEEP = ("best", "last")

CHOICES: dict[str, tuple[str, ...]] = {
    "architecture": tuple(models.ARCHITECTURES),
    "resize": MODES,
    "loss": losses.LOSS_NAMES,
    "optimizer": tuple(losses.OPTIMIZERS),
    "lr_schedule": LR_SCHEDULES,
    "mixed_precision": PRECISIONS,
    "keep": KEEP,
    "backend": backend.NAMES,
    "image_head_pool": tuple(heads.POOLS),
}
"""Fields with a fixed set of values, from the registries that define them (the CLI offers the
same ones)."""

MONITORS = tuple(f"{prefix}{name}" for prefix in ("", "val_")
                 for name in ("loss", *losses.METRIC_NAMES))
"""What ``monitor`` may watch: the loss and the training metrics, on training or validation."""


def _augmentation_overrides(values: Any) -> dict[str, Any]:
    """``augmentation`` checked (so a typo fails before training, naming the field) and in one
    form: a new dict, ranges as lists (as JSON gives them back) and defaults left out, so a
    config equals itself after a save and load, and a resumed run recognises its config."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"augmentation must be a mapping of AugmentConfig fields, got {values!r}")
    defaults = {f.name: f.default for f in dataclasses.fields(AugmentConfig)}
    _reject_unknown(values, defaults, "augmentation")
    try:
        checked = AugmentConfig(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"augmentation: {error}") from error
    overrides = {}
    for name in values:
        value = getattr(checked, name)
        if value != defaults[name]:
            overrides[name] = list(value) if isinstance(value, tuple) else value
    return overrides


def _word(choice: Any) -> str:
    """A choice as a config file writes it (``true``, ``cosine``)."""
    return str(choice).lower() if isinstance(choice, bool) else repr(choice)


def _reject_unknown(values: Any, known: Any, what: str) -> None:
    """An error naming the keys of ``values`` not in ``known``, and the known ones."""
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; known keys: {', '.join(sorted(known))}")


@dataclass
class TrainConfig:
    """Everything a training run depends on.

    Attributes:
        name: run name; the run folder is ``runs/<name>`` unless ``run_dir`` is given. None:
            named after the model (:meth:`default_name`: ``unet-resnet34``, ``classic-unet``,
            ``unet-efficientnet-lite0-scratch``, ...), so that runs of other models never land
            in one folder (and a resumed run refuses the other settings).
        data: root of the first of ``datasets`` (anything its adapter's ``locate`` accepts);
            None looks in the usual places and ``$BUSI_DATA`` (``$BUSBRA_DATA``, ...).
        datasets: registered dataset names (:mod:`busi.data.datasets`) the run trains on, each
            split on its own by its own rules: training uses every train part, validation
            monitors all val parts together, evaluation reports each test part apart. Default
            BUSI alone, the behaviour of runs made before datasets existed.
        data_paths: roots of datasets by name, for those ``data`` does not give.
        authors_fold: use the published partition of the datasets that have one (BUS-BRA:
            fold k of the authors' 5-fold file as test, validation grouped from the rest)
            instead of busi's grouped split; the others are split as usual.
        split_file: an existing split CSV to use; None makes one from ``split_seed`` and the
            fractions.
        split_seed: the seed of the split; None takes ``seed``. Set it to train seeds of one
            config on one split (their spread, or an ensemble of them, on the same test images).
        classes: labels that take part. Normal images teach the model to answer "no lesion".
        train_classes: labels the model is trained on (None: all of ``classes``). Validation and
            test keep every class of ``classes``, so the split, and the scores on normal images,
            stay comparable with runs trained on everything; the validation score that picks
            ``best.h5`` counts the images of these classes only. Published BUSI results train
            on benign + malignant only.
        drop_conflicts: leave out the images of duplicate groups whose labels conflict (the same
            scan filed as benign and malignant, say); kept, they stay together in one part.
        architecture: a name of :data:`busi.models.architectures.ARCHITECTURES`: "unet" (on
        ``encoder``, any
            of :data:`busi.models.encoders.ENCODERS`) or "classic_unet".
        encoder_weights: "imagenet" or None (from scratch). ImageNet needs internet once.
        freeze_encoder_epochs: epochs with a frozen encoder before fine-tuning it (pretrained only).
        init_weights: start from the weights of an earlier busi model of the same architecture
            (a run's ``best.h5`` or a shipped ``weights/*.h5``) instead of ``encoder_weights``:
            the second stage of pretrain-on-everything, fine-tune-on-one-hospital (say a model
            trained on BUSI + BUS-BRA, fine-tuned on BUSI). A relative path not found in the
            working directory is taken from the project root. Read once, when the run starts;
            its digests are kept in the run folder (``init_weights.json``). Keep
            ``encoder_weights`` as the first stage had it: the model card names that source.
        decoder_filters: filters of the five decoder stages of the "unet" architecture
            (segmentation-models' default 256, 128, 64, 32, 16). Smaller ones shrink the model
            file and the training time most, since the first stage sees the encoder's widest
            features.
        image_head: add the image-level head (:mod:`busi.models.heads`): normal / benign / malignant
            from the deepest encoder features, pooled as ``image_head_pool`` says (one of
            :data:`busi.models.heads.POOLS`), trained with the mask; its lesion probability
            gates the mask in post-processing.
        image_head_weight: weight of the head's loss beside the mask's.
        image_head_balance: weigh the head's classes by inverse frequency in the training part.
        resize: "letterbox" keeps the aspect ratio by padding, "stretch" distorts it.
        augment: augment the training images (off: every epoch sees the same images).
        augmentation: fields of :class:`busi.data.augment_config.AugmentConfig` (switches and
            strengths) that differ from its mild defaults, e.g. ``{"max_rotation_deg": 20,
            "scale_range": [0.75, 1.3]}``; checked when the config is made, so a typo fails
            before training. ``--set augmentation={...}`` (JSON) replaces the whole mapping.
            Ignored when ``augment`` is false.
        mixed_precision: "auto" (float16 on a GPU, float32 on CPU), "float32", "mixed_float16",
            "mixed_bfloat16" (CPUs with bf16 support, e.g. AVX-512 BF16).
        backend: "tf-keras" (default: Keras 2, segmentation-models' encoders and losses, what
            busi's published results were made with) or Keras 3 on "tensorflow", "jax" or
            "torch" (busi's own encoders only; on jax and torch training imports no
            TensorFlow). Weights saved on any backend load on all of them.
        jit_compile: XLA; a GPU option (on CPU it fails for this U-Net's upsampling gradient).
        devices: replicate the model over these devices (``tf.distribute.MirroredStrategy``,
            e.g. ``["/gpu:0", "/gpu:1"]``; the batch size is the global batch). None: all GPUs
            when there are several, else the default device. Older configs kept it as
            ``extra: {devices: [...]}``, still read.
        limit: use only N images of each split part, classes in proportion (quick runs, CI).
        precise_bn_batches: before each validation, recompute BatchNorm statistics over this
            many training batches (0: use Keras' moving averages, which lag badly when training
            from scratch; see :mod:`busi.training.batchnorm`).
        lr_schedule: "plateau" halves the learning rate when ``monitor`` stalls
            (``reduce_lr_*``); "cosine" decays it from ``learning_rate`` to
            ``min_learning_rate`` over ``epochs``, after ``warmup_epochs`` of linear warm-up. A
            schedule fixed in advance suits a time budget and does not react to noisy validation
            scores; it is a function of the epoch and ``epochs``, so a resumed run continues it
            exactly. Raising ``epochs`` when resuming recomputes it for the new length: the
            rate jumps back up (a warm restart) and decays again to the new end.
        keep: which epoch's weights become ``best.h5``, the model evaluated and published:
            "best" by ``monitor`` on validation, or "last". A schedule that decays to zero
            ends where training has converged, while the best epoch by ``monitor`` on ~70
            validation images follows noise: in ``lite0-40ep-cpu`` the pooled validation IoU
            went 0.59, 0.69, 0.49 over epochs 36-38, with the rate already near zero.
        weight_decay: decoupled weight decay of "adamw" (None: the optimizer's default).
        max_minutes: a wall-time budget for one training session, data loading included: no
            epoch starts that is predicted (from the slowest epoch measured, on resuming from
            ``history.csv``) to end past it, so the budget is kept to within one epoch. The
            first epoch of a new run cannot be predicted and always runs; a warning says when
            it will overrun. Training stopped by the budget says so, skips evaluation, and the
            same command resumes it.
    """

    name: str | None = None
    data: str | None = None
    datasets: tuple[str, ...] = ("busi",)
    data_paths: dict[str, str] = field(default_factory=dict)
    authors_fold: int | None = None
    run_dir: str | None = None
    split_file: str | None = None
    classes: tuple[str, ...] = LABELS
    train_classes: tuple[str, ...] | None = None
    drop_conflicts: bool = True
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    split_seed: int | None = None

    architecture: str = "unet"
    encoder: str = "resnet34"
    encoder_weights: str | None = "imagenet"
    freeze_encoder_epochs: int = 0
    init_weights: str | None = None
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16)
    base_filters: int = 32
    depth: int = 4
    dropout: float = 0.0
    image_head: bool = False
    image_head_weight: float = 0.5
    image_head_balance: bool = True
    image_head_pool: str = "avg"

    image_size: int = 256
    resize: str = "letterbox"
    augment: bool = True
    augmentation: dict[str, Any] = field(default_factory=dict)

    loss: str = "dice_focal"
    optimizer: str = "adam"
    learning_rate: float = 1e-4
    batch_size: int = 8
    epochs: int = 50
    steps_per_epoch: int | None = None
    early_stopping_patience: int = 15
    lr_schedule: str = "plateau"
    warmup_epochs: int = 0
    reduce_lr_patience: int = 5
    reduce_lr_factor: float = 0.5
    min_learning_rate: float = 1e-6
    monitor: str = "val_iou_score"
    keep: str = "best"
    weight_decay: float | None = None

    backend: str = backend.DEFAULT
    mixed_precision: str = "auto"
    jit_compile: bool = False
    devices: tuple[str, ...] | None = None
    deterministic: bool = False
    limit: int | None = None
    max_minutes: float | None = None
    precise_bn_batches: int = 25
    evaluate: bool = True

    def __post_init__(self) -> None:
        if self.augmentation is None:  # "augmentation:" left empty in YAML
            self.augmentation = {}
        check_fields(self)  # types and ranges of every field (busi.config.fields)
        self._check_datasets()
        unknown = sorted(set(self.classes) - set(KNOWN_LABELS))
        if unknown or not self.classes:
            raise ValueError(f"classes must be some of {list(KNOWN_LABELS)}, got "
                             f"{list(self.classes)}")
        if self.train_classes is not None:
            if not self.train_classes or set(self.train_classes) - set(self.classes):
                raise ValueError(f"train_classes must be some of classes {list(self.classes)}, "
                                 f"got {list(self.train_classes)}")
        trained = self.train_classes or self.classes
        if self.image_head and "normal" not in trained:
            raise ValueError(
                f"image_head needs normal images to train on (it learns lesion vs normal), but "
                f"the trained classes are {list(trained)}; add normal to classes/train_classes"
            )
        self.augmentation = _augmentation_overrides(self.augmentation)
        if self.encoder_weights in ("none", "None", ""):
            self.encoder_weights = None
        if self.init_weights in ("none", "None", ""):
            self.init_weights = None
        if self.encoder_weights not in (None, "imagenet"):
            raise ValueError(f"encoder_weights must be imagenet or none, got "
                             f"{self.encoder_weights!r}")
        if self.backend not in backend.NAMES:  # this message also names the installed ones
            backend.check(self.backend)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {list(MONITORS)}, got {self.monitor!r}")
        if models.ARCHITECTURES[self.architecture].uses_encoder:
            encoders.encoder(self.encoder)  # an unknown name fails, listing the known ones
        self._check_backend()
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be below 1 (some images must be left to "
                f"train on), got {self.val_fraction} + {self.test_fraction}"
            )
        if round((1 - self.test_fraction) / self.val_fraction) < 2:  # see busi.data.splits
            raise ValueError(
                f"val_fraction {self.val_fraction} is too large for test_fraction "
                f"{self.test_fraction}: validation is one of round((1 - test) / val) >= 2 "
                "grouped folds of the rest"
            )
        self._check_component_options()
        schedules.schedule(self.lr_schedule).check(self)

    def _check_backend(self) -> None:
        """Keras 3 backends take busi's own encoders only (segmentation-models needs tf-keras)
        and no ``devices`` (that is tf.distribute, TensorFlow's Keras only)."""
        if self.backend == backend.DEFAULT:
            return
        if (models.ARCHITECTURES[self.architecture].uses_encoder
                and encoders.encoder(self.encoder).family != "busi"):
            raise ValueError(
                f"backend {self.backend}: encoder {self.encoder} is segmentation-models', which "
                f"needs backend tf-keras; choose backend tf-keras or one of busi's encoders "
                f"({', '.join(encoders.family('busi'))})")
        if self.devices:
            raise ValueError(f"backend {self.backend}: devices {list(self.devices)} needs "
                             "tf.distribute (backend tf-keras); leave devices empty")

    def components(self) -> list[tuple[str, Any, dict[Any, tuple[str, ...]]]]:
        """``(field, choice, {each choice: the fields it takes})`` of every setting whose choices
        take settings of their own, read from the registries that define them: architectures
        (with their encoder's), optimizers, learning-rate schedules, and the image-level head."""
        def architecture_options(spec: models.Architecture) -> tuple[str, ...]:
            extra = ("freeze_encoder_epochs",) if spec.uses_encoder else ()
            return spec.options + extra

        return [
            ("architecture", self.architecture,
             {name: architecture_options(spec) for name, spec in models.ARCHITECTURES.items()}),
            ("optimizer", self.optimizer,
             {name: spec.options for name, spec in losses.OPTIMIZERS.items()}),
            ("lr_schedule", self.lr_schedule,
             {name: spec.options for name, spec in schedules.SCHEDULES.items()}),
            ("image_head", self.image_head,
             {True: ("image_head_weight", "image_head_balance", "image_head_pool"), False: ()}),
        ]

    def unused_fields(self) -> frozenset[str]:
        """Fields that only other choices of :meth:`components` take: they do nothing here,
        and a config file leaves them out."""
        unused: set[str] = set()
        for _, choice, options in self.components():
            taken = set(options[choice])
            unused.update(name for other in options.values() for name in other
                          if name not in taken)
        return frozenset(unused)

    def _check_component_options(self) -> None:
        """A field set for a choice the config does not make is refused: it would silently do
        nothing (``weight_decay`` with Adam, ``warmup_epochs`` with the plateau schedule). None
        means "not set" and is taken (``encoder_weights: none`` for a classic U-Net, which has no
        encoder); such fields then hold their defaults, so a config equals itself after a save
        and load, which leaves them out."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)
                    if f.default is not dataclasses.MISSING}
        for name in sorted(self.unused_fields() & set(defaults)):
            value = getattr(self, name)
            if value is not None and value != defaults[name]:
                field_name, choice, options = next(
                    component for component in self.components()
                    if any(name in taken for taken in component[2].values()))
                users = [_word(other) for other, taken in options.items() if name in taken]
                raise ValueError(f"{name} applies to {field_name} {' or '.join(users)}, not "
                                 f"{field_name} {_word(choice)}; leave it out")
            setattr(self, name, defaults[name])

    def _check_datasets(self) -> None:
        self.datasets = datasets.check_names(self.datasets)
        if not isinstance(self.data_paths, dict):
            raise ValueError(f"data_paths must map dataset names to folders, got "
                             f"{self.data_paths!r}")
        _reject_unknown(self.data_paths, self.datasets, "data_paths")
        if self.authors_fold is not None:
            with_split = [n for n in self.datasets if datasets.get(n).authors_split is not None]
            if not with_split:
                raise ValueError(f"authors_fold: none of the datasets {list(self.datasets)} has "
                                 "a published partition (BUS-BRA has)")

    def data_path(self, name: str) -> str | None:
        """Where dataset ``name`` is: ``data_paths[name]``, else ``data`` for the first dataset,
        else None (its adapter looks in the usual places)."""
        if name in self.data_paths:
            return self.data_paths[name]
        return self.data if name == self.datasets[0] else None

    def augment_config(self) -> AugmentConfig:
        """The augmentation of the training images: defaults plus ``augmentation``."""
        return AugmentConfig(**self.augmentation)

    @property
    def monitor_mode(self) -> str:
        """"min" for a monitored loss, "max" for a score: which way ``monitor`` improves."""
        return "min" if "loss" in self.monitor else "max"

    @property
    def directory(self) -> Path:
        """The run folder."""
        return Path(self.run_dir) if self.run_dir else paths.RUNS_DIR / self.run_name

    @property
    def run_name(self) -> str:
        """``name``, or the model's :meth:`default_name` when none is given."""
        return self.name or self.default_name()

    def default_name(self) -> str:
        """A run name that says which model trains: architecture, encoder, ``scratch`` for an
        encoder without pretrained weights, and the datasets when not BUSI alone."""
        parts = [self.architecture.replace("_", "-")]
        if models.ARCHITECTURES[self.architecture].uses_encoder:
            parts.append(self.encoder)
            if self.encoder_weights is None and self.init_weights is None:
                parts.append("scratch")
        if tuple(self.datasets) != ("busi",):
            parts.extend(self.datasets)
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Every field, flat, as JSON and YAML can hold them (tuples as lists)."""
        data = dataclasses.asdict(self)
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in data.items()}

    def to_sections(self) -> dict[str, Any]:
        """The settings grouped by component (:mod:`busi.config.sections`), without the fields
        of choices not made (:meth:`unused_fields`): what config files and sidecars hold."""
        return sections.nest(self.to_dict(), self.unused_fields())

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a sectioned or a flat mapping (older run folders and sidecars,
        ``--set``); an unknown key is an error that names it and the known ones."""
        values = legacy_extra(sections.flatten(values))
        _reject_unknown(values, {f.name for f in dataclasses.fields(cls)}, "config")
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (checked like a new config)."""
        return self.from_dict({**self.to_dict(), **changes})

    def save(self, path: str | os.PathLike) -> Path:
        """Write as JSON, or YAML if the file name ends in .yaml/.yml (atomically)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            return atomic_write_text(path, yaml.safe_dump(self.to_sections(), sort_keys=False))
        return atomic_write_text(path, json.dumps(self.to_sections(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a JSON or YAML config; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        values = read_mapping(path)
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from error
