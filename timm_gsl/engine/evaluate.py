"""Evaluation of a model over a loader with a task's evaluator (top-1, top-5, loss)."""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, Optional

import torch
import torch.nn as nn
from timm import utils
from timm.task import TrainingTask, evaluation_sample_limit

from ..naflex import is_naflex_batch, prepare_naflex_input
from .batch import prepare_input, progress_bar
from .tta import tta_forward

__all__ = ['evaluate']

_logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: Any,
        task: TrainingTask,
        device: torch.device,
        amp_autocast: Callable[[], ContextManager] = nullcontext,
        channels_last: bool = False,
        model_dtype: Optional[torch.dtype] = None,
        distributed: bool = False,
        log_interval: int = 50,
        log_suffix: str = '',
        progress: bool = False,
        tta: int = 0,
        tta_options: Optional[Dict[str, Any]] = None,
) -> 'OrderedDict[str, float]':
    """Evaluate ``model`` with the task's evaluator: cross-entropy loss, top-1 and top-5 in percent.

    Args:
        model: the eval model (``task.get_eval_model()``, or its EMA).
        loader: the evaluation loader.
        task: supplies the evaluator (``task.create_evaluator``).
        device: where batches go.
        amp_autocast: the autocast context factory.
        channels_last: convert inputs to channels-last.
        model_dtype: cast inputs to this dtype.
        distributed: reduce the metrics across processes.
        log_interval: log every this many batches.
        log_suffix: appended to the log prefix, e.g. ' (EMA)'.
        progress: show a tqdm progress bar.
        tta: ``--tta N``: average the logits over N views of each sample (the sample and its mirror,
            :func:`timm_gsl.engine.tta.tta_forward`); 0 or 1: off.
        tta_options: keyword arguments of :func:`timm_gsl.engine.tta.tta_views` (the patch layout of NaFlex
            batches).

    Returns:
        ``OrderedDict(loss=..., top1=..., top5=...)``.
    """
    evaluator = task.create_evaluator(max_samples=evaluation_sample_limit(loader))
    model.eval()
    bar = progress_bar(loader, progress, 'eval' + log_suffix)
    batch_time_m = utils.AverageMeter()
    end = time.time()
    last_idx = len(loader) - 1
    for batch_idx, (input, target) in enumerate(loader):
        if is_naflex_batch(input):
            input, target = prepare_naflex_input(input, target, device, model_dtype)
        else:
            input, target = prepare_input(input, target, device, model_dtype, channels_last)
        with amp_autocast():
            output = tta_forward(model, input, tta, **(tta_options or {}))
        evaluator.update(output, target)
        batch_time_m.update(time.time() - end)
        end = time.time()
        if bar is not None:
            bar.update(1)
        if batch_idx == last_idx or batch_idx % max(1, log_interval) == 0:
            running = evaluator.summary()
            _logger.info(
                f'Test{log_suffix}: [{batch_idx:>4d}/{last_idx}]  '
                f'Time: {batch_time_m.val:.3f} ({batch_time_m.avg:.3f})  '
                f'Loss: {running["loss"]:>7.3f}  Acc@1: {running["top1"]:>7.3f}  Acc@5: {running["top5"]:>7.3f}')
    if bar is not None:
        bar.close()
    return evaluator.compute(distributed=distributed)
