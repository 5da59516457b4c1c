"""timm's classification-loss factory, extended with ``loss_type='gsl'``."""
from __future__ import annotations

from typing import Any, Tuple

import torch.nn as nn
from timm.loss import LOSS_TYPES as TIMM_LOSS_TYPES
from timm.loss import create_classification_loss as timm_create_classification_loss

from .loss import GroupSoftmaxLoss

__all__ = ['LOSS_TYPES', 'create_classification_loss']

LOSS_TYPES: Tuple[str, ...] = tuple(TIMM_LOSS_TYPES) + ('gsl',)

# timm options that only make sense for one of timm's own losses.
_TIMM_ONLY_DEFAULTS = {
    'class_weight': None, 'pos_weight': None, 'bce_target_thresh': None, 'bce_sum': False,
    'jsd_splits': 0, 'class_counts': None, 'num_samples': None,
}


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
        gsl_grouping: 'discriminative', 'random' or 'contiguous' ('gsl' only).
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
    unexpected = sorted(k for k, v in timm_kwargs.items() if k in _TIMM_ONLY_DEFAULTS and v != _TIMM_ONLY_DEFAULTS[k])
    unknown = sorted(k for k in timm_kwargs if k not in _TIMM_ONLY_DEFAULTS and not k.startswith(('asl_', 'poly_', 'twoway_', 'db_')))
    if unknown:
        raise ValueError(f"Unknown argument(s) {unknown} for create_classification_loss.")
    if unexpected:
        raise ValueError(f"Argument(s) {unexpected} apply to timm's own losses, not to loss_type='gsl'.")
    return GroupSoftmaxLoss(
        groups=gsl_groups, loss_type=gsl_type, grouping=gsl_grouping, smoothing=0. if soft_targets else smoothing)
