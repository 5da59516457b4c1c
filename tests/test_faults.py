"""Faults in one process: SIGKILL at any moment, half-written files, non-finite losses (issue 4, items 3 and 6).

The multi-process faults (a crashed DDP rank, a NaN on one rank) are in ``tests/test_distributed.py``.
"""
import csv
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from timm_gsl.loss import GroupSoftmaxLoss
from timm_gsl.cli.train import apply_embedded_recipe, build_run, check_args, main, parse_args
from timm_gsl.engine import AtomicCheckpointSaver, loss_is_finite, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 48 images in 6 batches an epoch, a recovery checkpoint after every update, an EMA: every kind of file.
RUN = ['--model', 'test_vit', '--img-size', '32', '--class-subset', '3', '--samples-per-class', '16', '-b', '8',
       '-j', '0', '--epochs', '3', '--recovery-interval', '1', '--model-ema', '--model-ema-decay', '0.9',
       '--warmup-epochs', '1', '--log-interval', '1']
KILL_TIMEOUT_S = 120


def _epochs(output_dir):
    with open(os.path.join(output_dir, 'summary.csv'), newline='') as f:
        return [int(row['epoch']) for row in csv.DictReader(f)]


def _checkpoints(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(('.pth.tar', '.pth', '.safetensors')))


def _spy_calls(monkeypatch, fault=None, at=None, before_fault=None):
    """Count group-loss calls; make call number ``at`` return ``fault`` times the loss."""
    calls = []
    forward = GroupSoftmaxLoss.forward

    def counting_forward(self, *args, **kwargs):
        loss = forward(self, *args, **kwargs)
        calls.append(1)
        if fault is not None and len(calls) == at:
            if before_fault is not None:
                before_fault()
            return loss * fault
        return loss

    monkeypatch.setattr(GroupSoftmaxLoss, 'forward', counting_forward)
    return calls


# ----------------------------------------------------------------------------------------------
# Atomic checkpoints
# ----------------------------------------------------------------------------------------------

def test_checkpoint_interrupted_mid_write_leaves_no_file_under_a_checkpoint_name(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = AtomicCheckpointSaver(model, optimizer, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(0, metric=1.0)
    good = (tmp_path / 'last.pth.tar').read_bytes()
    written = []
    real_save = torch.save

    def dying_save(obj, path):
        written.append(os.path.basename(path))
        with open(path, 'wb') as f:
            f.write(b'PK\x03\x04 half a checkpoint')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', dying_save)
    for save in (lambda: saver.save_checkpoint(1, metric=2.0), lambda: saver.save_recovery(1, batch_idx=0)):
        with pytest.raises(OSError, match='disk full'):
            save()
    monkeypatch.setattr(torch, 'save', real_save)
    # The bytes went to hidden temporary names only, which were removed; the old checkpoint is intact.
    assert written and all(name.startswith('.') and name.endswith('.tmp') for name in written)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    assert (tmp_path / 'last.pth.tar').read_bytes() == good
    for name in os.listdir(tmp_path):
        assert read_checkpoint(str(tmp_path / name), 'test')['epoch'] == 0


def test_recovery_checkpoint_records_the_updates_it_holds(tmp_path):
    model = torch.nn.Linear(4, 3)
    saver = AtomicCheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir=str(tmp_path),
                                  recovery_dir=str(tmp_path))
    saver.save_recovery(2, batch_idx=4)
    saver.save_checkpoint(2)
    assert read_checkpoint(str(tmp_path / 'recovery-2-4.pth.tar'), 'test')['saver']['updates_done'] == 5
    assert 'updates_done' not in read_checkpoint(str(tmp_path / 'last.pth.tar'), 'test')['saver']


# ----------------------------------------------------------------------------------------------
# SIGKILL and --resume
# ----------------------------------------------------------------------------------------------

def _kill_when(command, folder, condition, timeout=KILL_TIMEOUT_S):
    """Run ``command`` in its own process group; SIGKILL the group as soon as ``condition(files)`` holds.

    Returns True if it was killed, False if it ended first.
    """
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env, cwd=ROOT)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            files = os.listdir(folder) if os.path.isdir(folder) else []
            if condition(files):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            if time.monotonic() > deadline:
                pytest.fail(f'training run did not reach the kill point within {timeout}s')
            time.sleep(0.001)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _newest_checkpoint(folder):
    candidates = [os.path.join(folder, f) for f in _checkpoints(folder) if f == 'last.pth.tar' or
                  f.startswith('recovery-')]
    return max(candidates, key=os.path.getmtime) if candidates else None


KILL_POINTS = {
    # After the first epoch's checkpoint appears (the kill may land during the next epoch or save).
    'after_first_checkpoint': lambda files: 'last.pth.tar' in files,
    # Inside epoch 1, after some of its updates were saved to a recovery checkpoint.
    'mid_epoch': lambda files: any(f.startswith('recovery-1-2') for f in files),
    # After epoch 0, while a checkpoint is being written (its hidden temporary file exists), or at the
    # latest in epoch 2.
    'during_a_save': lambda files: 'last.pth.tar' in files and any(
        f.startswith('.') and '.pth.tar.' in f and f.endswith('.tmp') for f in files) or any(
        f.startswith('recovery-2-') for f in files),
}


@pytest.mark.slow
@pytest.mark.parametrize('point', list(KILL_POINTS))
def test_sigkilled_run_leaves_loadable_checkpoints_and_resumes_to_the_planned_epochs(tmp_path, point):
    out = tmp_path / 'run'
    argv = RUN + ['--output', str(tmp_path), '--experiment', 'run']
    killed = _kill_when([sys.executable, os.path.join(ROOT, 'train.py')] + argv, str(out), KILL_POINTS[point])
    assert killed, 'the run ended before the kill point'
    # Every file under a checkpoint name loads, safely, whenever the kill came.
    for name in _checkpoints(out):
        checkpoint = read_checkpoint(str(out / name), 'test')
        assert {'state_dict', 'state_dict_ema', 'optimizer', 'epoch'} <= set(checkpoint)
    resume = _newest_checkpoint(str(out))
    assert resume is not None
    result = main(argv + ['--resume', resume])
    assert _epochs(out) == [0, 1, 2]  # the planned number of epochs, each once
    assert read_checkpoint(str(out / 'last.pth.tar'), 'test')['epoch'] == 2
    if point == 'mid_epoch':
        # Resumed inside epoch 1, which it finished, instead of skipping the rest of it.
        assert [row['epoch'] for row in result['history']] == [1, 2]
    for name in _checkpoints(out):
        read_checkpoint(str(out / name), 'test')


def _build(argv):
    args, explicit = parse_args(argv)
    apply_embedded_recipe(args, explicit)
    check_args(args)
    return build_run(args)


def test_resume_from_a_recovery_checkpoint_finishes_its_epoch(tmp_path, monkeypatch):
    argv = RUN + ['--output', str(tmp_path), '--experiment', 'run', '--recovery-interval', '2']
    main(argv + ['--epochs', '1'])
    recovery = str(tmp_path / 'run' / 'recovery-0-3.pth.tar')  # after updates 0..3: 4 of 6 done
    saved = read_checkpoint(recovery, 'test')
    assert saved['saver']['updates_done'] == 4

    run = _build(argv + ['--resume', recovery])
    assert (run.start_epoch, run.updates_done) == (0, 4)
    model_state = run.task.get_trainable_module().state_dict()
    assert all(torch.equal(model_state[k], v) for k, v in saved['state_dict'].items())
    ema_state = run.task.get_trainable_module(ema=True).module.state_dict()
    assert all(torch.equal(ema_state[k], v) for k, v in saved['state_dict_ema'].items())
    fresh = _build(RUN + ['--output', str(tmp_path), '--experiment', 'fresh', '--recovery-interval', '2'])
    fresh.lr_scheduler.step_update(4)
    assert run.optimizer.param_groups[0]['lr'] == pytest.approx(fresh.optimizer.param_groups[0]['lr'])

    calls = _spy_calls(monkeypatch)
    result = main(argv + ['--resume', recovery, '--epochs', '2'])
    assert len(calls) == (6 - 4) + 6  # the rest of epoch 0, then all of epoch 1
    assert [row['epoch'] for row in result['history']] == [0, 1]
    assert _epochs(tmp_path / 'run') == [0, 1]


# ----------------------------------------------------------------------------------------------
# Non-finite losses
# ----------------------------------------------------------------------------------------------

def test_loss_is_finite():
    assert loss_is_finite(torch.tensor(1.5))
    assert not loss_is_finite(torch.tensor(float('nan')))
    assert not loss_is_finite(torch.tensor([1.0, float('-inf')]))


@pytest.mark.parametrize('fault', [float('nan'), float('inf')])
def test_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                                      capsys, fault):
    last = tmp_path / 'run' / 'last.pth.tar'
    digest = {}

    def snapshot():
        digest['before'] = hashlib.sha256(last.read_bytes()).hexdigest()

    # 2 updates an epoch: call 4 is epoch 1, batch 1 (update 4 of the run).
    _spy_calls(monkeypatch, fault=fault, at=4, before_fault=snapshot)
    argv = RUN + ['--train-batches-per-epoch', '2', '--output', str(tmp_path), '--experiment', 'run']
    with pytest.raises(SystemExit) as exc:
        main(argv)
    message = str(exc.value.code)
    assert message.startswith('train.py: error: Non-finite training loss')
    assert 'at epoch 1, batch 1, update 4' in message
    # Stopped before the step: no checkpoint of the bad state; the last good one is byte for byte unchanged.
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest['before']
    checkpoint = read_checkpoint(str(last), 'test')
    assert checkpoint['epoch'] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint['state_dict'].values() if v.is_floating_point())
    assert _epochs(tmp_path / 'run') == [0]
    assert not [f for f in os.listdir(tmp_path / 'run') if f.startswith('recovery-1-1')]
