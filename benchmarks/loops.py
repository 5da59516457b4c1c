"""The training loops the speed benchmarks compare, and how they are timed side by side.

* :func:`timm_style_epoch`: the per-step work of timm's own ``train.py`` ``train_one_epoch`` (timm 1.0.x) for
  one process without gradient accumulation: the task's forward under autocast, backward (through the
  gradient scaler when there is one), optimiser step, ``zero_grad``, EMA update, the update timer, the loss
  read back with ``.item()`` into an ``AverageMeter`` every batch, and the scheduler's ``step_update`` with
  that meter's mean. Written here from reading timm's script (it is not part of the timm package).
* :func:`ours_epoch`: :func:`timm_gsl.engine.train_one_epoch`, what our ``train.py`` runs.
* :func:`interleaved_rounds` runs every loop once per round, rotating the order, and :func:`ratio_summary`
  turns the per-round times into ratios against a baseline measured in the same round (load from other jobs
  largely cancels), with a bootstrap interval to tell a difference from the noise.
"""
from __future__ import annotations

import random
import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence

import torch
from timm import utils

from timm_gsl.engine import TrainingState, train_one_epoch

__all__ = ['interleaved_rounds', 'ours_epoch', 'ratio_summary', 'timm_style_epoch']


def timm_style_epoch(task: Any, optimizer: torch.optim.Optimizer, batches: Sequence, epoch: int,
                     lr_scheduler: Any = None, amp_autocast: Callable[[], ContextManager] = nullcontext,
                     loss_scaler: Any = None) -> float:
    """One epoch the way timm's ``train_one_epoch`` steps (see the module docstring); the mean loss."""
    task.train()
    losses = utils.AverageMeter()
    update_time = utils.AverageMeter()
    num_updates = epoch * len(batches)
    optimizer.zero_grad()
    update_start = time.time()
    for input, target in batches:
        with amp_autocast():
            loss = task(input, target)['loss']
        if loss_scaler is not None:
            loss_scaler(loss, optimizer)
        else:
            loss.backward()
            optimizer.step()
        losses.update(loss.item(), input.shape[0])
        num_updates += 1
        optimizer.zero_grad()
        task.update_ema(step=num_updates)
        now = time.time()
        update_time.update(now - update_start)
        update_start = now
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses.avg)
    return losses.avg


def ours_epoch(task: Any, optimizer: torch.optim.Optimizer, batches: Sequence, epoch: int,
               lr_scheduler: Any = None, amp_autocast: Callable[[], ContextManager] = nullcontext,
               loss_scaler: Any = None, device: Optional[torch.device] = None) -> float:
    """One epoch of :func:`timm_gsl.engine.train_one_epoch` (logging at its first and last update only)."""
    state = TrainingState(optimizer=optimizer, device=device or torch.device('cpu'), lr_scheduler=lr_scheduler,
                          amp_autocast=amp_autocast, loss_scaler=loss_scaler, log_interval=10 ** 9)
    return train_one_epoch(epoch, task, batches, state)['loss']


def interleaved_rounds(loops: Dict[str, Callable[[int], Any]], rounds: int,
                       synchronize: Callable[[], None] = lambda: None) -> Dict[str, List[float]]:
    """Seconds of each loop in each of ``rounds`` timed rounds, after one untimed warm-up round.

    Every round runs every loop once (called with the round's epoch number), starting from a different loop
    each round so that none always runs first or right after another. ``synchronize`` waits for the device
    before and after each timed loop.
    """
    names = list(loops)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for epoch in range(rounds + 1):
        shift = epoch % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize()
            start = time.perf_counter()
            loops[name](epoch)
            synchronize()
            if epoch:  # the first round warms up allocators, caches and compiled graphs
                times[name].append(time.perf_counter() - start)
    return times


def _median_ci(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple:
    """Percentile bootstrap 95 % interval of the median of ``values``."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def ratio_summary(times: Dict[str, List[float]], baseline: str) -> Dict[str, Dict[str, Any]]:
    """Per loop: median seconds, and the median, quartiles and 95 % bootstrap interval of its per-round ratio
    to ``baseline`` (timed in the same round); ``verdict`` says whether the interval excludes 1."""
    summary = {}
    for name, values in times.items():
        ratios = [t / b for t, b in zip(values, times[baseline])]
        row: Dict[str, Any] = dict(median_s=statistics.median(values), ratio=statistics.median(ratios))
        if name != baseline and len(ratios) >= 3:
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            low, high = _median_ci(ratios)
            verdict = ('slower, above the noise' if low > 1 else 'faster, above the noise' if high < 1
                       else 'within the noise')
            row.update(q1=q1, q3=q3, ci_low=low, ci_high=high, verdict=verdict)
        elif name != baseline:
            row['verdict'] = 'too few rounds for an interval'
        summary[name] = row
    return summary
