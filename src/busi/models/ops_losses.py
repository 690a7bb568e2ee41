"""segmentation-models' losses and metrics that busi trains with, in backend-neutral ops.

Written against :func:`busi.models.backend.ops` (``keras.ops`` on Keras 3; the same names mapped to
TensorFlow on tf-keras), formula for formula as ``segmentation_models.base.functional``
(smooth 1e-5, Keras epsilon 1e-7, channels-last), so that one definition trains on tf-keras,
JAX, PyTorch and TensorFlow, and the names Keras saves with a compiled model stay those of sm
(``binary_crossentropy_plus_dice_loss_per_image``, ``iou_score``, ``f1-score``), so history
columns, monitors and saved models read the same on every backend. Training on tf-keras keeps
sm's own objects (:mod:`busi.models.losses`), so its runs and published results are unchanged;
the image head's loss and accuracy use these on every backend (the same TensorFlow ops there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from busi.models import backend

SMOOTH = 1e-5
EPSILON = 1e-7
THRESHOLD = 0.5


def _named(function: Callable, name: str) -> Callable:
    function.__name__ = name
    function.name = name  # type: ignore[attr-defined]  # what sm's loss objects carry
    return function


def _f32(ops: Any, *tensors: Any) -> list:
    return [ops.cast(t, "float32") for t in tensors]


def binary_crossentropy(gt: Any, pr: Any) -> Any:
    """Mean binary cross-entropy of probabilities as tf-keras computes it for sm's BinaryCELoss:
    clipped to [eps, 1 - eps], then eps added inside the logarithms (which bounds the loss of a
    saturated wrong pixel the same way on every backend)."""
    ops = backend.ops()
    gt, pr = _f32(ops, gt, pr)
    pr = ops.clip(pr, EPSILON, 1.0 - EPSILON)
    return ops.mean(-(gt * ops.log(pr + EPSILON) + (1.0 - gt) * ops.log(1.0 - pr + EPSILON)))


def _reduce_axes(per_image: bool) -> list[int]:
    return [1, 2] if per_image else [0, 1, 2]


def _thresholded(ops: Any, gt: Any, pr: Any, threshold: float | None) -> tuple[Any, Any]:
    """float32 truth and prediction, the prediction binarised at ``threshold`` if given."""
    gt, pr = _f32(ops, gt, pr)
    if threshold is not None:
        pr = ops.cast(ops.greater(pr, threshold), "float32")
    return gt, pr


def _batch_mean(ops: Any, score: Any, per_image: bool) -> Any:
    """sm's reduction: per-image scores averaged over the batch, then the mean (a scalar)."""
    if per_image:
        score = ops.mean(score, axis=0)
    return ops.mean(score)


def f_score(gt: Any, pr: Any, per_image: bool = False, threshold: float | None = None,
            beta: float = 1.0) -> Any:
    """F-score (Dice at beta 1), pooled over the batch or averaged per image (sm's ``f_score``)."""
    ops = backend.ops()
    gt, pr = _thresholded(ops, gt, pr, threshold)
    axes = _reduce_axes(per_image)
    tp = ops.sum(gt * pr, axis=axes)
    fp = ops.sum(pr, axis=axes) - tp
    fn = ops.sum(gt, axis=axes) - tp
    b2 = beta**2
    score = ((1 + b2) * tp + SMOOTH) / ((1 + b2) * tp + b2 * fn + fp + SMOOTH)
    return _batch_mean(ops, score, per_image)


def iou(gt: Any, pr: Any, per_image: bool = False, threshold: float | None = None) -> Any:
    """Jaccard index, pooled over the batch or averaged per image (sm's ``iou_score``)."""
    ops = backend.ops()
    gt, pr = _thresholded(ops, gt, pr, threshold)
    axes = _reduce_axes(per_image)
    intersection = ops.sum(gt * pr, axis=axes)
    union = ops.sum(gt + pr, axis=axes) - intersection
    score = (intersection + SMOOTH) / (union + SMOOTH)
    return _batch_mean(ops, score, per_image)


def binary_focal(gt: Any, pr: Any, gamma: float = 2.0, alpha: float = 0.25) -> Any:
    """Binary focal loss with sm's defaults (``BinaryFocalLoss()``)."""
    ops = backend.ops()
    gt, pr = _f32(ops, gt, pr)
    pr = ops.clip(pr, EPSILON, 1.0 - EPSILON)
    loss_1 = -gt * (alpha * ops.power(1.0 - pr, gamma) * ops.log(pr))
    loss_0 = -(1.0 - gt) * ((1.0 - alpha) * ops.power(pr, gamma) * ops.log(1.0 - pr))
    return ops.mean(loss_0 + loss_1)


def dice_loss(gt: Any, pr: Any) -> Any:
    """1 - pooled Dice (sm's ``DiceLoss()``)."""
    return 1.0 - f_score(gt, pr)


def dice_loss_per_image(gt: Any, pr: Any) -> Any:
    """1 - Dice averaged per image (sm's ``DiceLoss(per_image=True)``)."""
    return 1.0 - f_score(gt, pr, per_image=True)


LOSSES: dict[str, Callable[[], Callable]] = {
    "dice_focal": lambda: _named(lambda gt, pr: dice_loss(gt, pr) + binary_focal(gt, pr),
                                 "dice_loss_plus_binary_focal_loss"),
    "bce": lambda: _named(lambda gt, pr: binary_crossentropy(gt, pr), "binary_crossentropy"),
    "bce_dice": lambda: _named(lambda gt, pr: binary_crossentropy(gt, pr) + dice_loss(gt, pr),
                               "binary_crossentropy_plus_dice_loss"),
    "bce_dice_per_image": lambda: _named(
        lambda gt, pr: binary_crossentropy(gt, pr) + dice_loss_per_image(gt, pr),
        "binary_crossentropy_plus_dice_loss_per_image"),
}
"""busi's loss names -> factory of the loss function, saved under sm's name."""

METRICS: dict[str, Callable[[], Callable]] = {
    "iou_score": lambda: _named(lambda gt, pr: iou(gt, pr, threshold=THRESHOLD), "iou_score"),
    "f1-score": lambda: _named(lambda gt, pr: f_score(gt, pr, threshold=THRESHOLD), "f1-score"),
}
"""Training metric -> factory, under sm's names (the history's keys)."""


def image_label_loss(y_true: Any, y_pred: Any) -> Any:
    """Weighted cross-entropy of the head; flagged rows count benign vs malignant only."""
    ops = backend.ops()
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.clip(ops.cast(y_pred, "float32"), EPSILON, 1.0)
    onehot, lesion_only = y_true[..., :-1], y_true[..., -1]
    weight = ops.sum(onehot, axis=-1)
    chosen = ops.sum(onehot * y_pred, axis=-1) / ops.maximum(weight, EPSILON)
    among_lesions = y_pred[..., 1] + y_pred[..., 2]
    probability = ops.where(lesion_only > 0.5, chosen / among_lesions, chosen)
    return -weight * ops.log(ops.clip(probability, EPSILON, 1.0))


def class_accuracy(y_true: Any, y_pred: Any) -> Any:
    """Share of images whose most probable class is their class (a training metric)."""
    ops = backend.ops()
    hit = ops.equal(ops.argmax(y_true[..., :-1], axis=-1), ops.argmax(y_pred, axis=-1))
    return ops.cast(hit, "float32")
