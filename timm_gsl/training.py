"""The training loop of ``train.py``: one epoch, evaluation, atomic outputs, learning curves, summary.

Plain functions over a :class:`timm.task.TrainingTask` (a :class:`~timm_gsl.GroupSoftmaxTask` for the
group softmax loss, timm's ``ClassificationTask`` for the others), so the same loop trains with any
loss and reports, beside the training loss, the plain softmax cross-entropy of the same batches.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from timm import utils
from timm.models import clean_state_dict
from timm.task import TrainingTask, evaluation_sample_limit

__all__ = [
    'AtomicCheckpointSaver',
    'NonFiniteLossError',
    'TrainingState',
    'atomic_path',
    'batch_loss_scale',
    'check_checkpoint_fits',
    'evaluate',
    'format_summary',
    'loss_is_finite',
    'plot_learning_curves',
    'read_checkpoint',
    'train_one_epoch',
    'write_text_atomic',
]

_logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------

class atomic_path:
    """Context manager giving a temporary path beside ``path``; renamed onto ``path`` on success.

    A reader never sees a half-written file: either the old one or the complete new one.

    Args:
        path: the final file path.

    Examples:
        >>> with atomic_path('out/curves.png') as tmp:
        ...     figure.savefig(tmp, format='png')
    """

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> str:
        folder, name = os.path.split(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=folder)
        os.close(fd)
        # mkstemp makes the file private (0600); give it the permissions open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename.

    Args:
        path: destination file.
        text: its new content.
    """
    with atomic_path(path) as tmp:
        with open(tmp, 'w') as f:
            f.write(text)


class AtomicCheckpointSaver(utils.CheckpointSaver):
    """timm's ``CheckpointSaver`` whose every file appears by rename, never by a partial write.

    timm writes ``last.pth.tar`` through a temporary file but deletes the old one before the rename,
    and hard-links the others to it, falling back to a plain copy where hard links are unavailable.
    Here every file, timm's staging files included, is written under a hidden temporary name and
    replaced in one rename, so a process killed at any moment leaves only complete checkpoints.
    A recovery checkpoint also records, in its ``saver`` entry, how many updates of its epoch it holds
    (``updates_done``), so a resumed run finishes that epoch rather than skipping its remainder.
    """

    def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
        # timm writes its staging files ('tmp.pth.tar', 'recovery_tmp.pth.tar') in place; a kill
        # during that write would leave a file that looks like a checkpoint but does not load.
        with atomic_path(save_path) as tmp:
            super()._save(tmp, epoch, metric)

    def _replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def save_recovery(self, epoch: int, batch_idx: int = 0) -> None:
        """Write a mid-epoch recovery checkpoint that records how many updates of ``epoch`` it holds.

        Args:
            epoch: the epoch in progress.
            batch_idx: index of the update just made (0-based), as timm's loop passes it.
        """
        # Kept in the saver's bookkeeping, so --resume continues inside the epoch instead of skipping it.
        self._updates_done = batch_idx + 1
        try:
            super().save_recovery(epoch, batch_idx)
        finally:
            self._updates_done = None

    def state_dict(self, epoch: Optional[int] = None, metric: Optional[float] = None) -> Dict[str, Any]:
        """timm's bookkeeping, plus ``updates_done`` (updates of the epoch) in a recovery checkpoint."""
        state = super().state_dict(epoch, metric)
        if getattr(self, '_updates_done', None) is not None:
            state['updates_done'] = self._updates_done
        return state

    def _duplicate(self, src: str, dst: str) -> None:
        if self.can_hardlink:
            try:
                # Link under a temporary name first, so dst is replaced in one step.
                with atomic_path(dst) as tmp:
                    os.remove(tmp)
                    os.link(src, tmp)
                return
            except (OSError, NotImplementedError):
                self.can_hardlink = False
        with atomic_path(dst) as tmp:
            shutil.copy2(src, tmp)


def read_summary(path: str) -> List[Dict[str, Optional[float]]]:
    """The rows of a run's ``summary.csv`` as floats (empty cells, e.g. epochs without evaluation: None)."""
    with open(path, newline='') as f:
        return [{k: (float(v) if v not in ('', None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------
# Reading checkpoints someone else may have written
# ----------------------------------------------------------------------------------------------

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


def check_checkpoint_fits(checkpoint: Dict[str, Any], model: nn.Module, arch: str, flag: str, path: str) -> None:
    """Refuse a checkpoint whose weights do not fit ``model``: other names or other shapes.

    Args:
        checkpoint: from :func:`read_checkpoint`.
        model: the freshly created model the weights are for.
        arch: the ``--model`` name, for the message (checkpoints of train.py record theirs as ``arch``).
        flag: the flag that named the checkpoint.
        path: its path.

    Raises:
        ValueError: naming the flag, the checkpoint's architecture and the first mismatches.
    """
    saved = clean_state_dict(checkpoint.get('state_dict', checkpoint.get('model')) or {})
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
                         f'does not fit --model {arch}: {"; ".join(problems)}. Expected a checkpoint of the same '
                         f'architecture, number of classes and input channels.')
    if saved_arch and saved_arch != arch:
        _logger.warning(f'{flag} {path!r} records architecture {saved_arch!r}, not {arch!r}, but its weights fit; '
                        f'loading them.')


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

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


def _prepare_input(
        input: torch.Tensor,
        target: torch.Tensor,
        device: torch.device,
        model_dtype: Optional[torch.dtype],
        channels_last: bool,
):
    # A no-op for batches timm's prefetcher already moved.
    input, target = input.to(device), target.to(device)
    if model_dtype is not None:
        input = input.to(model_dtype)
    if channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    return input, target


def _progress_bar(loader: Any, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=len(loader), desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


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
    scheduler steps, recovery checkpoints and timm-style log lines.

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
        ``OrderedDict(loss=..., softmax_loss=..., gsl_...)``, means over the epoch's trained samples
        (``softmax_loss`` only when known; the ``gsl_`` grouping statistics of :class:`GroupingMeter`
        when the task result holds ``grouping_statistics``).

    Raises:
        NonFiniteLossError: a batch loss is NaN or infinite (on any process), before its backward
            pass and optimiser step, so the weights and the checkpoints on disk stay as they were.
    """
    softmax_loss_of = softmax_loss_of or (lambda result: result.get('softmax_loss'))
    optimizer = state.optimizer
    second_order = getattr(optimizer, 'is_second_order', False)
    update_time_m = utils.AverageMeter()
    data_time_m = utils.AverageMeter()
    losses_m = utils.AverageMeter()
    softmax_losses_m = utils.AverageMeter()
    grouping_m = GroupingMeter()

    task.train()
    num_batches = len(loader)
    accum_steps = state.grad_accum_steps
    last_accum_steps = num_batches % accum_steps
    updates_per_epoch = (num_batches + accum_steps - 1) // accum_steps
    num_updates = epoch * updates_per_epoch
    last_batch_idx = num_batches - 1
    last_batch_idx_to_accum = num_batches - last_accum_steps
    clip_parameters = None
    if state.clip_grad is not None:
        clip_parameters = list(task.get_clip_parameters(exclude_head='agc' in state.clip_mode))
    bar = _progress_bar(loader, state.progress, f'train {epoch}')

    data_start_time = update_start_time = time.time()
    optimizer.zero_grad()
    update_sample_count = 0
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == last_batch_idx
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        update_idx = batch_idx // accum_steps
        if batch_idx >= last_batch_idx_to_accum:
            accum_steps = last_accum_steps
        if update_idx < updates_done:
            if need_update:
                num_updates += 1
            if bar is not None:
                bar.update(1)
            data_start_time = update_start_time = time.time()
            continue
        input, target = _prepare_input(input, target, state.device, state.model_dtype, state.channels_last)
        if state.mixup_fn is not None:
            input, target = state.mixup_fn(input, target)
        # Times are per full update, so scale a part of one up.
        data_time_m.update(accum_steps * (time.time() - data_start_time))

        sync_context = task.no_sync() if (state.distributed and not need_update) else nullcontext()
        with sync_context:
            with state.amp_autocast():
                result = task(input, target)
                loss = result['loss']
            if not loss_is_finite(loss, state.distributed):
                raise NonFiniteLossError(
                    f'Non-finite training loss ({loss.detach().float().item()} on this process) at epoch {epoch}, '
                    f'batch {batch_idx}, update {num_updates + 1} (counted from the start of training): '
                    f'stopped before that update; the checkpoints on disk hold the last good state.')
            scale = batch_loss_scale(input.size(0), state.base_batch_size, state.variable_batch_loss_scale)
            if scale != 1.0:
                loss = loss * scale
            if accum_steps > 1:
                loss = loss / accum_steps
            if state.loss_scaler is not None:
                state.loss_scaler(
                    loss, optimizer, clip_grad=state.clip_grad, clip_mode=state.clip_mode,
                    parameters=clip_parameters, create_graph=second_order, need_update=need_update)
            else:
                loss.backward(create_graph=second_order)
                if need_update:
                    if state.clip_grad is not None:
                        utils.dispatch_clip_grad(clip_parameters, value=state.clip_grad, mode=state.clip_mode)
                    optimizer.step()

        batch_loss = loss.detach() * accum_steps
        softmax_loss = softmax_loss_of(result)
        if result.get('grouping_statistics') is not None:
            grouping_m.update(result['grouping_statistics'], input.size(0))
        if not state.distributed:
            losses_m.update(batch_loss.item(), input.size(0))
            if softmax_loss is not None:
                softmax_losses_m.update(float(softmax_loss), input.size(0))
        update_sample_count += input.size(0)
        if bar is not None:
            bar.update(1)

        if not need_update:
            data_start_time = time.time()
            continue

        num_updates += 1
        optimizer.zero_grad()
        task.update_ema(step=num_updates)

        if state.synchronize_step and state.device.type == 'cuda':
            torch.cuda.synchronize()
        time_now = time.time()
        update_time_m.update(time_now - update_start_time)
        update_start_time = time_now

        if state.distributed:
            # Every process reduces every update, so no process waits on another's log line.
            reduced = utils.reduce_tensor(batch_loss, state.world_size)
            losses_m.update(reduced.item(), input.size(0))
            if softmax_loss is not None:
                softmax_losses_m.update(
                    utils.reduce_tensor(softmax_loss.detach().float(), state.world_size).item(), input.size(0))
            update_sample_count *= state.world_size

        if bar is not None:
            bar.set_postfix(loss=f'{losses_m.avg:.3f}', lr=f'{_mean_lr(optimizer):.2e}')
        if update_idx % state.log_interval == 0 or last_batch:
            softmax_text = f'Softmax loss: {softmax_losses_m.avg:#.3g}  ' if softmax_losses_m.count else ''
            _logger.info(
                f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
                f'Loss: {losses_m.val:#.3g} ({losses_m.avg:#.3g})  {softmax_text}'
                f'Time: {update_time_m.val:.3f}s, {update_sample_count / update_time_m.val:>7.2f}/s  '
                f'({update_time_m.avg:.3f}s, {update_sample_count / update_time_m.avg:>7.2f}/s)  '
                f'LR: {_mean_lr(optimizer):.3e}  '
                f'Data: {data_time_m.val:.3f} ({data_time_m.avg:.3f})')
            if state.save_images and state.output_dir:
                import torchvision.utils
                with atomic_path(os.path.join(state.output_dir, f'train-batch-{batch_idx}.jpg')) as tmp:
                    torchvision.utils.save_image(input.float(), tmp, format='jpeg', padding=0, normalize=True)

        if state.saver is not None and state.recovery_interval and (update_idx + 1) % state.recovery_interval == 0:
            state.saver.save_recovery(epoch, batch_idx=update_idx)

        if state.lr_scheduler is not None:
            state.lr_scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)

        update_sample_count = 0
        data_start_time = time.time()

    if bar is not None:
        bar.close()
    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()

    # An epoch whose updates were all made before an interruption trained nothing here: no loss to report.
    metrics = OrderedDict(loss=losses_m.avg if losses_m.count else float('nan'))
    if softmax_losses_m.count:
        metrics['softmax_loss'] = softmax_losses_m.avg
    metrics.update(grouping_m.metrics(state.distributed))
    line = format_grouping(metrics)
    if line:
        _logger.info(f'Train: {epoch}  {line}')
    return metrics


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

    Returns:
        ``OrderedDict(loss=..., top1=..., top5=...)``.
    """
    evaluator = task.create_evaluator(max_samples=evaluation_sample_limit(loader))
    model.eval()
    bar = _progress_bar(loader, progress, 'eval' + log_suffix)
    batch_time_m = utils.AverageMeter()
    end = time.time()
    last_idx = len(loader) - 1
    for batch_idx, (input, target) in enumerate(loader):
        input, target = _prepare_input(input, target, device, model_dtype, channels_last)
        with amp_autocast():
            output = model(input)
        if isinstance(output, (tuple, list)):
            output = output[0]
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


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def plot_learning_curves(history: Sequence[Dict[str, float]], path: str, title: str = '',
                         train_targets: str = '') -> str:
    """Draw loss and top-1 per epoch into a PNG (matplotlib's Agg backend), written atomically.

    Args:
        history: one dict per epoch with ``epoch`` and any of ``train_loss``, ``train_softmax_loss``,
            ``train_clean_loss``, ``train_clean_top1``, ``eval_loss``, ``eval_top1`` (missing keys are skipped).
        path: the PNG to write.
        title: figure title.
        train_targets: how the training batches' targets differ from the labels, e.g. 'smoothed targets' or
            'mixed targets'; named in the legend of the losses computed on them ('' when they are the labels).

    Returns:
        ``path``.
    """
    import matplotlib
    matplotlib.use('Agg', force=False)
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    figure = Figure(figsize=(10, 4), dpi=100)
    loss_axes, top1_axes = figure.subplots(1, 2)
    on_targets = f', {train_targets}' if train_targets else ''
    curves = (
        (loss_axes, 'train_loss', f'train loss (augmented batches{on_targets})'),
        (loss_axes, 'train_softmax_loss', f'train softmax loss (same batches{on_targets})'),
        (loss_axes, 'train_clean_loss', 'clean train softmax loss (no augmentation, eval mode)'),
        (loss_axes, 'eval_loss', 'validation loss'),
        (top1_axes, 'train_clean_top1', 'clean train top-1'),
        (top1_axes, 'eval_top1', 'validation top-1'),
    )
    for axes, key, label in curves:
        points = [(row['epoch'], row[key]) for row in history if row.get(key) is not None]
        if points:
            epochs, values = zip(*points)
            axes.plot(epochs, values, marker='o', label=label)
    loss_axes.set_xlabel('epoch')
    loss_axes.set_ylabel('loss')
    if loss_axes.lines and all(min(line.get_ydata()) > 0 for line in loss_axes.lines):
        # Over-fitting shows as a clean training loss falling by decades while the validation loss rises.
        loss_axes.set_yscale('log')
        loss_axes.set_ylabel('loss (log scale)')
    top1_axes.set_xlabel('epoch')
    top1_axes.set_ylabel('top-1 (%)')
    for axes in (loss_axes, top1_axes):
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize='small')
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format='png')
    return path


def format_summary(
        best_metric: Optional[float],
        best_epoch: Optional[int],
        eval_metric: str,
        output_dir: Optional[str],
        last_metrics: Optional[Dict[str, float]] = None,
        elapsed_s: Optional[float] = None,
        clean_train_metrics: Optional[Dict[str, float]] = None,
) -> str:
    """The closing lines of a run: best metric and epoch, last epoch's metrics, where outputs are.

    Args:
        best_metric: best value of ``eval_metric`` (None if never evaluated).
        best_epoch: its epoch.
        eval_metric: the metric's name.
        output_dir: the run's folder, or None.
        last_metrics: the last evaluation's metrics.
        elapsed_s: wall time of the run.
        clean_train_metrics: the last measurement on the un-augmented training images in eval mode.

    Returns:
        A multi-line string.
    """
    lines = []
    if best_metric is not None:
        lines.append(f'Best {eval_metric}: {best_metric:.3f} (epoch {best_epoch})')
    else:
        lines.append('No evaluation was run.')
    if last_metrics:
        lines.append('Last evaluation: ' + ', '.join(f'{k} {v:.4g}' for k, v in last_metrics.items()))
    if clean_train_metrics:
        lines.append('Clean training set (no augmentation, eval mode): '
                     + ', '.join(f'{k} {v:.4g}' for k, v in clean_train_metrics.items()))
    if elapsed_s is not None:
        lines.append(f'Wall time: {elapsed_s:.1f}s')
    if output_dir:
        lines.append(f'Outputs in {output_dir} (args.yaml, summary.csv, last.pth.tar, model_best.pth.tar, '
                     f'learning_curves.png)')
    return '\n'.join(lines)
