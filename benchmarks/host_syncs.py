"""Count the reads of tensor values back to the host in a training run, per optimiser step.

On an accelerator every such read (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``,
``.numpy()``, formatting a tensor) waits for the device to finish all the work queued so far. A
:class:`torch.overrides.TorchFunctionMode` sees each one in the process it is installed in (data-loader
workers are other processes and are not counted; neither is data loading in this process), and a global
optimiser step hook counts the steps.

``python -m benchmarks.host_syncs [--module M | --script PATH] -- ARGS`` runs a training command in this
process under the counter and prints the reads made inside any function named ``train_one_epoch`` (the
training loop of timm's ``train.py`` and of ours) per optimiser step, with the call sites. Examples:

    python -m benchmarks.host_syncs --module timm_gsl.train -- --model resnet10t --loss gsl ...
    python -m benchmarks.host_syncs --script ~/pytorch-image-models/train.py -- --model resnet10t ...

Run it the same way under ``torchrun`` for a distributed count (each process prints its own).
"""
from __future__ import annotations

import argparse
import collections
import os
import runpy
import sys
import traceback
from typing import Counter, Iterator, List, Optional, Sequence, Tuple

from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.overrides import TorchFunctionMode

__all__ = ['HOST_READS', 'HostReadCounter', 'main']

#: Tensor methods and functions that copy a value to the host (``cpu`` is one even on a CPU tensor's way
#: there: on an accelerator it is a device-to-host copy).
HOST_READS = frozenset({'item', '__bool__', '__float__', '__int__', '__index__', '__format__', 'tolist', 'cpu',
                        'numpy'})

_DATA_LOADING = os.path.join('torch', 'utils', 'data', '')


class HostReadCounter(TorchFunctionMode):
    """Counts host reads of tensor values and optimiser steps while active (``with HostReadCounter() as c:``).

    Attributes:
        reads: every read, keyed by ``(what, where)``: the method name and the innermost three frames outside
            torch (``file:line`` each, innermost first).
        loop_reads: the same, for the reads made with a function named ``loop_function`` on the stack.
        steps: optimiser steps taken (any optimiser).
        loader_reads: reads made under a ``torch.utils.data`` loader's iteration in this process (data loading
            without worker processes); not in ``reads``.
    """

    def __init__(self, loop_function: str = 'train_one_epoch'):
        super().__init__()
        self.loop_function = loop_function
        self.reads: Counter[Tuple[str, str]] = collections.Counter()
        self.loop_reads: Counter[Tuple[str, str]] = collections.Counter()
        self.steps = 0
        self.loader_reads = 0
        self._hook = None

    def __enter__(self) -> 'HostReadCounter':
        def count_step(*_):
            self.steps += 1
        self._hook = register_optimizer_step_post_hook(count_step)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, '__name__', None)
        if name in HOST_READS:
            stack = traceback.extract_stack()[:-1]
            if any(_DATA_LOADING in f.filename for f in stack):
                # Data loading in this process (--workers 0): CPU tensors that a worker process would handle.
                self.loader_reads += 1
                return func(*args, **(kwargs or {}))
            frames = [f for f in stack if f'{os.sep}torch{os.sep}' not in f.filename and f.filename != __file__]
            key = (name, ' < '.join(f'{os.path.basename(f.filename)}:{f.lineno}' for f in frames[::-1][:3]))
            self.reads[key] += 1
            if any(f.name == self.loop_function for f in frames):
                self.loop_reads[key] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """All reads counted."""
        return sum(self.reads.values())

    @property
    def in_loop(self) -> int:
        """The reads made inside the training loop."""
        return sum(self.loop_reads.values())

    def report(self) -> Iterator[str]:
        """Lines for a person: the totals, then the loop's reads by call site."""
        per_step = f'{self.in_loop / self.steps:.2f}' if self.steps else 'n/a'
        yield (f'host reads: {self.total} in all, {self.in_loop} inside {self.loop_function}; optimiser steps '
               f'{self.steps}; reads per step inside the loop {per_step}')
        for (name, where), count in self.loop_reads.most_common():
            yield f'  {count:6d}  {name:<10} {where}'


def _run(module: Optional[str], script: Optional[str], argv: List[str]) -> int:
    """Run the command as ``python -m module`` or ``python script`` would, in this process; its exit status."""
    sys.argv = [script or module] + argv
    if script:
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        if script:
            runpy.run_path(script, run_name='__main__')
        else:
            runpy.run_module(module, run_name='__main__', alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.host_syncs', description=__doc__.split('\n\n')[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument('--module', metavar='M', help='run python -m M (e.g. timm_gsl.train)')
    what.add_argument('--script', metavar='PATH', help="run a script (e.g. timm's train.py)")
    parser.add_argument('args', nargs=argparse.REMAINDER, help='-- then the arguments of the command')
    args = parser.parse_args(argv)
    if args.script and not os.path.isfile(args.script):
        parser.error(f'argument --script: {args.script!r} is not a file, expected a Python script')
    command = args.args[1:] if args.args[:1] == ['--'] else args.args
    with HostReadCounter() as counter:
        status = _run(args.module, args.script, command)
    rank = os.environ.get('RANK')
    for line in counter.report():
        print(line if rank is None else f'[rank {rank}] {line}', file=sys.stderr, flush=True)
    return status


if __name__ == '__main__':
    sys.exit(main())
