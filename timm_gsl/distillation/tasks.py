"""timm's three distillation tasks with the group softmax loss as the task loss.

Each ``GroupSoftmax*DistillationTask`` subclasses timm's task (:class:`timm.task.LogitDistillationTask`,
:class:`~timm.task.FeatureDistillationTask`, :class:`~timm.task.TokenDistillationTask`) and keeps its
distillation term, weights, teacher, EMA and checkpoints; only the task loss changes. The student is
made to return a :class:`~timm_gsl.GroupSoftmaxOutput` in training mode, the criterion receives it, and
the distillation term receives what timm's task would give it (the plain logits, the pre-logits features,
the distillation head's logits).

What the three share lives in :class:`_GroupSoftmaxDistillation`: the set-up around timm's constructor
(the criterion, the student's preparation, the grouping statistics) and the forward (the student, the
group softmax loss, the teacher on the renormalised input, the weighted sum and the result). Each task
says only how its student is prepared and run, what it asks of the teacher and its distillation term.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import DistillationTeacher, FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask
from timm.task.distillation import FeatureDistillationTrainableModule
from timm.utils import unwrap_model

from ..head import (
    GroupSoftmaxOutput, UnsupportedModelError, classifier_layers, convert_model, is_converted, linear_classifier,
    unconvert_model)
from ..task import group_softmax_criterion, group_softmax_parts, track_grouping_statistics


def _kl_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """timm's soft distillation term: ``T**2 * KL(softmax(t / T) || softmax(s / T))``, batch mean."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction='batchmean', log_target=True) * (temperature ** 2)


def _not_group_output() -> RuntimeError:
    return RuntimeError(
        'the student returned plain logits; call task.train() before a training step (in eval mode use '
        'task.get_eval_model()).')


def _classifier_width(student: nn.Module) -> Tuple[int, int]:
    """(number of classifier heads, total width of their input) of a timm model."""
    layers = classifier_layers(student)
    return len(layers), sum(int(layer.weight.flatten(1).shape[1]) for layer in layers)


class _GroupSoftmaxDistillation:
    """What the three group softmax distillation tasks share: their set-up and their forward.

    Mixed in before timm's task. The set-up makes the criterion a group softmax loss, lets the task
    prepare the student (:meth:`_prepare_student`), calls timm's constructor, lets the task adapt what it
    built (:meth:`_adapt`) and switches the grouping statistics on or off. The forward runs the student
    (:meth:`_student_forward`), computes the group softmax loss of its output, runs the frozen teacher
    on the input renormalised to the teacher's statistics, and weighs the task loss and the task's
    distillation term (:meth:`_distillation_term`) as timm does.
    """

    criterion: Any
    grouping_statistics: bool
    teacher: DistillationTeacher
    student_mean: torch.Tensor
    student_std: torch.Tensor
    task_loss_weight: float
    distill_loss_weight: float

    _part: str = 'kd_loss'
    """The distillation part's name in the result (timm's)."""
    _teacher_features: bool = False
    """Whether the teacher returns its pooled pre-logits features rather than its logits."""

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: Union[str, nn.Module, DistillationTeacher],
            criterion: Optional[Union[nn.Module, Callable]] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            grouping_statistics: bool = False,
            **kwargs: Any,
    ):
        criterion = group_softmax_criterion(criterion, criterion_kwargs, grouping_statistics)
        kwargs = self._prepare_student(unwrap_model(student_model), kwargs)
        super().__init__(student_model, teacher_model, criterion=criterion, **kwargs)
        self._adapt()
        track_grouping_statistics(self, grouping_statistics)

    def _prepare_student(self, student: nn.Module, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """Make the (unwrapped) student return a GroupSoftmaxOutput in training; the kwargs for timm's task."""
        raise NotImplementedError

    def _adapt(self) -> None:
        """Adapt what timm's constructor built (nothing by default)."""

    def _student_forward(self, input: torch.Tensor) -> Tuple[GroupSoftmaxOutput, Any]:
        """``(output for the criterion, what the distillation term compares with the teacher)``."""
        raise NotImplementedError

    def _distillation_term(self, student: Any, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _teacher_forward(self, input: torch.Tensor) -> torch.Tensor:
        """The frozen teacher on the input renormalised from the student's statistics to its own."""
        with torch.no_grad():
            input_kd = self.teacher.normalize_input(input, self.student_mean, self.student_std)
            return self.teacher(input_kd.detach(), return_features=self._teacher_features)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        """Group softmax loss and timm's distillation term.

        Args:
            input: B x C x H x W images, normalised for the student.
            target: B class indices or B x C soft targets.

        Returns:
            ``{'loss', 'output', 'task_loss', <part>, 'softmax_loss'}`` (and ``'grouping_statistics'``), where
            ``<part>`` is ``'kd_loss'`` (logit and feature distillation) or ``'distill_loss'`` (token).
        """
        output, student_side = self._student_forward(input)
        if not isinstance(output, GroupSoftmaxOutput):
            raise _not_group_output()
        task_loss, extra = group_softmax_parts(self.criterion, output, target, self.grouping_statistics)
        part = self._distillation_term(student_side, self._teacher_forward(input))
        loss = self.task_loss_weight * task_loss + self.distill_loss_weight * part
        return dict({'loss': loss, 'output': output.logits, 'task_loss': task_loss, self._part: part}, **extra)


class GroupSoftmaxLogitDistillationTask(_GroupSoftmaxDistillation, LogitDistillationTask):
    """timm's logit distillation with the group softmax loss as the task loss.

    The student is converted with :func:`timm_gsl.convert_model`; the criterion receives its
    :class:`~timm_gsl.GroupSoftmaxOutput` and the KL term its whole logits, exactly as
    :class:`timm.task.LogitDistillationTask` computes it. Takes the arguments of
    :class:`timm.task.LogitDistillationTask` plus ``grouping_statistics``; ``criterion_kwargs`` go to
    :func:`timm_gsl.create_classification_loss` with ``loss_type='gsl'``.

    The result holds ``loss`` (``task_loss_weight * task_loss + distill_loss_weight * kd_loss``),
    ``output`` (the logits), ``task_loss`` (the group softmax loss), ``kd_loss``, ``softmax_loss`` and,
    with ``grouping_statistics``, ``grouping_statistics``.
    """

    def _prepare_student(self, student: nn.Module, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        convert_model(student)
        return kwargs

    def _student_forward(self, input: torch.Tensor) -> Tuple[GroupSoftmaxOutput, Any]:
        output = self.trainable_module(input)
        return output, output

    def _distillation_term(self, student: GroupSoftmaxOutput, teacher: torch.Tensor) -> torch.Tensor:
        return _kl_distillation(student.logits, teacher, self.temperature)


class _GroupSoftmaxFeatureModule(FeatureDistillationTrainableModule):
    """timm's feature-distillation module for a converted student.

    One forward of the student gives its :class:`~timm_gsl.GroupSoftmaxOutput`; the distilled features
    are the classifier's input (what ``forward_head(..., pre_logits=True)`` returns for a timm model with
    one linear classifier), projected when the teacher's are wider or narrower.
    """

    def forward(self, input: torch.Tensor) -> Tuple[GroupSoftmaxOutput, torch.Tensor]:
        output = self.student(input)
        if not isinstance(output, GroupSoftmaxOutput):
            raise _not_group_output()
        features = output.features
        if self.projection is not None:
            features = self.projection(features)
        return output, features


class GroupSoftmaxFeatureDistillationTask(_GroupSoftmaxDistillation, FeatureDistillationTask):
    """timm's feature distillation with the group softmax loss as the task loss.

    The student (converted with :func:`timm_gsl.convert_model`) runs once per step; the criterion
    receives its :class:`~timm_gsl.GroupSoftmaxOutput`, and the mean squared error compares the
    classifier's input (projected when the widths differ, as in timm) with the teacher's pooled
    pre-logits features. Needs a student with one linear classifier whose input is its pre-logits
    features (true of timm's single-head models). Takes the arguments of
    :class:`timm.task.FeatureDistillationTask` plus ``grouping_statistics``.

    The result holds ``loss``, ``output`` (the logits), ``task_loss`` (the group softmax loss),
    ``kd_loss``, ``softmax_loss`` and, with ``grouping_statistics``, ``grouping_statistics``.
    """

    _teacher_features = True

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: Union[str, nn.Module, DistillationTeacher],
            criterion: Optional[Union[nn.Module, Callable]] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            grouping_statistics: bool = False,
            student_feature_dim: Optional[int] = None,
            **kwargs: Any,
    ):
        super().__init__(student_model, teacher_model, criterion=criterion, criterion_kwargs=criterion_kwargs,
                         grouping_statistics=grouping_statistics, student_feature_dim=student_feature_dim, **kwargs)

    def _prepare_student(self, student: nn.Module, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The distilled features are the single classifier's input: check the sizes, convert the student."""
        heads, width = _classifier_width(student)
        if heads != 1:
            raise ValueError(
                f"{type(self).__name__}: the student has {heads} classifier heads; feature distillation distils "
                f"the classifier's input, which needs a single linear classifier.")
        dim = kwargs.get('student_feature_dim')
        if dim is None:
            dim = self._detect_feature_dim(student)
        if dim != width:
            raise ValueError(
                f"student_feature_dim {dim}: with the group softmax loss the distilled student features are its "
                f"classifier's input, which has {width} elements (leave student_feature_dim unset).")
        convert_model(student)
        return dict(kwargs, student_feature_dim=dim)

    def _adapt(self) -> None:
        self.trainable_module = _GroupSoftmaxFeatureModule(self.trainable_module.student,
                                                           self.trainable_module.projection)

    def _student_forward(self, input: torch.Tensor) -> Tuple[GroupSoftmaxOutput, torch.Tensor]:
        return self.trainable_module(input)

    def _distillation_term(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student, teacher)


class _MainHeadCapture:
    """Hooks that make a distilled student return ``(GroupSoftmaxOutput of the main head, dist_logits)``.

    In distilled training mode a DeiT-style student returns the logits of its main and distillation
    heads separately; the group softmax loss needs the main head's input, weight and bias. Like
    :class:`timm_gsl.GroupSoftmaxHead` these are hooks (nothing in ``state_dict``), active only in
    training mode, and the main head's output goes out of the model's own ``forward`` (DDP sees it).
    """

    def __init__(self, model: nn.Module):
        layers = classifier_layers(model)
        self.name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
        if len(layers) != 2:
            raise UnsupportedModelError(
                f'{self.name}: token distillation needs a main and a distillation head, found {len(layers)} '
                f'classifier layer(s).')
        self.layer = layers[0]
        self.verified = False
        self._armed = False
        self._input: Optional[torch.Tensor] = None
        self._calls = 0
        model.register_forward_pre_hook(self._before_forward)
        self.layer.register_forward_pre_hook(self._capture)
        model.register_forward_hook(self._after_forward)

    def _before_forward(self, model: nn.Module, args: Any) -> None:
        if model.training:
            self._armed, self._input, self._calls = True, None, 0

    def _capture(self, layer: nn.Module, args: Any) -> None:
        if self._armed:
            self._input = args[0]
            self._calls += 1

    def _after_forward(self, model: nn.Module, args: Any, output: Any) -> Any:
        if not self._armed:
            return output
        self._armed = False
        features, calls = self._input, self._calls
        self._input = None
        if not (isinstance(output, (tuple, list)) and len(output) == 2
                and all(isinstance(o, torch.Tensor) for o in output)):
            raise UnsupportedModelError(
                f'{self.name}: in training mode it returns {type(output).__name__}, not (main logits, '
                f'distillation logits); token distillation needs set_distilled_training(True).')
        if calls != 1:
            raise UnsupportedModelError(f'{self.name}: its main classifier ran {calls} times in one forward pass.')
        logits = output[0]
        features, weight, bias = linear_classifier([self.layer], [features], self.name)
        if not self.verified:
            with torch.no_grad():
                expect = F.linear(features.float(), weight.float(), None if bias is None else bias.float())
                tol = 3e-2 if logits.dtype in (torch.float16, torch.bfloat16) else 1e-4
                if expect.shape != logits.shape or not float((expect - logits.float()).abs().max()) <= tol * (
                        1.0 + float(expect.abs().max())):
                    raise UnsupportedModelError(
                        f'{self.name}: its main logits are not classifier(features); the group softmax loss '
                        f'would train a different function.')
            self.verified = True
        return type(output)((GroupSoftmaxOutput(logits, features, weight, bias), output[1]))


def _find_capture(model: nn.Module) -> Optional[_MainHeadCapture]:
    for fn in model._forward_hooks.values():
        owner = getattr(fn, '__self__', None)
        if isinstance(owner, _MainHeadCapture):
            return owner
    return None


class GroupSoftmaxTokenDistillationTask(_GroupSoftmaxDistillation, TokenDistillationTask):
    """timm's token distillation with the group softmax loss on the main head.

    The student (with a distillation head, e.g. a distilled DeiT, put in distilled training mode as
    timm does) returns in training mode the :class:`~timm_gsl.GroupSoftmaxOutput` of its main head and
    the plain logits of its distillation head: the criterion receives the first, the soft (KL) or hard
    (cross-entropy with the teacher's argmax) distillation term the second, as in
    :class:`timm.task.TokenDistillationTask`. A student converted with :func:`timm_gsl.convert_model` is
    unconverted first (that head serves the mean of both heads, which distilled training does not
    return). Takes the arguments of :class:`timm.task.TokenDistillationTask` plus
    ``grouping_statistics``.

    The result holds ``loss``, ``output`` (the main head's logits), ``task_loss`` (the group softmax
    loss), ``distill_loss``, ``softmax_loss`` and, with ``grouping_statistics``, ``grouping_statistics``.
    """

    _part = 'distill_loss'

    def _prepare_student(self, student: nn.Module, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        if is_converted(student):
            unconvert_model(student)
        if _find_capture(student) is None:
            _MainHeadCapture(student)
        return kwargs

    def _student_forward(self, input: torch.Tensor) -> Tuple[GroupSoftmaxOutput, torch.Tensor]:
        student_output = self.trainable_module(input)
        if not isinstance(student_output, (tuple, list)):
            raise _not_group_output()
        output, dist_logits = student_output
        return output, dist_logits

    def _distillation_term(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.distill_type == 'soft':
            return _kl_distillation(student, teacher, self.temperature)
        return F.cross_entropy(student, teacher.argmax(dim=-1))
