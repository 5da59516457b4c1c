"""``GroupSoftmaxLoss``: the group softmax loss as an ``nn.Module`` criterion."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from .functional import (
    GROUPINGS, GroupingStatistics, check_groups, check_grouping, check_loss_type, group_softmax_loss,
    group_softmax_loss_and_statistics, grouping_statistics)
from .head import GroupSoftmaxOutput

__all__ = ['GroupSoftmaxLoss']


class GroupSoftmaxLoss(nn.Module):
    """Group softmax loss with discriminative feature grouping, as a criterion.

    Call it with the output of a converted model (:func:`timm_gsl.convert_model`) in training mode,
    ``criterion(model(images), target)``, or with plain tensors,
    ``criterion(features, target, weight=W, bias=b)``.

    Args:
        groups: number of feature groups G (>= 1; at most the classifier's feature size).
        loss_type: 'I' (tighter bound, for plenty of data) or 'II' (stronger regulariser).
        grouping: 'discriminative' (the paper's), 'random' or 'contiguous' (ablation baselines), or
            'zero-aware' (discriminative, with zero-discriminativity features dealt evenly across groups).
        smoothing: label smoothing ε applied to class-index targets (soft targets pass unchanged).

    Examples:
        >>> model = timm_gsl.convert_model(timm.create_model('resnet18', num_classes=10))
        >>> criterion = GroupSoftmaxLoss(groups=4, loss_type='II')
        >>> loss = criterion(model(images), labels)
    """

    def __init__(
            self,
            groups: int = 4,
            loss_type: str = 'II',
            grouping: str = 'discriminative',
            smoothing: float = 0.0,
    ):
        super().__init__()
        self.groups = check_groups(groups)
        self.loss_type = check_loss_type(loss_type)
        if isinstance(grouping, torch.Tensor):
            raise ValueError(
                f"grouping must be one of {GROUPINGS} here, got a tensor of shape {tuple(grouping.shape)}; "
                f"pass an explicit assignment to group_softmax_loss().")
        self.grouping = check_grouping(grouping)
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be a float in [0, 1), got {smoothing!r}.")
        self.smoothing = float(smoothing)
        # With keep_statistics, every forward also measures its grouping (from the same grouping and group
        # logits as the loss) into last_statistics; GroupSoftmaxTask(grouping_statistics=True) sets it.
        self.keep_statistics = False
        self.last_statistics: Optional[GroupingStatistics] = None

    def extra_repr(self) -> str:
        return f"groups={self.groups}, loss_type='{self.loss_type}', grouping='{self.grouping}', smoothing={self.smoothing}"

    def forward(
            self,
            output: Union[GroupSoftmaxOutput, torch.Tensor],
            target: torch.Tensor,
            weight: Optional[torch.Tensor] = None,
            bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Batch-mean loss.

        Args:
            output: a :class:`GroupSoftmaxOutput`, or B x D features when ``weight`` is given.
            target: B class indices or B x C soft targets.
            weight: C x D classifier weight, with plain-tensor features only.
            bias: C classifier bias, with plain-tensor features only.

        With ``keep_statistics`` set, the batch's :class:`~timm_gsl.functional.GroupingStatistics` (from this very
        grouping) are left in ``last_statistics``.
        """
        features, weight, bias = self._classifier(output, weight, bias)
        options = dict(loss_type=self.loss_type, grouping=self.grouping, label_smoothing=self._smoothing_for(target))
        if not self.keep_statistics:
            return group_softmax_loss(features, weight, bias, target, self.groups, **options)
        loss, self.last_statistics = group_softmax_loss_and_statistics(
            features, weight, bias, target, self.groups, **options)
        return loss

    def statistics(
            self,
            output: Union[GroupSoftmaxOutput, torch.Tensor],
            target: torch.Tensor,
            weight: Optional[torch.Tensor] = None,
            bias: Optional[torch.Tensor] = None,
    ) -> GroupingStatistics:
        """How this loss groups a batch: zero inputs, nonzero features and loss per group (no autograd).

        Takes the same arguments as :meth:`forward`; see :func:`timm_gsl.functional.grouping_statistics`.
        """
        features, weight, bias = self._classifier(output, weight, bias)
        return grouping_statistics(
            features, weight, bias, target, self.groups,
            loss_type=self.loss_type, grouping=self.grouping, label_smoothing=self._smoothing_for(target))

    def _smoothing_for(self, target: torch.Tensor) -> float:
        return self.smoothing if not target.is_floating_point() else 0.0

    @staticmethod
    def _classifier(output, weight, bias):
        if isinstance(output, GroupSoftmaxOutput):
            if weight is not None or bias is not None:
                raise ValueError("weight and bias come from the GroupSoftmaxOutput; do not pass them too.")
            return output.features, output.weight, output.bias
        if weight is not None:
            return output, weight, bias
        raise ValueError(
            "GroupSoftmaxLoss needs the classifier's input features, weight and bias, but got plain "
            f"{type(output).__name__} logits: convert the model with timm_gsl.convert_model(model) (or create it "
            "with timm.create_model('group_softmax', base_model=...)) and call it in training mode, "
            "or pass features with weight= and bias=.")
