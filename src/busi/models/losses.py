"""Training losses, metrics and optimizers by name, and the custom objects a saved model needs.

:data:`LOSSES`, :data:`METRICS` and :data:`OPTIMIZERS` are the one list of each: config checks
read their names (without importing TensorFlow: the factories import on use), training builds
from them, so a new loss or optimizer is one entry here.

Losses come from segmentation-models (``sm.losses``) because its Dice and focal losses are the
reference implementations the BUSI literature uses. The default, Dice + binary focal, fits
the class imbalance of BUSI: lesions cover a few percent of the pixels, so plain BCE is
dominated by background, Dice optimises the overlap directly, and the focal term keeps
per-pixel gradients well behaved where Dice alone is noisy (small lesions, empty masks).

The training metrics are soft/thresholded batch statistics for monitoring only; reported numbers
come from :mod:`busi.evaluation.scoring` (per image, at the original resolution).

Saved models: Keras writes the loss and metric *names* into the ``.h5`` training config (an sm
loss is not a Keras object, so only its ``__name__`` is stored, e.g.
``dice_loss_plus_binary_focal_loss``). :data:`CUSTOM_OBJECTS` maps every such name back to an
object built exactly as :func:`get_loss` / :func:`get_metrics` build it, so
:func:`busi.inference.weights.load_model` reloads a compiled model without the caller naming
anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from busi import _keras
from busi.models import backend, ops_losses

DEFAULT_LOSS = "dice_focal"
THRESHOLD = 0.5
"""Probability threshold of the training metrics. Evaluation chooses its own on validation."""

LOSSES: dict[str, Callable[[Any], Any]] = {
    "dice_focal": lambda sm: sm.losses.DiceLoss() + sm.losses.BinaryFocalLoss(),
    "bce": lambda sm: sm.losses.BinaryCELoss(),
    "bce_dice": lambda sm: sm.losses.BinaryCELoss() + sm.losses.DiceLoss(),
    "bce_dice_per_image": lambda sm: _named(
        sm.losses.BinaryCELoss() + sm.losses.DiceLoss(per_image=True),
        "binary_crossentropy_plus_dice_loss_per_image"),
}
"""Loss name (as a config writes it) -> factory taking the segmentation-models module."""

def _named(loss: Any, name: str) -> Any:
    """``loss`` under its own saved name: a per-image Dice sum would otherwise save the name of
    the pooled one (``binary_crossentropy_plus_dice_loss``) and reload as it."""
    loss.name = name  # sm losses keep their saved name (__name__) in `name`
    return loss


LOSS_NAMES = tuple(LOSSES)
"""Names accepted by :func:`get_loss` (a config picks the loss by one of these)."""

METRICS: dict[str, Callable[[Any], Any]] = {
    "iou_score": lambda sm: sm.metrics.IOUScore(threshold=THRESHOLD),
    "f1-score": lambda sm: sm.metrics.FScore(threshold=THRESHOLD),
}
"""Training metric -> factory taking the segmentation-models module. The names are the metrics'
own ``__name__``, the keys of the training history (``val_iou_score`` ...) that monitors,
plots and resumed runs rely on: keep them stable."""

METRIC_NAMES = tuple(METRICS)
"""Names of :func:`get_metrics` as they appear in the training history (keep them stable)."""

@dataclass(frozen=True)
class Optimizer:
    """An optimizer a config can name, and the config fields it takes beyond the rate."""

    make: Callable[..., Any]
    """``make(keras, rate, **options)``: a fresh optimizer."""
    options: tuple[str, ...] = ()
    """:class:`~busi.config.train_config.TrainConfig` fields passed to ``make`` by name (set
    for another optimizer, they are refused when the config is made)."""


OPTIMIZERS: dict[str, Optimizer] = {
    "adam": Optimizer(lambda keras, rate: keras.optimizers.Adam(learning_rate=rate)),
    "adamw": Optimizer(
        lambda keras, rate, weight_decay=None: keras.optimizers.AdamW(
            learning_rate=rate, **({} if weight_decay is None else {"weight_decay": weight_decay})),
        options=("weight_decay",)),
    "sgd": Optimizer(lambda keras, rate: keras.optimizers.SGD(learning_rate=rate, momentum=0.9)),
}
"""Optimizer name (as a config writes it) -> :class:`Optimizer`."""


def get_loss(name: str = DEFAULT_LOSS) -> Callable:
    """The training loss called ``name``: ``"dice_focal"`` (default), ``"bce"`` or ``"bce_dice"``.

    Args:
        name: one of :data:`LOSS_NAMES`.

    Returns:
        A segmentation-models loss object, usable as ``model.compile(loss=...)``. Its
        ``__name__`` (e.g. ``dice_loss_plus_binary_focal_loss``) is what Keras saves.

    Raises:
        ValueError: unknown name.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    if backend.is_keras3():  # sm needs tf-keras: the same formulas in keras.ops, same names
        return ops_losses.LOSSES[name]()
    return LOSSES[name](_keras.sm())


def get_optimizer(name: str, learning_rate: float, weight_decay: float | None = None) -> Any:
    """A fresh Keras optimizer called ``name`` (one of :data:`OPTIMIZERS`)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")
    options = {} if weight_decay is None else {"weight_decay": weight_decay}
    return OPTIMIZERS[name].make(_keras.keras(), learning_rate, **options)


def get_metrics() -> list:
    """Training metrics: IoU and F1 (= Dice) at threshold 0.5, pooled over the batch.

    Their names, ``iou_score`` and ``f1-score``, are the keys of the training history
    (``val_iou_score`` ...), which the plots and checkpoint monitors rely on.
    """
    if backend.is_keras3():
        return [make() for make in ops_losses.METRICS.values()]
    sm = _keras.sm()
    return [make(sm) for make in METRICS.values()]


def _custom_objects() -> dict[str, Any]:
    objects: dict[str, Any] = {}
    for name in LOSS_NAMES:
        loss = get_loss(name)
        objects[loss.__name__] = loss
    for metric in get_metrics():
        objects[metric.__name__] = metric
    return objects


def __getattr__(name: str) -> Any:
    # CUSTOM_OBJECTS needs the backend's Keras (on tf-keras segmentation-models, hence
    # TensorFlow): built on first use so that importing this module stays cheap.
    if name == "CUSTOM_OBJECTS":
        value = _custom_objects()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
