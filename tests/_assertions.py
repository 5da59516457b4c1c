"""Assertions the loss tests share: equal values and gradients, and one-line ValueErrors that say what is wrong."""
from __future__ import annotations

from typing import Sequence

import pytest
import torch

TOL = dict(rtol=1e-9, atol=1e-9)


def assert_same_value_and_grads(loss, expected, inputs, tol=TOL):
    """Equal values and equal gradients with respect to (features, weight[, bias])."""
    torch.testing.assert_close(loss, expected, **tol)
    got = torch.autograd.grad(loss, inputs, retain_graph=True)
    want = torch.autograd.grad(expected, inputs, retain_graph=True)
    for name, g, r in zip(('features', 'weight', 'bias'), got, want):
        torch.testing.assert_close(g, r, **tol, msg=lambda m, name=name: f'gradient of {name}: {m}')


def assert_value_error_says(call, pieces: Sequence[str]) -> None:
    """``call()`` raises ``ValueError`` whose message holds every piece (argument, value, what is allowed)."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    for piece in pieces:
        assert piece in message, f'{piece!r} missing from {message!r}'
