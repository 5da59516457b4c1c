"""Speed of train.py's training loop against timm's, side by side in one process.

Every loop trains the same architecture from the same initial weights on the same batches (drawn once from
train.py's own loader and replayed from memory, so data loading is not timed), with train.py's optimiser and
scheduler, for ``--steps`` steps a round:

* ``timm``: :func:`benchmarks.loops.timm_style_epoch`, the per-step work of timm's own ``train_one_epoch``
  (one ``loss.item()`` a step), over timm's ``ClassificationTask`` with ``--loss ce``; the baseline;
* ``timm-again``: the same loop on its own copy: an A/A arm whose ratio shows what the noise alone does;
* ``ours-ce``: :func:`timm_gsl.engine.train_one_epoch` with ``--loss ce``;
* ``ours-gsl``: the same with ``--loss gsl`` (Type-II, G = 4, the grouping statistics train.py logs);
* ``gsl-nostats``: ``--loss gsl`` without the grouping statistics.

Rounds are interleaved (every loop once a round, rotating the order) after one warm-up round; each loop's
per-round time is divided by the baseline's in the same round. The table gives the median ratio, its
quartiles and a 95 % bootstrap interval of the median; a ratio is "above the noise" when that interval
excludes 1. Goal on a CPU: ours-ce <= 1.02 and ours-gsl <= 1.05.

Usage:
    python -m benchmarks.bench_train                     # resnet10t, 28 px, batch 64, 10 steps x 21 rounds
    python -m benchmarks.bench_train --quick             # smoke run (a few seconds)
"""
from __future__ import annotations

import argparse
import copy
import functools
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
from timm.task import ClassificationTask

from benchmarks.loops import interleaved_rounds, ours_epoch, ratio_summary, timm_style_epoch
from timm_gsl.cli.train import EMBEDDED_RECIPE, apply_embedded_recipe, build_run, check_args, parse_args

LOOPS = ('timm', 'timm-again', 'ours-ce', 'ours-gsl', 'gsl-nostats')


def _build(loss: str, cli: argparse.Namespace):
    argv = ['--model', cli.model, '-b', str(cli.batch_size), '--train-batches-per-epoch', str(cli.steps),
            '--loss', loss, '--epochs', '1000', '--warmup-epochs', '0', '--seed', '0', '--device', 'cpu']
    if cli.quick:
        argv += ['--class-subset', '3', '--samples-per-class', str(cli.batch_size * cli.steps // 3 + 1)]
    args, explicit = parse_args(argv)
    apply_embedded_recipe(args, explicit)
    check_args(args)
    return build_run(args)


def _timm_arm(reference: Any, model: torch.nn.Module, batches: List) -> Any:
    """timm's ClassificationTask over a copy of ``model``, with train.py's optimiser and scheduler settings."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    args = reference.config
    model = copy.deepcopy(model)
    task = ClassificationTask(model, criterion=copy.deepcopy(reference.task.criterion), verbose=False)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=len(batches))
    return functools.partial(timm_style_epoch, task, optimizer, batches, lr_scheduler=scheduler)


def measure(cli: argparse.Namespace) -> Dict[str, List[float]]:
    """Build every loop and time them in interleaved rounds; seconds per round of each."""
    torch.manual_seed(0)
    runs = {'ours-ce': _build('ce', cli), 'ours-gsl': _build('gsl', cli), 'gsl-nostats': _build('gsl', cli)}
    runs['gsl-nostats'].task.grouping_statistics = False
    runs['gsl-nostats'].task.criterion.keep_statistics = False
    reference = runs['ours-ce']
    batches = [(x.clone(), y.clone()) for x, y in reference.loader_train]
    model = reference.task.get_trainable_module()
    initial = copy.deepcopy(model.state_dict())
    for run in runs.values():
        run.task.get_trainable_module().load_state_dict(initial)

    loops = {'timm': _timm_arm(reference, model, batches), 'timm-again': _timm_arm(reference, model, batches)}
    for name, run in runs.items():
        loops[name] = functools.partial(ours_epoch, run.task, run.optimizer, batches, lr_scheduler=run.lr_scheduler)
    return interleaved_rounds({name: loops[name] for name in LOOPS}, cli.repeats)


def format_table(summary: Dict[str, Dict[str, Any]], steps: int, batch_size: int) -> str:
    """The table of :func:`benchmarks.loops.ratio_summary`, one row a loop."""
    lines = [f'{"loop":>12} {"ms/step":>8} {"img/s":>7} {"ratio":>6} {"quartiles":>13} {"95% CI of median":>16}  '
             'verdict']
    for name, row in summary.items():
        ms = 1000 * row['median_s'] / steps
        spread = (f'{row["q1"]:.3f}-{row["q3"]:.3f}', f'{row["ci_low"]:.3f}-{row["ci_high"]:.3f}', row['verdict']) \
            if 'verdict' in row else ('', '', 'baseline')
        lines.append(f'{name:>12} {ms:8.1f} {1000 * batch_size / ms:7.1f} {row["ratio"]:6.3f} {spread[0]:>13} '
                     f'{spread[1]:>16}  {spread[2]}')
    return '\n'.join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.bench_train', description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default=EMBEDDED_RECIPE['model'], help="default: the no-data-flags recipe's")
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--steps', type=int, default=10, help='steps per loop and round (default: %(default)s)')
    parser.add_argument('--repeats', type=int, default=21, help='timed rounds, after one warm-up (default: 21)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads (default: 1; on a shared machine more threads mostly add noise)')
    parser.add_argument('--quick', action='store_true', help='smoke run: batch 8, 2 steps, 3 rounds')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_args_parser()
    cli = parser.parse_args(argv)
    for name in ('batch_size', 'steps', 'repeats', 'threads'):
        if getattr(cli, name) < 1:
            parser.error(f'argument --{name.replace("_", "-")}: {getattr(cli, name)} is invalid, expected >= 1')
    if cli.quick:
        cli.batch_size, cli.steps, cli.repeats = 8, 2, 3
    torch.set_num_threads(cli.threads)
    times = measure(cli)
    print(f'model {cli.model}, batch {cli.batch_size}, {cli.steps} steps x {cli.repeats} interleaved rounds, '
          f'torch {torch.__version__}, threads {torch.get_num_threads()}; ratios to "timm" in the same round')
    print(format_table(ratio_summary(times, 'timm'), cli.steps, cli.batch_size))
    return 0


if __name__ == '__main__':
    sys.exit(main())
