"""Distributed training: torchrun on the gloo backend, on this machine's CPUs (issue 4, items 1-3, 6).

Every test starts real processes (``python -m torch.distributed.run``) in their own process groups,
waits for them with a hard timeout and kills the groups when anything goes wrong, so a hang fails
the test instead of blocking the suite. The model is timm's BatchNorm-free ``test_vit`` at 32x32
with dropout off, on 24 training images: one batch per epoch, so every epoch is one full-batch
update whichever process holds which images, and a run on 2 processes with batch 12 each must
reach the same weights as one process with batch 24 (same seed: DDP starts from rank 0's weights).
"""
import csv
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch

from timm_gsl.cli.train import main
from timm_gsl.engine import read_checkpoint

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(ROOT, 'train.py')
TIMEOUT_S = 180
# No augmentation, dropout or warm-up and a fixed learning rate: nothing that differs between ranks.
RECIPE = ['--model', 'test_vit', '--img-size', '32', '--class-subset', '3', '--samples-per-class', '8',
          '--no-aug', '--drop', '0', '--epochs', '3', '--lr', '0.05', '--warmup-epochs', '0', '--sched', 'step',
          '--decay-epochs', '100', '--smoothing', '0', '--opt', 'sgd', '--weight-decay', '1e-4', '-j', '0',
          '--log-interval', '1', '--checkpoint-hist', '3']


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'SLURM_NTASKS', 'SLURM_PROCID'):
        env.pop(key, None)
    return env


def _torchrun(*launcher_args):
    return [sys.executable, '-m', 'torch.distributed.run', *launcher_args]


def _run_together(commands, timeout=TIMEOUT_S, env=None):
    """Start every command in its own process group; wait for all; kill them all on timeout.

    Output goes to temporary files, not pipes: waiting on one process while another fills an
    unread pipe would block that one in a write, and with it every rank in its collectives.

    Returns ``[(returncode, output), ...]``; a timeout fails the test after killing the groups.
    """
    logs = [tempfile.TemporaryFile(mode='w+') for _ in commands]
    procs = [subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, env=env or _env(), cwd=ROOT) for c, log in zip(commands, logs)]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    if q.poll() is None:
                        os.killpg(q.pid, signal.SIGKILL)
                        q.wait()
                tails = []
                for log in logs:
                    log.seek(0)
                    tails.append(log.read()[-2000:])
                pytest.fail(f'distributed run did not finish within {timeout}s (a hang): {commands}\n'
                            + '\n----\n'.join(tails))
        results = []
        for p, log in zip(procs, logs):
            log.seek(0)
            results.append((p.returncode, log.read()))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()


def _load(path):
    # weights_only loading, as train.py does (the argparse namespace under 'args' allowed).
    return read_checkpoint(str(path), 'test')


def _weights(path):
    return _load(path)['state_dict']


def _epochs(output_dir):
    with open(os.path.join(output_dir, 'summary.csv'), newline='') as f:
        return [int(row['epoch']) for row in csv.DictReader(f)]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
    """The reference: one process, the global batch of 24."""
    out = tmp_path_factory.mktemp('single')
    result = main(RECIPE + ['-b', '24', '--output', str(out), '--experiment', 'run'])
    last = os.path.join(result['output_dir'], 'last.pth.tar')
    return _weights(last)


def test_two_processes_train_to_the_same_weights_as_one_process_on_the_global_batch(tmp_path, one_process):
    (rc, log), = _run_together([_torchrun('--standalone', '--nproc-per-node', '2', TRAIN_PY, *RECIPE, '-b', '12',
                                          '--output', str(tmp_path), '--experiment', 'run')])
    assert rc == 0, log[-3000:]
    assert 'process 1 of 2' in log and 'process 0 of 2' in log
    two = _weights(tmp_path / 'run' / 'last.pth.tar')
    # Training moved the weights (the comparison is not of two untouched initialisations).
    start = _weights(tmp_path / 'run' / 'checkpoint-0.pth.tar')
    assert any(not torch.equal(two[k], start[k]) for k in two)
    _assert_same_weights(two, one_process)
    assert _epochs(tmp_path / 'run') == [0, 1, 2]


def test_two_node_groups_on_this_machine_complete_a_run_together(tmp_path, one_process):
    port = _free_port()
    commands = [_torchrun('--nnodes', '2', '--node-rank', str(node), '--nproc-per-node', '1',
                          '--master-addr', '127.0.0.1', '--master-port', str(port),
                          TRAIN_PY, *RECIPE, '-b', '12', '--output', str(tmp_path), '--experiment', 'run')
                for node in (0, 1)]
    results = _run_together(commands)
    for rc, log in results:
        assert rc == 0, log[-3000:]
    assert 'process 0 of 2' in results[0][1] and 'process 1 of 2' in results[1][1]
    # One folder, written by global rank 0 only; the same weights as one process on the global batch.
    assert _epochs(tmp_path / 'run') == [0, 1, 2]
    _assert_same_weights(_weights(tmp_path / 'run' / 'last.pth.tar'), one_process)


@pytest.mark.parametrize('dist_bn', ['reduce', ''])
def test_dist_bn_reduce_averages_batchnorm_statistics_across_processes(tmp_path, dist_bn):
    # test_resnet has BatchNorm. After one full-batch epoch, the first BatchNorm's running mean on
    # each rank moved towards the mean of that rank's half of the batch; the mean of the two halves'
    # means is the whole batch's, so --dist-bn reduce (timm's default) must give exactly what one
    # process sees on the whole batch, and no sharing must not.
    recipe = [a if a != 'test_vit' else 'test_resnet' for a in RECIPE]
    recipe[recipe.index('--epochs') + 1] = '1'
    single = main(recipe + ['-b', '24', '--output', str(tmp_path / 'single'), '--experiment', 'run'])
    (rc, log), = _run_together([_torchrun('--standalone', '--nproc-per-node', '2', TRAIN_PY, *recipe, '-b', '12',
                                          '--dist-bn', dist_bn, '--output', str(tmp_path), '--experiment', 'run')])
    assert rc == 0, log[-3000:]
    key = 'conv1.1.running_mean'  # the stem's BatchNorm, right after the first convolution
    reference = _weights(os.path.join(single['output_dir'], 'last.pth.tar'))[key]
    shared = _weights(tmp_path / 'run' / 'last.pth.tar')[key]
    assert reference.abs().max() > 0
    gap = (shared - reference).abs().max().item()
    assert torch.allclose(shared, reference, rtol=1e-4, atol=1e-7) == (dist_bn == 'reduce'), (gap, log[-2000:])


# A launcher that injects a fault into one rank, then runs train.py's main as torchrun would.
FAULTY_TRAIN_PY = textwrap.dedent('''
    import os, signal, sys, time
    from timm_gsl.loss import GroupSoftmaxLoss
    from timm_gsl.cli.train import main

    fault, rank, call = os.environ['GSL_FAULT'], int(os.environ['GSL_FAULT_RANK']), int(os.environ['GSL_FAULT_CALL'])
    calls = [0]
    forward = GroupSoftmaxLoss.forward

    def faulty_forward(self, *args, **kwargs):
        loss = forward(self, *args, **kwargs)
        calls[0] += 1
        if rank in (-1, int(os.environ['RANK'])) and calls[0] == call:
            if fault == 'sigterm':
                os.kill(os.getpid(), signal.SIGTERM)  # as torchrun or a scheduler stops every rank
                time.sleep(1)
            if fault == 'crash':
                os._exit(7)  # dies like a killed process: no cleanup, no message
            return loss * float('nan')
        return loss

    GroupSoftmaxLoss.forward = faulty_forward
    main(sys.argv[1:])
''')


def _faulty_run(tmp_path, fault, rank, call):
    launcher = tmp_path / 'faulty_train.py'
    launcher.write_text(FAULTY_TRAIN_PY)
    env = dict(_env(), GSL_FAULT=fault, GSL_FAULT_RANK=str(rank), GSL_FAULT_CALL=str(call))
    (rc, log), = _run_together([_torchrun('--standalone', '--nproc-per-node', '2', str(launcher), *RECIPE,
                                          '-b', '12', '--output', str(tmp_path), '--experiment', 'run')], env=env)
    return rc, log


def test_crash_of_one_process_ends_the_whole_run_with_a_clear_message(tmp_path):
    rc, log = _faulty_run(tmp_path, 'crash', rank=1, call=2)  # rank 1 dies in epoch 1
    assert rc != 0
    # torchrun names the failed rank and its exit code, and stops the other rank.
    assert 'FAILED' in log and re.search(r'Root Cause.*?rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: 7', log, re.S), \
        log[-3000:]
    # Rank 0 may have been stopped while saving epoch 0: whatever checkpoint is on disk is complete.
    for name in os.listdir(tmp_path / 'run'):
        if name.endswith('.pth.tar'):
            assert _load(tmp_path / 'run' / name)['epoch'] == 0


def test_non_finite_loss_on_one_rank_stops_every_rank_and_keeps_the_last_checkpoint(tmp_path):
    rc, log = _faulty_run(tmp_path, 'nan', rank=1, call=3)  # NaN on rank 1 only, in epoch 2
    assert rc != 0
    # Both ranks stop, each with the message naming the step (rank 0's own loss was finite).
    assert log.count('train.py: error: Non-finite training loss') == 2, log[-3000:]
    assert 'at epoch 2, batch 0, update 3' in log
    checkpoint = _load(tmp_path / 'run' / 'last.pth.tar')
    assert checkpoint['epoch'] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint['state_dict'].values() if v.is_floating_point())
    assert _epochs(tmp_path / 'run') == [0, 1]


def test_sigterm_to_every_rank_ends_each_with_143_keeping_the_completed_epochs(tmp_path):
    rc, log = _faulty_run(tmp_path, 'sigterm', rank=-1, call=3)  # every rank, in epoch 2
    assert rc != 0
    assert log.count('interrupted by SIGTERM') == 1, log[-3000:]  # said once, by the primary
    assert f"--resume {tmp_path / 'run' / 'last.pth.tar'}" in log
    # No traceback of ours (torchrun prints its own ChildFailedError): the ranks leave through SystemExit(143);
    # a rank still stopping when torchrun closes the others may end by that SIGTERM itself (exit code -15).
    assert 'RunInterrupted' not in log and 'KeyboardInterrupt' not in log, log[-3000:]
    assert re.search(r'exitcode\s*: 143', log), log[-3000:]
    assert _load(tmp_path / 'run' / 'last.pth.tar')['epoch'] == 1
    assert _epochs(tmp_path / 'run') == [0, 1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='--sync-bn needs CUDA, and NCCL one GPU per process')
def test_sync_bn_trains_on_two_gpus(tmp_path):
    (rc, log), = _run_together([_torchrun(
        '--standalone', '--nproc-per-node', '2', TRAIN_PY, '--model', 'test_resnet', '--img-size', '32',
        '--class-subset', '3', '--samples-per-class', '8', '-b', '12', '--epochs', '1', '-j', '0', '--device', 'cuda',
        '--sync-bn', '--output', str(tmp_path), '--experiment', 'run')])
    assert rc == 0, log[-3000:]
    assert 'SyncBatchNorm' in log
    assert _epochs(tmp_path / 'run') == [0]


def _loop_reads(log):
    """Per rank: the loop's host reads from ``benchmarks.host_syncs``'s report, without the loss's target value
    checks (they run for CPU tensors only; on a GPU they are skipped) and the optimiser steps."""
    counts = {}
    for rank, body in re.findall(r'\[rank (\d)\] (host reads: .*?)(?=\n\[rank \d\] host reads|\Z)', log, re.S):
        steps = int(re.search(r'optimiser steps (\d+)', body).group(1))
        sites = re.findall(r'\[rank \d\]\s+(\d+)\s+\S+\s+(\S+)', body)
        counts[rank] = (sum(int(n) for n, where in sites if not where.startswith('functional.py')), steps)
    return counts


@pytest.mark.slow
@pytest.mark.parametrize('loss', ['ce', 'gsl'])
def test_under_torchrun_a_steps_reads_do_not_grow_with_the_steps(tmp_path, loss):
    runs = {}
    for batches in (2, 5):
        cmd = _torchrun('--standalone', '--nproc-per-node', '2', '-m', 'benchmarks.host_syncs', '--module',
                        'timm_gsl.train', '--', *RECIPE, '-b', '4', '--epochs', '1', '--loss', loss,
                        '--train-batches-per-epoch', str(batches), '--log-interval', '50', '--output',
                        str(tmp_path), '--experiment', f'{loss}-{batches}', '--no-calibrate')
        (rc, log), = _run_together([cmd])
        assert rc == 0, log[-3000:]
        runs[batches] = _loop_reads(log)
    for batches, counts in runs.items():
        assert sorted(counts) == ['0', '1'] and all(steps == batches for _, steps in counts.values()), counts
    # The same for 2 and 5 steps: the first and the last log line; for gsl also the grouping statistics at the
    # epoch's end and the head's one-time check of its classifier on the first batch (2 reads).
    expected = 2 + 3 * (loss == 'gsl')
    assert {reads for reads, _ in runs[2].values()} == {reads for reads, _ in runs[5].values()} == {expected}, runs
