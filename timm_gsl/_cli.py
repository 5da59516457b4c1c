"""Helpers shared by the ``train.py`` and ``validate.py`` command lines."""
from __future__ import annotations

import argparse
import copy
import logging
from typing import Sequence, Set

import torch

_logger = logging.getLogger(__name__)


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Set[str]:
    """Destinations of the options present in ``argv``, even those given their default value.

    Args:
        parser: the command line's parser (left unchanged).
        argv: the arguments.

    Returns:
        The set of ``dest`` names the command line set.
    """
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    given, _ = probe.parse_known_args(argv)
    return set(vars(given))


def resolve_device(name: str, purpose: str = 'running') -> torch.device:
    """The torch device named ``name``; a CUDA device falls back to the CPU, with a notice, when CUDA is absent.

    Args:
        name: a torch device string ('cuda', 'cuda:1', 'cpu', ...).
        purpose: what the device is for, used in the notice ('training', 'validating').

    Returns:
        The device.

    Raises:
        ValueError: ``name`` is not a torch device.
    """
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"Unknown --device {name!r}: expected a torch device such as 'cuda' or 'cpu' ({e}).")
    if device.type == 'cuda' and not torch.cuda.is_available():
        _logger.warning(f"--device {name!r} requested but CUDA is not available: {purpose} on the CPU instead.")
        return torch.device('cpu')
    return device


def check_at_least(flag: str, value: int, minimum: int = 1) -> None:
    """Refuse an integer flag below ``minimum``.

    Raises:
        ValueError: naming the flag, the value and the allowed range.
    """
    if value < minimum:
        raise ValueError(f'{flag} {value} is invalid, expected an integer >= {minimum}.')
