"""benchmarks/gpu_check.py runs its code paths at toy sizes on the CPU, so it works when a GPU appears."""
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    from benchmarks import gpu_check
    return gpu_check


@pytest.mark.slow
def test_quick_cpu_run_covers_every_configuration_and_writes_json(tmp_path, capsys):
    gpu_check = _load()
    out = tmp_path / 'gpu_check.json'
    assert gpu_check.main(['--device', 'cpu', '--quick', '--output', str(out)]) == 0
    result = json.loads(out.read_text())
    configs = {(r['amp_dtype'], r['channels_last'], r['compiled']) for r in result['training']}
    assert configs == {(d, c, k) for d in ('float16', 'bfloat16') for c in (False, True) for k in (False, True)}
    for row in result['training']:
        for loss in ('ce', 'gsl'):
            assert 'error' not in row[loss], row
            assert row[loss]['finite'] and row[loss]['images_per_s'] > 0
        assert row['gsl_over_ce'] > 0
    assert [r['classes'] for r in result['loss']] == list(gpu_check.QUICK.loss_classes)
    assert all(r['gsl_s'] > 0 and r['plain_s'] > 0 for r in result['loss'])
    loops = result['loop']['loops']
    assert list(loops) == ['timm', 'ours-ce', 'ours-gsl'] and loops['timm']['ratio'] == 1.0
    assert all(row['step_s'] > 0 and row['ratio'] > 0 and 'noise' in row['verdict']
               for name, row in loops.items() if name != 'timm')
    assert all(v['status'].startswith('skipped: needs CUDA') for v in result['cuda_paths'].values())
    printed = capsys.readouterr().out
    assert '2. Training steps' in printed and '3. The loss alone' in printed and '4. Our training loop' in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal on a machine without CUDA')
def test_cuda_without_a_gpu_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        _load().main([])
    assert exc.value.code == 2
    assert 'CUDA is not available here; pass --device cpu --quick' in capsys.readouterr().err


def test_a_spent_budget_skips_the_training_configurations_and_still_reports_the_rest(tmp_path, capsys):
    gpu_check = _load()
    out = tmp_path / 'gpu_check.json'
    assert gpu_check.main(['--device', 'cpu', '--quick', '--no-compile', '--budget-s', '0', '--output', str(out)]) == 0
    result = json.loads(out.read_text())
    assert all('skipped' in row['ce'] and 'skipped' in row['gsl'] for row in result['training'])
    assert len(result['training']) == 4 and result['loss'] and result['loop']['loops']['ours-gsl']['ratio'] > 0
    assert 'ce skipped: time budget spent (--budget-s)' in capsys.readouterr().out


def test_a_negative_budget_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        _load().main(['--device', 'cpu', '--budget-s', '-1'])
    assert exc.value.code == 2
    assert 'argument --budget-s: -1 is invalid, expected seconds >= 0' in capsys.readouterr().err
