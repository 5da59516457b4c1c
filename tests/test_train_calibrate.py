"""The temperature train.py fits after training (timm_gsl/cli/train_calibrate.py, its flags and data).

Each check recomputes what train.py did from the checkpoint and the images, image by image, with timm's own
eval transform: the calibration images are the ones promised, never trained on, and the stored temperature and
figures are those of the checkpoint's weights.
"""
import csv
import os

import pytest
import torch

from timm_gsl.calibration import CalibrationFit, calibration_metrics, fit_temperature
from timm_gsl.cli.train import main

# Every training image of 3 classes (1,500), or 8 of each (TINY); two batches an epoch either way.
EVERY_IMAGE = ['--model', 'test_resnet', '--class-subset', '3', '-b', '8', '--train-batches-per-epoch', '2', '-j', '0',
               '--log-interval', '1']
TINY = EVERY_IMAGE + ['--samples-per-class', '8']


def _run(tmp_path, *extra, name='run'):
    return main(TINY + ['--output', str(tmp_path), '--experiment', name] + list(extra))


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def _logits(checkpoint, split, **conditions):
    """The checkpoint model's logits, image by image through timm's eval transform (a slow reference)."""
    import timm
    from timm.data import create_transform, resolve_data_config

    from timm_gsl.data import create_dataset

    args = checkpoint['args']
    model = timm.create_model('test_resnet', num_classes=3, in_chans=args.in_chans or 3)
    model.load_state_dict(checkpoint['state_dict'])
    model.eval()
    dataset = create_dataset(args.dataset, split=split, class_subset=args.class_subset, seed=args.seed,
                             transform=create_transform(**resolve_data_config(vars(args), model=model)),
                             input_img_mode='L' if (args.in_chans or 3) == 1 else 'RGB', **conditions)
    with torch.no_grad():
        rows = [(model(image.unsqueeze(0))[0], label) for image, label in dataset]
    return torch.stack([r for r, _ in rows]), torch.tensor([y for _, y in rows]), dataset


def test_gsl_run_fits_a_temperature_on_held_out_training_images_by_default(tmp_path, caplog):
    caplog.set_level('INFO')
    result = _run(tmp_path, '--epochs', '2')
    out = result['output_dir']
    best, last = _load(os.path.join(out, 'model_best.pth.tar')), _load(os.path.join(out, 'last.pth.tar'))
    fit = CalibrationFit.from_dict(best['calibration'])
    assert CalibrationFit.from_dict(last['calibration']) is not None
    assert result['calibration'] == fit
    assert best['run_record']['calibration'] == fit.to_dict()  # in the run record too, for its readers
    assert fit.images == 3 * 50 and fit.source.startswith('training-pool hold-out') and fit.weights == 'model'
    # The calibration images: the 50 set aside per class, none of them a training image.
    calib_logits, calib_target, calib = _logits(best, 'train', is_training=True, samples_per_class=8,
                                                holdout_per_class=50, part='holdout')
    _, _, train = _logits(best, 'train', is_training=True, samples_per_class=8)
    assert not set(calib.indices) & set(train.indices) and len(calib) == 150
    assert fit.temperature == pytest.approx(fit_temperature(calib_logits, calib_target), rel=1e-4)
    # The figures: the validation images at T = 1 and at T.
    val_logits, val_target, _ = _logits(best, 'validation')
    assert fit.reported_images == len(val_target) == 300
    before = calibration_metrics(val_logits, val_target)
    after = calibration_metrics(val_logits, val_target, fit.temperature)
    assert (fit.nll_before, fit.ece_before) == pytest.approx((before['nll'], before['ece']), rel=1e-4, abs=1e-3)
    assert (fit.nll_after, fit.ece_after) == pytest.approx((after['nll'], after['ece']), rel=1e-4, abs=1e-3)
    # The run's last log line is the published checkpoint's calibration.
    last_line = [r.getMessage() for r in caplog.records if r.name == 'timm_gsl.train'][-1]
    assert last_line.startswith('Calibration (model_best.pth.tar): T = ') and '150 images' in last_line


def test_summary_has_nll_and_ece_of_every_evaluation(tmp_path):
    result = _run(tmp_path, '--epochs', '2', '--val-interval', '2', '--no-calibrate')
    with open(os.path.join(result['output_dir'], 'summary.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    assert {'eval_nll', 'eval_ece', 'train_clean_nll', 'train_clean_ece'} <= set(rows[0])
    assert rows[0]['eval_nll'] == '' and rows[0]['train_clean_nll'] == ''  # epoch 0: not evaluated
    checkpoint = _load(os.path.join(result['output_dir'], 'last.pth.tar'))
    assert 'calibration' not in checkpoint
    logits, target, _ = _logits(checkpoint, 'validation')
    expected = calibration_metrics(logits, target)
    assert float(rows[1]['eval_nll']) == pytest.approx(expected['nll'], rel=1e-4)
    assert float(rows[1]['eval_ece']) == pytest.approx(expected['ece'], abs=1e-3)
    assert result['last_metrics']['nll'] == pytest.approx(float(rows[1]['eval_loss']), rel=1e-5)


def test_other_losses_calibrate_only_when_asked(tmp_path):
    plain = _run(tmp_path, '--epochs', '1', '--loss', 'ce', name='ce')
    assert 'calibration' not in _load(os.path.join(plain['output_dir'], 'last.pth.tar'))
    asked = _run(tmp_path, '--epochs', '1', '--loss', 'ce', '--calibrate', name='ce-calibrated')
    assert CalibrationFit.from_dict(_load(os.path.join(asked['output_dir'], 'last.pth.tar'))['calibration'])


def test_without_unused_training_images_the_validation_images_are_cross_fitted(tmp_path):
    # No --samples-per-class: every training image is trained on, so auto cross-fits on the validation split.
    result = main(EVERY_IMAGE + ['--output', str(tmp_path), '--experiment', 'x', '--epochs', '1', '--no-train-eval'])
    fit = result['calibration']
    assert fit.source == 'validation images, 2-fold cross-fitted' and fit.images == fit.reported_images == 300
    logits, target, _ = _logits(_load(os.path.join(result['output_dir'], 'model_best.pth.tar')), 'validation')
    assert fit.temperature == pytest.approx(fit_temperature(logits, target), rel=1e-4)


def test_explicit_holdout_without_samples_per_class_leaves_the_training_set(tmp_path):
    result = main(EVERY_IMAGE + ['--output', str(tmp_path), '--experiment', 'x', '--epochs', '1', '--no-train-eval',
                          '--calibration-source', 'holdout', '--calibration-images-per-class', '20'])
    assert result['calibration'].images == 60 and result['calibration'].source.startswith('training-pool')


@pytest.mark.parametrize('flags, message', [
    (['--calibration-source', 'holdout', '--calibration-images-per-class', '495'],
     '--calibration-source holdout with --calibration-images-per-class 495'),
    (['--calibration-images-per-class', '0'], '--calibration-images-per-class 0 is invalid'),
    (['--calibration-images-per-class', '5', '--calibration-source', 'holdout'],
     'gives 15 calibration images, expected at least 20'),
    (['--no-calibrate', '--calibration-source', 'holdout'],
     '--calibration-source holdout would be ignored: no temperature is fitted with --no-calibrate'),
    (['--loss', 'ce', '--calibration-images-per-class', '10'], 'pass --calibrate to fit one'),
])
def test_calibration_that_cannot_work_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, flags,
                                                                                       message):
    with pytest.raises(SystemExit) as exc:
        main(TINY + ['--output', str(tmp_path / 'out'), '--experiment', 'x', '--epochs', '1'] + flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'out').exists()
