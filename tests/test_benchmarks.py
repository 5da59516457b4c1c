"""Tests of the benchmark helpers: host-read counting, interleaved rounds, ratio verdicts, bench_train's smoke run."""
import textwrap

import pytest

from benchmarks import bench_train, host_syncs
from benchmarks.loops import interleaved_rounds, ratio_summary


def test_interleaved_rounds_rotate_the_order_and_skip_the_warm_up_round():
    calls = []
    loops = {name: (lambda n: lambda epoch: calls.append((epoch, n)))(name) for name in 'abc'}
    times = interleaved_rounds(loops, rounds=3)
    assert [n for _, n in calls] == list('abc' 'bca' 'cab' 'abc')
    assert [e for e, _ in calls] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert {name: len(values) for name, values in times.items()} == {'a': 3, 'b': 3, 'c': 3}


def test_ratio_summary_pairs_rounds_and_says_when_a_ratio_is_above_the_noise():
    base = [1.0, 2.0, 1.5, 1.2, 0.9, 1.1, 1.3]  # a loaded machine: the baseline itself varies a lot
    times = {'base': base,
             'slower': [1.1 * t for t in base],                                  # 10 % slower in every round
             'same': [t * f for t, f in zip(base, [1.02, 0.97, 1.01, 0.99, 1.03, 0.98, 1.0])]}
    summary = ratio_summary(times, 'base')
    assert summary['base'] == dict(median_s=1.2, ratio=1.0)
    assert summary['slower']['ratio'] == pytest.approx(1.1)
    assert summary['slower']['verdict'] == 'slower, above the noise'
    assert summary['same']['ratio'] == pytest.approx(1.0)
    assert summary['same']['ci_low'] < 1 < summary['same']['ci_high']
    assert summary['same']['verdict'] == 'within the noise'
    faster = ratio_summary({'base': base, 'f': [0.8 * t for t in base]}, 'base')
    assert faster['f']['verdict'] == 'faster, above the noise'


def test_host_syncs_counts_a_scripts_reads_per_optimiser_step(tmp_path, capsys):
    script = tmp_path / 'train.py'
    script.write_text(textwrap.dedent('''
        import sys
        import torch
        w = torch.zeros(3, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.1)

        def train_one_epoch(steps):
            for _ in range(steps):
                loss = (w - 1).pow(2).sum()
                loss.backward()
                opt.step()
                opt.zero_grad()
                float(loss.detach())        # one read a step
            return loss.detach().item()     # and one at the end

        train_one_epoch(int(sys.argv[1]))
        print(w.tolist())                   # outside the loop
    '''))
    assert host_syncs.main(['--script', str(script), '--', '4']) == 0
    err = capsys.readouterr().err
    assert 'host reads: 6 in all, 5 inside train_one_epoch; optimiser steps 4; reads per step inside the loop 1.25' \
        in err, err
    assert '__float__' in err and 'item' in err


def test_host_syncs_refuses_a_missing_script(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        host_syncs.main(['--script', str(tmp_path / 'nope.py')])
    assert e.value.code == 2
    assert "argument --script: '" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_train_quick_prints_every_loop_with_its_ratio(capsys):
    assert bench_train.main(['--quick']) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert list(rows) == list(bench_train.LOOPS)
    assert 'baseline' in rows['timm']
    for name in bench_train.LOOPS[1:]:
        assert 'noise' in rows[name], out


def test_bench_train_refuses_zero_rounds(capsys):
    with pytest.raises(SystemExit):
        bench_train.main(['--repeats', '0'])
    assert 'argument --repeats: 0 is invalid, expected >= 1' in capsys.readouterr().err
