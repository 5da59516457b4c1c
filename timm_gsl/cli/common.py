"""Helpers shared by the command lines: one-line errors, the parser class, cheap checks of names and files."""
from __future__ import annotations

import argparse
import copy
import difflib
import logging
import os
import re
import sys
from typing import Any, NoReturn, Optional, Sequence, Set

import torch

from ..hub import check_repo_id

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


def resolve_device(name: str, purpose: str = 'running', asked: bool = True) -> torch.device:
    """The torch device named ``name``; a CUDA device falls back to the CPU, with a notice, when CUDA is absent.

    Args:
        name: a torch device string ('cuda', 'cuda:1', 'cpu', ...).
        purpose: what the device is for, used in the notice ('training', 'validating').
        asked: the user named the device (``--device``); the notice is a warning then, else (timm's default
            'cuda' on a machine without it) an info line.

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
        if asked:
            _logger.warning(f"--device {name!r} requested but CUDA is not available: {purpose} on the CPU instead.")
        else:
            _logger.info(f'CUDA is not available: {purpose} on the CPU.')
        return torch.device('cpu')
    return device


def check_at_least(flag: str, value: int, minimum: int = 1) -> None:
    """Refuse an integer flag below ``minimum``.

    Raises:
        ValueError: naming the flag, the value and the allowed range.
    """
    if value < minimum:
        raise ValueError(f'{flag} {value} is invalid, expected an integer >= {minimum}.')


# ----------------------------------------------------------------------------------------------
# Mistakes: one line, before any expensive work
# ----------------------------------------------------------------------------------------------

def one_line(message: Any) -> str:
    """``message`` as one line: its line breaks (and the indentation after them) become single spaces."""
    return re.sub(r'\s*\n\s*', ' ', str(message)).strip()


def exit_with_error(prog: str, message: Any, hint: Optional[str] = None) -> NoReturn:
    """Print ``<prog>: error: <message>`` (one line) and at most one hint line to stderr; exit with status 2.

    This is how every command of the package reports a user mistake: no usage block, no traceback.

    Args:
        prog: the command's name as the user typed it (``train.py``, ``python -m timm_gsl push``).
        message: what is wrong; line breaks are folded into one line.
        hint: an optional second line (e.g. ``see 'train.py --help'``).

    Raises:
        SystemExit: always, with code 2.
    """
    sys.stdout.flush()
    print(f'{prog}: error: {one_line(message)}', file=sys.stderr)
    if hint:
        print(one_line(hint), file=sys.stderr)
    sys.stderr.flush()
    raise SystemExit(2)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose parse errors are one line and a hint, not the whole usage block.

    ``train.py`` has about 200 flags: argparse's usage block would bury the message under 100 lines.
    Sub-parsers (``add_subparsers().add_parser``) are of this class too.
    """

    def error(self, message: str) -> NoReturn:  # noqa: D102 (argparse's hook)
        exit_with_error(self.prog, message, hint=f"see '{self.prog} --help'")


def check_model_name(name: str, flag: str = '--model') -> None:
    """Refuse a model name timm cannot create, suggesting the closest timm names.

    Accepted: a registered architecture (``resnet50``), one with a pretrained tag timm knows
    (``resnet50.a1_in1k``), ``hf-hub:ORG/NAME`` and ``local-dir:FOLDER`` (the folder must exist).
    Cheap (a look-up in timm's registry), so it runs before any dataset or model is built.

    Args:
        name: the model name.
        flag: the flag (or file) that named it, for the message.

    Raises:
        ValueError: naming the flag, the value, and up to three close matches.
    """
    from timm.models import is_model, list_models, list_pretrained, split_model_name_tag
    from timm.models._factory import parse_model_name
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f'{flag} {name!r}: expected a timm model name such as resnet50 (see timm.list_models()).')
    try:
        source, model_id = parse_model_name(name)
    except ValueError as e:
        raise ValueError(f'{flag} {name!r}: {e}') from None
    if source == 'local-dir':
        if not os.path.isdir(model_id):
            raise ValueError(f'{flag} {name!r}: no such folder {model_id!r}; expected a folder holding config.json '
                             f'and the weights (as `python -m timm_gsl export` writes).')
        return
    if source:  # hf-hub: only the Hub can tell
        return
    arch, tag = split_model_name_tag(name)
    if not is_model(arch):
        close = difflib.get_close_matches(arch, list_models(), n=3, cutoff=0.6)
        suggestion = f'; did you mean {", ".join(close)}?' if close else ' (see timm.list_models())'
        raise ValueError(f'{flag} {name!r}: timm has no model of that name{suggestion}')
    if tag:
        tags = [n.split('.', 1)[1] for n in list_pretrained(f'{arch}.*')]
        if tag not in tags:
            close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.5) or tags[:3]
            known = f'; its tags include {", ".join(close)}' if close else '; it has no pretrained tags'
            raise ValueError(f'{flag} {name!r}: timm has no pretrained tag {tag!r} for {arch}{known}.')


def check_pretrained_weights(name: str, flag: str = '--pretrained') -> None:
    """Refuse ``--pretrained`` for a timm model that has no pretrained weights at all (checked without downloading).

    Raises:
        ValueError: naming the flag and the model.
    """
    from timm.models import get_pretrained_cfg
    from timm.models._factory import parse_model_name
    try:
        source, _ = parse_model_name(name)
        cfg = None if source else get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        return  # check_model_name says what is wrong with the name
    if source:
        return
    if cfg is None or not any(getattr(cfg, key, None) for key in ('url', 'hf_hub_id', 'file', 'state_dict')):
        raise ValueError(f'{flag}: timm has no pretrained weights for --model {name}; drop --pretrained, pass '
                         f'--pretrained-path FILE, or choose a model with weights (timm.list_pretrained()).')


def check_file(path: str, flag: str, expected: str = 'an existing file') -> None:
    """Refuse a path that is not an existing, readable file (a folder included).

    Raises:
        ValueError: naming the flag, the path and what is expected.
    """
    if os.path.isdir(path):
        raise ValueError(f'{flag} {path!r} is a folder; expected {expected}.')
    if not os.path.exists(path):
        raise ValueError(f'{flag} {path!r}: no such file; expected {expected}.')
    if not os.access(path, os.R_OK):
        raise ValueError(f'{flag} {path!r} is not readable (permission denied); expected {expected}.')


def check_folder(path: str, flag: str, expected: str = 'an existing folder') -> None:
    """Refuse a path that is not an existing folder.

    Raises:
        ValueError: naming the flag, the path and what is expected.
    """
    if not os.path.exists(path):
        raise ValueError(f'{flag} {path!r}: no such folder; expected {expected}.')
    if not os.path.isdir(path):
        raise ValueError(f'{flag} {path!r} is a file, not a folder; expected {expected}.')


def check_can_create(path: str, flag: str) -> None:
    """Refuse an output path whose nearest existing ancestor is not a writable folder (checked without writing).

    Raises:
        ValueError: naming the flag and the path.
    """
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f'{flag} {path!r} cannot be created: {parent!r} is a file, not a folder.')
    if not os.access(parent, os.W_OK):
        raise ValueError(f'{flag} {path!r} cannot be created: folder {parent!r} is not writable.')


def check_class_subset(value: Any, flag: str = '--class-subset') -> None:
    """Refuse ``--class-subset`` that is neither a number of classes nor an existing file of class names.

    Raises:
        ValueError: naming the flag, the value and what is expected.
    """
    if value is None or isinstance(value, int):
        return
    text = str(value).strip()
    if text.lstrip('+-').isdigit():
        return  # the number's range is checked against the dataset
    check_file(text, flag, 'a number of classes K or a file of class names (one per line)')


def close_matches(word: str, choices: Sequence[str]) -> str:
    """``'; did you mean a, b?'`` for the choices closest to ``word``, or ``''``."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f'; did you mean {", ".join(close)}?' if close else ''


def repo_id_type(value: str) -> str:
    """``argparse`` type of ``--push-to-hub`` / ``--repo-id``: the checks of :func:`check_repo_id`.

    Args:
        value: the option's text.

    Returns:
        The repo id.
    """
    try:
        return check_repo_id(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def quiet_http_logs() -> None:
    """Keep the HTTP client's one INFO line per request (``httpx`` or ``httpx2``, under ``huggingface_hub``) out of a
    command's output; its warnings and errors still show."""
    for name in ('httpx', 'httpcore', 'httpx2', 'httpcore2'):
        logging.getLogger(name).setLevel(logging.WARNING)


def setup_logging() -> None:
    """INFO-level logging for a command, as timm sets it up, without stacking handlers.

    timm's setup adds a console handler on every call (bound to the stderr of that moment): one is added only
    when nothing is configured, so that calling a command's main() again (tests, notebooks) does not stack them.
    """
    if not logging.root.handlers:
        from timm.utils import setup_default_logging
        setup_default_logging()
    elif logging.root.level > logging.INFO or logging.root.level == logging.NOTSET:
        logging.root.setLevel(logging.INFO)
    quiet_http_logs()
