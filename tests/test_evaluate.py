"""Tests of ``timm_gsl.engine.evaluate``: the evaluation train.py and validate.py share, against literal definitions."""
import math

import pytest
import torch
import torch.nn as nn

from timm_gsl.engine import evaluate


def _data(n=37, classes=7, features=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    model = nn.Linear(features, classes)
    with torch.no_grad():
        model.weight.copy_(torch.randn(classes, features, generator=g))
        model.bias.copy_(torch.randn(classes, generator=g))
    loader = [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]  # a last batch of 5
    return model, loader, x, y


def _reference(logits, y):
    """Mean cross-entropy, top-1 and top-5 (%) and NLL, one image at a time, in Python floats."""
    loss = hits1 = hits5 = 0.0
    for row, label in zip(logits.double().tolist(), y.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        loss += log_z - row[label]
        ranked = sorted(range(len(row)), key=lambda c: -row[c])
        hits1 += ranked[0] == label
        hits5 += label in ranked[:5]
    n = len(y)
    return loss / n, 100 * hits1 / n, 100 * hits5 / n


def test_without_a_task_it_measures_with_timms_classification_evaluator():
    model, loader, x, y = _data()
    metrics = evaluate(model, loader, None, torch.device('cpu'))
    loss, top1, top5 = _reference(model(x).detach(), y)
    assert list(metrics) == ['loss', 'top1', 'top5', 'nll', 'ece']
    assert metrics['loss'] == pytest.approx(loss, abs=1e-5) and metrics['nll'] == pytest.approx(loss, abs=1e-5)
    assert (metrics['top1'], metrics['top5']) == (pytest.approx(top1), pytest.approx(top5))
    assert 0 < metrics['top1'] < metrics['top5'] < 100  # not a degenerate case


def test_output_transform_and_on_batch_see_every_image_once_in_order():
    model, _, x, y = _data(n=60)
    keep = [1, 3, 4, 6]  # validate.py's --valid-labels: the logits of these classes only
    inside = torch.tensor([int(label) in keep for label in y])
    x, y = x[inside], torch.tensor([keep.index(int(label)) for label in y[inside]])  # labels as positions
    assert 8 < len(y) < 60
    loader = [(x[i:i + 8], y[i:i + 8]) for i in range(0, len(y), 8)]
    seen_logits, seen_targets = [], []
    metrics = evaluate(model, loader, None, torch.device('cpu'), output_transform=lambda out: out[:, keep],
                       on_batch=lambda out, target: (seen_logits.append(out), seen_targets.append(target)))
    expected = model(x).detach()[:, keep]
    assert torch.equal(torch.cat(seen_logits), expected) and torch.equal(torch.cat(seen_targets), y)
    loss, top1, _ = _reference(expected, y)
    assert metrics['loss'] == pytest.approx(loss, abs=1e-5) and metrics['top1'] == pytest.approx(top1)
