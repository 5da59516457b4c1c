"""Tests of ``timm_gsl.engine.train_epoch``: a training step reads nothing back from the device (issue 25).

The loop keeps the batch losses on the device and reads them at its log lines, before a recovery checkpoint and
at the epoch's end. Counted with :class:`benchmarks.host_syncs.HostReadCounter` (every ``item``, ``bool``,
``float``, ``tolist``, ``cpu``, ... of a tensor). timm's own ``train_one_epoch`` reads ``loss.item()`` once a
batch: ``benchmarks.loops.timm_style_epoch``, its per-step work, stands for it here.
"""
import math
import os
import socket

import pytest
import torch

from benchmarks.loops import timm_style_epoch
from benchmarks.host_syncs import HostReadCounter
from timm_gsl import functional
from timm_gsl.cli.train import apply_embedded_recipe, build_run, check_args, main, parse_args
from timm_gsl.engine import NonFiniteLossError, TrainingState, train_one_epoch

FLAGS = ['--model', 'test_vit', '--img-size', '32', '--class-subset', '3', '--samples-per-class', '16', '-b', '4',
         '-j', '0', '--warmup-epochs', '0', '--seed', '0', '--device', 'cpu']


@pytest.fixture(autouse=True)
def as_on_an_accelerator(monkeypatch):
    """The loss's target value checks run on CPU tensors only (there is no device to wait for); skip them as
    they are skipped on a GPU, so that the counts are an accelerator's."""
    monkeypatch.setattr(functional, '_should_check_values', lambda tensor, check: bool(check))


def _run(loss, *extra):
    args, explicit = parse_args(FLAGS + ['--loss', loss, *extra])
    apply_embedded_recipe(args, explicit)
    check_args(args)
    return build_run(args)


def _batches(run, count):
    batches = [(x.clone(), y.clone()) for x, y in run.loader_train]
    while len(batches) < count:
        batches += batches
    return batches[:count]


def _state(run, **kwargs):
    kwargs.setdefault('log_interval', 10 ** 9)
    return TrainingState(optimizer=run.optimizer, device=run.device, lr_scheduler=run.lr_scheduler, **kwargs)


def _count_epoch(run, batches, state, epoch=1):
    with HostReadCounter() as counter:
        metrics = train_one_epoch(epoch, run.task, batches, state)
    assert counter.steps == math.ceil(len(batches) / state.grad_accum_steps)
    return counter, metrics


@pytest.fixture
def one_process_group(tmp_path):
    """A real (gloo) process group of one process: the loop's distributed code paths, in this process."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize('loss, epoch_reads', [('ce', 2), ('gsl', 3)])  # gsl: + the grouping statistics
@pytest.mark.parametrize('distributed', [False, True])
def test_a_step_reads_nothing_from_the_device_only_log_lines_and_the_epoch_end_do(loss, epoch_reads, distributed,
                                                                                  request):
    if distributed:
        request.getfixturevalue('one_process_group')
    run = _run(loss)
    state = _state(run, distributed=distributed, world_size=1)
    train_one_epoch(0, run.task, _batches(run, 2), state)  # first steps verify the head once; not counted
    short, _ = _count_epoch(run, _batches(run, 4), state)
    long, _ = _count_epoch(run, _batches(run, 12), state)
    # Reads per epoch do not grow with the steps: the first and the last update log, the epoch's end reads the
    # grouping statistics; no step in between reads anything.
    assert short.in_loop == long.in_loop == epoch_reads, (list(short.report()), list(long.report()))
    assert short.total == short.in_loop
    if loss == 'gsl':
        assert 'grouping_statistics' in run.task(*_batches(run, 1)[0])


def test_timm_reads_the_loss_once_a_step_and_the_counter_sees_it():
    run = _run('ce')
    batches = _batches(run, 6)
    with HostReadCounter(loop_function='timm_style_epoch') as counter:
        timm_style_epoch(run.task, run.optimizer, batches, 1, run.lr_scheduler)
    assert counter.steps == 6 and counter.in_loop == 6
    assert [name for name, _ in counter.loop_reads] == ['item']


@pytest.mark.parametrize('loss', ['ce', 'gsl'])
def test_logging_every_update_reads_once_an_update_like_timm(loss):
    run = _run(loss)
    state = _state(run, log_interval=1)
    train_one_epoch(0, run.task, _batches(run, 2), state)
    counter, _ = _count_epoch(run, _batches(run, 5), state)
    assert counter.in_loop == 5 + (loss == 'gsl'), list(counter.report())


def _recorded_losses(monkeypatch, task):
    """Spy on the task: the loss and softmax loss of every batch, as it computed them."""
    seen = []
    forward = type(task).forward

    def spy(self, input, target):
        result = forward(self, input, target)
        seen.append((float(result['loss'].detach()), float(result.get('softmax_loss', torch.tensor(float('nan')))), input.shape[0]))
        return result

    monkeypatch.setattr(type(task), 'forward', spy)
    return seen


@pytest.mark.parametrize('accum', [1, 2])
def test_epoch_means_are_the_sample_weighted_means_of_every_batch(monkeypatch, accum):
    run = _run('gsl')
    batches = _batches(run, 7)
    batches[-1] = (batches[-1][0][:3], batches[-1][1][:3])  # a shorter last batch weighs less
    seen = _recorded_losses(monkeypatch, run.task)
    metrics = train_one_epoch(1, run.task, batches, _state(run, log_interval=2, grad_accum_steps=accum))
    total = sum(n for _, _, n in seen)
    assert len(seen) == 7
    assert metrics['loss'] == pytest.approx(sum(loss * n for loss, _, n in seen) / total, rel=1e-6)
    assert metrics['softmax_loss'] == pytest.approx(sum(soft * n for _, soft, n in seen) / total, rel=1e-6)


def _poison(monkeypatch, task, at):
    """Make the task's loss NaN at call ``at`` (1-based)."""
    calls = []
    forward = type(task).forward

    def poisoned(self, input, target):
        result = forward(self, input, target)
        calls.append(1)
        if len(calls) == at:
            result['loss'] = result['loss'] * float('nan')
        return result

    monkeypatch.setattr(type(task), 'forward', poisoned)


class _Saver:
    def __init__(self):
        self.saved = []

    def save_recovery(self, epoch, batch_idx=0):
        self.saved.append((epoch, batch_idx))


def test_a_non_finite_loss_is_reported_at_the_next_read_naming_its_batch(monkeypatch):
    run = _run('ce')
    _poison(monkeypatch, run.task, at=2)  # epoch 1, batch 1: update 2 of 6 an epoch
    with pytest.raises(NonFiniteLossError) as e:
        train_one_epoch(1, run.task, _batches(run, 6), _state(run, log_interval=4))
    message = str(e.value)
    assert message.startswith('Non-finite training loss (nan on this process) at epoch 1, batch 1, update 8 '
                              '(counted from the start of training) (losses are read at log lines; the run '
                              'stopped at update 11, the first read after it)'), message


def test_a_non_finite_loss_stops_the_run_before_the_recovery_checkpoint_of_its_update(monkeypatch):
    run = _run('ce')
    _poison(monkeypatch, run.task, at=4)  # batch 3: update 4, a recovery checkpoint is due after it
    saver = _Saver()
    state = _state(run, saver=saver, recovery_interval=2)
    with pytest.raises(NonFiniteLossError) as e:
        train_one_epoch(0, run.task, _batches(run, 6), state)
    assert saver.saved == [(0, 1)]  # after update 2 only
    assert 'at epoch 0, batch 3, update 4 (counted from the start of training): stopped before any checkpoint' \
        in str(e.value)


def test_train_py_reads_per_epoch_do_not_grow_with_its_steps(tmp_path):
    counts = []
    for batches in (2, 6):
        argv = FLAGS + ['--loss', 'gsl', '--epochs', '1', '--train-batches-per-epoch', str(batches), '--output',
                        str(tmp_path), '--experiment', f'b{batches}', '--no-calibrate']
        with HostReadCounter() as counter:
            main(argv)
        assert counter.steps == batches
        counts.append(counter.in_loop)
    assert counts[0] == counts[1], counts
    assert os.path.isfile(tmp_path / 'b6' / 'last.pth.tar')
