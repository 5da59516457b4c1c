"""How the distillation errors name an option: by its keyword, or through ``names`` by a command line's flag.

Every function of :mod:`timm_gsl.distillation` that names options in its errors takes
``names: Optional[Mapping[str, str]]``, keyword -> how the message names it (train.py passes
:data:`timm_gsl.cli.train_args.DISTILLATION_FLAGS`, which names its flags). A keyword missing from
``names``, or no ``names`` at all, is named as itself: ``teacher 'x'``, ``distill_type``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

Names = Optional[Mapping[str, str]]
"""Keyword -> how a message names that option (None: the keyword itself)."""


def option_name(key: str, names: Names = None) -> str:
    """How a message names the option ``key``: ``names[key]``, else the keyword."""
    return names.get(key, key) if names else key


def option_value(key: str, value: Any, names: Names = None) -> str:
    """The option and its value as a message shows them: ``distill_type 'attention'``."""
    return f'{option_name(key, names)} {value!r}'


def one_line(error: BaseException) -> str:
    """An exception's text on one line, at most 300 characters (its type's name when it has none)."""
    text = ' '.join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + '...'
