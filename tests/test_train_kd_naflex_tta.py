"""train.py with timm's distillation, NaFlex and TTA flags, for both losses, end to end on the embedded data.

The pieces are tested against timm and slow references in test_distillation.py, test_naflex.py and
test_tta.py; here the command line puts them together: a teacher trained and exported by this project,
students distilled from it, a NaFlexViT trained through the NaFlex loader, evaluation with --tta.
"""
import csv
import os

import pytest
import timm
import torch

from timm_gsl.cli.train import main
from timm_gsl.engine import read_checkpoint
from timm_gsl.hub import export_checkpoint

# Small and quick: 3 classes of the embedded set, 8 images each, batches of 8.
SMALL = ['--class-subset', '3', '--samples-per-class', '8', '-b', '8', '-j', '0', '--log-interval', '1',
         '--epochs', '1', '--no-train-eval']


def _summary(output_dir):
    with open(os.path.join(output_dir, 'summary.csv')) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    """A resnet teacher trained for one epoch by train.py and exported by the package (local-dir: loadable)."""
    root = tmp_path_factory.mktemp('teacher')
    result = main(['--model', 'test_resnet', '--loss', 'ce', '--output', str(root), '--experiment', 'run'] + SMALL)
    folder = root / 'exported'
    export_checkpoint(os.path.join(result['output_dir'], 'last.pth.tar'), str(folder))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize('loss', ['ce', 'gsl'])
def test_distillation_from_an_exported_teacher_logs_both_parts_and_saves_a_plain_student(tmp_path, teacher, loss):
    result = main(['--model', 'test_resnet', '--loss', loss, '--kd-model-name', f'local-dir:{teacher}',
                   '--distill-loss-weight', '0.5', '--output', str(tmp_path), '--experiment', 'run'] + SMALL)
    row = _summary(result['output_dir'])[-1]
    task, kd = float(row['train_task_loss']), float(row['train_kd_loss'])
    # timm's weighting: --distill-loss-weight alone keeps the task loss at weight 1.
    assert float(row['train_loss']) == pytest.approx(task + 0.5 * kd, rel=1e-5)
    assert kd >= 0 and task > 0
    if loss == 'gsl':  # the group loss is the task loss: the softmax loss and the grouping health beside it
        assert float(row['train_softmax_loss']) <= task + 1e-6 and row['train_gsl_zero_frac'] != ''
    checkpoint = read_checkpoint(os.path.join(result['output_dir'], 'last.pth.tar'), 'checkpoint')
    plain = timm.create_model('test_resnet', num_classes=3)
    assert set(checkpoint['state_dict']) == set(plain.state_dict())  # no teacher, no hooks: a plain timm model
    plain.load_state_dict(checkpoint['state_dict'])


@pytest.mark.slow
def test_a_teacher_with_another_class_count_is_refused_in_one_line_before_any_output(tmp_path, teacher, capsys):
    with pytest.raises(SystemExit) as exc:
        main(['--model', 'test_resnet', '--kd-model-name', f'local-dir:{teacher}', '--output', str(tmp_path / 'o'),
              '--experiment', 'run'] + SMALL[:1] + ['5'] + SMALL[2:])  # --class-subset 5: the teacher has 3
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert err[0].startswith('train.py: error: --kd-model-name') and '3' in err[0] and '5' in err[0]
    assert not (tmp_path / 'o').exists()


NAFLEX = ['--model', 'naflexvit_base_patch16_gap', '--model-kwargs', 'embed_dim=32', 'depth=1', 'num_heads=2',
          'patch_size=7', 'img_size=28', '--naflex-loader', '--naflex-train-seq-lens', '4', '16',
          '--naflex-max-seq-len', '16']


@pytest.mark.slow
@pytest.mark.parametrize('loss', ['ce', 'gsl'])
def test_naflex_training_with_either_loss(tmp_path, loss):
    result = main(NAFLEX + ['--loss', loss, '--output', str(tmp_path), '--experiment', 'run'] + SMALL)
    row = _summary(result['output_dir'])[-1]
    assert torch.isfinite(torch.tensor(float(row['train_loss'])))
    assert 0 <= float(row['eval_top1']) <= 100
    if loss == 'gsl':  # the grouped head saw the pooled NaFlex features: four groups of 32 / 4 features
        nonzero = [float(row[f'train_gsl_nonzero_g{g}']) for g in range(1, 5)]
        assert all(0 <= v <= 8 for v in nonzero) and max(nonzero) > 0


@pytest.mark.slow
def test_tta_2_evaluates_the_mirror_too(tmp_path):
    plain = main(['--model', 'test_resnet', '--output', str(tmp_path), '--experiment', 'plain', '--seed', '3'] + SMALL)
    tta = main(['--model', 'test_resnet', '--output', str(tmp_path), '--experiment', 'tta', '--seed', '3',
                '--tta', '2'] + SMALL)
    # Same seed, same training; only the evaluation differs.
    assert plain['history'][0]['train_loss'] == tta['history'][0]['train_loss']
    assert tta['last_metrics']['loss'] != plain['last_metrics']['loss']
    assert 0 <= tta['last_metrics']['top1'] <= 100
