"""Shared by the head, task and registry tests: timm architectures made small, and the reference tap.

The reference is built without ``timm_gsl.head``: :class:`ClassifierTap` hooks the classifier layer(s) that
timm's own ``pretrained_cfg['classifier']`` names and hands back what they receive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn


@dataclass(frozen=True)
class Case:
    """One architecture: how to create it small, and the input it takes."""
    arch: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    size: int = 64

    def create(self, num_classes: int = 5, **extra: Any) -> nn.Module:
        return timm.create_model(self.arch, num_classes=num_classes, **dict(self.kwargs, **extra))

    def __str__(self) -> str:
        return self.arch + ''.join(f'-{k}={v}' for k, v in self.kwargs.items())


class ClassifierTap:
    """Forward pre-hooks on the layers timm's ``pretrained_cfg['classifier']`` names."""

    def __init__(self, model: nn.Module, arch: str):
        names = timm.get_pretrained_cfg(arch).classifier
        names = (names,) if isinstance(names, str) else tuple(names)
        self.layers = [model.get_submodule(n) for n in names]
        self.inputs: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        self._handles = [
            layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, index: int):
        def hook(module, args):
            self.inputs[index] = args[0]
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def linear(self) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(features, weight, bias) of the classifier, averaged over heads: logits = x W^T + b."""
        xs, ws, bs = [], [], []
        for layer, x in zip(self.layers, self.inputs):
            xs.append(x.reshape(x.shape[0], -1))  # B x D x 1 x 1 for a 1x1 conv
            ws.append(layer.weight.reshape(layer.weight.shape[0], -1))
            bs.append(layer.bias)
        k = len(xs)
        bias = None if bs[0] is None else sum(bs) / k
        return torch.cat(xs, 1), torch.cat(ws, 1) / k, bias


def batch(case: Case, num_classes: int = 5, n: int = 4, seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, case.size, case.size, generator=gen)
    target = torch.randint(0, num_classes, (n,), generator=gen)
    return images, target
