"""How the distillation errors fit one line.

How they name an option (by its keyword, or through ``names`` by a command line's flag) is
:mod:`timm_gsl.naming`'s: train.py passes :data:`timm_gsl.cli.train_args.DISTILLATION_FLAGS`.
"""
from __future__ import annotations


def one_line(error: BaseException) -> str:
    """An exception's text on one line, at most 300 characters (its type's name when it has none)."""
    text = ' '.join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + '...'
