"""Tests of ``timm_gsl.training`` pieces that train.py's runs do not pin down on their own."""
import pytest
import torch

from timm_gsl.functional import GroupingStatistics
from timm_gsl.training import GroupingMeter, format_grouping, format_summary, plot_learning_curves


def _stats(zero, nonzero, loss):
    return GroupingStatistics(torch.tensor(zero), torch.tensor(nonzero), torch.tensor(loss))


def test_grouping_meter_weights_batches_by_their_size():
    meter = GroupingMeter()
    meter.update(_stats(0.5, [1., 3.], [2., 4.]), n=1)
    meter.update(_stats(0.2, [4., 0.], [1., 1.]), n=3)
    metrics = meter.metrics()
    assert list(metrics) == GroupingMeter.names(2) == [
        'gsl_zero_frac', 'gsl_nonzero_g1', 'gsl_nonzero_g2', 'gsl_loss_g1', 'gsl_loss_g2']
    expected = [(0.5 + 3 * 0.2) / 4, (1 + 12) / 4, 3 / 4, (2 + 3) / 4, (4 + 3) / 4]
    assert list(metrics.values()) == pytest.approx(expected)


def test_grouping_meter_without_batches_has_no_metrics_and_blank_has_every_name():
    assert GroupingMeter().metrics() == {}
    assert dict(GroupingMeter.blank(3)) == dict.fromkeys(GroupingMeter.names(3), '')


def test_format_grouping_lists_groups_in_order():
    meter = GroupingMeter()
    meter.update(_stats(0.25, [10., 2., 30.], [1.5, 2.25, 0.5]), n=2)
    line = format_grouping(meter.metrics())
    assert line.startswith('Grouping: 25.0% of classifier inputs are exactly zero')
    assert '[10.0, 2.0, 30.0]' in line and '[1.500, 2.250, 0.500]' in line
    assert format_grouping({'loss': 1.0}) is None


def test_summary_reports_the_clean_training_measurement():
    text = format_summary(90.0, 3, 'top1', None, last_metrics={'top1': 89.0},
                          clean_train_metrics={'loss': 0.01, 'top1': 100.0})
    assert 'Clean training set (no augmentation, eval mode): loss 0.01, top1 100' in text
    assert 'Clean training set' not in format_summary(90.0, 3, 'top1', None)


def test_learning_curves_draw_the_clean_training_loss(tmp_path):
    history = [dict(epoch=0, train_loss=2.0, train_softmax_loss=1.5, eval_loss=1.2, eval_top1=50.0),
               dict(epoch=1, train_loss=1.0, train_softmax_loss=0.8, train_clean_loss=0.5, train_clean_top1=90.0,
                    eval_loss=1.0, eval_top1=60.0)]
    path = plot_learning_curves(history, str(tmp_path / 'curves.png'), 'title', train_targets='smoothed targets')
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
