"""The factory: :func:`create_distillation_task`, timm's distillation task for any loss, checked before it is built.

It reads the student's class and channel counts, checks the options
(:func:`~timm_gsl.distillation.check_distillation_options`), the task loss against ``loss``, the data's
normalisation and what the distillation type needs of the student, then creates the teacher
(:mod:`timm_gsl.distillation.teacher`) and builds timm's task, or for ``loss='gsl'`` the matching
``GroupSoftmax*DistillationTask`` (:mod:`timm_gsl.distillation.tasks`).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.task import FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask, TrainingTask
from timm.utils import unwrap_model

from ..head import classifier_layers
from ..loss import GroupSoftmaxLoss
from ..loss_factory import create_classification_loss
from ..task import group_softmax_criterion
from ..naming import Names, option_name, option_value
from .options import _DEFAULT_TEMPERATURE, _is_number, check_distillation_options
from .tasks import (
    GroupSoftmaxFeatureDistillationTask, GroupSoftmaxLogitDistillationTask, GroupSoftmaxTokenDistillationTask,
    _classifier_width)
from .teacher import _check_channels, _model_classes, _prepare_teacher


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


def _task_criterion(loss: str, criterion: Any, grouping_statistics: bool, names: Names = None) -> Any:
    """The task loss, checked to fit ``loss``: a group softmax loss for 'gsl', a loss on logits otherwise."""
    loss_name = option_name('loss', names)
    if loss == 'gsl':
        criterion = group_softmax_criterion(criterion, None, grouping_statistics)
        if isinstance(criterion, nn.modules.loss._Loss) or type(criterion).__module__.startswith('timm.loss'):
            raise ValueError(f"{loss_name} gsl: the criterion {type(criterion).__name__} takes plain logits; give a "
                             f"timm_gsl.GroupSoftmaxLoss.")
    else:
        if isinstance(criterion, GroupSoftmaxLoss):
            raise ValueError(f'{loss_name} {loss}: the criterion is a GroupSoftmaxLoss; use {loss_name} gsl for it.')
        if grouping_statistics:
            raise ValueError(f'grouping_statistics=True needs {loss_name} gsl, got {loss_name} {loss}.')
        if criterion is None:
            criterion = create_classification_loss(loss_type=loss)

    return criterion


def _normalization(values: Optional[Sequence[float]], name: str, device: torch.device,
                   dtype: torch.dtype) -> Optional[torch.Tensor]:
    if values is None:
        return None
    values = [values] if _is_number(values) else list(values)
    if not values or not all(_is_number(v) for v in values) or (name == 'input_std' and min(values) <= 0):
        raise ValueError(f'create_distillation_task: {name}={values!r} must be numbers (std > 0).')
    return torch.tensor(values, device=device, dtype=dtype).view(1, -1, 1, 1)


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


def _check_feature_student(student: nn.Module, student_feature_dim: Optional[int], names: Names) -> None:
    """Feature distillation with the group softmax loss distils the input of the student's single classifier."""
    distill_type, loss = option_name('distill_type', names), option_name('loss', names)
    heads, width = _classifier_width(student)
    if heads != 1:
        raise ValueError(f"{distill_type} feature with {loss} gsl: the student has {heads} classifier heads; the "
                         f"group softmax loss and the distilled features must share the input of a single linear "
                         f"classifier.")
    if student_feature_dim is not None and student_feature_dim != width:
        raise ValueError(f"{option_value('student_feature_dim', student_feature_dim, names)}: with {loss} gsl the "
                         f"distilled student features are its classifier's input, which has {width} elements.")
    dim = student_feature_dim if student_feature_dim is not None else \
        FeatureDistillationTask._detect_feature_dim(student)
    if dim != width:
        raise ValueError(f"{distill_type} feature with {loss} gsl: the student's classifier takes {width} features "
                         f"but its pre-logits features have {dim}; the group softmax loss and the distilled features "
                         f"must share the classifier's input.")


def _check_student(student: nn.Module, gsl: bool, distill_type: str, student_feature_dim: Optional[int],
                   names: Names = None) -> None:
    """What each distillation type needs of the student (a distillation head, one classifier, feature sizes)."""
    type_name, loss_name = option_name('distill_type', names), option_name('loss', names)
    if distill_type == 'token' and not hasattr(student, 'set_distilled_training'):
        raise ValueError(
            f"{type_name} token: the student {type(student).__name__} has no distillation head "
            f"(set_distilled_training); use a distilled model (e.g. deit_tiny_distilled_patch16_224) or "
            f"{type_name} logit.")
    if gsl:
        heads = len(classifier_layers(student))  # UnsupportedModelError (a ValueError) for models it cannot train
        if distill_type == 'token' and heads != 2:
            raise ValueError(f"{type_name} token with {loss_name} gsl: the student has {heads} classifier "
                             f"layer(s), not a main and a distillation head.")
    if distill_type == 'feature' and student_feature_dim is None:
        try:
            FeatureDistillationTask._detect_feature_dim(student)
        except ValueError:
            raise ValueError(f"{type_name} feature: cannot infer the student's feature size (no head_hidden_size or "
                             f"num_features); give {option_name('student_feature_dim', names)}.") from None
    if gsl and distill_type == 'feature':
        _check_feature_student(student, student_feature_dim, names)


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
        names: Names = None,
) -> TrainingTask:
    """Knowledge distillation from a frozen teacher, as timm's ``train.py`` sets it up, for any loss.

    With ``loss != 'gsl'`` this is exactly the task timm's ``train.py`` builds for ``distill_type``
    (:class:`timm.task.LogitDistillationTask`, :class:`~timm.task.FeatureDistillationTask` or
    :class:`~timm.task.TokenDistillationTask`) with ``criterion`` as the task loss. With ``loss='gsl'``
    it is the matching ``GroupSoftmax*DistillationTask`` of :mod:`timm_gsl.distillation.tasks`: the
    group softmax loss is the task loss, the distillation term is timm's.

    Everything cheap is checked before the teacher is created (:func:`check_distillation_options`, the
    student's class count against the teacher's, the feature sizes).

    Args:
        model: the student, a timm model (converted in place for 'gsl').
        loss: 'gsl' or one of timm's loss types (train.py's ``--loss``; only to choose and check, the
            criterion is ``criterion``).
        criterion: the task loss: a :class:`timm_gsl.GroupSoftmaxLoss` for 'gsl', else a criterion on
            logits (train.py's ``train_loss_fn``). None: the loss factory's default for ``loss``.
        teacher: a timm architecture (with pretrained weights, or ``teacher_pretrained_path``),
            ``local-dir:FOLDER``, ``hf-hub:ORG/NAME``, or an ``nn.Module`` (train.py's ``--kd-model-name``).
            Created as timm does: ``pretrained=True``, the student's class and channel counts.
        distill_type: 'logit', 'feature' or 'token' (train.py's ``--kd-distill-type``).
        kd_loss_type: 'kl' (train.py's ``--kd-loss-type``).
        distill_loss_weight: None: see :func:`resolve_loss_weights` (train.py's ``--distill-loss-weight``).
        task_loss_weight: None: see :func:`resolve_loss_weights` (train.py's ``--task-loss-weight``).
        temperature: logit and soft token distillation (train.py's ``--kd-temperature``).
        student_feature_dim: feature distillation; None: inferred (train.py's ``--kd-student-feature-dim``).
        teacher_feature_dim: feature distillation; None: inferred (train.py's ``--kd-teacher-feature-dim``).
        token_distill_type: 'soft' or 'hard' (train.py's ``--kd-token-distill-type``).
        num_classes: the student's class count (None: read from the student).
        in_chans: the student's input channels (None: read from the student, else 3).
        teacher_pretrained_path: checkpoint for a teacher given by timm architecture name (timm's
            ``DistillationTeacher(pretrained_path=...)``; train.py's ``--kd-pretrained-path``, not a flag
            of timm's ``train.py``).
        input_mean: the mean the data loader normalises with (train.py's ``data_config['mean']``). timm
            assumes the student's ``pretrained_cfg`` mean, which is wrong when the data's mean (train.py's
            ``--mean``, or a recipe) overrides it; the teacher receives the input renormalised from these
            to its own statistics. None: timm's assumption.
        input_std: the std the data loader normalises with (see ``input_mean``).
        device: device of the task's tensors and of a teacher created here (a module teacher is moved).
        dtype: dtype of the task's tensors and of the teacher (a module teacher is cast).
        grouping_statistics: with 'gsl', also report the grouping of each batch (see
            :class:`timm_gsl.GroupSoftmaxTask`).
        verbose: log the setup as timm's tasks do.
        names: keyword -> how the errors name that option (train.py passes its flags,
            :data:`timm_gsl.cli.train_args.DISTILLATION_FLAGS`); None, or a keyword it lacks: the keyword.

    Returns:
        The task. ``task(images, target)`` returns ``loss``, ``output`` and the parts named by
        :func:`distillation_loss_names` (plus ``softmax_loss`` and optionally ``grouping_statistics`` for
        'gsl'). Train ``task.get_trainable_module().parameters()``; evaluate and save
        ``task.get_eval_model()`` (or use ``task.get_checkpoint_state()``, which adds the feature
        projection as ``task_state``).

    Raises:
        ValueError: a bad option, teacher or combination, in one line naming the option and value.

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
        num_classes=num_classes, names=names)
    gsl = loss == 'gsl'
    criterion = _task_criterion(loss, criterion, grouping_statistics, names)
    mean, std = _student_normalization(student, input_mean, input_std, device, dtype)
    _check_student(student, gsl, distill_type, student_feature_dim, names)
    teacher_module, teacher_feature_dim = _prepare_teacher(
        teacher, distill_type, teacher_feature_dim, num_classes, in_chans, teacher_pretrained_path, device, dtype,
        names)
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
    _check_channels(task, in_chans, names)
    return task
