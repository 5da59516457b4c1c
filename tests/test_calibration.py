"""timm_gsl.calibration against slow, obviously-correct references written with Python floats and loops."""
import math

import pytest
import torch

from timm_gsl.calibration import (
    CalibrationFit, CalibrationMeter, calibrate_cross_fitted, calibrate_held_out, calibration_metrics,
    expected_calibration_error, fit_temperature, negative_log_likelihood,
)


def reference_softmax(row, temperature=1.0):
    scaled = [v / temperature for v in row]
    top = max(scaled)
    exps = [math.exp(v - top) for v in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def reference_nll(logits, target, temperature=1.0):
    total = 0.0
    for row, y in zip(logits.tolist(), target.tolist()):
        total -= math.log(reference_softmax(row, temperature)[y])
    return total / len(target)


def reference_ece(logits, target, temperature=1.0, bins=15):
    """Guo et al.'s definition, literally: bins (k/M, (k+1)/M], |acc - conf| weighted by the bin's share."""
    members = [[] for _ in range(bins)]
    for row, y in zip(logits.tolist(), target.tolist()):
        probs = reference_softmax(row, temperature)
        confidence = max(probs)
        prediction = probs.index(confidence)
        for k in range(bins):
            if k / bins < confidence <= (k + 1) / bins:
                members[k].append((prediction == y, confidence))
                break
    n = len(target)
    ece = 0.0
    for bin_members in members:
        if bin_members:
            accuracy = sum(c for c, _ in bin_members) / len(bin_members)
            confidence = sum(p for _, p in bin_members) / len(bin_members)
            ece += len(bin_members) / n * abs(accuracy - confidence)
    return 100 * ece


def hand_made(n=300, classes=7, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g) * scale
    # Push two thirds of the rows towards their label, so accuracy and confidence vary across bins.
    logits[: 2 * n // 3] += 3 * torch.nn.functional.one_hot(target[: 2 * n // 3], classes)
    return logits, target


@pytest.mark.parametrize('temperature', [1.0, 0.5, 3.7])
def test_nll_and_ece_equal_the_literal_definitions(temperature):
    logits, target = hand_made()
    assert negative_log_likelihood(logits, target, temperature) == pytest.approx(
        reference_nll(logits, target, temperature), rel=1e-12)
    assert expected_calibration_error(logits, target, temperature) == pytest.approx(
        reference_ece(logits, target, temperature), abs=1e-9)
    assert calibration_metrics(logits, target, temperature) == pytest.approx(
        dict(nll=reference_nll(logits, target, temperature), ece=reference_ece(logits, target, temperature)))


def test_ece_of_hand_computed_cases():
    # Two images, both predicted with confidence 0.5 of 2 classes (bin 7 of 15): one right, one wrong -> ECE 0.
    assert expected_calibration_error(torch.zeros(2, 2), torch.tensor([0, 1])) == pytest.approx(0.0)
    # Confident (p ~ 1) and always right -> ECE ~ 0; confident and always wrong -> ECE ~ 100.
    sure = torch.tensor([[50.0, 0.0], [0.0, 50.0]])
    assert expected_calibration_error(sure, torch.tensor([0, 1])) == pytest.approx(0.0, abs=1e-9)
    assert expected_calibration_error(sure, torch.tensor([1, 0])) == pytest.approx(100.0, abs=1e-9)
    # One image with p = 0.8 right and one with p = 0.8 wrong, in the same bin: |0.5 - 0.8| = 30 %.
    p8 = math.log(0.8 / 0.2)
    assert expected_calibration_error(torch.tensor([[p8, 0.0], [p8, 0.0]]), torch.tensor([0, 1])) == pytest.approx(30.0)


def test_meter_over_batches_equals_the_whole_set():
    logits, target = hand_made(n=257)
    meter = CalibrationMeter()
    for start in range(0, 257, 64):
        meter.update(logits[start:start + 64], target[start:start + 64])
    meter.update(logits[:0], target[:0])
    assert meter.compute() == pytest.approx(dict(nll=reference_nll(logits, target), ece=reference_ece(logits, target)))


def test_meter_without_images_reports_nan_not_a_number_over_zero_images():
    result = CalibrationMeter().compute()
    assert math.isnan(result['nll']) and math.isnan(result['ece'])


def test_fitted_temperature_minimises_the_nll_on_a_fine_grid():
    logits, target = hand_made(scale=6.0)
    t = fit_temperature(logits, target)
    grid = [math.exp(-3 + 6.5 * i / 2000) for i in range(2001)]  # T from 0.05 to 33
    best = min(grid, key=lambda x: reference_nll(logits, target, x))
    assert t == pytest.approx(best, rel=5e-3)
    assert reference_nll(logits, target, t) <= min(reference_nll(logits, target, x) for x in grid) + 1e-9
    # Deterministic, and scale-equivariant: logits x 2 need a temperature twice as high.
    assert fit_temperature(logits, target) == t
    assert fit_temperature(2 * logits, target) == pytest.approx(2 * t, rel=1e-6)


def test_an_optimum_outside_the_bracket_returns_the_nearer_bound():
    logits, target = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])  # all right: T -> 0 is best
    assert fit_temperature(logits, target, bounds=(0.5, 2.0)) == pytest.approx(0.5)


@pytest.mark.parametrize('bad, match', [
    (dict(logits=torch.zeros(3), target=torch.zeros(3, dtype=torch.long)), 'N x C'),
    (dict(logits=torch.zeros(3, 1), target=torch.zeros(3, dtype=torch.long)), 'C >= 2'),
    (dict(logits=torch.zeros(3, 4), target=torch.zeros(2, dtype=torch.long)), 'one per row'),
    (dict(logits=torch.zeros(3, 4), target=torch.tensor([0, 4, 1])), r'class 4, expected class indices in \[0, 3\]'),
    (dict(logits=torch.zeros(3, 4), target=torch.zeros(3)), 'integer class indices'),
])
def test_bad_inputs_are_refused_in_one_line(bad, match):
    with pytest.raises(ValueError, match=match):
        negative_log_likelihood(**bad)


@pytest.mark.parametrize('temperature', [0.0, -1.0, float('nan'), float('inf')])
def test_temperature_must_be_finite_and_positive(temperature):
    with pytest.raises(ValueError, match='temperature=.*expected a finite number > 0'):
        expected_calibration_error(torch.zeros(2, 2), torch.tensor([0, 1]), temperature)


def test_held_out_fit_reports_on_other_images():
    fit_logits, fit_target = hand_made(n=400, scale=8.0, seed=1)
    report_logits, report_target = hand_made(n=300, scale=8.0, seed=2)
    fit = calibrate_held_out(fit_logits, fit_target, report_logits, report_target, 'hold-out', 'validation images')
    assert fit.temperature == fit_temperature(fit_logits, fit_target)
    assert fit.images == 400 and fit.reported_images == 300
    assert fit.nll_before == pytest.approx(reference_nll(report_logits, report_target))
    assert fit.nll_after == pytest.approx(reference_nll(report_logits, report_target, fit.temperature))
    assert fit.ece_after == pytest.approx(reference_ece(report_logits, report_target, fit.temperature))
    assert fit.nll_after < fit.nll_before  # over-confident logits (scale 8) are helped by T > 1
    assert CalibrationFit.from_dict(fit.to_dict()) == fit


def test_cross_fitted_figures_score_each_half_with_the_other_halfs_temperature():
    logits, target = hand_made(n=301, scale=8.0, seed=3)
    fit = calibrate_cross_fitted(logits, target, 'validation images, 2-fold cross-fitted', seed=5)
    order = torch.randperm(301, generator=torch.Generator().manual_seed(5))
    a, b = order[:150], order[150:]
    t_a, t_b = fit_temperature(logits[a], target[a]), fit_temperature(logits[b], target[b])
    nll = (reference_nll(logits[a], target[a], t_b) * 150 + reference_nll(logits[b], target[b], t_a) * 151) / 301
    assert fit.nll_after == pytest.approx(nll)
    assert fit.temperature == fit_temperature(logits, target)  # the published T uses every image
    assert fit.nll_before == pytest.approx(reference_nll(logits, target))


def test_calibration_record_refuses_unknown_or_missing_keys():
    logits, target = hand_made()
    record = calibrate_held_out(logits, target, logits, target, 's', 'r').to_dict()
    with pytest.raises(ValueError, match='unknown keys'):
        CalibrationFit.from_dict(dict(record, extra=1))
    with pytest.raises(ValueError, match="weights='x'"):
        CalibrationFit.from_dict(dict(record, weights='x'))
    assert CalibrationFit.from_dict(None) is None
