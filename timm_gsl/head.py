"""The grouped classifier head: lets any timm model hand its classifier's input to the loss.

A converted model is the *same* timm model (same class, modules, parameters and state-dict keys)
with three forward hooks attached:

* a forward pre-hook on the model arms a capture and, if ``reset_classifier()`` swapped the
  classifier since the last step, moves the capture hook onto the new one;
* a forward pre-hook on each final linear classifier layer records the tensor it receives;
* a forward hook on the model replaces the logits by a :class:`GroupSoftmaxOutput` that carries
  the logits together with the classifier's input features, weight and bias.

All three act only in training mode, so in eval mode the model *is* the plain model. Because the
loss inputs come out of the model's own ``forward``, a ``DistributedDataParallel`` wrapper sees them
and synchronises every gradient.

Classifiers handled: ``nn.Linear`` (timm's ``Linear`` too), a 1x1 ``nn.Conv2d`` applied to pooled
features, a linear layer inside a container (``ClassifierHead``, ``NormMlpClassifierHead``, MLP
heads, ``NormLinear`` variants: the *last* linear layer is the classifier, everything before it is
part of the features), and models whose logits are the mean of several heads (the two heads of
distilled DeiT and LeViT, the per-branch heads of CrossViT, the ``head``/``head_dist`` pair inside
RepViT's classifier): their features are concatenated and their weights divided by the number of
heads, which is again one linear classifier. On the first training step the head checks that the
model's logits equal ``features @ W.T + b``; a model that does anything after its classifier is
refused there with an error that says so.
"""
from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'GroupSoftmaxOutput',
    'GroupSoftmaxHead',
    'UnsupportedModelError',
    'convert_model',
    'unconvert_model',
    'is_converted',
    'get_logits',
    'classifier_layers',
    'linear_classifier',
]


class UnsupportedModelError(ValueError):
    """The model's classifier cannot be expressed as one linear map of captured features."""


class GroupSoftmaxOutput(NamedTuple):
    """What a converted model returns in training mode.

    Attributes:
        logits: B x C, the model's ordinary output.
        features: B x D, the input of its final linear classifier (heads concatenated).
        weight: C x D, the classifier weight (a view of the parameter, so gradients reach it).
        bias: C, or None.
    """
    logits: torch.Tensor
    features: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]


def get_logits(output: Union[torch.Tensor, GroupSoftmaxOutput]) -> torch.Tensor:
    """The logits of a model output, whether the model is converted (training mode) or not."""
    return output.logits if isinstance(output, GroupSoftmaxOutput) else output


def _is_linear_layer(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and tuple(module.kernel_size) == (1, 1)
        and module.groups == 1
        and tuple(module.dilation) == (1, 1)
        and module.padding in ((0, 0), 'valid')
    )


def _final_linear(head: nn.Module, model_name: str) -> nn.Module:
    if _is_linear_layer(head):
        return head
    found = [m for m in head.modules() if _is_linear_layer(m)]
    if not found:
        raise UnsupportedModelError(
            f"{model_name}: its classifier {type(head).__name__} holds no nn.Linear or 1x1 nn.Conv2d "
            f"(a model created with num_classes=0 has no classifier); the group softmax loss needs a "
            f"linear classifier.")
    return found[-1]


def _classifier_heads(model: nn.Module) -> Tuple[nn.Module, ...]:
    # Several heads come as a tuple (distilled DeiT/LeViT/PiT/EfficientFormer: head, head_dist) or
    # as an nn.ModuleList (CrossViT: one head per branch); the model's logits are their mean.
    heads = model.get_classifier()
    heads = tuple(heads) if isinstance(heads, (tuple, list, nn.ModuleList)) else (heads,)
    # RepViT and iFormer keep their distillation head inside one classifier module.
    if len(heads) == 1 and getattr(heads[0], 'distillation', False) and all(
            isinstance(getattr(heads[0], n, None), nn.Module) for n in ('head', 'head_dist')):
        heads = (heads[0].head, heads[0].head_dist)
    return heads


def classifier_layers(model: nn.Module) -> List[nn.Module]:
    """The final linear layer(s) of a timm model's classifier, one per head.

    Args:
        model: a timm model (anything with ``get_classifier()``).

    Returns:
        One layer for ordinary models, one per head for models whose logits are the mean of
        several heads (distilled DeiT/LeViT, CrossViT, RepViT with distillation).

    Raises:
        UnsupportedModelError: the model has no ``get_classifier()`` or no linear classifier.
    """
    name = _model_name(model)
    if not hasattr(model, 'get_classifier'):
        raise UnsupportedModelError(
            f"{name}: the model has no get_classifier(); the group softmax head needs a timm classifier model.")
    heads = _classifier_heads(model)
    if not heads:
        raise UnsupportedModelError(f"{name}: get_classifier() returned no classifier.")
    return [_final_linear(h, name) for h in heads]


def _layer_weight(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight
    return weight.flatten(1) if weight.ndim == 4 else weight


def _layer_input(layer: nn.Module, x: torch.Tensor, model_name: str) -> torch.Tensor:
    if x.ndim == 4:
        if x.shape[2:] != (1, 1):
            raise UnsupportedModelError(
                f"{model_name}: its 1x1-conv classifier runs on a {x.shape[2]}x{x.shape[3]} feature map, not on "
                f"pooled features; the group softmax loss needs one feature vector per sample.")
        return x.flatten(1)
    if x.ndim != 2:
        raise UnsupportedModelError(
            f"{model_name}: its classifier receives a {x.ndim}-D tensor of shape {tuple(x.shape)}; "
            f"the group softmax loss needs B x D features (token-wise or spatial classifiers are not supported).")
    return x


def linear_classifier(
        layers: Sequence[nn.Module],
        inputs: Sequence[torch.Tensor],
        model_name: str = 'model',
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Express the mean of K linear heads as one linear classifier ``(features, weight, bias)``.

    ``mean_k (x_k W_k^T + b_k) = [x_1 .. x_K] [W_1/K .. W_K/K]^T + mean_k b_k``.
    """
    feats = [_layer_input(layer, x, model_name) for layer, x in zip(layers, inputs)]
    weights = [_layer_weight(layer) for layer in layers]
    if len(layers) == 1:
        return feats[0], weights[0], layers[0].bias
    k = len(layers)
    features = torch.cat(feats, dim=1)
    weight = torch.cat(weights, dim=1) / k
    biases = [layer.bias for layer in layers if layer.bias is not None]
    bias = torch.stack(biases).sum(0) / k if biases else None
    return features, weight, bias


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


class GroupSoftmaxHead:
    """The hooks that make a timm model emit :class:`GroupSoftmaxOutput` in training mode.

    Not an ``nn.Module`` on purpose: it adds nothing to ``state_dict()``, ``repr`` or ``modules()``.
    Use :func:`convert_model` rather than creating it directly.

    Args:
        model: the timm model to attach to.
        verify: check on the first training step that the logits equal ``features @ W.T + b``.
    """

    def __init__(self, model: nn.Module, verify: bool = True):
        self.model = model
        self.verify = verify
        self.verified = False
        self.layers: List[nn.Module] = []
        self._armed = False
        self._inputs: List[Optional[torch.Tensor]] = []
        self._calls: List[int] = []
        self.attach_layers()
        model.register_forward_pre_hook(self._before_forward)
        model.register_forward_hook(self._after_forward)

    # -- hooks -----------------------------------------------------------------------------
    def attach_layers(self) -> None:
        """(Re)attach the capture hook to the model's current classifier layer(s)."""
        layers = classifier_layers(self.model)
        for layer in self.layers:
            _remove_hooks(layer._forward_pre_hooks, self)
        for layer in layers:
            layer.register_forward_pre_hook(self._capture)
        self.layers = layers
        self.verified = False

    def _layers_changed(self) -> bool:
        heads = _classifier_heads(self.model)
        if len(heads) != len(self.layers):
            return True
        return any(
            not (h is layer or any(m is layer for m in h.modules())) for h, layer in zip(heads, self.layers))

    def _before_forward(self, model: nn.Module, args: Any) -> None:
        if not model.training:
            return
        if self._layers_changed():
            self.attach_layers()
        self._armed = True
        self._inputs = [None] * len(self.layers)
        self._calls = [0] * len(self.layers)

    def _capture(self, layer: nn.Module, args: Any) -> None:
        if not self._armed:
            return
        index = next(i for i, m in enumerate(self.layers) if m is layer)
        self._inputs[index] = args[0]
        self._calls[index] += 1

    def _after_forward(self, model: nn.Module, args: Any, output: Any) -> Any:
        if not self._armed:
            return output
        self._armed = False
        inputs, calls = self._inputs, self._calls
        self._inputs, self._calls = [], []
        name = _model_name(model)
        if any(c != 1 for c in calls):
            raise UnsupportedModelError(
                f"{name}: its classifier layer(s) ran {calls} times in one forward pass, expected once each "
                f"(models that apply the classifier to several tokens or feed both distillation heads "
                f"separately in training are not supported).")
        if not isinstance(output, torch.Tensor) or output.ndim != 2:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise UnsupportedModelError(
                f"{name}: in training mode the model returns {shape}, not B x C logits "
                f"(for distilled models, keep set_distilled_training(False)).")
        features, weight, bias = linear_classifier(self.layers, inputs, name)
        if self.verify and not self.verified:
            self._check_linear(name, output, features, weight, bias)
        return GroupSoftmaxOutput(output, features, weight, bias)

    def _check_linear(self, name, output, features, weight, bias) -> None:
        with torch.no_grad():
            expect = F.linear(features.float(), weight.float(), None if bias is None else bias.float())
            if expect.shape != output.shape:
                raise UnsupportedModelError(
                    f"{name}: its logits have shape {tuple(output.shape)} but its classifier gives "
                    f"{tuple(expect.shape)}; the group softmax loss needs logits = classifier(features).")
            got = output.float()
            reduced = output.dtype in (torch.float16, torch.bfloat16) or features.dtype != weight.dtype
            tol = (3e-2 if reduced else 1e-4) * (1.0 + float(expect.abs().max()))
            err = float((got - expect).abs().max())
            if not err <= tol:
                raise UnsupportedModelError(
                    f"{name}: its logits differ from classifier(features) by {err:.3g} (tolerance {tol:.3g}): "
                    f"the model does something after its final linear classifier, so the group softmax "
                    f"loss would train a different function.")
        self.verified = True


def _remove_hooks(hooks: dict, owner: Optional[GroupSoftmaxHead] = None) -> None:
    for key in [k for k, fn in hooks.items()
                if isinstance(getattr(fn, '__self__', None), GroupSoftmaxHead)
                and (owner is None or fn.__self__ is owner)]:
        del hooks[key]


def _find_head(model: nn.Module) -> Optional[GroupSoftmaxHead]:
    for fn in model._forward_hooks.values():
        owner = getattr(fn, '__self__', None)
        if isinstance(owner, GroupSoftmaxHead):
            return owner
    return None


def is_converted(model: nn.Module) -> bool:
    """Whether :func:`convert_model` has attached a :class:`GroupSoftmaxHead` to ``model``."""
    return _find_head(model) is not None


def convert_model(model: nn.Module, verify: bool = True) -> nn.Module:
    """Attach the grouped classifier head to a timm model, in place (idempotent).

    After conversion, ``model(x)`` in training mode returns a :class:`GroupSoftmaxOutput` that
    :class:`timm_gsl.GroupSoftmaxLoss` consumes; in eval mode it returns the plain logits. The
    model's class, modules and state-dict keys do not change, so a checkpoint loads with
    ``strict=True`` into ``timm.create_model(arch)``.

    Args:
        model: a timm classification model.
        verify: on the first training step, check logits == classifier(features) and refuse
            models that do something after their classifier.

    Returns:
        The same model object.

    Raises:
        UnsupportedModelError: the model has no linear classifier the loss can use.

    Examples:
        >>> model = convert_model(timm.create_model('resnet18', num_classes=10))
        >>> loss = GroupSoftmaxLoss(groups=4)(model(images), labels)
    """
    if _find_head(model) is None:
        GroupSoftmaxHead(model, verify=verify)
    return model


def unconvert_model(model: nn.Module) -> nn.Module:
    """Remove the hooks that :func:`convert_model` attached; returns the same model."""
    head = _find_head(model)
    if head is not None:
        for layer in head.layers:
            _remove_hooks(layer._forward_pre_hooks, head)
    _remove_hooks(model._forward_pre_hooks)
    _remove_hooks(model._forward_hooks)
    return model
