"""The distillation options: their values, timm's weighting rule and the checks done before any model exists.

:func:`check_distillation_options` refuses, in one line, what cannot run or would have no effect,
including a teacher name that cannot resolve to weights of the student's classes
(:func:`_check_teacher_name`). Errors name each option by its keyword, or through ``names`` as a command
line spells it (:mod:`timm_gsl.naming`).
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Tuple, Union

import torch.nn as nn
from timm.models import is_model, parse_model_name, resolve_pretrained_cfg, split_model_name_tag

from ..loss_factory import LOSS_TYPES
from ..naming import Names, option_name, option_value
from .messages import one_line
from .teacher import _class_mismatch, _local_dir_config

DISTILL_TYPES: Tuple[str, ...] = ('logit', 'feature', 'token')
"""``distill_type`` choices (timm's; train.py's ``--kd-distill-type``)."""
KD_LOSS_TYPES: Tuple[str, ...] = ('kl',)
"""``kd_loss_type`` values timm's logit distillation implements (train.py's ``--kd-loss-type``)."""
TOKEN_DISTILL_TYPES: Tuple[str, ...] = ('soft', 'hard')
"""``token_distill_type`` choices (timm's; train.py's ``--kd-token-distill-type``)."""

# timm's train.py default, which is also ours.
_DEFAULT_TEMPERATURE = 4.0


def _teacher_choices(names: Names = None) -> str:
    """What a teacher may be, for the messages that refuse one."""
    return ("give a timm architecture (timm.list_models()) with pretrained weights or a checkpoint "
            f"({option_name('teacher_pretrained_path', names)}), local-dir:FOLDER of a model exported with "
            "'python -m timm_gsl export', hf-hub:ORG/NAME, or an nn.Module")


def distillation_loss_names(distill_type: str, names: Names = None) -> Tuple[str, str]:
    """The names of the two loss parts in a distillation task's result, as timm's tasks name them.

    Args:
        distill_type: 'logit', 'feature' or 'token'.
        names: how the error names ``distill_type`` (None: by that keyword).

    Returns:
        ``('task_loss', 'kd_loss')`` for logit and feature distillation, ``('task_loss', 'distill_loss')``
        for token distillation.
    """
    if distill_type not in DISTILL_TYPES:
        raise ValueError(f"{option_value('distill_type', distill_type, names)}: expected one of {DISTILL_TYPES}.")
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


def _check_teacher_name(teacher: str, teacher_pretrained_path: Optional[str],
                        num_classes: Optional[int], distill_type: str, names: Names = None) -> None:
    """Cheap checks of a teacher given by name: the name resolves, weights can be had, classes agree."""
    where = option_value('teacher', teacher, names)
    if not teacher.strip():
        raise ValueError(f'{where}: empty model name; {_teacher_choices(names)}.')
    try:
        source, model_id = parse_model_name(teacher)
    except ValueError as e:
        raise ValueError(f'{where}: {one_line(e)}') from None
    if source is not None and teacher_pretrained_path:
        raise ValueError(
            f"{option_value('teacher_pretrained_path', teacher_pretrained_path, names)}: only with a timm "
            f'architecture name; {where} already names its weights.')
    if source == 'local-dir':
        config = _local_dir_config(teacher, model_id, names)
        teacher_classes = config.get('num_classes')
        if distill_type != 'feature' and num_classes is not None and isinstance(teacher_classes, int) \
                and teacher_classes != num_classes:
            raise ValueError(_class_mismatch(teacher, teacher_classes, num_classes, names))
        return
    if source is not None:  # hf-hub: resolved (and downloaded) when the teacher is created
        return
    arch, tag = split_model_name_tag(model_id)
    if not is_model(arch):
        raise ValueError(f'{where}: timm has no such model; {_teacher_choices(names)}.')
    if teacher_pretrained_path:
        if not os.path.isfile(teacher_pretrained_path):
            raise ValueError(f"{option_value('teacher_pretrained_path', teacher_pretrained_path, names)}: no such "
                             f"file.")
        return
    try:
        cfg = resolve_pretrained_cfg(arch, pretrained_cfg=tag or None)
    except Exception as e:  # noqa: BLE001 (an unknown tag)
        raise ValueError(f'{where}: {one_line(e)}') from None
    if not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict is not None):
        raise ValueError(
            f"{where}: timm has no pretrained weights for it; give the teacher's checkpoint with "
            f"{option_name('teacher_pretrained_path', names)} or use local-dir:FOLDER of an exported model.")
    # timm would drop pretrained classifier weights of another size and distil from a random classifier.
    if distill_type != 'feature' and num_classes is not None and cfg.num_classes and cfg.num_classes != num_classes:
        raise ValueError(_class_mismatch(teacher, cfg.num_classes, num_classes, names))


def _check_choices(loss: Any, distill_type: str, kd_loss_type: str, token_distill_type: str, temperature: float,
                   names: Names) -> None:
    """The loss, the distillation type and its loss, the token target and the temperature."""
    def named(key: str, value: Any) -> str:
        return option_value(key, value, names)

    if not isinstance(loss, str) or loss not in LOSS_TYPES:
        raise ValueError(f"{named('loss', loss)}: expected one of {LOSS_TYPES}.")
    if distill_type not in DISTILL_TYPES:
        raise ValueError(f"{named('distill_type', distill_type)}: expected one of {DISTILL_TYPES}.")
    if kd_loss_type not in KD_LOSS_TYPES:
        raise ValueError(
            f"{named('kd_loss_type', kd_loss_type)}: timm implements only {KD_LOSS_TYPES} (the KL divergence of "
            f"logit distillation; feature distillation uses the mean squared error, token distillation "
            f"{option_name('token_distill_type', names)}).")
    if token_distill_type not in TOKEN_DISTILL_TYPES:
        raise ValueError(f"{named('token_distill_type', token_distill_type)}: expected one of {TOKEN_DISTILL_TYPES}.")
    if token_distill_type != 'soft' and distill_type != 'token':
        raise ValueError(f"{named('token_distill_type', token_distill_type)}: only with "
                         f"{option_name('distill_type', names)} token (got {distill_type!r}).")
    if not _is_number(temperature) or temperature <= 0:
        raise ValueError(f"{named('temperature', temperature)}: expected a positive number.")
    if distill_type == 'feature' and temperature != _DEFAULT_TEMPERATURE:
        raise ValueError(f"{named('temperature', temperature)}: feature distillation has no temperature "
                         f"(it matches features with the mean squared error).")
    if distill_type == 'token' and token_distill_type == 'hard' and temperature != _DEFAULT_TEMPERATURE:
        raise ValueError(f"{named('temperature', temperature)}: hard token distillation has no temperature "
                         f"(it learns the teacher's argmax).")


def _check_sizes_and_weights(distill_type: str, student_feature_dim: Optional[int],
                             teacher_feature_dim: Optional[int], distill_loss_weight: Optional[float],
                             task_loss_weight: Optional[float], names: Names) -> None:
    """The feature sizes (positive, feature distillation only) and the loss weights (>= 0, not both 0)."""
    dims = (('student_feature_dim', student_feature_dim), ('teacher_feature_dim', teacher_feature_dim))
    for key, value in dims:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f'{option_value(key, value, names)}: expected a positive integer (or leave it unset '
                             f'to infer it).')
    for key, value in dims:
        if value is not None and distill_type != 'feature':
            raise ValueError(f"{option_value(key, value, names)}: only with {option_name('distill_type', names)} "
                             f"feature (got {distill_type!r}).")
    for key, value in (('distill_loss_weight', distill_loss_weight), ('task_loss_weight', task_loss_weight)):
        if value is not None and (not _is_number(value) or value < 0):
            raise ValueError(f'{option_value(key, value, names)}: expected a number >= 0.')
    task_weight, distill_weight = resolve_loss_weights(distill_loss_weight, task_loss_weight)
    distill_flag, task_flag = option_name('distill_loss_weight', names), option_name('task_loss_weight', names)
    if distill_weight < 0:
        raise ValueError(
            f"{option_value('task_loss_weight', task_loss_weight, names)} without {distill_flag}: timm then weights "
            f"the distillation loss 1 - {task_loss_weight} = {distill_weight:g} < 0; give a task weight in [0, 1] or "
            f"{distill_flag} too.")
    if task_weight == 0 and distill_weight == 0:
        raise ValueError(f"{task_flag} 0 and {distill_flag} 0: nothing to train.")


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
        names: Names = None,
) -> None:
    """Check the distillation options without creating any model (cheap; call it early).

    Takes the arguments of :func:`~timm_gsl.distillation.create_distillation_task` that describe the run.
    Options that would have no effect with the chosen distillation type (a temperature for feature
    distillation, feature sizes for logit distillation, a token target for logit or feature distillation,
    another ``kd_loss_type`` than 'kl') are refused rather than silently ignored as timm does.

    Args:
        loss: the task loss, 'gsl' or one of timm's loss types (train.py's ``--loss``).
        teacher: the teacher's timm name (train.py's ``--kd-model-name``) or a module.
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
        names: keyword -> how the errors name that option (e.g. a command line's flags); None, or a
            keyword it lacks: the keyword itself.

    Raises:
        ValueError: one line naming the option, the value and what is allowed.
    """
    _check_choices(loss, distill_type, kd_loss_type, token_distill_type, temperature, names)
    _check_sizes_and_weights(distill_type, student_feature_dim, teacher_feature_dim, distill_loss_weight,
                             task_loss_weight, names)
    if teacher_pretrained_path is not None and not isinstance(teacher_pretrained_path, (str, os.PathLike)):
        raise ValueError(f"{option_value('teacher_pretrained_path', teacher_pretrained_path, names)}: expected a "
                         f"file path.")
    if isinstance(teacher, nn.Module):
        if teacher_pretrained_path:
            raise ValueError(f"{option_value('teacher_pretrained_path', teacher_pretrained_path, names)}: only with "
                             f"a teacher given by name, not with a module.")
        return
    if not isinstance(teacher, str):
        raise ValueError(f"{option_value('teacher', teacher, names)}: {_teacher_choices(names)}.")
    _check_teacher_name(teacher, os.fspath(teacher_pretrained_path) if teacher_pretrained_path else None,
                        num_classes, distill_type, names)
