"""Tests of train.py (timm_gsl/train.py and timm_gsl/training.py).

Runs use timm's tiny ``test_resnet`` on the embedded 28x28 Fashion-MNIST subset, a few classes and
samples, 1-2 batches per epoch and no worker processes.
"""
import ast
import csv
import os

import pytest
import torch
import yaml

from timm_gsl import functional
from timm_gsl.loss import GroupSoftmaxLoss
from timm_gsl.train import (
    EMBEDDED_RECIPE, GSL_AUTO_THRESHOLD, apply_embedded_recipe, build_run, check_args, get_args_parser, main,
    parse_args, resolve_gsl_type,
)
from timm_gsl.training import batch_loss_scale

TSV = '/work/shared/reference/timm-train-flags.tsv'
# A tiny model, few classes and images, two batches an epoch: seconds per run on one core.
TINY = ['--model', 'test_resnet', '--class-subset', '3', '--samples-per-class', '8', '-b', '8',
        '--train-batches-per-epoch', '2', '-j', '0', '--log-interval', '1']


def _run(tmp_path, *extra, name='run'):
    return main(TINY + ['--output', str(tmp_path), '--experiment', name] + list(extra))


def _summary_rows(output_dir):
    with open(os.path.join(output_dir, 'summary.csv'), newline='') as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

def _tsv_value(text):
    """Evaluate the TSV's default column: Python literals and arithmetic on them ('3.0 / 4.0')."""
    tree = ast.parse(text, mode='eval')
    allowed = (ast.Expression, ast.Constant, ast.List, ast.Tuple, ast.Dict, ast.BinOp, ast.UnaryOp, ast.Div,
               ast.USub, ast.Load)
    for node in ast.walk(tree):
        if not isinstance(node, allowed):
            raise AssertionError(f'unexpected default expression {text!r}')
    return eval(compile(tree, '<tsv>', 'eval'), {'__builtins__': {}})


def _tsv_rows():
    with open(TSV) as f:
        lines = [line.rstrip('\n').split('\t') for line in f if line.strip() and not line.startswith('#')]
    return [dict(group=g, flags=fl, default=d, kind=k) for g, fl, d, k in lines]


def test_parser_has_every_timm_flag_with_its_default_and_kind():
    parser = get_args_parser()
    by_option = {s: a for a in parser._actions for s in a.option_strings}
    by_dest = {a.dest: a for a in parser._actions if not a.option_strings}
    rows = _tsv_rows()
    assert len(rows) > 150
    for row in rows:
        names = row['flags'].split('/')
        action = by_option.get(names[0]) if names[0].startswith('-') else by_dest.get(names[0])
        assert action is not None, f"missing flag {row['flags']}"
        assert set(names) <= set(action.option_strings or [action.dest]), row['flags']
        expected = _tsv_value(row['default'])
        assert action.default == expected and type(action.default) is type(expected), (
            row['flags'], action.default, expected)
        kind = row['kind']
        if "action='store_true'" in kind:
            assert action.nargs == 0 and action.const is True, row['flags']
        for name, tp in (('int', int), ('float', float), ('str', str)):
            if f'type={name}' in kind:
                assert action.type is tp, row['flags']
        if 'nargs=' in kind:
            nargs = _tsv_value(kind.split('nargs=')[1].split(',')[0])
            assert action.nargs == nargs, row['flags']
        if 'choices=' in kind:
            assert tuple(action.choices) == tuple(_tsv_value(kind.split('choices=')[1])), row['flags']


def test_help_lists_every_timm_flag_and_ours(capsys):
    with pytest.raises(SystemExit):
        main(['--help'])
    text = capsys.readouterr().out
    for row in _tsv_rows():
        for name in row['flags'].split('/'):
            if name.startswith('-'):
                assert name in text, name
    for ours in ('--loss', '--gsl-groups', '--gsl-type', '--gsl-grouping', '--class-subset', '--samples-per-class'):
        assert ours in text


def test_our_flag_defaults():
    args, _ = parse_args([])
    assert (args.loss, args.gsl_groups, args.gsl_type, args.gsl_grouping) == ('gsl', 4, 'auto', 'discriminative')
    assert args.class_subset is None and args.samples_per_class is None


def test_config_file_sets_defaults_and_command_line_wins(tmp_path):
    config = tmp_path / 'c.yaml'
    config.write_text(yaml.safe_dump({'lr': 0.3, 'model': 'resnet10t', 'epochs': 7}))
    args, explicit = parse_args(['-c', str(config), '--lr', '0.2'])
    assert (args.lr, args.model, args.epochs) == (0.2, 'resnet10t', 7)
    assert {'lr', 'model', 'epochs'} <= explicit
    # Config values count as the user's: the recipe leaves them alone.
    apply_embedded_recipe(args, explicit)
    assert (args.model, args.epochs) == ('resnet10t', 7)
    assert args.batch_size == EMBEDDED_RECIPE['batch_size']


def test_recipe_applies_only_without_data_flags():
    args, explicit = parse_args([])
    changed = apply_embedded_recipe(args, explicit)
    assert args.dataset == 'embedded/fashion-mnist' and args.model == EMBEDDED_RECIPE['model']
    assert args.epochs == EMBEDDED_RECIPE['epochs'] and args.img_size == 28 and args.workers == 0
    assert args.device in ('cpu', 'cuda') and 'epochs' in changed
    for data_flags in (['--data-dir', '/data'], ['/data'], ['--dataset', 'torch/cifar10']):
        args, explicit = parse_args(data_flags)
        assert apply_embedded_recipe(args, explicit) == []
        # timm's defaults, untouched.
        assert (args.model, args.epochs, args.batch_size, args.workers, args.device) == (
            'resnet50', 300, 128, 4, 'cuda')


def test_flag_passed_at_its_default_value_still_wins():
    # 128 and 'resnet50' are timm's defaults; given explicitly they must beat the recipe.
    args, explicit = parse_args(['--batch-size', '128', '--model', 'resnet50', '--epochs', '2'])
    apply_embedded_recipe(args, explicit)
    assert (args.batch_size, args.model, args.epochs) == (128, 'resnet50', 2)
    assert args.lr == EMBEDDED_RECIPE['lr']


def test_recipe_follows_the_users_channels():
    args, explicit = parse_args(['--in-chans', '3'])
    apply_embedded_recipe(args, explicit)
    assert args.in_chans == 3 and args.mean == EMBEDDED_RECIPE['mean'] * 3 and len(args.std) == 3
    args, explicit = parse_args(['--input-size', '3', '32', '32'])
    apply_embedded_recipe(args, explicit)
    assert args.in_chans is None and args.img_size is None and len(args.mean) == 3
    args, explicit = parse_args(['--in-chans', '3', '--mean', '0.5', '0.5', '0.5'])
    apply_embedded_recipe(args, explicit)
    assert args.mean == [0.5, 0.5, 0.5] and len(args.std) == 3


def test_gsl_type_auto_follows_the_data_size():
    assert resolve_gsl_type('auto', GSL_AUTO_THRESHOLD - 1) == 'II'
    assert resolve_gsl_type('auto', GSL_AUTO_THRESHOLD) == 'I'
    assert resolve_gsl_type('I', 10) == 'I' and resolve_gsl_type('II', 10 ** 7) == 'II'
    with pytest.raises(ValueError, match='--gsl-type auto'):
        resolve_gsl_type('auto', None)


def test_variable_batch_loss_scale():
    assert batch_loss_scale(32, 64, 'none') == 1.0
    assert batch_loss_scale(32, 64, 'linear') == 0.5
    assert batch_loss_scale(16, 64, 'sqrt') == 0.5
    with pytest.raises(ValueError, match='mode'):
        batch_loss_scale(16, 64, 'cubic')


@pytest.mark.parametrize('flags, message', [
    (['--bce-loss'], '--bce-loss'),
    (['--jsd-loss', '--aug-splits', '2'], '--jsd-loss/--aug-splits'),
    (['--aug-splits', '3'], '--aug-splits'),
    (['--kd-model-name', 'resnet18'], '--kd-model-name'),
    (['--torchscript'], '--torchscript'),
    (['--loss', 'ce', '--kd-model-name', 'resnet18'], 'distillation is not supported'),
    (['--sync-bn', '--device', 'cpu'], '--sync-bn needs CUDA'),
    (['--amp', '--device', 'cpu'], 'bfloat16'),
    (['--tta', '2'], '--tta 2'),
    (['--loss', 'ce', '--naflex-loader'], '--naflex-loader'),
    (['--loss', 'ce', '--jsd-loss'], '--aug-splits >= 2'),
    (['--class-subset', '1'], 'class_subset=1'),
    (['--loss', 'ce', '--jsd-loss', '--aug-splits', '2'], '--train-batches-per-epoch'),
    (['--loss', 'ce', '--gsl-groups', '8'], '--gsl-groups configure the group softmax loss'),
    (['--loss', 'ce', '--bce-sum'], '--bce-sum apply to the bce loss only'),
    (['--aug-repeats', '3'], '--aug-repeats 3 needs distributed training'),
    (['--train-eval-interval', '-1'], '--train-eval-interval -1 is invalid'),
    (['--no-train-eval', '--train-eval-interval', '2'], '--train-eval-interval 2 asks for the measurement'),
    (['--loss', 'ce', '--jsd-loss', '--aug-splits', '2', '--train-batches-per-epoch', '0', '--no-prefetcher'],
     'drop --no-prefetcher'),
])
def test_refused_flags_exit_with_a_clear_message_and_write_nothing(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        main(TINY + ['--output', str(tmp_path / 'out'), '--experiment', 'x', '--epochs', '1'] + flags)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_check_args_raises_value_error_naming_the_flag():
    args, explicit = parse_args(['--bce-loss'])
    apply_embedded_recipe(args, explicit)
    with pytest.raises(ValueError, match=r'--loss gsl cannot be combined with --bce-loss'):
        check_args(args)


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------

def test_run_writes_timm_outputs_and_records_data_conditions(tmp_path):
    result = _run(tmp_path, '--epochs', '2', '--checkpoint-hist', '1')
    out = result['output_dir']
    assert out == str(tmp_path / 'run')
    files = set(os.listdir(out))
    assert {'args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'learning_curves.png'} <= files
    assert len([f for f in files if f.startswith('checkpoint-')]) == 1  # --checkpoint-hist 1
    assert not [f for f in files if 'tmp' in f]
    with open(os.path.join(out, 'learning_curves.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    saved = yaml.safe_load(open(os.path.join(out, 'args.yaml')))
    assert saved['class_subset'] == '3' and saved['samples_per_class'] == 8
    assert saved['gsl_type'] == 'II' and saved['num_classes'] == 3 and saved['model'] == 'test_resnet'
    rows = _summary_rows(out)
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert {'train_loss', 'train_softmax_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'} <= set(rows[0])
    # Proposition 1: the group loss bounds the softmax loss of the same batches from above.
    assert all(float(r['train_loss']) >= float(r['train_softmax_loss']) for r in rows)
    checkpoint = torch.load(os.path.join(out, 'last.pth.tar'), map_location='cpu', weights_only=False)
    assert checkpoint['epoch'] == 1
    assert checkpoint['args'].class_subset == '3' and checkpoint['args'].samples_per_class == 8
    best = result['best_metric']
    assert best == max(float(r['eval_top1']) for r in rows)
    # Ties keep the earlier epoch, as timm's CheckpointSaver does.
    assert result['best_epoch'] == min(int(r['epoch']) for r in rows if float(r['eval_top1']) == best)
    assert float(checkpoint['metric']) == float(rows[-1]['eval_top1'])


def test_ce_run_logs_its_loss_as_the_softmax_loss(tmp_path):
    result = _run(tmp_path, '--epochs', '1', '--loss', 'ce')
    row = _summary_rows(result['output_dir'])[0]
    assert float(row['train_loss']) == pytest.approx(float(row['train_softmax_loss']))


def _spy_on_group_loss(monkeypatch):
    calls = []
    original = GroupSoftmaxLoss.forward

    def forward(self, output, target, weight=None, bias=None):
        loss = original(self, output, target, weight, bias)
        # Clone now: the weight is a view of the parameter, which the optimiser step changes.
        output = output._replace(**{k: getattr(output, k).detach().clone() for k in output._fields})
        calls.append((self, output, target.detach().clone(), loss.detach()))
        return loss

    monkeypatch.setattr(GroupSoftmaxLoss, 'forward', forward)
    return calls


def test_mixup_soft_targets_reach_the_group_loss(tmp_path, monkeypatch):
    calls = _spy_on_group_loss(monkeypatch)
    _run(tmp_path, '--epochs', '1', '--mixup', '1.0', '--mixup-prob', '1.0')
    assert calls
    for criterion, output, target, loss in calls:
        assert target.is_floating_point() and target.shape == (8, 3)
        assert torch.allclose(target.sum(1), torch.ones(8))
        assert (target > 0).all()  # mixed and smoothed (0.1): no hard zeros
        assert criterion.smoothing == 0.0  # applied once, by Mixup
        expected = functional.group_softmax_loss(
            output.features, output.weight, output.bias, target, criterion.groups,
            loss_type=criterion.loss_type, grouping='discriminative')
        assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_label_smoothing_reaches_the_group_loss_as_soft_targets(tmp_path, monkeypatch):
    calls = _spy_on_group_loss(monkeypatch)
    _run(tmp_path, '--epochs', '1', '--smoothing', '0.2', '--gsl-type', 'I', '--gsl-groups', '2')
    criterion, output, target, loss = calls[0]
    assert not target.is_floating_point()
    soft = torch.full((target.shape[0], 3), 0.2 / 3).scatter_(1, target[:, None], 1 - 0.2 + 0.2 / 3)
    expected = functional.group_softmax_loss(
        output.features, output.weight, output.bias, soft, 2, loss_type='I')
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('loss', ['gsl', 'ce'])
def test_bfloat16_amp_trains_on_cpu(tmp_path, loss):
    result = _run(tmp_path, '--epochs', '1', '--amp', '--amp-dtype', 'bfloat16', '--device', 'cpu',
                  '--loss', loss, '--channels-last', '--grad-accum-steps', '2', '--clip-grad', '1.0')
    row = _summary_rows(result['output_dir'])[0]
    assert torch.isfinite(torch.tensor(float(row['train_loss'])))
    assert 0.0 <= float(row['eval_top1']) <= 100.0


@pytest.mark.parametrize('flags', [
    ['--loss', 'ce', '--jsd-loss', '--aug-splits', '2', '--split-bn'],
    ['--loss', 'bce', '--bce-target-thresh', '0.2'],
    ['--loss', 'ce', '--bce-loss'],
    ['--loss', 'poly'],
    ['--train-img-sizes', '24', '28', '--train-batch-sizes', '8', '6', '--variable-batch-loss-scale', 'sqrt'],
    ['--model-dtype', 'bfloat16', '--smoothing', '0'],
    ['--layer-decay', '0.9', '--opt', 'adamw', '--lr', '1e-3', '--clip-mode', 'agc', '--clip-grad', '0.1'],
    ['--gsl-grouping', 'random', '--gsl-groups', '8', '--recovery-interval', '1', '--save-images'],
    ['--torchcompile', 'aot_eager'],
])
def test_timm_training_options_run(tmp_path, flags):
    if '--aug-splits' in flags:  # no scheduled batches with augmentation splits: 24 images, 3 batches
        flags = flags + ['--train-batches-per-epoch', '0']
    result = _run(tmp_path, '--epochs', '1', *flags)
    row = _summary_rows(result['output_dir'])[0]
    assert torch.isfinite(torch.tensor(float(row['train_loss'])))
    files = os.listdir(result['output_dir'])
    if '--recovery-interval' in flags:
        assert any(f.startswith('recovery-0-') for f in files)
    if '--save-images' in flags:
        assert any(f.startswith('train-batch-') and f.endswith('.jpg') for f in files)


def test_val_interval_skips_evaluation_but_not_the_last_epoch(tmp_path):
    rows = _summary_rows(_run(tmp_path, '--epochs', '3', '--val-interval', '2')['output_dir'])
    assert [bool(r.get('eval_top1')) for r in rows] == [False, True, True]


def _build(argv):
    args, explicit = parse_args(argv)
    apply_embedded_recipe(args, explicit)
    check_args(args)
    return build_run(args)


def test_resume_continues_at_the_next_epoch_and_restores_everything(tmp_path):
    first = _run(tmp_path, '--epochs', '2', '--model-ema', '--model-ema-decay', '0.5', '--warmup-epochs', '1')
    last = os.path.join(first['output_dir'], 'last.pth.tar')
    checkpoint = torch.load(last, map_location='cpu', weights_only=False)

    run = _build(TINY + ['--epochs', '4', '--model-ema', '--model-ema-decay', '0.5', '--warmup-epochs', '1',
                         '--resume', last])
    assert run.start_epoch == 2
    model_state = run.task.get_trainable_module().state_dict()
    assert all(torch.equal(model_state[k], v) for k, v in checkpoint['state_dict'].items())
    ema_state = run.task.get_trainable_module(ema=True).module.state_dict()
    assert all(torch.equal(ema_state[k], v) for k, v in checkpoint['state_dict_ema'].items())
    assert not all(torch.equal(ema_state[k], model_state[k]) for k in ema_state)
    momentum = [s['momentum_buffer'] for s in run.optimizer.state_dict()['state'].values()]
    saved = [s['momentum_buffer'] for s in checkpoint['optimizer']['state'].values()]
    assert len(momentum) == len(saved) > 0 and all(torch.equal(a, b) for a, b in zip(momentum, saved))
    # The schedule is where an uninterrupted 4-epoch run would be at epoch 2.
    fresh = _build(TINY + ['--epochs', '4', '--warmup-epochs', '1'])
    assert fresh.args.sched_on_updates  # the recipe's: stepped per update
    fresh.lr_scheduler.step_update(2 * len(fresh.loader_train))
    assert run.optimizer.param_groups[0]['lr'] == pytest.approx(fresh.optimizer.param_groups[0]['lr'])
    assert run.optimizer.param_groups[0]['lr'] != pytest.approx(EMBEDDED_RECIPE['lr'])

    # Resuming into the same folder continues summary.csv and the checkpoint history.
    second = main(TINY + ['--epochs', '3', '--model-ema', '--model-ema-decay', '0.5', '--warmup-epochs', '1',
                          '--resume', last, '--output', str(tmp_path), '--experiment', 'run'])
    assert [row['epoch'] for row in second['history']] == [2]
    assert [int(r['epoch']) for r in _summary_rows(second['output_dir'])] == [0, 1, 2]


def test_no_prefetcher_mixup_and_ema_run(tmp_path, monkeypatch):
    calls = _spy_on_group_loss(monkeypatch)
    result = _run(tmp_path, '--epochs', '1', '--no-prefetcher', '--cutmix', '1.0', '--model-ema')
    assert calls and all(c[2].is_floating_point() for c in calls)
    assert 'model_best.pth.tar' in os.listdir(result['output_dir'])
    assert 'state_dict_ema' in torch.load(os.path.join(result['output_dir'], 'last.pth.tar'), weights_only=False)


# ----------------------------------------------------------------------------------------------
# Fit to the training set and grouping health
# ----------------------------------------------------------------------------------------------

def test_clean_training_set_is_measured_after_the_last_epoch_by_default(tmp_path, caplog):
    caplog.set_level('INFO')
    result = _run(tmp_path, '--epochs', '3')
    rows = _summary_rows(result['output_dir'])
    assert [bool(r['train_clean_top1']) for r in rows] == [False, False, True]
    assert [bool(r['train_clean_loss']) for r in rows] == [False, False, True]
    assert float(rows[-1]['train_clean_top1']) == pytest.approx(result['clean_train_metrics']['top1'])
    assert 'Clean training set (no augmentation, eval mode): loss' in caplog.text


def test_train_eval_interval_measures_every_n_epochs_and_the_last(tmp_path):
    rows = _summary_rows(_run(tmp_path, '--epochs', '5', '--train-eval-interval', '2')['output_dir'])
    assert [bool(r['train_clean_top1']) for r in rows] == [False, True, False, True, True]


def test_no_train_eval_writes_no_clean_columns(tmp_path, caplog):
    caplog.set_level('INFO')
    result = _run(tmp_path, '--epochs', '1', '--no-train-eval')
    assert not any(k.startswith('train_clean') for k in _summary_rows(result['output_dir'])[0])
    assert result['clean_train_metrics'] == {}
    assert 'Clean training set' not in caplog.text


def test_clean_training_metrics_equal_a_direct_evaluation_of_the_final_model(tmp_path):
    """The final model, the training images once each through timm's eval transform: same loss and top-1."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm_gsl.data import create_dataset

    result = _run(tmp_path, '--epochs', '2', '--loss', 'ce')
    out = result['output_dir']
    checkpoint = torch.load(os.path.join(out, 'last.pth.tar'), map_location='cpu', weights_only=False)
    args = checkpoint['args']
    model = timm.create_model('test_resnet', num_classes=3, in_chans=args.in_chans or 3)
    model.load_state_dict(checkpoint['state_dict'])
    model.eval()
    config = resolve_data_config(vars(args), model=model)
    dataset = create_dataset(args.dataset, split='train', is_training=True, class_subset=args.class_subset,
                             samples_per_class=args.samples_per_class, seed=args.seed,
                             transform=create_transform(**config, is_training=False),
                             input_img_mode='L' if (args.in_chans or 3) == 1 else 'RGB')
    losses, correct = [], 0
    with torch.no_grad():
        for image, label in dataset:
            logits = model(image.unsqueeze(0))
            losses.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor([label]))))
            correct += int(logits.argmax(1).item() == label)
    assert len(losses) == 3 * 8
    measured = result['clean_train_metrics']
    assert measured['loss'] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert measured['top1'] == pytest.approx(100. * correct / len(losses))


def test_gsl_run_logs_grouping_health_per_epoch(tmp_path, caplog):
    caplog.set_level('INFO')
    result = _run(tmp_path, '--epochs', '2', '--gsl-groups', '4', '--gsl-type', 'II')
    rows = _summary_rows(result['output_dir'])
    import timm
    dim = timm.create_model('test_resnet').num_features  # the classifier input's size
    for row in rows:
        zero = float(row['train_gsl_zero_frac'])
        nonzero = [float(row[f'train_gsl_nonzero_g{i}']) for i in range(1, 5)]
        losses = [float(row[f'train_gsl_loss_g{i}']) for i in range(1, 5)]
        assert 0 <= zero <= 1
        assert sum(nonzero) == pytest.approx((1 - zero) * dim, rel=1e-5)
        # Type-II is the sum of the group losses, measured on the same batches.
        assert sum(losses) == pytest.approx(float(row['train_loss']), rel=1e-4)
    assert 'Grouping:' in caplog.text and 'nonzero features per group' in caplog.text


def test_ce_run_has_no_grouping_columns(tmp_path):
    rows = _summary_rows(_run(tmp_path, '--epochs', '1', '--loss', 'ce')['output_dir'])
    assert not any(k.startswith('train_gsl_') for k in rows[0])


def test_learning_curve_legend_names_smoothed_and_mixed_targets():
    from timm_gsl.train import _train_targets
    for flags, expected in (([], ''), (['--smoothing', '0.1'], 'smoothed targets'),
                            (['--mixup', '0.2', '--smoothing', '0.1'], 'mixed, smoothed targets'),
                            (['--cutmix', '1.0'], 'mixed targets')):
        args, _ = parse_args(flags + ['--smoothing', '0'] if '--smoothing' not in flags else flags)
        assert _train_targets(args) == expected
