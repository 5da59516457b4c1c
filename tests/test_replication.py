"""The replication (experiments/replication.py) and its report (experiments/replication_report.py).

The statistics are checked against literal definitions; the runs' plumbing (logits saved, JSON written last,
the calibration images never trained on) against a real two-epoch run of the smoke design.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from experiments import replication
from experiments.overfit_study import StudyDesign
from experiments.replication_report import bootstrap_interval, format_report, run_metrics, sign_test
from timm_gsl.calibration import calibration_metrics, fit_temperature

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
needs_source = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                                  reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")


def test_design_is_the_studys_primary_comparison_on_new_seeds():
    design, study = replication.ReplicationDesign(), StudyDesign()
    primary = study.comparison('primary')
    assert design.seeds == (5, 6, 7, 8, 9) and not set(design.seeds) & set(primary.seeds)
    assert design.original == primary.seeds
    for seed in (0, 5):
        # Same run ids, hence the same train.py command, as the study's primary runs.
        assert design.type_ii(seed) == primary.treatment(seed) and design.softmax(seed) == primary.baseline(seed)
    assert [s.run_id for s in replication.plan_runs(design)][:2] == [
        'A-e240-lr0.1-v20-softmax-k10-n100-s5', 'A-e240-lr0.1-v20-typeii-g4-discriminative-k10-n100-s5']


@pytest.mark.parametrize('diffs, expected', [
    ([-1, -2, -3, -4, -5], (5, 5, 0.0625)),  # 2 * (1/2)^5
    ([-1, 1, -1, 1], (2, 4, 1.0)),
    ([-1, -1, -1, 0, 2], (3, 4, 0.625)),  # zeros dropped; 2 * (1 + 4) / 16
    ([0, 0], (0, 0, 1.0)),
])
def test_sign_test_is_the_exact_binomial_test(diffs, expected):
    neg, n, p = sign_test(diffs)
    assert (neg, n) == expected[:2] and p == pytest.approx(expected[2])


def naive_bootstrap(wrong_t, wrong_b, resamples, seed):
    """Resample seeds, then images within each seed, literally."""
    rng = np.random.default_rng(seed)
    k = len(wrong_t)
    means = []
    for _ in range(resamples):
        total = 0.0
        for s in rng.integers(0, k, size=k):
            idx = rng.integers(0, len(wrong_t[s]), size=len(wrong_t[s]))
            total += wrong_t[s][idx].mean() - wrong_b[s][idx].mean()
        means.append(100 * total / k)
    return np.quantile(means, 0.025), np.quantile(means, 0.975)


def test_bootstrap_interval_agrees_with_literal_resampling():
    rng = np.random.default_rng(1)
    wrong_b = [(rng.random(400) < p).astype(np.int8) for p in (0.2, 0.25, 0.18)]
    wrong_t = [np.where(rng.random(400) < 0.1, 1 - b, b) for b in wrong_b]  # flip 10 % of the predictions
    fast = bootstrap_interval(wrong_t, wrong_b, resamples=4000, seed=2)
    slow = naive_bootstrap(wrong_t, wrong_b, 4000, seed=3)
    assert fast[0] == pytest.approx(slow[0], abs=0.4) and fast[1] == pytest.approx(slow[1], abs=0.4)
    assert fast[0] < fast[1]


def test_bootstrap_of_identical_arms_is_zero():
    same = [np.array([0, 1, 1, 0], dtype=np.int8)] * 2
    assert bootstrap_interval(same, same, resamples=100) == (0.0, 0.0)


def _fake_run(folder, seed, loss, scale, groups=None):
    g = torch.Generator().manual_seed(seed * 10 + (loss == 'Type-II'))
    target = torch.randint(0, 10, (300,), generator=g)
    logits = torch.randn(300, 10, generator=g) + scale * torch.nn.functional.one_hot(target, 10)
    calib_target = torch.randint(0, 10, (100,), generator=g)
    calib = torch.randn(100, 10, generator=g) + scale * torch.nn.functional.one_hot(calib_target, 10)
    name = f'{loss}-s{seed}'
    save_file(dict(test_logits=logits * scale, test_target=target, calib_logits=calib * scale,
                   calib_target=calib_target), os.path.join(folder, name + replication.LOGITS_SUFFIX))
    return dict(run_id=name, seed=seed, loss=loss, groups=groups, logits_file=name + replication.LOGITS_SUFFIX,
                wall_s=1.0, test_top1=100 - 100 * float((logits.argmax(1) != target).float().mean()),
                test_top1_from_logits=0.0, git_commit='abc1234', finished='now'), \
        logits * scale, target, calib * scale, calib_target


def test_run_metrics_recompute_error_and_calibration_from_the_logits(tmp_path):
    record, logits, target, calib, calib_target = _fake_run(str(tmp_path), 5, 'Type-II', 3.0, groups=4)
    m = run_metrics(record, str(tmp_path))
    assert m.error == pytest.approx(100 * float((logits.argmax(1) != target).float().mean()))
    t = fit_temperature(calib, calib_target)
    assert m.temperature == t
    for key, temperature in (('T=1', 1.0), ('T=G', 4.0), ('fitted', t)):
        expected = calibration_metrics(logits, target, temperature)
        assert (m.nll[key], m.ece[key]) == pytest.approx((expected['nll'], expected['ece']))


def test_report_gives_both_questions_and_their_verdicts(tmp_path):
    design = replication.ReplicationDesign()
    records = []
    for seed in design.seeds:
        records.append(_fake_run(str(tmp_path), seed, 'softmax', 2.0)[0])
        records.append(_fake_run(str(tmp_path), seed, 'Type-II', 2.5, groups=4)[0])
    text = format_report(design, records, [], str(tmp_path))
    assert '10 of 10 runs present' in text and '5 complete pairs' in text
    assert '| new (5, 6, 7, 8, 9) | 5 |' in text and 'Paired bootstrap over seeds and test images' in text
    assert '**Verdict (pre-registered: the 5 new seeds\' t-interval):' in text
    assert '| Type-II | T = G = 4 | 5 |' in text and '**Verdict (pre-registered: calibrated NLL):' in text
    partial = format_report(design, records[:3], [], str(tmp_path))
    assert 'pending (1 of 5 seeds)' in partial


@needs_source
def test_quick_run_saves_the_logits_of_the_final_model_and_its_json_last(tmp_path):
    out = str(tmp_path / 'rep')
    argv = ['--output', out, '--quick', '--threads', '1', '--data-cache', str(tmp_path / 'cache')]
    assert replication.main(argv) == 0
    design = replication.QUICK_DESIGN
    for spec in replication.plan_runs(design):
        record = json.load(open(replication.result_path(out, spec)))
        tensors = load_file(replication.logits_path(out, spec))
        assert tensors['test_logits'].shape == (3000, 3) and tensors['calib_logits'].shape == (24, 3)
        # The logits are the final model's: they give the last evaluation's top-1 of summary.csv.
        assert record['test_top1_from_logits'] == pytest.approx(record['test_top1'], abs=0.01)
        assert record['calib_source'] == 'training-pool hold-out' and record['wall_s'] > 0 and record['git_commit']
        if spec.loss == 'Type-II':
            groups = tensors['test_group_logits']
            assert groups.shape == (3000, 4, 3)
            assert torch.allclose(groups.sum(1), tensors['test_logits'], atol=1e-4)
    assert not os.listdir(os.path.join(out, '.scratch'))  # checkpoints removed after the logits were taken
    report = open(os.path.join(out, 'report.md')).read()
    assert '2 of 2 runs present' in report and math.isfinite(float(report.split('| 5 | softmax | ')[1].split(' |')[0]))
