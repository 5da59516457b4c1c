"""configs/: one YAML per row of Table B.1, loaded through train.py's own parser."""
import os

import pytest

from timm_gsl.cli.train import check_args, parse_args, resolve_gsl_type, uses_embedded_recipe

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')

# Table B.1 as SPEC.md lists it: (epochs, lr milestones, lr, training images, class subset, samples per class).
TABLE_B1 = {
    'imagenet': (120, [30, 60, 90], 0.1, 1_281_000, None, None),
    'food101': (180, [60, 120, 150], 0.1, 75_000, None, None),
    'caltech256': (300, [120, 240, 270], 0.1, 15_000, None, None),
    'sun397': (300, [120, 240, 270], 0.1, 19_000, None, None),
    'imagenet_100classes': (180, [60, 120, 150], 0.1, 100 * 1281, 100, None),
    'imagenet_200classes': (180, [60, 120, 150], 0.1, 200 * 1281, 200, None),
    'imagenet_500classes': (120, [30, 60, 90], 0.1, 500 * 1281, 500, None),
    'imagenet_100samples': (240, [90, 180, 210], 0.1, 100_000, None, 100),
    'imagenet_200samples': (240, [90, 180, 210], 0.1, 200_000, None, 200),
    'imagenet_500samples': (180, [60, 120, 150], 0.1, 500_000, None, 500),
    'food101_finetune': (120, [30, 60, 90], 0.0045, 75_000, None, None),
}
# The paper's advice (SPEC.md): Type-II below about 500K images, Type-I with more.
PAPER_TYPE = {name: ('II' if row[3] < 500_000 else 'I') for name, row in TABLE_B1.items()}


def _config(name):
    return os.path.join(CONFIG_DIR, name + '.yaml')


def test_there_is_one_config_per_table_b1_row():
    names = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith('.yaml'))
    assert names == sorted(TABLE_B1)


@pytest.mark.parametrize('name', sorted(TABLE_B1))
def test_config_sets_the_papers_schedule_and_optimiser(name):
    epochs, milestones, lr, _, _, _ = TABLE_B1[name]
    args, explicit = parse_args(['-c', _config(name)])
    assert (args.sched, args.epochs, args.decay_milestones, args.decay_rate) == ('multistep', epochs, milestones, 0.1)
    assert (args.opt, args.lr, args.momentum, args.weight_decay) == ('sgd', lr, 0.9, 1e-4)
    assert args.warmup_epochs == 0 and args.cooldown_epochs == 0
    assert args.batch_size == 256
    # Every value comes from the file, not from train.py's defaults (which differ: cosine, warm-up 5, ...).
    assert {'sched', 'epochs', 'decay_milestones', 'lr', 'weight_decay', 'warmup_epochs', 'smoothing',
            'color_jitter', 'batch_size'} <= explicit


@pytest.mark.parametrize('name', sorted(TABLE_B1))
def test_config_uses_the_resnet_augmentation_not_timms(name):
    args, _ = parse_args(['-c', _config(name)])
    assert args.scale == [0.08, 1.0] and args.ratio == pytest.approx([3 / 4, 4 / 3])
    assert (args.hflip, args.vflip, args.color_jitter, args.aa, args.reprob) == (0.5, 0.0, 0.0, None, 0.0)
    assert (args.mixup, args.cutmix, args.smoothing, args.drop) == (0.0, 0.0, 0.0, 0.0)
    assert (args.img_size, args.crop_pct) == (224, 0.875)  # resize 256, centre-crop 224
    assert args.train_interpolation == args.interpolation == 'bilinear'


@pytest.mark.parametrize('name', sorted(TABLE_B1))
def test_config_sets_the_group_softmax_loss_and_data_condition(name):
    _, _, _, images, class_subset, samples = TABLE_B1[name]
    args, explicit = parse_args(['-c', _config(name)])
    assert args.model.split('.')[0] == 'resnet50'
    assert args.pretrained == name.endswith('finetune')
    assert (args.loss, args.gsl_groups, args.gsl_grouping) == ('gsl', 4, 'discriminative')
    assert resolve_gsl_type(args.gsl_type, images) == PAPER_TYPE[name]
    assert (None if args.class_subset is None else int(args.class_subset)) == class_subset
    assert args.samples_per_class == samples
    # A data option is set, so train.py does not fall back to its embedded Fashion-MNIST recipe.
    assert not uses_embedded_recipe(explicit)


@pytest.mark.parametrize('name', sorted(TABLE_B1))
@pytest.mark.parametrize('extra', [[], ['--loss', 'ce']], ids=['gsl', 'softmax-baseline'])
def test_config_passes_train_py_checks_with_and_without_the_softmax_baseline_flag(name, extra):
    args, _ = parse_args(['-c', _config(name), '--device', 'cpu', *extra])
    check_args(args)
    assert args.loss == (extra[1] if extra else 'gsl')


@pytest.mark.parametrize('name', sorted(TABLE_B1))
def test_config_states_the_per_process_batch_for_one_and_eight_gpus(name):
    with open(_config(name)) as f:
        text = f.read()
    assert '-b 256 on one GPU' in text and '--nproc_per_node 8' in text and '-b 32' in text
    assert 'ResNet-50 is assumed' in text and '--loss ce' in text
    args, _ = parse_args(['-c', _config(name), '-b', '32'])
    assert args.batch_size * 8 == 256
