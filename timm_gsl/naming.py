"""How the library's messages name an option: by its keyword, or through ``names`` as the caller's users know it.

Every library function whose errors name options takes ``names: Optional[Mapping[str, str]]``, keyword -> how
the message names it. The command lines (:mod:`timm_gsl.cli`) pass their flags, so train.py's messages read
``--kd-distill-type 'attention'``; a keyword missing from ``names``, or no ``names`` at all, is named as itself:
``distill_type 'attention'``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

__all__ = ['Names', 'option_name', 'option_value']

Names = Optional[Mapping[str, str]]
"""Keyword -> how a message names that option (None: the keyword itself)."""


def option_name(key: str, names: Names = None) -> str:
    """How a message names the option ``key``: ``names[key]``, else the keyword."""
    return names.get(key, key) if names else key


def option_value(key: str, value: Any, names: Names = None) -> str:
    """The option and its value as a message shows them: ``distill_type 'attention'``."""
    return f'{option_name(key, names)} {value!r}'
