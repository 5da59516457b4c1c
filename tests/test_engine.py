"""Tests of ``timm_gsl.engine`` pieces that train.py's runs do not pin down on their own (atomic files, meters, reports)."""
import pytest
import torch

from timm_gsl.cli.flags import CHECKPOINT_FLAGS
from timm_gsl.functional import GroupingStatistics
from timm_gsl.engine import GroupingMeter, check_checkpoint_fits, format_grouping, format_summary, plot_learning_curves


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


# ---------------------------------------------------------------------------------------------- atomic files

def test_atomic_writes_create_the_folder_and_replace_the_whole_file(tmp_path):
    from timm_gsl.engine import write_bytes_atomic, write_json_atomic, write_text_atomic
    target = tmp_path / 'new' / 'folder' / 'out.txt'
    write_text_atomic(str(target), 'first\n')
    write_text_atomic(str(target), 'second, ünïcode\n')
    assert target.read_text(encoding='utf-8') == 'second, ünïcode\n'
    write_bytes_atomic(str(tmp_path / 'b.bin'), b'\x00\x01')
    assert (tmp_path / 'b.bin').read_bytes() == b'\x00\x01'
    write_json_atomic(str(tmp_path / 'r.json'), {'b': 1, 'a': [1.5]})
    assert (tmp_path / 'r.json').read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ['out.txt']  # no temporary file left


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from timm_gsl.engine import atomic_path, write_text_atomic
    target = tmp_path / 'curves.png'
    write_text_atomic(str(target), 'old')
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            with open(tmp, 'w') as f:
                f.write('half')
            raise RuntimeError('killed mid-write')
    assert target.read_text() == 'old'
    assert [p.name for p in tmp_path.iterdir()] == ['curves.png']


def test_atomic_files_get_the_permissions_of_a_plain_write(tmp_path):
    import os
    import stat
    from timm_gsl.engine import write_text_atomic
    plain, atomic = tmp_path / 'plain', tmp_path / 'atomic'
    plain.write_text('x')
    write_text_atomic(str(atomic), 'x')
    assert stat.S_IMODE(os.stat(atomic).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_summary_opens_with_timms_best_metric_line():
    # timm's train.py logs '*** Best metric: {best_metric} (epoch {best_epoch})' with the float as Python prints it.
    lines = format_summary(100 / 3, 7, 'top1', None).splitlines()
    assert lines[0] == '*** Best metric: 33.333333333333336 (epoch 7)'
    assert lines[1] == 'Best top1: 33.333 (epoch 7)'
    assert format_summary(None, None, 'top1', None).splitlines()[0] == 'No evaluation was run.'


def test_a_checkpoint_that_does_not_fit_names_the_architecture_keyword_and_through_names_the_flag():
    model = torch.nn.Linear(3, 2)
    checkpoint = {'arch': 'other', 'state_dict': {'weight': torch.zeros(5, 3), 'bias': torch.zeros(5)}}

    def message(**kwargs):
        with pytest.raises(ValueError) as info:
            check_checkpoint_fits(checkpoint, model, 'linear', '--resume', 'x.pth.tar', **kwargs)
        return str(info.value)

    assert message().startswith("--resume 'x.pth.tar' is a checkpoint of other, which does not fit arch linear: ")
    assert message(names=CHECKPOINT_FLAGS).startswith(  # train.py's and validate.py's words
        "--resume 'x.pth.tar' is a checkpoint of other, which does not fit --model linear: 2 of another shape")
