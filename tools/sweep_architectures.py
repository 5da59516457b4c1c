#!/usr/bin/env python3
"""Sweep the grouped head over every timm model family (module).

For each module in ``timm.list_modules()`` the script picks the smallest architecture by parameter
count (counted on the meta device, nothing allocated), then:

1. creates it with a small ``num_classes`` and, where the model allows, a small input size;
2. converts it with :func:`timm_gsl.convert_model` and runs one training step (train-mode forward,
   :class:`timm_gsl.GroupSoftmaxLoss`, backward, gradient norm clipped to 1, SGD step) on a batch
   of two;
3. loads the trained state dict with ``strict=True`` into an unconverted ``timm.create_model`` of
   the same architecture and checks that both give identical eval logits (``torch.equal``); the
   converted model's ``pretrained_cfg['architecture']`` must still name the architecture.

A model passes when all of this works; it is *refused* when ``convert_model`` or the training step
raises :class:`timm_gsl.UnsupportedModelError` / ``ValueError`` (a clear refusal); anything else is a
*crash* (or a *timeout*). The table goes to stdout and, with ``--markdown``, into a Markdown file
between the ``<!-- sweep:begin -->`` / ``<!-- sweep:end -->`` markers (the rest of the file is kept).

Examples:
    python -m tools.sweep_architectures                          # every module (slow on a CPU)
    python -m tools.sweep_architectures --modules resnet,levit,deit
    python -m tools.sweep_architectures --max-params 30e6 --markdown docs/architecture_sweep.md
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import timm

import timm_gsl
from timm_gsl import GroupSoftmaxLoss, UnsupportedModelError, convert_model
from timm_gsl.engine.atomic import write_text_atomic

# Modules registered by this project (timm_gsl.registry), which are not timm architecture families.
OWN_MODULES = {timm_gsl.registry.__name__.rsplit('.', 1)[-1]}

# Input sizes tried, smallest first, before falling back to the model's pretrained_cfg input size.
SMALL_SIZES = (64, 96, 128, 160)

MARK_BEGIN = '<!-- sweep:begin -->'
MARK_END = '<!-- sweep:end -->'


class SweepTimeout(Exception):
    """A model took longer than the per-model time limit."""


@dataclass
class Result:
    """The outcome for one module."""
    module: str
    model: str
    params: Optional[int]
    status: str  # 'pass' | 'refused' | 'crash' | 'timeout' | 'skipped'
    reason: str = ''
    input_size: str = ''
    seconds: float = 0.0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], add_help=True)
    parser.add_argument('--modules', default='', type=str,
                        help='comma-separated timm modules to sweep (default: all of timm.list_modules())')
    parser.add_argument('--max-params', default=100e6, type=float,
                        help='skip a module whose smallest model has more parameters than this (default 100e6)')
    parser.add_argument('--num-classes', default=5, type=int, help='classes of the test models (default 5)')
    parser.add_argument('--timeout', default=300, type=int, help='seconds allowed per model, 0 = none (default 300)')
    parser.add_argument('--threads', default=1, type=int, help='torch CPU threads (default 1)')
    parser.add_argument('--seed', default=0, type=int, help='random seed (default 0)')
    parser.add_argument('--markdown', default='', type=str,
                        help='write the table into this Markdown file (between the sweep markers)')
    return parser


# ----------------------------------------------------------------------------------------------
# Choosing the model and its input
# ----------------------------------------------------------------------------------------------

def count_params_meta(name: str) -> int:
    """Parameter count of ``timm.create_model(name)``, built on the meta device (no memory, no init)."""
    with torch.device('meta'):
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters())


def smallest_model(module: str) -> Tuple[Optional[str], Optional[int], str]:
    """The architecture of ``module`` with the fewest parameters: ``(name, params, note)``."""
    best: Tuple[Optional[str], Optional[int]] = (None, None)
    failed = []
    for name in timm.list_models(module=module):
        try:
            params = count_params_meta(name)
        except Exception as e:  # a model that cannot be built on meta is not a candidate
            failed.append(f'{name}: {type(e).__name__}')
            continue
        if best[1] is None or params < best[1]:
            best = (name, params)
    note = f'{len(failed)} model(s) not buildable on meta' if failed else ''
    return best[0], best[1], note


def _default_size(name: str) -> Tuple[int, int, int]:
    cfg = timm.get_pretrained_cfg(name)
    size = getattr(cfg, 'input_size', None) if cfg is not None else None
    return tuple(size) if size else (3, 224, 224)


def _input_options(name: str) -> Iterator[Tuple[Dict[str, Any], Tuple[int, int, int]]]:
    chans, height, width = _default_size(name)
    for size in SMALL_SIZES:
        if size < min(height, width):
            yield {}, (chans, size, size)
            yield dict(img_size=size), (chans, size, size)
    yield {}, (chans, height, width)


def resolve_input(name: str, num_classes: int) -> Tuple[Dict[str, Any], Tuple[int, int, int]]:
    """The smallest (create kwargs, input size) for which the model builds and runs a forward pass.

    Tries each small size first as a plain dynamic input, then with ``img_size=`` (models with
    position embeddings or fixed windows), and finally the model's own ``pretrained_cfg`` size.
    """
    last_error: Optional[Exception] = None
    for kwargs, size in _input_options(name):
        try:
            model = timm.create_model(name, num_classes=num_classes, **kwargs).eval()
            with torch.no_grad():
                out = model(torch.randn(1, *size))
            if isinstance(out, torch.Tensor) and tuple(out.shape) == (1, num_classes):
                return kwargs, size
        except SweepTimeout:
            raise
        except Exception as e:  # this size does not suit the model: try the next
            last_error = e
    if last_error is not None:
        raise last_error
    raise RuntimeError(f'{name}: no input size gave {num_classes} logits')


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------

def check_model(name: str, num_classes: int, groups: int, seed: int) -> str:
    """Convert, train one step, compare eval logits with an unconverted twin.

    Args:
        name: timm architecture.
        num_classes: classes of the test model.
        groups: G of the group softmax loss.
        seed: torch seed for the weights and the batch.

    Returns:
        The input size used, e.g. ``'64x64 (img_size=64)'``.

    Raises:
        UnsupportedModelError, ValueError: the model is refused.
        AssertionError: a non-finite loss or logits, or eval logits that differ from the twin's.
    """
    kwargs, size = resolve_input(name, num_classes)
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes, **kwargs)
    convert_model(model)
    if model.pretrained_cfg.get('architecture') != name:
        raise AssertionError(f"pretrained_cfg['architecture'] is {model.pretrained_cfg.get('architecture')!r}")
    model.train()
    images = torch.randn(2, *size)
    target = torch.tensor([0, num_classes - 1])
    criterion = GroupSoftmaxLoss(groups=groups, loss_type='II')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = criterion(model(images), target)
    if not torch.isfinite(loss):
        raise AssertionError(f'training loss is {float(loss)}')
    loss.backward()
    # Batch-norm over two samples of a tiny feature map can give huge gradients; clipping keeps the
    # weights finite so the eval comparison below means something.
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

    model.eval()
    twin = timm.create_model(name, num_classes=num_classes, **kwargs).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    probe = torch.randn(2, *size)
    with torch.no_grad():
        got, want = model(probe), twin(probe)
    if not isinstance(got, torch.Tensor) or not torch.isfinite(want).all():
        raise AssertionError('eval logits are not finite after the training step')
    if not torch.equal(got, want):
        raise AssertionError('eval logits of the converted model differ from the unconverted twin')
    args = ', '.join(f'{k}={v}' for k, v in kwargs.items())
    return f"{size[1]}x{size[2]}" + (f" ({args})" if args else '')


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise :class:`SweepTimeout` in the main thread after ``seconds`` (0: no limit)."""
    if seconds <= 0 or not hasattr(signal, 'SIGALRM'):
        yield
        return

    def _raise(signum, frame):
        raise SweepTimeout(f'exceeded {seconds}s')

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _one_line(error: BaseException, limit: int = 240) -> str:
    text = ' '.join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + '...'


def sweep_module(module: str, index: int, args: argparse.Namespace) -> Result:
    """Run the whole check for one module's smallest model."""
    start = time.perf_counter()
    if module in OWN_MODULES:
        return Result(module, '-', None, 'skipped', "timm_gsl's own entrypoint ('group_softmax'), not a timm family")
    name, params, note = smallest_model(module)
    if name is None:
        return Result(module, '-', None, 'skipped', f'no model buildable on the meta device ({note})')
    if params > args.max_params:
        return Result(module, name, params, 'skipped',
                      f'smallest model has {params / 1e6:.0f}M parameters > --max-params {args.max_params / 1e6:.0f}M')
    groups = 2 + index % 3
    result = Result(module, name, params, 'pass', f'G={groups}')
    try:
        with time_limit(args.timeout):
            result.input_size = check_model(name, args.num_classes, groups, args.seed)
    except SweepTimeout as e:
        result.status, result.reason = 'timeout', _one_line(e)
    except (UnsupportedModelError, ValueError) as e:
        result.status = 'refused'
        result.reason = f'{type(e).__name__}: {_one_line(e)}'
    except Exception as e:
        result.status = 'crash'
        result.reason = f'{type(e).__name__}: {_one_line(e)}'
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def summary(results: Sequence[Result]) -> str:
    """One line: passes over tested modules, and how many were refused, crashed or skipped."""
    tested = [r for r in results if r.status != 'skipped']
    counts = {s: sum(r.status == s for r in results) for s in ('pass', 'refused', 'crash', 'timeout', 'skipped')}
    rate = 100.0 * counts['pass'] / len(tested) if tested else 0.0
    return (f"{counts['pass']}/{len(tested)} tested modules pass ({rate:.1f}%); refused {counts['refused']}, "
            f"crash {counts['crash']}, timeout {counts['timeout']}, skipped {counts['skipped']} "
            f"(of {len(results)} modules).")


def format_table(results: Sequence[Result]) -> str:
    """A Markdown table: module, model, parameters, input, result, reason."""
    lines = ['| module | model | params | input | result | reason |', '|---|---|---:|---|---|---|']
    for r in results:
        params = f'{r.params / 1e6:.1f}M' if r.params is not None else '-'
        reason = r.reason.replace('|', '\\|')
        lines.append(f'| {r.module} | {r.model} | {params} | {r.input_size or "-"} | {r.status} | {reason} |')
    return '\n'.join(lines)


def write_markdown(path: str, block: str) -> None:
    """Replace the marked block of ``path`` (or append one), writing a temporary file then renaming it."""
    text = ''
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            text = f.read()
    new_block = f'{MARK_BEGIN}\n{block}\n{MARK_END}'
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + new_block + rest.split(MARK_END, 1)[1]
    else:
        text = text + ('\n' if text and not text.endswith('\n') else '') + new_block + '\n'
    write_text_atomic(path, text)


def main(args: argparse.Namespace) -> List[Result]:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings('ignore')
    available = timm.list_modules()
    modules = [m.strip() for m in args.modules.split(',') if m.strip()] if args.modules else available
    unknown = [m for m in modules if m not in available]
    if unknown:
        raise ValueError(f'--modules: unknown timm module(s) {unknown}; expected names from timm.list_modules().')

    results = []
    for index, module in enumerate(modules):
        result = sweep_module(module, index, args)
        results.append(result)
        print(f'{module:28s} {result.model:36s} {result.status:8s} {result.seconds:6.1f}s  {result.reason}',
              flush=True)

    table = format_table(results)
    line = summary(results)
    print()
    print(table)
    print()
    print(line)
    if args.markdown:
        command = 'python -m tools.sweep_architectures ' + ' '.join(sys.argv[1:])
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
        versions = f'timm {timm.__version__}, torch {torch.__version__}, timm-gsl {timm_gsl.__version__}'
        block = f'Command: `{command.strip()}`  \nDate: {stamp}; {versions}  \nResult: {line}\n\n{table}'
        write_markdown(args.markdown, block)
    return results


if __name__ == '__main__':
    main(get_args_parser().parse_args())
