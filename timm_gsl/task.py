"""``GroupSoftmaxTask``: a ``timm.task`` training task for the group softmax loss."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import ClassificationTask

from .functional import smooth_targets
from .head import GroupSoftmaxOutput, convert_model
from .loss import GroupSoftmaxLoss
from .loss_factory import create_classification_loss

__all__ = ['GroupSoftmaxTask', 'group_softmax_criterion', 'group_softmax_parts', 'plain_softmax_loss',
           'track_grouping_statistics']

_logger = logging.getLogger(__name__)


def group_softmax_criterion(criterion: Optional[Union[nn.Module, Callable]], criterion_kwargs: Optional[Dict[str, Any]],
                            grouping_statistics: bool = False) -> Union[nn.Module, Callable]:
    """The criterion of a group softmax task: the one given, or one made from ``criterion_kwargs``.

    Raises:
        ValueError: both are given, or ``grouping_statistics`` without a :class:`GroupSoftmaxLoss`.
    """
    if criterion is None:
        criterion = create_classification_loss(**dict(dict(loss_type='gsl'), **(criterion_kwargs or {})))
    elif criterion_kwargs:
        raise ValueError(
            f'Pass either an explicit criterion or criterion_kwargs, not both: {sorted(criterion_kwargs)}')
    if grouping_statistics and not isinstance(criterion, GroupSoftmaxLoss):
        raise ValueError(f'grouping_statistics=True needs a GroupSoftmaxLoss criterion, got '
                         f'{type(criterion).__name__}.')
    return criterion


@torch.no_grad()
def plain_softmax_loss(criterion: Any, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The ordinary softmax cross-entropy of ``logits``, with the criterion's label smoothing; detached.

    What the group loss is compared with in the logs: their gap is the regulariser at work.
    """
    logits = logits.float()
    soft = target
    if not target.is_floating_point():
        smoothing = getattr(criterion, 'smoothing', 0.0)
        soft = smooth_targets(target, logits.shape[1], smoothing) if smoothing else None
    if soft is None:
        return F.cross_entropy(logits, target)
    return -(soft.to(logits.dtype) * F.log_softmax(logits, -1)).sum(-1).mean()


def group_softmax_parts(criterion: Any, output: GroupSoftmaxOutput, target: torch.Tensor,
                        statistics: bool) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """The group softmax loss of a step and what a task reports beside it.

    The criterion is called as a module (hooks and patches of its ``forward`` apply); with ``statistics`` the
    :class:`GroupSoftmaxLoss` measures its grouping in that same forward (``keep_statistics``).

    Returns:
        ``(loss, extra)``: ``extra`` holds ``softmax_loss`` (:func:`plain_softmax_loss`) and, with
        ``statistics``, ``grouping_statistics``.
    """
    if statistics:
        criterion.last_statistics = None
    loss = criterion(output, target)
    extra: Dict[str, Any] = {'softmax_loss': plain_softmax_loss(criterion, output.logits, target)}
    if statistics:
        extra['grouping_statistics'] = criterion.last_statistics
    return loss, extra


def track_grouping_statistics(task: Any, on: bool) -> None:
    """Set ``task.grouping_statistics`` and have its criterion measure them in its forward when ``on``."""
    task.grouping_statistics = on
    if on:
        task.criterion.keep_statistics = True


class GroupSoftmaxTask(ClassificationTask):
    """Supervised classification trained with the group softmax loss.

    Like :class:`timm.task.ClassificationTask`, but the model is converted with
    :func:`timm_gsl.convert_model` so that its own ``forward`` (inside DDP, when distributed)
    returns the classifier's features, weight and bias beside the logits; the loss is computed from
    those. Evaluation, EMA, checkpoints and ``torch.compile`` use the unchanged timm model.

    Args:
        model: a timm classification model (converted in place).
        criterion: a criterion that accepts a :class:`GroupSoftmaxOutput`; created from
            ``criterion_kwargs`` when None.
        criterion_kwargs: keyword arguments of :func:`timm_gsl.create_classification_loss`
            (``gsl_groups``, ``gsl_type``, ``gsl_grouping``, ``smoothing``, ``soft_targets``).
        device: device for task tensors.
        dtype: dtype for task tensors.
        verbose: log the criterion.
        grouping_statistics: also measure how the criterion groups each batch (a
            :class:`timm_gsl.functional.GroupingStatistics` under ``'grouping_statistics'`` in the result;
            needs a :class:`GroupSoftmaxLoss` criterion). Measured from the loss's own grouping and group logits
            (``GroupSoftmaxLoss.keep_statistics``), so it adds only a count of nonzero features.

    The result of ``task(input, target)`` holds ``loss`` (the group loss), ``output`` (the logits)
    and ``softmax_loss`` (the ordinary softmax cross-entropy of the same logits and targets,
    detached), whose gap to ``loss`` is the regulariser at work; with ``grouping_statistics`` also
    ``grouping_statistics``.

    Examples:
        >>> task = GroupSoftmaxTask(model, criterion_kwargs=dict(gsl_groups=4, gsl_type='II'))
        >>> result = task(images, labels)
        >>> result['loss'].backward()
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
            grouping_statistics: bool = False,
    ):
        criterion = group_softmax_criterion(criterion, criterion_kwargs, grouping_statistics)
        convert_model(model)
        super().__init__(model, criterion=criterion, device=device, dtype=dtype, verbose=verbose)
        track_grouping_statistics(self, grouping_statistics)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Forward pass and group softmax loss.

        Args:
            input: B x 3 x H x W images.
            target: B class indices or B x C soft targets (Mixup/CutMix).

        Returns:
            ``{'loss', 'output', 'softmax_loss'}``, and ``'grouping_statistics'`` when enabled.
        """
        output = self.trainable_module(input)
        if not isinstance(output, GroupSoftmaxOutput):
            raise RuntimeError(
                "GroupSoftmaxTask: the model returned plain logits; call task.train() before a training step "
                "(in eval mode use task.get_eval_model()).")
        loss, extra = group_softmax_parts(self.criterion, output, target, self.grouping_statistics)
        return dict({'loss': loss, 'output': output.logits}, **extra)
