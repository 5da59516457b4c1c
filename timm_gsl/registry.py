"""timm's model factory: the ``group_softmax`` entrypoint, and a run's model created again from its record.

Importing :mod:`timm_gsl` registers one entrypoint, ``group_softmax``. It creates the *base*
architecture with timm (pretrained weights, ``num_classes`` and every other keyword pass through)
and converts it with :func:`timm_gsl.convert_model`. The model it returns is an instance of the base
class whose ``pretrained_cfg['architecture']`` names the base architecture, so anything exported
from it names ``resnet50``, never ``group_softmax``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import timm
import torch.nn as nn
from timm.models import register_model, resolve_model_input_args

from .head import convert_model
from .record import ModelRecord

__all__ = ['create_model_from_record', 'group_softmax']


def create_model_from_record(spec: ModelRecord, input_options: Optional[Mapping[str, Any]] = None,
                             **overrides: Any) -> nn.Module:
    """The architecture of a run, created with ``timm.create_model`` as training created it.

    The architecture, classes, input channels, global pooling and model keyword arguments come from ``spec``;
    timm resolves the input size as its own scripts do (:func:`timm.models.resolve_model_input_args`: a model
    with a fixed input size is built for the size asked). No weights are loaded unless ``overrides`` ask
    (``pretrained=True``).

    Args:
        spec: the model section of a run record.
        input_options: the input requested (``img_size``, ``input_size``, ``in_chans``), when any.
        **overrides: other ``timm.create_model`` arguments (``pretrained``, ``scriptable``, ...); they win over
            ``spec``.

    Returns:
        The model (in training mode, as timm returns it).
    """
    options = dict(pretrained=False, num_classes=spec.num_classes, in_chans=spec.in_chans,
                   global_pool=spec.global_pool, **spec.kwargs)
    options.update(overrides)
    return timm.create_model(**resolve_model_input_args(spec.architecture, dict(input_options or {}), **options))


@register_model
def group_softmax(pretrained: bool = False, base_model: str = '', **kwargs: Any) -> nn.Module:
    """A timm model of architecture ``base_model`` that trains with the group softmax loss.

    Args:
        pretrained: load the base architecture's pretrained weights.
        base_model: any name ``timm.create_model`` accepts ('resnet50', 'hf-hub:org/name', ...).
        **kwargs: passed to ``timm.create_model(base_model, ...)`` (``num_classes``, ``drop_rate``, ...).

    Examples:
        >>> import timm, timm_gsl
        >>> model = timm.create_model('group_softmax', base_model='resnet18', num_classes=10)
        >>> loss = timm_gsl.GroupSoftmaxLoss(groups=4)(model(images), labels)
    """
    if not base_model or not isinstance(base_model, str):
        raise ValueError(
            f"base_model must name a timm architecture (e.g. base_model='resnet50'), got {base_model!r}.")
    if base_model.split('.')[0] == 'group_softmax':
        raise ValueError("base_model must be a real architecture, not 'group_softmax' itself.")
    if kwargs.get('pretrained_cfg') is None:
        kwargs.pop('pretrained_cfg', None)
    model = timm.create_model(base_model, pretrained=pretrained, **kwargs)
    # timm's factory records the arguments of *this* call, base_model included, as the model's
    # reconstruction arguments once we return; an export (save_for_hf) would then write
    # base_model=... into config.json and the base architecture could not be rebuilt from it.
    # Exports read the state dict first, so drop the key there.
    model.register_state_dict_pre_hook(_drop_base_model_arg)
    return convert_model(model)


def _drop_base_model_arg(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    getattr(module, '_model_args', {}).pop('base_model', None)
