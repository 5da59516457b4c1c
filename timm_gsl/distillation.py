"""Knowledge distillation as timm's ``train.py`` does it, with timm's losses or the group softmax loss.

timm 1.0.31 distils a student from a frozen teacher with one of three ``timm.task`` tasks, chosen by
``--kd-distill-type``:

* ``logit``: :class:`timm.task.LogitDistillationTask`, the temperature-scaled KL divergence between
  the student's and the teacher's logits (times ``T**2``), result parts ``task_loss`` and ``kd_loss``;
* ``feature``: :class:`timm.task.FeatureDistillationTask`, the mean squared error between the
  student's pooled pre-logits features (through a learned linear projection when the widths differ)
  and the teacher's, result parts ``task_loss`` and ``kd_loss``;
* ``token``: :class:`timm.task.TokenDistillationTask`, for students with a distillation head
  (distilled DeiT): the main head learns the labels, the distillation head the teacher's soft
  (KL) or hard (argmax) predictions, result parts ``task_loss`` and ``distill_loss``.

The total is ``task_loss_weight * task_loss + distill_loss_weight * <distillation part>``, with timm's
weighting rule (:func:`resolve_loss_weights`).

:func:`create_distillation_task` builds exactly timm's task for every loss but ``'gsl'``. For
``'gsl'`` it builds the subclasses defined here, in which the group softmax loss is the task loss: the
student is converted (:func:`timm_gsl.convert_model`), the criterion receives its
:class:`~timm_gsl.GroupSoftmaxOutput`, and the distillation term receives what timm's task would give
it (the plain logits, the pre-logits features, the distillation head's logits). Their result also
holds ``softmax_loss`` (the plain softmax cross-entropy of the same logits, as
:class:`timm_gsl.GroupSoftmaxTask` reports it) and, on request, ``grouping_statistics``.

As in timm, ``task.get_eval_model()`` is the student (a plain timm model: same class and state-dict
keys, the teacher outside it), ``task.get_trainable_module()`` is what the optimiser trains (the student,
or for feature distillation the student with the projection), and the teacher stays in eval mode,
frozen, outside both.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import is_model, load_state_dict, parse_model_name, resolve_pretrained_cfg, split_model_name_tag
from timm.task import (
    DistillationTeacher, FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask, TrainingTask)
from timm.task.distillation import FeatureDistillationTrainableModule
from timm.utils import unwrap_model

from .head import (
    GroupSoftmaxOutput, UnsupportedModelError, classifier_layers, convert_model, is_converted, linear_classifier,
    unconvert_model)
from .loss import GroupSoftmaxLoss
from .loss_factory import LOSS_TYPES, create_classification_loss
from .task import group_softmax_criterion, group_softmax_parts, track_grouping_statistics

__all__ = [
    'DISTILL_TYPES',
    'KD_LOSS_TYPES',
    'TOKEN_DISTILL_TYPES',
    'FLAGS',
    'GroupSoftmaxLogitDistillationTask',
    'GroupSoftmaxFeatureDistillationTask',
    'GroupSoftmaxTokenDistillationTask',
    'check_distillation_options',
    'create_distillation_task',
    'distillation_loss_names',
    'resolve_loss_weights',
]

_logger = logging.getLogger(__name__)

DISTILL_TYPES: Tuple[str, ...] = ('logit', 'feature', 'token')
"""``--kd-distill-type`` choices (timm's)."""
KD_LOSS_TYPES: Tuple[str, ...] = ('kl',)
"""``--kd-loss-type`` values timm's logit distillation implements."""
TOKEN_DISTILL_TYPES: Tuple[str, ...] = ('soft', 'hard')
"""``--kd-token-distill-type`` choices (timm's)."""

FLAGS: Dict[str, str] = dict(
    loss='--loss',
    teacher='--kd-model-name',
    distill_type='--kd-distill-type',
    kd_loss_type='--kd-loss-type',
    distill_loss_weight='--distill-loss-weight',
    task_loss_weight='--task-loss-weight',
    temperature='--kd-temperature',
    student_feature_dim='--kd-student-feature-dim',
    teacher_feature_dim='--kd-teacher-feature-dim',
    token_distill_type='--kd-token-distill-type',
    teacher_pretrained_path='--kd-pretrained-path',
)
"""The command-line flag each argument of :func:`create_distillation_task` stands for (named in errors).

All are timm's ``train.py`` flags except ``--kd-pretrained-path``, which timm's ``train.py`` does not have
(its ``DistillationTeacher`` takes the path as ``pretrained_path``)."""

# timm's train.py defaults, which are also ours.
_DEFAULT_TEMPERATURE = 4.0
_TEACHER_CHOICES = ("give a timm architecture (timm.list_models()) with pretrained weights or a checkpoint "
                    f"({FLAGS['teacher_pretrained_path']}), local-dir:FOLDER of a model exported with "
                    "'python -m timm_gsl export', hf-hub:ORG/NAME, or an nn.Module")


def _one_line(error: BaseException) -> str:
    text = ' '.join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + '...'


def _flag(name: str, value: Any) -> str:
    return f'{FLAGS[name]} {value!r}'


def distillation_loss_names(distill_type: str) -> Tuple[str, str]:
    """The names of the two loss parts in a distillation task's result, as timm's tasks name them.

    Args:
        distill_type: 'logit', 'feature' or 'token'.

    Returns:
        ``('task_loss', 'kd_loss')`` for logit and feature distillation, ``('task_loss', 'distill_loss')``
        for token distillation.
    """
    if distill_type not in DISTILL_TYPES:
        raise ValueError(f"{_flag('distill_type', distill_type)}: expected one of {DISTILL_TYPES}.")
    return ('task_loss', 'distill_loss') if distill_type == 'token' else ('task_loss', 'kd_loss')


def resolve_loss_weights(
        distill_loss_weight: Optional[float] = None,
        task_loss_weight: Optional[float] = None,
) -> Tuple[float, float]:
    """timm's weighting rule: ``(task_loss_weight, distill_loss_weight)`` actually used.

    Both given: as given. Only the distillation weight: the task weight is 1. Only the task weight:
    the distillation weight is ``1 - task_loss_weight``. Neither: both 1.
    """
    if distill_loss_weight is not None:
        return (1.0 if task_loss_weight is None else float(task_loss_weight)), float(distill_loss_weight)
    if task_loss_weight is not None:
        return float(task_loss_weight), 1.0 - float(task_loss_weight)
    return 1.0, 1.0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_dim(name: str, value: Optional[int]) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f'{_flag(name, value)}: expected a positive integer (or leave it unset to infer it).')


def _local_dir_config(teacher: str, folder: str) -> Dict[str, Any]:
    """The ``config.json`` of a ``local-dir:`` teacher, checked to name a timm architecture."""
    where = f"{FLAGS['teacher']} {teacher!r}"
    if not os.path.isdir(folder):
        raise ValueError(f'{where}: {folder} is not a folder; local-dir: needs a folder holding config.json and '
                         f'the weights (as \'python -m timm_gsl export\' or timm\'s save_for_hf writes it).')
    config_path = os.path.join(folder, 'config.json')
    if not os.path.isfile(config_path):
        raise ValueError(f'{where}: {folder} has no config.json; local-dir: needs a folder written by '
                         f'\'python -m timm_gsl export\' or timm\'s save_for_hf.')
    try:
        with open(config_path, encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'{where}: cannot read {config_path} ({_one_line(e)}).') from None
    arch = config.get('architecture') if isinstance(config, dict) else None
    if not isinstance(arch, str) or not is_model(arch):
        raise ValueError(f'{where}: {config_path} names the architecture {arch!r}, which timm does not have.')
    return config


def _check_teacher_name(teacher: str, teacher_pretrained_path: Optional[str],
                        num_classes: Optional[int], distill_type: str) -> None:
    """Cheap checks of a teacher given by name: the name resolves, weights can be had, classes agree."""
    where = f"{FLAGS['teacher']} {teacher!r}"
    if not teacher.strip():
        raise ValueError(f'{where}: empty model name; {_TEACHER_CHOICES}.')
    try:
        source, model_id = parse_model_name(teacher)
    except ValueError as e:
        raise ValueError(f'{where}: {_one_line(e)}') from None
    if source is not None and teacher_pretrained_path:
        raise ValueError(
            f"{_flag('teacher_pretrained_path', teacher_pretrained_path)}: only with a timm architecture name; "
            f'{where} already names its weights.')
    if source == 'local-dir':
        config = _local_dir_config(teacher, model_id)
        teacher_classes = config.get('num_classes')
        if distill_type != 'feature' and num_classes is not None and isinstance(teacher_classes, int) \
                and teacher_classes != num_classes:
            raise ValueError(_class_mismatch(teacher, teacher_classes, num_classes))
        return
    if source is not None:  # hf-hub: resolved (and downloaded) when the teacher is created
        return
    arch, tag = split_model_name_tag(model_id)
    if not is_model(arch):
        raise ValueError(f'{where}: timm has no such model; {_TEACHER_CHOICES}.')
    if teacher_pretrained_path:
        if not os.path.isfile(teacher_pretrained_path):
            raise ValueError(f"{_flag('teacher_pretrained_path', teacher_pretrained_path)}: no such file.")
        return
    try:
        cfg = resolve_pretrained_cfg(arch, pretrained_cfg=tag or None)
    except Exception as e:  # noqa: BLE001 (an unknown tag)
        raise ValueError(f'{where}: {_one_line(e)}') from None
    if not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict is not None):
        raise ValueError(
            f"{where}: timm has no pretrained weights for it; give the teacher's checkpoint with "
            f"{FLAGS['teacher_pretrained_path']} or use local-dir:FOLDER of an exported model.")
    # timm would drop pretrained classifier weights of another size and distil from a random classifier.
    if distill_type != 'feature' and num_classes is not None and cfg.num_classes and cfg.num_classes != num_classes:
        raise ValueError(_class_mismatch(teacher, cfg.num_classes, num_classes))


def _class_mismatch(teacher: Any, teacher_classes: int, student_classes: int) -> str:
    name = teacher if isinstance(teacher, str) else f'<{type(teacher).__name__} module>'
    return (f"{FLAGS['teacher']} {name} has {teacher_classes} classes but the student has {student_classes}; "
            f"logit and token distillation compare class scores, so the teacher must be trained on the student's "
            f"classes (feature distillation, {FLAGS['distill_type']} feature, does not use the teacher's classifier).")


def check_distillation_options(
        *,
        loss: str,
        teacher: Union[str, nn.Module],
        distill_type: str = 'logit',
        kd_loss_type: str = 'kl',
        distill_loss_weight: Optional[float] = None,
        task_loss_weight: Optional[float] = None,
        temperature: float = _DEFAULT_TEMPERATURE,
        student_feature_dim: Optional[int] = None,
        teacher_feature_dim: Optional[int] = None,
        token_distill_type: str = 'soft',
        teacher_pretrained_path: Optional[str] = None,
        num_classes: Optional[int] = None,
) -> None:
    """Check the distillation options without creating any model (cheap; call it early).

    Takes the arguments of :func:`create_distillation_task` that describe the run. Options that would
    have no effect with the chosen distillation type (a temperature for feature distillation, feature
    sizes for logit distillation, a token target for logit or feature distillation, another
    ``kd_loss_type`` than 'kl') are refused rather than silently ignored as timm does.

    Args:
        loss: the task loss, 'gsl' or one of timm's loss types (``--loss``).
        teacher: the teacher's timm name (``--kd-model-name``) or a module.
        distill_type: 'logit', 'feature' or 'token'.
        kd_loss_type: 'kl' (the only one timm implements).
        distill_loss_weight: weight of the distillation loss (None: timm's rule).
        task_loss_weight: weight of the task loss (None: timm's rule).
        temperature: softmax temperature of logit and soft token distillation.
        student_feature_dim: student feature size for feature distillation (None: inferred).
        teacher_feature_dim: teacher feature size for feature distillation (None: inferred).
        token_distill_type: 'soft' or 'hard' (token distillation).
        teacher_pretrained_path: checkpoint of a teacher given by timm architecture name.
        num_classes: the student's class count, when known: checked against a ``local-dir:`` teacher's.

    Raises:
        ValueError: one line naming the flag, the value and what is allowed.
    """
    if not isinstance(loss, str) or loss not in LOSS_TYPES:
        raise ValueError(f"{_flag('loss', loss)}: expected one of {LOSS_TYPES}.")
    if distill_type not in DISTILL_TYPES:
        raise ValueError(f"{_flag('distill_type', distill_type)}: expected one of {DISTILL_TYPES}.")
    if kd_loss_type not in KD_LOSS_TYPES:
        raise ValueError(
            f"{_flag('kd_loss_type', kd_loss_type)}: timm implements only {KD_LOSS_TYPES} (the KL divergence of "
            f"logit distillation; feature distillation uses the mean squared error, token distillation "
            f"{FLAGS['token_distill_type']}).")
    if token_distill_type not in TOKEN_DISTILL_TYPES:
        raise ValueError(f"{_flag('token_distill_type', token_distill_type)}: expected one of {TOKEN_DISTILL_TYPES}.")
    if token_distill_type != 'soft' and distill_type != 'token':
        raise ValueError(f"{_flag('token_distill_type', token_distill_type)}: only with "
                         f"{FLAGS['distill_type']} token (got {distill_type!r}).")
    if not _is_number(temperature) or temperature <= 0:
        raise ValueError(f"{_flag('temperature', temperature)}: expected a positive number.")
    if distill_type == 'feature' and temperature != _DEFAULT_TEMPERATURE:
        raise ValueError(f"{_flag('temperature', temperature)}: feature distillation has no temperature "
                         f"(it matches features with the mean squared error).")
    if distill_type == 'token' and token_distill_type == 'hard' and temperature != _DEFAULT_TEMPERATURE:
        raise ValueError(f"{_flag('temperature', temperature)}: hard token distillation has no temperature "
                         f"(it learns the teacher's argmax).")
    _check_dim('student_feature_dim', student_feature_dim)
    _check_dim('teacher_feature_dim', teacher_feature_dim)
    for name, value in (('student_feature_dim', student_feature_dim), ('teacher_feature_dim', teacher_feature_dim)):
        if value is not None and distill_type != 'feature':
            raise ValueError(f'{_flag(name, value)}: only with {FLAGS["distill_type"]} feature (got {distill_type!r}).')
    for name, value in (('distill_loss_weight', distill_loss_weight), ('task_loss_weight', task_loss_weight)):
        if value is not None and (not _is_number(value) or value < 0):
            raise ValueError(f'{_flag(name, value)}: expected a number >= 0.')
    task_weight, distill_weight = resolve_loss_weights(distill_loss_weight, task_loss_weight)
    if distill_weight < 0:
        raise ValueError(
            f"{_flag('task_loss_weight', task_loss_weight)} without {FLAGS['distill_loss_weight']}: timm then weights "
            f"the distillation loss 1 - {task_loss_weight} = {distill_weight:g} < 0; give a task weight in [0, 1] or "
            f"{FLAGS['distill_loss_weight']} too.")
    if task_weight == 0 and distill_weight == 0:
        raise ValueError(f"{FLAGS['task_loss_weight']} 0 and {FLAGS['distill_loss_weight']} 0: nothing to train.")
    if teacher_pretrained_path is not None and not isinstance(teacher_pretrained_path, (str, os.PathLike)):
        raise ValueError(f"{_flag('teacher_pretrained_path', teacher_pretrained_path)}: expected a file path.")
    if isinstance(teacher, nn.Module):
        if teacher_pretrained_path:
            raise ValueError(f"{_flag('teacher_pretrained_path', teacher_pretrained_path)}: only with a teacher "
                             f"given by name, not with a module.")
        return
    if not isinstance(teacher, str):
        raise ValueError(f"{FLAGS['teacher']} {teacher!r}: {_TEACHER_CHOICES}.")
    _check_teacher_name(teacher, os.fspath(teacher_pretrained_path) if teacher_pretrained_path else None,
                        num_classes, distill_type)


# ----------------------------------------------------------------------------------------------
# The group softmax loss as the task loss of timm's distillation tasks
# ----------------------------------------------------------------------------------------------

def _kl_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """timm's soft distillation term: ``T**2 * KL(softmax(t / T) || softmax(s / T))``, batch mean."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction='batchmean', log_target=True) * (temperature ** 2)


def _not_group_output() -> RuntimeError:
    return RuntimeError(
        'the student returned plain logits; call task.train() before a training step (in eval mode use '
        'task.get_eval_model()).')


class _GroupSoftmaxResult:
    """What the three group softmax distillation tasks share: the task loss and the extra result entries."""

    criterion: Any
    grouping_statistics: bool

    def _group_softmax_loss(self, output: GroupSoftmaxOutput, target: torch.Tensor,
                            ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        if not isinstance(output, GroupSoftmaxOutput):
            raise _not_group_output()
        return group_softmax_parts(self.criterion, output, target, self.grouping_statistics)


class GroupSoftmaxLogitDistillationTask(_GroupSoftmaxResult, LogitDistillationTask):
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
        convert_model(unwrap_model(student_model))
        super().__init__(student_model, teacher_model, criterion=criterion, **kwargs)
        track_grouping_statistics(self, grouping_statistics)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        """Group softmax loss and logit distillation.

        Args:
            input: B x C x H x W images, normalised for the student.
            target: B class indices or B x C soft targets.

        Returns:
            ``{'loss', 'output', 'task_loss', 'kd_loss', 'softmax_loss'}`` (and ``'grouping_statistics'``).
        """
        output = self.trainable_module(input)
        task_loss, extra = self._group_softmax_loss(output, target)
        with torch.no_grad():
            input_kd = self.teacher.normalize_input(input, self.student_mean, self.student_std)
            teacher_logits = self.teacher(input_kd.detach(), return_features=False)
        kd_loss = _kl_distillation(output.logits, teacher_logits, self.temperature)
        loss = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss
        return dict({'loss': loss, 'output': output.logits, 'task_loss': task_loss, 'kd_loss': kd_loss}, **extra)


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


def _classifier_width(student: nn.Module) -> Tuple[int, int]:
    """(number of classifier heads, total width of their input) of a timm model."""
    layers = classifier_layers(student)
    return len(layers), sum(int(layer.weight.flatten(1).shape[1]) for layer in layers)


class GroupSoftmaxFeatureDistillationTask(_GroupSoftmaxResult, FeatureDistillationTask):
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
        criterion = group_softmax_criterion(criterion, criterion_kwargs, grouping_statistics)
        student = unwrap_model(student_model)
        heads, width = _classifier_width(student)
        if heads != 1:
            raise ValueError(
                f"{FLAGS['distill_type']} feature with --loss gsl: the student has {heads} classifier heads; "
                f"feature distillation distils the classifier's input, which needs a single linear classifier.")
        dim = student_feature_dim if student_feature_dim is not None else self._detect_feature_dim(student)
        if dim != width:
            raise ValueError(
                f"{FLAGS['student_feature_dim']} {dim}: with --loss gsl the distilled student features are its "
                f"classifier's input, which has {width} elements (leave {FLAGS['student_feature_dim']} unset).")
        convert_model(student)
        super().__init__(student_model, teacher_model, criterion=criterion, student_feature_dim=dim, **kwargs)
        self.trainable_module = _GroupSoftmaxFeatureModule(self.trainable_module.student,
                                                           self.trainable_module.projection)
        track_grouping_statistics(self, grouping_statistics)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        """Group softmax loss and feature distillation.

        Args:
            input: B x C x H x W images, normalised for the student.
            target: B class indices or B x C soft targets.

        Returns:
            ``{'loss', 'output', 'task_loss', 'kd_loss', 'softmax_loss'}`` (and ``'grouping_statistics'``).
        """
        output, student_features = self.trainable_module(input)
        task_loss, extra = self._group_softmax_loss(output, target)
        with torch.no_grad():
            input_kd = self.teacher.normalize_input(input, self.student_mean, self.student_std)
            teacher_features = self.teacher(input_kd.detach(), return_features=True)
        kd_loss = F.mse_loss(student_features, teacher_features)
        loss = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss
        return dict({'loss': loss, 'output': output.logits, 'task_loss': task_loss, 'kd_loss': kd_loss}, **extra)


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


class GroupSoftmaxTokenDistillationTask(_GroupSoftmaxResult, TokenDistillationTask):
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
        student = unwrap_model(student_model)
        if is_converted(student):
            unconvert_model(student)
        if _find_capture(student) is None:
            _MainHeadCapture(student)
        super().__init__(student_model, teacher_model, criterion=criterion, **kwargs)
        track_grouping_statistics(self, grouping_statistics)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        """Group softmax loss on the main head and distillation on the distillation head.

        Args:
            input: B x C x H x W images, normalised for the student.
            target: B class indices or B x C soft targets.

        Returns:
            ``{'loss', 'output', 'task_loss', 'distill_loss', 'softmax_loss'}`` (and ``'grouping_statistics'``).
        """
        student_output = self.trainable_module(input)
        if not isinstance(student_output, (tuple, list)):
            raise _not_group_output()
        output, dist_logits = student_output
        task_loss, extra = self._group_softmax_loss(output, target)
        with torch.no_grad():
            input_kd = self.teacher.normalize_input(input, self.student_mean, self.student_std)
            teacher_logits = self.teacher(input_kd.detach())
        if self.distill_type == 'soft':
            distill_loss = _kl_distillation(dist_logits, teacher_logits, self.temperature)
        else:
            distill_loss = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
        loss = self.task_loss_weight * task_loss + self.distill_loss_weight * distill_loss
        return dict({'loss': loss, 'output': output.logits, 'task_loss': task_loss, 'distill_loss': distill_loss},
                    **extra)


# ----------------------------------------------------------------------------------------------
# The factory
# ----------------------------------------------------------------------------------------------

def _model_classes(model: nn.Module) -> Optional[int]:
    classes = getattr(model, 'num_classes', None)
    if isinstance(classes, int) and not isinstance(classes, bool):
        return classes
    try:
        layers = classifier_layers(model)
    except UnsupportedModelError:
        return None
    return int(layers[0].weight.shape[0])


def _student_input(student: nn.Module, num_classes: Optional[int], in_chans: Optional[int]) -> Tuple[int, int]:
    """The student's class and channel counts (checked against the explicit ones)."""
    own_classes = _model_classes(student)
    if num_classes is None:
        if own_classes is None:
            raise ValueError('create_distillation_task: cannot tell how many classes the student has; '
                             'pass num_classes.')
        num_classes = own_classes
    elif own_classes is not None and own_classes != num_classes:
        raise ValueError(f'create_distillation_task: num_classes={num_classes} but the student has {own_classes} '
                         f'classes.')
    own_chans = getattr(student, 'in_chans', None)
    if in_chans is None:
        in_chans = own_chans if isinstance(own_chans, int) else 3
    elif isinstance(own_chans, int) and own_chans != in_chans:
        raise ValueError(f'create_distillation_task: in_chans={in_chans} but the student takes {own_chans} channels.')
    return num_classes, in_chans


def _create_teacher(
        teacher: Union[str, nn.Module],
        num_classes: int,
        in_chans: int,
        pretrained_path: Optional[str],
        device: Optional[torch.device],
        dtype: Optional[torch.dtype],
) -> DistillationTeacher:
    """timm's :class:`DistillationTeacher`, with creation errors turned into one-line ValueErrors."""
    if isinstance(teacher, DistillationTeacher):
        model = teacher
    elif isinstance(teacher, nn.Module):
        if device is not None or dtype is not None:
            teacher.to(device=device, dtype=dtype)
        model = DistillationTeacher(teacher, num_classes=num_classes, in_chans=in_chans, device=device, dtype=dtype)
    else:
        weights = f" with {FLAGS['teacher_pretrained_path']} {pretrained_path}" if pretrained_path else ''
        try:
            model = DistillationTeacher(teacher, num_classes=num_classes, in_chans=in_chans,
                                        pretrained_path=pretrained_path, device=device, dtype=dtype)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 (weights that cannot be had or do not fit, options it refuses)
            raise ValueError(f"{FLAGS['teacher']} {teacher!r}{weights}: timm cannot create the teacher "
                             f'({type(e).__name__}: {_one_line(e)}).') from e
    model.eval()
    model.requires_grad_(False)
    return model


def _checkpoint_classes(arch: str, path: str) -> Optional[int]:
    """The class count of the classifier in a teacher checkpoint for a timm architecture, when it has one."""
    try:
        classifier = resolve_pretrained_cfg(arch).classifier
    except Exception:  # noqa: BLE001
        return None
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    if not names:
        return None
    try:
        state_dict = load_state_dict(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{_flag('teacher_pretrained_path', path)}: cannot read it ({type(e).__name__}: "
                         f'{_one_line(e)}).') from e
    weight = state_dict.get(names[0] + '.weight')
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim >= 1 else None


def _check_teacher_classes(teacher: Union[str, nn.Module], pretrained_path: Optional[str], num_classes: int) -> None:
    if isinstance(teacher, nn.Module):
        module = teacher.model if isinstance(teacher, DistillationTeacher) else teacher
        classes = _model_classes(unwrap_model(module))
        if classes is not None and classes != num_classes:
            raise ValueError(_class_mismatch(teacher, classes, num_classes))
        return
    source, model_id = parse_model_name(teacher)
    if source is None and pretrained_path:
        classes = _checkpoint_classes(split_model_name_tag(model_id)[0], pretrained_path)
        if classes is not None and classes != num_classes:
            raise ValueError(_class_mismatch(teacher, classes, num_classes))
    # local-dir and registry weights: checked by check_distillation_options; hf-hub: after creation.


def _normalization(values: Optional[Sequence[float]], name: str, device: torch.device,
                   dtype: torch.dtype) -> Optional[torch.Tensor]:
    if values is None:
        return None
    values = [values] if _is_number(values) else list(values)
    if not values or not all(_is_number(v) for v in values) or (name == 'input_std' and min(values) <= 0):
        raise ValueError(f'create_distillation_task: {name}={values!r} must be numbers (std > 0).')
    return torch.tensor(values, device=device, dtype=dtype).view(1, -1, 1, 1)


def _check_channels(task: TrainingTask, in_chans: int) -> None:
    """Refuse normalisation statistics that would broadcast the student's input to another channel count."""
    if torch.equal(task.student_mean, task.teacher.mean_kd) and torch.equal(task.student_std, task.teacher.std_kd):
        return
    for name, tensor in (('student mean', task.student_mean), ('student std', task.student_std),
                         ('teacher mean', task.teacher.mean_kd), ('teacher std', task.teacher.std_kd)):
        if tensor.numel() not in (1, in_chans):
            raise ValueError(
                f"{FLAGS['teacher']}: the {name} has {tensor.numel()} values but the student takes {in_chans} "
                f"channels, so the student's input cannot be renormalised for the teacher; give input_mean/input_std "
                f"(the normalisation of the data) and a teacher whose pretrained_cfg mean/std have {in_chans} values "
                f"(or the same statistics, which need no renormalisation).")


def _task_criterion(loss: str, criterion: Any, grouping_statistics: bool) -> Any:
    """The task loss, checked to fit ``loss``: a group softmax loss for 'gsl', a loss on logits otherwise."""
    if loss == 'gsl':
        criterion = group_softmax_criterion(criterion, None, grouping_statistics)
        if isinstance(criterion, nn.modules.loss._Loss) or type(criterion).__module__.startswith('timm.loss'):
            raise ValueError(f"--loss gsl: the criterion {type(criterion).__name__} takes plain logits; give a "
                             f"timm_gsl.GroupSoftmaxLoss.")
    else:
        if isinstance(criterion, GroupSoftmaxLoss):
            raise ValueError(f'--loss {loss}: the criterion is a GroupSoftmaxLoss; use --loss gsl for it.')
        if grouping_statistics:
            raise ValueError(f'grouping_statistics=True needs --loss gsl, got --loss {loss}.')
        if criterion is None:
            criterion = create_classification_loss(loss_type=loss)

    return criterion


def _student_normalization(student: nn.Module, input_mean: Optional[Sequence[float]],
                           input_std: Optional[Sequence[float]], device: Optional[torch.device],
                           dtype: Optional[torch.dtype]):
    """The data's normalisation as tensors (None: the student's pretrained_cfg, which must then have it)."""
    task_device = device if device is not None else torch.device('cpu')
    task_dtype = dtype if dtype is not None else torch.get_default_dtype()
    mean = _normalization(input_mean, 'input_mean', task_device, task_dtype)
    std = _normalization(input_std, 'input_std', task_device, task_dtype)
    if input_mean is None or input_std is None:
        cfg = getattr(student, 'pretrained_cfg', None) or {}
        if 'mean' not in cfg or 'std' not in cfg:
            raise ValueError('create_distillation_task: the student has no pretrained_cfg mean/std; pass '
                             'input_mean and input_std (the normalisation of the data).')
    return mean, std


def _check_student(student: nn.Module, gsl: bool, distill_type: str, student_feature_dim: Optional[int]) -> None:
    """What each distillation type needs of the student (a distillation head, one classifier, feature sizes)."""
    if distill_type == 'token' and not hasattr(student, 'set_distilled_training'):
        raise ValueError(
            f"{FLAGS['distill_type']} token: the student {type(student).__name__} has no distillation head "
            f"(set_distilled_training); use a distilled model (e.g. deit_tiny_distilled_patch16_224) or "
            f"{FLAGS['distill_type']} logit.")
    if gsl:
        heads = len(classifier_layers(student))  # UnsupportedModelError (a ValueError) for models it cannot train
        if distill_type == 'token' and heads != 2:
            raise ValueError(f"{FLAGS['distill_type']} token with --loss gsl: the student has {heads} classifier "
                             f"layer(s), not a main and a distillation head.")
    if distill_type == 'feature' and student_feature_dim is None:
        try:
            FeatureDistillationTask._detect_feature_dim(student)
        except ValueError:
            raise ValueError(f"{FLAGS['distill_type']} feature: cannot infer the student's feature size (no "
                             f"head_hidden_size or num_features); give {FLAGS['student_feature_dim']}.") from None
    if gsl and distill_type == 'feature':
        heads, width = _classifier_width(student)
        if heads != 1:
            raise ValueError(f"{FLAGS['distill_type']} feature with --loss gsl: the student has {heads} classifier "
                             f"heads; the group softmax loss and the distilled features must share the input of a "
                             f"single linear classifier.")
        if student_feature_dim is not None and student_feature_dim != width:
            raise ValueError(f"{_flag('student_feature_dim', student_feature_dim)}: with --loss gsl the distilled "
                             f"student features are its classifier's input, which has {width} elements.")
        dim = student_feature_dim if student_feature_dim is not None else \
            FeatureDistillationTask._detect_feature_dim(student)
        if dim != width:
            raise ValueError(f"{FLAGS['distill_type']} feature with --loss gsl: the student's classifier takes {width} "
                             f"features but its pre-logits features have {dim}; the group softmax loss and the "
                             f"distilled features must share the classifier's input.")


def _prepare_teacher(teacher: Union[str, nn.Module], distill_type: str, teacher_feature_dim: Optional[int],
                     num_classes: int, in_chans: int, teacher_pretrained_path: Optional[str],
                     device: Optional[torch.device], dtype: Optional[torch.dtype]):
    """The frozen teacher, its class count checked against the student's; its feature size for feature distillation.

    Returns:
        ``(teacher, teacher_feature_dim)``.
    """
    if distill_type != 'feature':
        _check_teacher_classes(teacher, teacher_pretrained_path, num_classes)
    if distill_type == 'feature' and teacher_feature_dim is None and isinstance(teacher, nn.Module):
        module = teacher.model if isinstance(teacher, DistillationTeacher) else teacher
        try:
            FeatureDistillationTask._detect_feature_dim(module)
        except ValueError:
            raise ValueError(f"{FLAGS['distill_type']} feature: cannot infer the teacher's feature size; give "
                             f"{FLAGS['teacher_feature_dim']}.") from None
    teacher_module = _create_teacher(teacher, num_classes, in_chans, teacher_pretrained_path, device, dtype)
    if distill_type != 'feature' and isinstance(teacher, str):
        # The class count of the weights timm loaded (a classifier of another size is dropped by timm).
        loaded = (getattr(teacher_module.model, 'pretrained_cfg', None) or {}).get('num_classes')
        if isinstance(loaded, int) and loaded and loaded != num_classes:
            raise ValueError(_class_mismatch(teacher, loaded, num_classes))
    if distill_type == 'feature' and teacher_feature_dim is None:
        try:
            teacher_feature_dim = FeatureDistillationTask._detect_feature_dim(teacher_module.model)
        except ValueError:
            raise ValueError(f"{FLAGS['teacher']} {teacher!r}: cannot infer the teacher's feature size; give "
                             f"{FLAGS['teacher_feature_dim']}.") from None
    return teacher_module, teacher_feature_dim


def create_distillation_task(
        model: nn.Module,
        *,
        loss: str,
        criterion: Optional[Union[nn.Module, Callable]],
        teacher: Union[str, nn.Module],
        distill_type: str = 'logit',
        kd_loss_type: str = 'kl',
        distill_loss_weight: Optional[float] = None,
        task_loss_weight: Optional[float] = None,
        temperature: float = _DEFAULT_TEMPERATURE,
        student_feature_dim: Optional[int] = None,
        teacher_feature_dim: Optional[int] = None,
        token_distill_type: str = 'soft',
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        teacher_pretrained_path: Optional[str] = None,
        input_mean: Optional[Sequence[float]] = None,
        input_std: Optional[Sequence[float]] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        grouping_statistics: bool = False,
        verbose: bool = True,
) -> TrainingTask:
    """Knowledge distillation from a frozen teacher, as timm's ``train.py`` sets it up, for any loss.

    With ``loss != 'gsl'`` this is exactly the task timm's ``train.py`` builds for ``--kd-distill-type``
    (:class:`timm.task.LogitDistillationTask`, :class:`~timm.task.FeatureDistillationTask` or
    :class:`~timm.task.TokenDistillationTask`) with ``criterion`` as the task loss. With ``loss='gsl'``
    it is the matching ``GroupSoftmax*DistillationTask`` of this module: the group softmax loss is the
    task loss, the distillation term is timm's.

    Everything cheap is checked before the teacher is created (:func:`check_distillation_options`, the
    student's class count against the teacher's, the feature sizes).

    Args:
        model: the student, a timm model (converted in place for 'gsl').
        loss: 'gsl' or one of timm's loss types (``--loss``; only to choose and check, the criterion is
            ``criterion``).
        criterion: the task loss: a :class:`timm_gsl.GroupSoftmaxLoss` for 'gsl', else a criterion on
            logits (train.py's ``train_loss_fn``). None: the loss factory's default for ``loss``.
        teacher: ``--kd-model-name``: a timm architecture (with pretrained weights, or
            ``teacher_pretrained_path``), ``local-dir:FOLDER``, ``hf-hub:ORG/NAME``, or an ``nn.Module``.
            Created as timm does: ``pretrained=True``, the student's class and channel counts.
        distill_type: ``--kd-distill-type``: 'logit', 'feature' or 'token'.
        kd_loss_type: ``--kd-loss-type``: 'kl'.
        distill_loss_weight: ``--distill-loss-weight`` (None: see :func:`resolve_loss_weights`).
        task_loss_weight: ``--task-loss-weight`` (None: see :func:`resolve_loss_weights`).
        temperature: ``--kd-temperature`` (logit and soft token distillation).
        student_feature_dim: ``--kd-student-feature-dim`` (feature distillation; None: inferred).
        teacher_feature_dim: ``--kd-teacher-feature-dim`` (feature distillation; None: inferred).
        token_distill_type: ``--kd-token-distill-type``: 'soft' or 'hard'.
        num_classes: the student's class count (None: read from the student).
        in_chans: the student's input channels (None: read from the student, else 3).
        teacher_pretrained_path: checkpoint for a teacher given by timm architecture name (timm's
            ``DistillationTeacher(pretrained_path=...)``; not a timm ``train.py`` flag).
        input_mean: the mean the data loader normalises with (train.py's ``data_config['mean']``). timm
            assumes the student's ``pretrained_cfg`` mean, which is wrong when ``--mean`` (or a recipe)
            overrides it; the teacher receives the input renormalised from these to its own statistics.
            None: timm's assumption.
        input_std: the std the data loader normalises with (see ``input_mean``).
        device: device of the task's tensors and of a teacher created here (a module teacher is moved).
        dtype: dtype of the task's tensors and of the teacher (a module teacher is cast).
        grouping_statistics: with 'gsl', also report the grouping of each batch (see
            :class:`timm_gsl.GroupSoftmaxTask`).
        verbose: log the setup as timm's tasks do.

    Returns:
        The task. ``task(images, target)`` returns ``loss``, ``output`` and the parts named by
        :func:`distillation_loss_names` (plus ``softmax_loss`` and optionally ``grouping_statistics`` for
        'gsl'). Train ``task.get_trainable_module().parameters()``; evaluate and save
        ``task.get_eval_model()`` (or use ``task.get_checkpoint_state()``, which adds the feature
        projection as ``task_state``).

    Raises:
        ValueError: a bad option, teacher or combination, in one line naming the flag and value.

    Examples:
        >>> criterion = timm_gsl.GroupSoftmaxLoss(groups=4, loss_type='II', smoothing=0.1)
        >>> task = create_distillation_task(student, loss='gsl', criterion=criterion,
        ...                                 teacher='local-dir:output/export/teacher')
        >>> result = task(images, labels)
        >>> result['loss'].backward()
    """
    teacher_pretrained_path = os.fspath(teacher_pretrained_path) if teacher_pretrained_path else None
    student = unwrap_model(model)
    num_classes, in_chans = _student_input(student, num_classes, in_chans)
    check_distillation_options(
        loss=loss, teacher=teacher, distill_type=distill_type, kd_loss_type=kd_loss_type,
        distill_loss_weight=distill_loss_weight, task_loss_weight=task_loss_weight, temperature=temperature,
        student_feature_dim=student_feature_dim, teacher_feature_dim=teacher_feature_dim,
        token_distill_type=token_distill_type, teacher_pretrained_path=teacher_pretrained_path,
        num_classes=num_classes)
    gsl = loss == 'gsl'
    criterion = _task_criterion(loss, criterion, grouping_statistics)
    mean, std = _student_normalization(student, input_mean, input_std, device, dtype)
    _check_student(student, gsl, distill_type, student_feature_dim)
    teacher_module, teacher_feature_dim = _prepare_teacher(
        teacher, distill_type, teacher_feature_dim, num_classes, in_chans, teacher_pretrained_path, device, dtype)
    common = dict(criterion=criterion, distill_loss_weight=distill_loss_weight, task_loss_weight=task_loss_weight,
                  device=device, dtype=dtype, verbose=verbose)
    gsl_kwargs = dict(grouping_statistics=grouping_statistics) if gsl else {}
    if distill_type == 'logit':
        cls = GroupSoftmaxLogitDistillationTask if gsl else LogitDistillationTask
        task = cls(model, teacher_module, loss_type=kd_loss_type, temperature=temperature, **common, **gsl_kwargs)
    elif distill_type == 'feature':
        cls = GroupSoftmaxFeatureDistillationTask if gsl else FeatureDistillationTask
        task = cls(model, teacher_module, student_feature_dim=student_feature_dim,
                   teacher_feature_dim=teacher_feature_dim, **common, **gsl_kwargs)
    else:
        cls = GroupSoftmaxTokenDistillationTask if gsl else TokenDistillationTask
        task = cls(model, teacher_module, distill_type=token_distill_type, temperature=temperature, **common,
                   **gsl_kwargs)

    if mean is not None:
        task.student_mean = mean
    if std is not None:
        task.student_std = std
    _check_channels(task, in_chans)
    return task
