"""The teacher: read from a ``local-dir:`` folder or a checkpoint, its class count checked, created frozen.

The teacher is timm's :class:`~timm.task.DistillationTeacher`, created as timm's ``train.py`` creates it
(``pretrained=True``, the student's class and channel counts), in eval mode with no gradients. Before it
is created its class count is checked against the student's wherever that is cheap (a ``local-dir:``
config, a checkpoint's classifier, a module); afterwards, the class count of the weights timm loaded.
Logit and token distillation compare class scores, so these must agree; feature distillation does not
use the teacher's classifier.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import is_model, load_state_dict, parse_model_name, resolve_pretrained_cfg, split_model_name_tag
from timm.task import DistillationTeacher, FeatureDistillationTask, TrainingTask
from timm.utils import unwrap_model

from ..head import UnsupportedModelError, classifier_layers
from ..naming import Names, option_name, option_value
from .messages import one_line


def _local_dir_config(teacher: str, folder: str, names: Names = None) -> Dict[str, Any]:
    """The ``config.json`` of a ``local-dir:`` teacher, checked to name a timm architecture."""
    where = option_value('teacher', teacher, names)
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
        raise ValueError(f'{where}: cannot read {config_path} ({one_line(e)}).') from None
    arch = config.get('architecture') if isinstance(config, dict) else None
    if not isinstance(arch, str) or not is_model(arch):
        raise ValueError(f'{where}: {config_path} names the architecture {arch!r}, which timm does not have.')
    return config


def _class_mismatch(teacher: Any, teacher_classes: int, student_classes: int, names: Names = None) -> str:
    """The message for a teacher trained on another number of classes than the student's."""
    name = teacher if isinstance(teacher, str) else f'<{type(teacher).__name__} module>'
    return (f"{option_name('teacher', names)} {name} has {teacher_classes} classes but the student has "
            f"{student_classes}; logit and token distillation compare class scores, so the teacher must be trained "
            f"on the student's classes (feature distillation, {option_name('distill_type', names)} feature, does "
            f"not use the teacher's classifier).")


def _model_classes(model: nn.Module) -> Optional[int]:
    """A model's class count: ``num_classes``, else its classifier's output size (None: neither)."""
    classes = getattr(model, 'num_classes', None)
    if isinstance(classes, int) and not isinstance(classes, bool):
        return classes
    try:
        layers = classifier_layers(model)
    except UnsupportedModelError:
        return None
    return int(layers[0].weight.shape[0])


def _checkpoint_classes(arch: str, path: str, names: Names = None) -> Optional[int]:
    """The class count of the classifier in a teacher checkpoint for a timm architecture, when it has one."""
    try:
        classifier = resolve_pretrained_cfg(arch).classifier
    except Exception:  # noqa: BLE001
        return None
    classifier_names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    if not classifier_names:
        return None
    try:
        state_dict = load_state_dict(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{option_value('teacher_pretrained_path', path, names)}: cannot read it "
                         f'({type(e).__name__}: {one_line(e)}).') from e
    weight = state_dict.get(classifier_names[0] + '.weight')
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim >= 1 else None


def _check_teacher_classes(teacher: Union[str, nn.Module], pretrained_path: Optional[str], num_classes: int,
                           names: Names = None) -> None:
    """Refuse a teacher module or checkpoint with another class count than the student's."""
    if isinstance(teacher, nn.Module):
        module = teacher.model if isinstance(teacher, DistillationTeacher) else teacher
        classes = _model_classes(unwrap_model(module))
        if classes is not None and classes != num_classes:
            raise ValueError(_class_mismatch(teacher, classes, num_classes, names))
        return
    source, model_id = parse_model_name(teacher)
    if source is None and pretrained_path:
        classes = _checkpoint_classes(split_model_name_tag(model_id)[0], pretrained_path, names)
        if classes is not None and classes != num_classes:
            raise ValueError(_class_mismatch(teacher, classes, num_classes, names))
    # local-dir and registry weights: checked by check_distillation_options; hf-hub: after creation.


def _create_teacher(
        teacher: Union[str, nn.Module],
        num_classes: int,
        in_chans: int,
        pretrained_path: Optional[str],
        device: Optional[torch.device],
        dtype: Optional[torch.dtype],
        names: Names = None,
) -> DistillationTeacher:
    """timm's :class:`DistillationTeacher`, with creation errors turned into one-line ValueErrors."""
    if isinstance(teacher, DistillationTeacher):
        model = teacher
    elif isinstance(teacher, nn.Module):
        if device is not None or dtype is not None:
            teacher.to(device=device, dtype=dtype)
        model = DistillationTeacher(teacher, num_classes=num_classes, in_chans=in_chans, device=device, dtype=dtype)
    else:
        weights = f" with {option_name('teacher_pretrained_path', names)} {pretrained_path}" if pretrained_path else ''
        try:
            model = DistillationTeacher(teacher, num_classes=num_classes, in_chans=in_chans,
                                        pretrained_path=pretrained_path, device=device, dtype=dtype)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 (weights that cannot be had or do not fit, options it refuses)
            raise ValueError(f"{option_value('teacher', teacher, names)}{weights}: timm cannot create the teacher "
                             f'({type(e).__name__}: {one_line(e)}).') from e
    model.eval()
    model.requires_grad_(False)
    return model


def _prepare_teacher(teacher: Union[str, nn.Module], distill_type: str, teacher_feature_dim: Optional[int],
                     num_classes: int, in_chans: int, teacher_pretrained_path: Optional[str],
                     device: Optional[torch.device], dtype: Optional[torch.dtype], names: Names = None,
                     ) -> Tuple[DistillationTeacher, Optional[int]]:
    """The frozen teacher, its class count checked against the student's; its feature size for feature distillation.

    Returns:
        ``(teacher, teacher_feature_dim)``.
    """
    cannot_infer = (f"cannot infer the teacher's feature size; give "
                    f"{option_name('teacher_feature_dim', names)}.")
    if distill_type != 'feature':
        _check_teacher_classes(teacher, teacher_pretrained_path, num_classes, names)
    if distill_type == 'feature' and teacher_feature_dim is None and isinstance(teacher, nn.Module):
        module = teacher.model if isinstance(teacher, DistillationTeacher) else teacher
        try:
            FeatureDistillationTask._detect_feature_dim(module)
        except ValueError:
            raise ValueError(f"{option_name('distill_type', names)} feature: {cannot_infer}") from None
    teacher_module = _create_teacher(teacher, num_classes, in_chans, teacher_pretrained_path, device, dtype, names)
    if distill_type != 'feature' and isinstance(teacher, str):
        # The class count of the weights timm loaded (a classifier of another size is dropped by timm).
        loaded = (getattr(teacher_module.model, 'pretrained_cfg', None) or {}).get('num_classes')
        if isinstance(loaded, int) and loaded and loaded != num_classes:
            raise ValueError(_class_mismatch(teacher, loaded, num_classes, names))
    if distill_type == 'feature' and teacher_feature_dim is None:
        try:
            teacher_feature_dim = FeatureDistillationTask._detect_feature_dim(teacher_module.model)
        except ValueError:
            raise ValueError(f"{option_value('teacher', teacher, names)}: {cannot_infer}") from None
    return teacher_module, teacher_feature_dim


def _check_channels(task: TrainingTask, in_chans: int, names: Names = None) -> None:
    """Refuse normalisation statistics that would broadcast the student's input to another channel count."""
    if torch.equal(task.student_mean, task.teacher.mean_kd) and torch.equal(task.student_std, task.teacher.std_kd):
        return
    for name, tensor in (('student mean', task.student_mean), ('student std', task.student_std),
                         ('teacher mean', task.teacher.mean_kd), ('teacher std', task.teacher.std_kd)):
        if tensor.numel() not in (1, in_chans):
            raise ValueError(
                f"{option_name('teacher', names)}: the {name} has {tensor.numel()} values but the student takes "
                f"{in_chans} channels, so the student's input cannot be renormalised for the teacher; give "
                f"input_mean/input_std (the normalisation of the data) and a teacher whose pretrained_cfg mean/std "
                f"have {in_chans} values (or the same statistics, which need no renormalisation).")
