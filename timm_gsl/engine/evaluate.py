"""Evaluation of a model over a loader: the task's evaluator (loss, top-1, top-5) and the calibration (NLL, ECE).

Also :func:`predict`, the logits of every image (for fitting a temperature after training).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
from timm import utils
from timm.task import ClassificationEvaluator, TrainingTask, evaluation_sample_limit

from ..calibration import CalibrationMeter
from ..naflex import is_naflex_batch, prepare_naflex_input
from .batch import prepare_input, progress_bar
from .tta import tta_forward

__all__ = ['CALIBRATION_METRICS', 'evaluate', 'predict']

# What evaluate() reports besides the task evaluator's metrics: mean NLL and top-label ECE (percent, 15 bins).
CALIBRATION_METRICS = ('nll', 'ece')

_logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: Any,
        task: Optional[TrainingTask],
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
        output_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        on_batch: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
) -> 'OrderedDict[str, float]':
    """Evaluate ``model`` with the task's evaluator: cross-entropy loss, top-1 and top-5 in percent.

    Args:
        model: the eval model (``task.get_eval_model()``, or its EMA).
        loader: the evaluation loader.
        task: supplies the evaluator (``task.create_evaluator``); None: timm's ``ClassificationEvaluator``
            (validate.py, which has no training task).
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
        output_transform: applied to each batch's logits before anything measures them (validate.py's
            ``--valid-labels`` keeps some columns).
        on_batch: called with each batch's (transformed) logits and labels, distributed padding left out, for
            what a caller measures besides (validate.py: real labels, precision and recall, calibrated NLL).

    Returns:
        ``OrderedDict(loss=..., top1=..., top5=..., nll=..., ece=...)``: the task evaluator's metrics, then the
        mean negative log-likelihood and the top-label expected calibration error in percent (15 bins).
    """
    limit = evaluation_sample_limit(loader)
    evaluator = (ClassificationEvaluator(device, max_samples=limit) if task is None
                 else task.create_evaluator(max_samples=limit))
    calibration = CalibrationMeter(device=getattr(evaluator, 'device', None))
    seen = 0
    model.eval()
    bar = progress_bar(loader, progress, 'eval' + log_suffix)
    batch_time_m = utils.AverageMeter()
    end = time.time()
    last_idx = len(loader) - 1
    batches = _forward(model, loader, device, amp_autocast, channels_last, model_dtype, tta, tta_options)
    for batch_idx, (output, target) in enumerate(batches):
        if output_transform is not None:
            output = output_transform(output)
        evaluator.update(output, target)
        # The same trimming of distributed padding as the evaluator's.
        keep = output.shape[0] if limit is None else max(0, min(output.shape[0], limit - seen))
        seen += output.shape[0]
        calibration.update(output[:keep].float(), target[:keep])
        if on_batch is not None:
            on_batch(output[:keep], target[:keep])
        batch_time_m.update(time.time() - end)
        end = time.time()
        if bar is not None:
            bar.update(1)
        if batch_idx == last_idx or batch_idx % max(1, log_interval) == 0:
            running = evaluator.summary()
            extra = ''
            if batch_idx == last_idx:
                cal = calibration.compute()
                extra = f'  NLL: {cal["nll"]:>7.3f}  ECE: {cal["ece"]:>6.2f}%'
            _logger.info(
                f'Test{log_suffix}: [{batch_idx:>4d}/{last_idx}]  '
                f'Time: {batch_time_m.val:.3f} ({batch_time_m.avg:.3f})  '
                f'Loss: {running["loss"]:>7.3f}  Acc@1: {running["top1"]:>7.3f}  Acc@5: {running["top5"]:>7.3f}'
                + extra)
    if bar is not None:
        bar.close()
    metrics = evaluator.compute(distributed=distributed)
    metrics.update(calibration.compute(distributed=distributed))
    return metrics


def _forward(model: nn.Module, loader: Any, device: torch.device, amp_autocast: Callable[[], ContextManager],
             channels_last: bool, model_dtype: Optional[torch.dtype], tta: int,
             tta_options: Optional[Dict[str, Any]]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(logits, target) of every batch of ``loader``, prepared and forwarded as evaluation does."""
    for input, target in loader:
        if is_naflex_batch(input):
            input, target = prepare_naflex_input(input, target, device, model_dtype)
        else:
            input, target = prepare_input(input, target, device, model_dtype, channels_last)
        with amp_autocast():
            output = tta_forward(model, input, tta, **(tta_options or {}))
        yield output, target


@torch.no_grad()
def predict(
        model: nn.Module,
        loader: Any,
        device: torch.device,
        amp_autocast: Callable[[], ContextManager] = nullcontext,
        channels_last: bool = False,
        model_dtype: Optional[torch.dtype] = None,
        tta: int = 0,
        tta_options: Optional[Dict[str, Any]] = None,
        **_: Any,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The logits (float32, on the CPU) and labels of every image of ``loader``, in loader order.

    The forward pass is :func:`evaluate`'s (same input preparation, autocast and test-time views). Meant for
    a loader of this process alone (not a distributed one); extra keyword arguments of :func:`evaluate`
    (``distributed``, ``log_interval``, ...) are accepted and ignored, so both take the same options.

    Returns:
        (N x C logits, N labels).
    """
    model.eval()
    logits, targets = [], []
    for output, target in _forward(model, loader, device, amp_autocast, channels_last, model_dtype, tta, tta_options):
        logits.append(output.detach().float().cpu())
        targets.append(target.detach().cpu())
    if not logits:
        raise ValueError('predict: the loader yielded no batch; expected at least one image.')
    return torch.cat(logits), torch.cat(targets)
