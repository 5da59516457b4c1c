"""timm's classification-loss factory, extended with ``loss_type='gsl'``.

Messages name options by their keywords; :func:`resolve_gsl_type` takes ``names`` (:mod:`timm_gsl.naming`), through
which train.py names its flags (``--gsl-type``, ``--train-num-samples``).
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
from timm.loss import LOSS_TYPES as TIMM_LOSS_TYPES
from timm.loss import create_classification_loss as timm_create_classification_loss

from .loss import GroupSoftmaxLoss

from .functional import LOSS_TYPES as GSL_TYPES
from .naming import Names, option_name

__all__ = ['GSL_AUTO_THRESHOLD', 'GSL_TYPE_CHOICES', 'LOSS_TYPES', 'create_classification_loss', 'resolve_gsl_type']

LOSS_TYPES: Tuple[str, ...] = tuple(TIMM_LOSS_TYPES) + ('gsl',)
GSL_TYPE_CHOICES: Tuple[str, ...] = GSL_TYPES + ('auto',)
# The paper's rule (SPEC.md): Type-II regularises best below about 500K training images, Type-I above.
GSL_AUTO_THRESHOLD: int = 500_000

# timm options that only make sense for one of timm's own losses, with their defaults (read from
# timm's signature so that an option added by a later timm is refused for 'gsl' too, not ignored).
_TIMM_ONLY_DEFAULTS = {
    name: param.default
    for name, param in inspect.signature(timm_create_classification_loss).parameters.items()
    if name not in ('loss_type', 'multi_label', 'smoothing', 'soft_targets')
}


def _is_default(value: Any, default: Any) -> bool:
    if value is None or default is None or isinstance(value, torch.Tensor):
        return value is default
    return value == default


def create_classification_loss(
        loss_type: str = None,
        multi_label: bool = False,
        smoothing: float = 0.,
        soft_targets: bool = False,
        gsl_groups: int = 4,
        gsl_type: str = 'II',
        gsl_grouping: str = 'discriminative',
        **timm_kwargs: Any,
) -> nn.Module:
    """Create a training criterion: the group softmax loss for ``loss_type='gsl'``, else timm's.

    Args:
        loss_type: 'gsl' or one of timm's ``LOSS_TYPES`` (None: timm's default, 'ce' or 'bce').
        multi_label: dense multi-label targets (not supported by 'gsl').
        smoothing: label smoothing; ignored when ``soft_targets`` (Mixup/CutMix already applied it).
        soft_targets: targets arrive as B x C soft distributions.
        gsl_groups: G, the number of feature groups ('gsl' only).
        gsl_type: 'I' or 'II' ('gsl' only).
        gsl_grouping: 'discriminative', 'random', 'contiguous' or 'zero-aware' ('gsl' only).
        **timm_kwargs: passed to :func:`timm.loss.create_classification_loss` for timm's losses.

    Returns:
        The criterion. A :class:`GroupSoftmaxLoss` consumes the output of a converted model.
    """
    if loss_type != 'gsl':
        if loss_type is not None and loss_type not in LOSS_TYPES:
            raise ValueError(f"Unknown loss type '{loss_type}', expected one of {LOSS_TYPES}.")
        return timm_create_classification_loss(
            loss_type=loss_type, multi_label=multi_label, smoothing=smoothing, soft_targets=soft_targets,
            **timm_kwargs)
    if multi_label:
        raise ValueError("Loss type 'gsl' is a softmax loss for single-label targets; it does not support "
                         "multi_label=True.")
    unknown = sorted(k for k in timm_kwargs if k not in _TIMM_ONLY_DEFAULTS)
    if unknown:
        raise ValueError(
            f"Unknown argument(s) {unknown} for create_classification_loss, expected gsl_groups, gsl_type, "
            f"gsl_grouping or one of timm's options {tuple(_TIMM_ONLY_DEFAULTS)}.")
    unexpected = {k: v for k, v in timm_kwargs.items() if not _is_default(v, _TIMM_ONLY_DEFAULTS[k])}
    if unexpected:
        settings = ', '.join(f'{k}={v!r}' for k, v in sorted(unexpected.items()))
        raise ValueError(
            f"Argument(s) {settings} apply to timm's own losses, not to loss_type='gsl'; leave them at their "
            f"defaults ({', '.join(f'{k}={_TIMM_ONLY_DEFAULTS[k]!r}' for k in sorted(unexpected))}).")
    return GroupSoftmaxLoss(
        groups=gsl_groups, loss_type=gsl_type, grouping=gsl_grouping, smoothing=0. if soft_targets else smoothing)


def resolve_gsl_type(gsl_type: str, num_train_images: Optional[int], *, names: Names = None) -> str:
    """The group softmax loss type to train with: 'I' or 'II', choosing for 'auto' by data size.

    Args:
        gsl_type: 'I', 'II' or 'auto'.
        num_train_images: size of the training set (needed for 'auto').
        names: keyword -> how the messages name it (train.py passes its flags); default: the keyword
            (``gsl_type``, ``num_train_images``).

    Returns:
        'I' or 'II'. 'auto' gives Type-II below :data:`GSL_AUTO_THRESHOLD` images, Type-I from there.
    """
    type_name = option_name('gsl_type', names)
    if gsl_type != 'auto':
        if gsl_type not in GSL_TYPES:
            # Named by its keyword even with ``names``: train.py (a -c/--config value skips argparse's choices)
            # has always said gsl_type here.
            raise ValueError(f"gsl_type must be one of {GSL_TYPE_CHOICES}, got {gsl_type!r}.")
        return gsl_type
    if num_train_images is None:
        raise ValueError(f"{type_name} auto needs the number of training images, which this dataset does not "
                         f"report; pass {option_name('num_train_images', names)} N or choose {type_name} I or II.")
    return 'II' if num_train_images < GSL_AUTO_THRESHOLD else 'I'
