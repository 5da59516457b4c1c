"""Safe reading of checkpoints: tensors and plain containers only, one-line errors, shape checks.

The messages name the checkpoint as the caller's ``flag`` says, and the architecture by its keyword (``arch``) or
through ``names`` (:mod:`timm_gsl.naming`; the command lines name their ``--model``).
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
from typing import Any, Dict, Mapping

import torch
import torch.nn as nn
from timm.models import clean_state_dict

from ..naming import Names, option_name
from .atomic import atomic_path

__all__ = ['add_checkpoint_entries', 'check_checkpoint_fits', 'read_checkpoint']

_logger = logging.getLogger(__name__)


def read_checkpoint(path: str, flag: str) -> Dict[str, Any]:
    """Load a checkpoint without running any code it might carry.

    Pickled checkpoints are read with ``torch.load(..., weights_only=True)``, which rebuilds only
    tensors, plain containers and (as timm's checkpoints hold one) ``argparse.Namespace``; a file
    asking for anything else is refused before a single object of it is built. ``.safetensors``
    files hold no code at all and are read with safetensors.

    Whatever else is wrong with the file (a folder, an empty, truncated or text file, random bytes, a
    zip of something else) ends in the same kind of one-line ``ValueError``: the unpickler and the zip
    reader raise many exception types (``EOFError``, ``KeyError``, ``IndexError``, ``struct.error``,
    ``UnicodeDecodeError``, ``RuntimeError``, ...), and none of them may reach the user as a traceback.

    Args:
        path: the checkpoint file.
        flag: the command-line flag that named it, for the messages (e.g. ``'--resume'``).

    Returns:
        The checkpoint as a dict; a bare state dict or a safetensors file comes back as
        ``{'state_dict': ...}``.

    Raises:
        ValueError: the file is missing, unreadable, or carries objects other than weights; the
            message names ``flag``, the path and what is accepted. A file refused for the objects it
            would build says "was refused" (and that nothing in it was run); any other unreadable file
            says "is not a readable checkpoint".
    """
    expected = 'expected a checkpoint written by train.py (.pth.tar) or a .safetensors file'
    if os.path.isdir(path):
        raise ValueError(f'{flag} {path!r} is a folder; {expected}.')
    if not os.path.isfile(path):
        raise ValueError(f'{flag} {path!r}: no such file; {expected}.')
    if os.path.getsize(path) == 0:
        raise ValueError(f'{flag} {path!r} is an empty file; {expected}.')

    def unreadable(e: BaseException) -> ValueError:
        detail = str(e).strip().splitlines()[0].strip() if str(e).strip() else ''
        detail = detail.split('. ')[0].rstrip('.')[:160]  # the first sentence: miniz's advice goes on for lines
        kind = type(e).__name__ if type(e).__name__ != 'error' else f'{type(e).__module__}.error'  # struct.error
        return ValueError(f'{flag} {path!r} is not a readable checkpoint ({kind}{": " + detail if detail else ""}); '
                          f'{expected}, complete and undamaged.')

    if path.lower().endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return {'state_dict': load_file(path, device='cpu')}
        except MemoryError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise ValueError(f'{flag} {path!r} is not a readable safetensors file ({type(e).__name__}: '
                             f'{str(e).strip()[:200]}); expected a complete .safetensors file.') from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        refused = [line for line in lines if any(word in line for word in (
            'GLOBAL', 'global', 'allowlisted', 'reduce', 'new object'))]
        if not refused:
            # Not a request for a forbidden object: bytes the unpickler cannot parse (e.g. "Unsupported operand").
            reason = next((line for line in lines if line.startswith('Unsupported')), lines[-1] if lines else '')
            raise unreadable(pickle.UnpicklingError(reason)) from e
        reason = next((line for line in refused if 'global' in line.lower()), refused[0])
        raise ValueError(f'{flag} {path!r} was refused: it holds pickled objects other than tensors and plain '
                         f'containers ({reason}), which could run code when loaded. Only weights_only '
                         f'checkpoints and .safetensors files are accepted; nothing in it was run.') from e
    except MemoryError:
        raise
    except Exception as e:  # EOFError, KeyError, IndexError, struct.error, UnicodeDecodeError, RuntimeError, ...
        raise unreadable(e) from e
    if isinstance(checkpoint, dict) and ('state_dict' in checkpoint or 'model' in checkpoint):
        return checkpoint
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return {'state_dict': checkpoint}
    raise ValueError(f'{flag} {path!r} holds a {type(checkpoint).__name__} without a state dict; expected a '
                     f'checkpoint written by train.py (with "state_dict") or a plain state dict.')


def add_checkpoint_entries(path: str, entries: Mapping[str, Any]) -> None:
    """Set top-level ``entries`` in a checkpoint file, rewritten whole under a temporary name and renamed.

    The file is read as :func:`read_checkpoint` reads it (weights only), so nothing in it runs; the values must
    be plain data (numbers, strings, lists, dicts) for the result to stay loadable with ``weights_only``. A file
    hard-linked elsewhere (timm's saver links ``model_best.pth.tar`` to ``last.pth.tar``) gets its own copy.

    Args:
        path: a checkpoint written by train.py.
        entries: the top-level entries to set (key -> value).
    """
    checkpoint = read_checkpoint(path, 'checkpoint')
    checkpoint.update(entries)
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def check_checkpoint_fits(checkpoint: Dict[str, Any], model: nn.Module, arch: str, flag: str, path: str, *,
                          names: Names = None) -> None:
    """Refuse a checkpoint whose weights do not fit ``model``: other names or other shapes.

    Args:
        checkpoint: from :func:`read_checkpoint`.
        model: the freshly created model the weights are for.
        arch: the ``--model`` name, for the message (checkpoints of train.py record theirs as ``arch``).
        flag: the flag that named the checkpoint.
        path: its path.
        names: keyword -> how the message names it (the command lines pass their flags); default: the keyword
            (``arch``).

    Raises:
        ValueError: naming the flag, the checkpoint's architecture and the first mismatches (or the first values
            that are not tensors).
    """
    saved = clean_state_dict(checkpoint.get('state_dict', checkpoint.get('model')) or {})
    foreign = [f'{k} ({type(v).__name__})' for k, v in saved.items() if not isinstance(v, torch.Tensor)]
    if foreign:
        raise ValueError(f'{flag} {path!r} holds values other than tensors in its state dict, e.g. {foreign[:3]}; '
                         f'expected a state dict of tensors (a checkpoint written by train.py, or a .safetensors '
                         f'file).')
    expected = model.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    reshaped = [f'{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
                if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    saved_arch = checkpoint.get('arch')
    if missing or unexpected or reshaped:
        problems = []
        if missing:
            problems.append(f'{len(missing)} missing weight(s), e.g. {missing[:3]}')
        if unexpected:
            problems.append(f'{len(unexpected)} unexpected weight(s), e.g. {unexpected[:3]}')
        if reshaped:
            problems.append(f'{len(reshaped)} of another shape, e.g. {reshaped[:3]}')
        raise ValueError(f'{flag} {path!r} is a checkpoint of {saved_arch or "an unknown architecture"!s}, which '
                         f'does not fit {option_name("arch", names)} {arch}: {"; ".join(problems)}. Expected a '
                         f'checkpoint of the same architecture, number of classes and input channels.')
    if saved_arch and saved_arch != arch:
        _logger.warning(f'{flag} {path!r} records architecture {saved_arch!r}, not {arch!r}, but its weights fit; '
                        f'loading them.')
