"""One training epoch over a :class:`timm.task.TrainingTask`, with the group softmax loss's health.

Plain functions over a task (a :class:`~timm_gsl.GroupSoftmaxTask` for the group softmax loss, timm's
``ClassificationTask`` for the others), so the same loop trains with any loss and reports, beside the
training loss, the plain softmax cross-entropy of the same batches.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
from timm import utils
from timm.task import TrainingTask

from .atomic import atomic_path
from ..naflex import batch_size_of, is_naflex_batch, naflex_distributed_scale, naflex_loss_scale, prepare_naflex_input
from .batch import prepare_input, progress_bar

__all__ = ['GroupingMeter', 'NonFiniteLossError', 'TrainingState', 'batch_loss_scale', 'format_grouping',
           'loss_is_finite', 'train_one_epoch']

_logger = logging.getLogger(__name__)


class TrainingState:
    """What the loop needs besides the task: the pieces timm's ``train.py`` passes around.

    Args:
        optimizer: the optimiser over the task's trainable parameters.
        device: where batches go.
        lr_scheduler: a timm scheduler, stepped on every update (``step_update``).
        amp_autocast: a callable returning the autocast context (``nullcontext`` for float32).
        loss_scaler: timm's ``NativeScaler`` for float16 AMP, else None.
        mixup_fn: timm's ``Mixup`` when mixing happens in the loop (no prefetcher), else None.
        grad_accum_steps: batches per optimiser update.
        clip_grad: gradient clipping value, None for none.
        clip_mode: 'norm', 'value' or 'agc'.
        channels_last: convert inputs to channels-last.
        model_dtype: dtype the inputs are cast to (the model's), None to leave them.
        log_interval: log every this many updates.
        distributed: reduce the logged loss across processes.
        world_size: number of processes.
        variable_batch_loss_scale: 'none', 'sqrt' or 'linear' (see :func:`batch_loss_scale`).
        base_batch_size: the batch size a loss scale of 1 refers to.
        synchronize_step: synchronise CUDA after each update.
        saver: checkpoint saver for recovery checkpoints, or None.
        recovery_interval: write a recovery checkpoint every this many updates (0: never).
        output_dir: where ``--save-images`` writes input batches, None for nowhere.
        save_images: save the input batch at every log line.
        progress: show a tqdm progress bar.
        naflex_loss_scale: for NaFlex batches (dicts of patches), timm's ``--naflex-loss-scale`` ('none', 'sqrt',
            'linear'), which replaces ``variable_batch_loss_scale`` for them; None: not a NaFlex run.
        loss_parts: keys of the task result that are parts of the loss (distillation's ``task_loss`` and
            ``kd_loss``), averaged over the epoch and logged beside the loss.
    """

    def __init__(
            self,
            optimizer: torch.optim.Optimizer,
            device: torch.device,
            lr_scheduler: Any = None,
            amp_autocast: Callable[[], ContextManager] = nullcontext,
            loss_scaler: Any = None,
            mixup_fn: Optional[Callable] = None,
            grad_accum_steps: int = 1,
            clip_grad: Optional[float] = None,
            clip_mode: str = 'norm',
            channels_last: bool = False,
            model_dtype: Optional[torch.dtype] = None,
            log_interval: int = 50,
            distributed: bool = False,
            world_size: int = 1,
            variable_batch_loss_scale: str = 'none',
            base_batch_size: Optional[int] = None,
            synchronize_step: bool = False,
            saver: Optional[utils.CheckpointSaver] = None,
            recovery_interval: int = 0,
            output_dir: Optional[str] = None,
            save_images: bool = False,
            progress: bool = False,
            naflex_loss_scale: Optional[str] = None,
            loss_parts: Sequence[str] = (),
    ):
        if isinstance(grad_accum_steps, bool) or not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be an int >= 1, got {grad_accum_steps!r}.")
        if variable_batch_loss_scale not in ('none', 'sqrt', 'linear'):
            raise ValueError(f"variable_batch_loss_scale must be one of ('none', 'sqrt', 'linear'), "
                             f"got {variable_batch_loss_scale!r}.")
        self.optimizer = optimizer
        self.device = device
        self.lr_scheduler = lr_scheduler
        self.amp_autocast = amp_autocast
        self.loss_scaler = loss_scaler
        self.mixup_fn = mixup_fn
        self.grad_accum_steps = grad_accum_steps
        self.clip_grad = clip_grad
        self.clip_mode = clip_mode
        self.channels_last = channels_last
        self.model_dtype = model_dtype
        self.log_interval = max(1, log_interval)
        self.distributed = distributed
        self.world_size = world_size
        self.variable_batch_loss_scale = variable_batch_loss_scale
        self.base_batch_size = base_batch_size
        self.synchronize_step = synchronize_step
        self.saver = saver
        self.recovery_interval = recovery_interval
        self.output_dir = output_dir
        self.save_images = save_images
        self.progress = progress
        self.naflex_loss_scale = naflex_loss_scale
        self.loss_parts = tuple(loss_parts)


class NonFiniteLossError(RuntimeError):
    """A training loss came out NaN or infinite; raised on every process together, before the step."""


def loss_is_finite(loss: torch.Tensor, distributed: bool = False) -> bool:
    """Whether ``loss`` is finite, on this process and, when ``distributed``, on every other one.

    Under DDP all processes take part in the same reduction, so they all answer alike and stop
    together instead of leaving the others blocked in the next gradient all-reduce.

    Args:
        loss: the batch loss (any shape).
        distributed: agree across the default process group.

    Returns:
        True when every element is finite on every process.
    """
    finite = torch.isfinite(loss.detach()).all().to(torch.float32)
    if distributed:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def batch_loss_scale(batch_size: int, base_batch_size: Optional[int], mode: str) -> float:
    """Loss multiplier for a batch whose size differs from the base size (``--variable-batch-loss-scale``).

    Args:
        batch_size: samples in this batch.
        base_batch_size: the batch size whose loss is left as is (None: no scaling).
        mode: 'none' (1), 'linear' (``batch_size / base``) or 'sqrt' (its square root).

    Returns:
        The factor the batch-mean loss is multiplied by.
    """
    if mode == 'none' or not base_batch_size:
        return 1.0
    ratio = batch_size / base_batch_size
    if mode == 'linear':
        return ratio
    if mode == 'sqrt':
        return math.sqrt(ratio)
    raise ValueError(f"mode must be one of ('none', 'sqrt', 'linear'), got {mode!r}.")

def _mean_lr(optimizer: torch.optim.Optimizer) -> float:
    lrs = [group['lr'] for group in optimizer.param_groups]
    return sum(lrs) / len(lrs)


class GroupingMeter:
    """Sample-weighted means of :class:`~timm_gsl.functional.GroupingStatistics` over an epoch.

    :meth:`metrics` names them as the epoch's metrics: ``gsl_zero_frac``, ``gsl_nonzero_g1`` ..
    ``gsl_nonzero_gG`` and ``gsl_loss_g1`` .. ``gsl_loss_gG`` (group 1 is the least discriminative).
    """

    def __init__(self) -> None:
        self.sums: Optional[torch.Tensor] = None
        self.count = 0

    def update(self, stats: Any, n: int) -> None:
        """Add the batch means ``stats`` of a batch of ``n`` samples."""
        row = torch.cat([stats.zero_fraction.detach().float().reshape(1),
                         stats.nonzero_per_group.detach().float(), stats.group_loss.detach().float()])
        row = row * n
        self.sums = row if self.sums is None else self.sums + row
        self.count += n

    @staticmethod
    def names(groups: int) -> List[str]:
        """The metric names :meth:`metrics` gives for ``groups`` groups, in order."""
        return (['gsl_zero_frac'] + [f'gsl_nonzero_g{i + 1}' for i in range(groups)]
                + [f'gsl_loss_g{i + 1}' for i in range(groups)])

    @classmethod
    def blank(cls, groups: int) -> 'OrderedDict[str, str]':
        """Empty values under every name of :meth:`names`, for an epoch that measured nothing."""
        return OrderedDict((name, '') for name in cls.names(groups))

    def metrics(self, distributed: bool = False) -> 'OrderedDict[str, float]':
        """The epoch's means (over every process when ``distributed``); empty if nothing was added."""
        if self.sums is None:
            return OrderedDict()
        sums = torch.cat([self.sums, self.sums.new_tensor([float(self.count)])])
        if distributed:
            torch.distributed.all_reduce(sums)
        means = (sums[:-1] / sums[-1]).tolist()
        return OrderedDict(zip(self.names((len(means) - 1) // 2), means))


def format_grouping(metrics: Dict[str, float]) -> Optional[str]:
    """One log line from :meth:`GroupingMeter.metrics` (None when there are none)."""
    if 'gsl_zero_frac' not in metrics:
        return None
    nonzero = [v for k, v in metrics.items() if k.startswith('gsl_nonzero_g')]
    losses = [v for k, v in metrics.items() if k.startswith('gsl_loss_g')]
    return (f'Grouping: {100 * metrics["gsl_zero_frac"]:.1f}% of classifier inputs are exactly zero; nonzero '
            f'features per group (least to most discriminative) [{", ".join(f"{v:.1f}" for v in nonzero)}]; '
            f'loss per group [{", ".join(f"{v:.3f}" for v in losses)}]')


class _EpochMeters:
    """The running means an epoch logs and returns.

    The batch losses stay on the device as they come (:meth:`add`, no host read); :meth:`read` copies every
    value since the last read to the host in one transfer (under DDP after one all-reduce) and folds it into
    the meters. The loop reads at its log lines, before a recovery checkpoint and at the epoch's end, so a
    training step reads nothing back from the device in between.
    """

    def __init__(self, loss_parts: Sequence[str]):
        self.update_time = utils.AverageMeter()
        self.data_time = utils.AverageMeter()
        self.loss = utils.AverageMeter()
        self.softmax_loss = utils.AverageMeter()
        self.parts = OrderedDict((name, utils.AverageMeter()) for name in loss_parts)
        self.grouping = GroupingMeter()
        # Since the last read: per batch (batch index, samples, names of its values), and the values themselves.
        self._pending: List[tuple] = []
        self._values: List[torch.Tensor] = []

    def add(self, batch_idx: int, result: Dict[str, Any], softmax_loss: Optional[torch.Tensor], n: int) -> None:
        """Keep a batch's loss, softmax loss and loss parts (detached, on the device) for the next :meth:`read`."""
        if result.get('grouping_statistics') is not None:
            self.grouping.update(result['grouping_statistics'], n)
        named = [('loss', result['batch_loss'])]
        if softmax_loss is not None:
            named.append(('softmax_loss', softmax_loss))
        named.extend((name, result[name]) for name in self.parts if result.get(name) is not None)
        self._pending.append((batch_idx, n, tuple(name for name, _ in named)))
        self._values.extend(value.detach().float().reshape(()) for _, value in named)

    def read(self, distributed: bool, world_size: int) -> Optional[Tuple[int, float]]:
        """Bring the kept values to the host and add them to the meters.

        Under DDP the values are averaged over the processes (every process calls this at the same batches).

        Returns:
            None when every loss was finite on every process; else ``(batch index, its loss on this process)``
            of the first batch whose loss was not finite (on any process); the meters are then left as they were.
        """
        if not self._values:
            return None
        local = torch.stack(self._values)
        if distributed:
            mean = local.clone()
            torch.distributed.all_reduce(mean)
            both = torch.cat([local, mean / world_size]).tolist()
            local_values, values = both[:len(local)], both[len(local):]
        else:
            values = local_values = local.tolist()
        pending, self._pending, self._values = self._pending, [], []
        position = 0
        for batch_idx, _, names in pending:
            if not math.isfinite(values[position]):
                return batch_idx, local_values[position]
            position += len(names)
        position = 0
        for _, n, names in pending:
            for name, value in zip(names, values[position:position + len(names)]):
                self._meter(name).update(value, n)
            position += len(names)
        return None

    def _meter(self, name: str) -> utils.AverageMeter:
        if name == 'loss':
            return self.loss
        if name == 'softmax_loss':
            return self.softmax_loss
        return self.parts[name]

    def metrics(self, distributed: bool) -> 'OrderedDict[str, float]':
        # An epoch whose updates were all made before an interruption trained nothing here: no loss to report.
        metrics = OrderedDict(loss=self.loss.avg if self.loss.count else float('nan'))
        if self.softmax_loss.count:
            metrics['softmax_loss'] = self.softmax_loss.avg
        metrics.update((name, meter.avg) for name, meter in self.parts.items() if meter.count)
        metrics.update(self.grouping.metrics(distributed))
        return metrics


class _Batch:
    """Where a batch stands in the epoch's gradient accumulation."""

    def __init__(self, batch_idx: int, num_batches: int, accum_steps: int):
        last_accum = num_batches % accum_steps
        self.index = batch_idx
        self.last = batch_idx == num_batches - 1
        self.need_update = self.last or (batch_idx + 1) % accum_steps == 0
        self.update_idx = batch_idx // accum_steps
        # The last, shorter group of batches counts as a full update.
        self.accum_steps = last_accum if batch_idx >= num_batches - last_accum else accum_steps


def _prepare_batch(input: Any, target: torch.Tensor, state: TrainingState):
    """Device, dtype and memory layout of a batch; in-loop mixing. NaFlex batches (dicts) are mixed by their loader."""
    if is_naflex_batch(input):
        return prepare_naflex_input(input, target, state.device, state.model_dtype)
    input, target = prepare_input(input, target, state.device, state.model_dtype, state.channels_last)
    if state.mixup_fn is not None:
        input, target = state.mixup_fn(input, target)
    return input, target


def _loss_scale(input: Any, state: TrainingState) -> float:
    """The factor a batch's loss is multiplied by: NaFlex's scaling for dict batches, else timm's variable one."""
    n = batch_size_of(input)
    if state.naflex_loss_scale is not None and is_naflex_batch(input):
        scale = naflex_loss_scale(n, state.base_batch_size or n, state.naflex_loss_scale)
        if state.distributed:  # a collective: every process calls it on every batch
            factor, _ = naflex_distributed_scale(n, state.world_size, state.device)
            scale *= factor
        return scale
    return batch_loss_scale(n, state.base_batch_size, state.variable_batch_loss_scale)


def _checkpoints_left(output_dir: Optional[str]) -> str:
    """What the run's folder holds after a stop, in words (the primary process writes it; others say so)."""
    if output_dir is None:
        return 'the checkpoints the primary process wrote hold the last good state'
    try:
        saved = any(n.endswith('.pth.tar') and not n.startswith('.') for n in os.listdir(output_dir))
    except OSError:
        saved = False
    return ('the checkpoints on disk hold the last good state' if saved else
            'no checkpoint was written before it (no epoch had ended), so there is nothing to resume from')


def _forward_backward(task: TrainingTask, input: Any, target: torch.Tensor, state: TrainingState, batch: _Batch,
                      clip_parameters: Optional[List[torch.nn.Parameter]]) -> Dict[str, Any]:
    """One batch's forward pass, scaled backward pass and (on an update) optimiser step; no host read.

    The loss is not checked here (that would wait for the device in the middle of every step): the loop checks
    the kept losses at its next read, before any checkpoint (see :func:`train_one_epoch`).
    """
    optimizer = state.optimizer
    second_order = getattr(optimizer, 'is_second_order', False)
    sync_context = task.no_sync() if (state.distributed and not batch.need_update) else nullcontext()
    with sync_context:
        with state.amp_autocast():
            result = task(input, target)
            loss = result['loss']
        scale = _loss_scale(input, state)
        if scale != 1.0:
            loss = loss * scale
        if batch.accum_steps > 1:
            loss = loss / batch.accum_steps
        if state.loss_scaler is not None:
            state.loss_scaler(
                loss, optimizer, clip_grad=state.clip_grad, clip_mode=state.clip_mode,
                parameters=clip_parameters, create_graph=second_order, need_update=batch.need_update)
        else:
            loss.backward(create_graph=second_order)
            if batch.need_update:
                if state.clip_grad is not None:
                    utils.dispatch_clip_grad(clip_parameters, value=state.clip_grad, mode=state.clip_mode)
                optimizer.step()
    result['batch_loss'] = loss.detach() * batch.accum_steps
    return result


def _read_meters(meters: _EpochMeters, state: TrainingState, epoch: int, updates_per_epoch: int,
                 num_updates: int) -> None:
    """Read the kept losses (every process together); stop the run on the first non-finite one.

    Raises:
        NonFiniteLossError: naming the batch whose loss was not finite; raised before the caller writes any
            checkpoint or log line of this update.
    """
    bad = meters.read(state.distributed, state.world_size)
    if bad is None:
        return
    bad_idx, value = bad
    bad_update = epoch * updates_per_epoch + bad_idx // state.grad_accum_steps + 1
    checked = ('' if bad_update == num_updates else
               f' (losses are read at log lines; the run stopped at update {num_updates}, the first read after it)')
    raise NonFiniteLossError(
        f'Non-finite training loss ({value} on this process) at epoch {epoch}, batch {bad_idx}, update {bad_update} '
        f'(counted from the start of training){checked}: stopped before any checkpoint of that state; '
        f'{_checkpoints_left(state.output_dir)}.')


def _log_update(epoch: int, batch: _Batch, updates_per_epoch: int, meters: _EpochMeters, samples: int,
                optimizer: torch.optim.Optimizer) -> None:
    softmax_text = f'Softmax loss: {meters.softmax_loss.avg:#.3g}  ' if meters.softmax_loss.count else ''
    parts_text = ''.join(f'{name}: {meter.avg:#.3g}  ' for name, meter in meters.parts.items() if meter.count)
    _logger.info(
        f'Train: {epoch} [{batch.update_idx:>4d}/{updates_per_epoch} '
        f'({100. * (batch.update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
        f'Loss: {meters.loss.val:#.3g} ({meters.loss.avg:#.3g})  {softmax_text}{parts_text}'
        f'Time: {meters.update_time.val:.3f}s, {samples / meters.update_time.val:>7.2f}/s  '
        f'({meters.update_time.avg:.3f}s, {samples / meters.update_time.avg:>7.2f}/s)  '
        f'LR: {_mean_lr(optimizer):.3e}  '
        f'Data: {meters.data_time.val:.3f} ({meters.data_time.avg:.3f})')


def _save_images(input: Any, state: TrainingState, batch_idx: int) -> None:
    if not state.save_images or not state.output_dir or is_naflex_batch(input):
        return
    import torchvision.utils
    with atomic_path(os.path.join(state.output_dir, f'train-batch-{batch_idx}.jpg')) as tmp:
        torchvision.utils.save_image(input.float(), tmp, format='jpeg', padding=0, normalize=True)


def train_one_epoch(
        epoch: int,
        task: TrainingTask,
        loader: Any,
        state: TrainingState,
        softmax_loss_of: Optional[Callable[[Dict[str, torch.Tensor]], Optional[torch.Tensor]]] = None,
        updates_done: int = 0,
) -> 'OrderedDict[str, float]':
    """Train the task for one epoch, the way timm's ``train.py`` does.

    Gradient accumulation over ``state.grad_accum_steps`` batches (the last, shorter group counts
    as a full update), clipping, AMP with an optional loss scaler, EMA updates, per-update
    scheduler steps, recovery checkpoints and timm-style log lines. Batches are image tensors or
    NaFlex dicts of patches (``--naflex-loader``).

    Args:
        epoch: epoch index (0-based), for the schedule and the logs.
        task: the training task; ``task(input, target)`` returns ``loss`` and ``output``, and for
            the group softmax loss also ``softmax_loss``.
        loader: the training loader (timm's, with or without prefetcher).
        state: optimiser, scheduler, AMP and the other loop settings.
        softmax_loss_of: picks the plain softmax loss out of the task result, None where the
            loss has no softmax counterpart; default: the result's ``softmax_loss`` if present.
        updates_done: updates of this epoch already made before an interruption (from a recovery
            checkpoint); their batches are passed over, so the epoch still makes its planned number
            of updates.

    Returns:
        ``OrderedDict(loss=..., softmax_loss=..., <loss parts>..., gsl_...)``, means over the epoch's trained
        samples (``softmax_loss`` only when known; ``state.loss_parts`` when the result holds them; the ``gsl_``
        grouping statistics of :class:`GroupingMeter` when the task result holds ``grouping_statistics``).

    Raises:
        NonFiniteLossError: a batch loss was NaN or infinite (on any process). The losses stay on the device
            and are read at log lines, before a recovery checkpoint and at the epoch's end (a step waits for
            nothing), so the error comes at the first such read after the bad batch: before any checkpoint
            holds the weights it produced, on every process at the same update.
    """
    softmax_loss_of = softmax_loss_of or (lambda result: result.get('softmax_loss'))
    optimizer = state.optimizer
    meters = _EpochMeters(state.loss_parts)
    task.train()
    num_batches = len(loader)
    updates_per_epoch = (num_batches + state.grad_accum_steps - 1) // state.grad_accum_steps
    num_updates = epoch * updates_per_epoch
    clip_parameters = None
    if state.clip_grad is not None:
        clip_parameters = list(task.get_clip_parameters(exclude_head='agc' in state.clip_mode))
    bar = progress_bar(loader, state.progress, f'train {epoch}')

    data_start_time = update_start_time = time.time()
    optimizer.zero_grad()
    update_sample_count = 0
    for batch_idx, (input, target) in enumerate(loader):
        batch = _Batch(batch_idx, num_batches, state.grad_accum_steps)
        if batch.update_idx < updates_done:
            num_updates += batch.need_update
            if bar is not None:
                bar.update(1)
            data_start_time = update_start_time = time.time()
            continue
        input, target = _prepare_batch(input, target, state)
        # Times are per full update, so scale a part of one up.
        meters.data_time.update(batch.accum_steps * (time.time() - data_start_time))
        result = _forward_backward(task, input, target, state, batch, clip_parameters)
        n = batch_size_of(input)
        meters.add(batch_idx, result, softmax_loss_of(result), n)
        update_sample_count += n
        if bar is not None:
            bar.update(1)
        if not batch.need_update:
            data_start_time = time.time()
            continue

        num_updates += 1
        optimizer.zero_grad()
        task.update_ema(step=num_updates)
        if state.synchronize_step and state.device.type == 'cuda':
            torch.cuda.synchronize()
        time_now = time.time()
        meters.update_time.update(time_now - update_start_time)
        update_start_time = time_now
        if state.distributed:
            update_sample_count *= state.world_size
        log_due = batch.update_idx % state.log_interval == 0 or batch.last
        recovery_due = state.recovery_interval and (batch.update_idx + 1) % state.recovery_interval == 0
        if log_due or recovery_due:  # the loop's only host reads (every process at the same updates)
            _read_meters(meters, state, epoch, updates_per_epoch, num_updates)
        if bar is not None:
            bar.set_postfix(loss=f'{meters.loss.avg:.3f}', lr=f'{_mean_lr(optimizer):.2e}')
        if log_due:
            _log_update(epoch, batch, updates_per_epoch, meters, update_sample_count, optimizer)
            _save_images(input, state, batch_idx)
        if state.saver is not None and recovery_due:
            state.saver.save_recovery(epoch, batch_idx=batch.update_idx)
        if state.lr_scheduler is not None:
            state.lr_scheduler.step_update(num_updates=num_updates, metric=meters.loss.avg)
        update_sample_count = 0
        data_start_time = time.time()

    if bar is not None:
        bar.close()
    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()
    _read_meters(meters, state, epoch, updates_per_epoch, num_updates)  # nothing left unless the loader ran short
    metrics = meters.metrics(state.distributed)
    line = format_grouping(metrics)
    if line:
        _logger.info(f'Train: {epoch}  {line}')
    return metrics
