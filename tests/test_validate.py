"""validate.py: timm's command line, and top-1/top-5 equal to an evaluation built from timm's library pieces.

The reference evaluation (:func:`reference_eval`) uses only timm's ``resolve_data_config``,
``create_transform``, ``accuracy`` and a plain loop; the numbers it gives are what timm's own
``validate.py`` computes (same data config, eval transform, prefetcher normalisation and metric).
Models are tiny (``test_resnet``) with a classifier fitted in closed form on frozen random features,
so that accuracies are far from chance and a wrong crop, weight or label set shows.
"""
from __future__ import annotations

import argparse
import ast
import copy
import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import timm
from PIL import Image
from timm.data import create_dataset as timm_create_dataset
from timm.data import create_transform, resolve_data_config
from timm.utils import accuracy

from timm_gsl import data as gsl_data
from timm_gsl.cli.validate import (
    checkpoint_training_args,
    classification_metrics,
    get_args_parser,
    main,
    parse_args,
    validate,
)

SIZE = 28
LOGGER = 'timm_gsl.validate'


# -- reference -----------------------------------------------------------------------------------

def reference_eval(model, dataset, data_args, prefetcher=True, batch_size=64, valid_labels=None):
    """top-1 / top-5 (%, exact fractions) of ``model`` on ``dataset``, the way timm's validate.py does it.

    With the prefetcher, timm's transform yields uint8 tensors that the loader normalises on the device
    as ``(x - 255 mean) / (255 std)``; without it the transform normalises floats itself.
    """
    model = model.eval()
    cfg = resolve_data_config(data_args, model=model, use_test_size=True)
    transform = create_transform(**cfg, is_training=False, use_prefetcher=prefetcher)
    mean = torch.tensor([255 * m for m in cfg['mean']]).view(1, -1, 1, 1)
    std = torch.tensor([255 * s for s in cfg['std']]).view(1, -1, 1, 1)
    dataset.transform = None
    hits1 = hits5 = total = 0
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            images = torch.stack([transform(img) for img, _ in items])
            target = torch.tensor([t for _, t in items])
            if prefetcher:
                images = (images.float() - mean) / std
            logits = model(images)
            if valid_labels is not None:
                logits = logits[:, valid_labels]
            acc1, acc5 = accuracy(logits, target, topk=(1, min(5, logits.shape[1])))
            hits1 += round(acc1.item() * len(items) / 100)
            hits5 += round(acc5.item() * len(items) / 100)
            total += len(items)
    return round(100 * hits1 / total, 4), round(100 * hits5 / total, 4)


def fit_classifier(model, dataset, ridge=1e-3):
    """Set ``model.fc`` to the ridge-regression fit of one-hot labels on its frozen features."""
    model.eval()
    cfg = resolve_data_config({'input_size': (3, SIZE, SIZE)}, model=model)
    dataset.transform = create_transform(**cfg, is_training=False)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    dataset.transform = None
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True).double()
    feats = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.double)], 1)
    onehot = torch.nn.functional.one_hot(y, model.num_classes).double()
    eye = torch.eye(feats.shape[1], dtype=torch.double)
    solution = torch.linalg.solve(feats.T @ feats + ridge * eye, feats.T @ onehot)
    model.fc.weight.data.copy_(solution[:-1].T.float())
    model.fc.bias.data.copy_(solution[-1].float())
    return model


def fitted_model(num_classes=10, class_subset=None, seed=42):
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=num_classes)
    train = gsl_data.create_dataset(gsl_data.EMBEDDED_DATASET, split='train', is_training=True,
                                    class_subset=class_subset, samples_per_class=40, seed=seed)
    return fit_classifier(model, train)


def run(*flags):
    return validate(parse_args(['-j', '0', '--device', 'cpu', *flags]))


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def model10():
    return fitted_model()


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """60 embedded validation images (6 per class) as non-square PNGs in class folders, in label order."""
    root = tmp_path_factory.mktemp('folder')
    val = gsl_data.create_dataset(gsl_data.EMBEDDED_DATASET, split='validation')
    names = gsl_data.dataset_class_names(val)
    targets = np.asarray(gsl_data.dataset_targets(val))
    for label, name in enumerate(names):
        folder = root / f'{label:02d}_{name.replace("/", "-").replace(" ", "_")}'
        folder.mkdir()
        for k, index in enumerate(np.flatnonzero(targets == label)[:6]):
            img, _ = val[int(index)]
            img.convert('L').resize((30 + k, 36), Image.BILINEAR).save(folder / f'{k}.png')
    return root


@pytest.fixture(scope='module')
def checkpoint_with_args(model10, tmp_path_factory):
    """A checkpoint as our train.py writes it: timm's dict with the training arguments as a namespace."""
    path = tmp_path_factory.mktemp('ckpt') / 'model_best.pth.tar'
    trained = argparse.Namespace(model='test_resnet', num_classes=10, input_size=[3, SIZE, SIZE], img_size=None,
                                 class_subset=None, samples_per_class=None, seed=42, dataset='', data_dir=None)
    torch.save({'epoch': 3, 'arch': 'resnet', 'state_dict': model10.state_dict(), 'args': trained}, path)
    return path


# -- command line --------------------------------------------------------------------------------

def _reference_flags_file():
    # timm's validate.py flags (timm 1.0.31), regenerated by tools/update_timm_flag_refs.py.
    return Path(__file__).resolve().parent / 'data' / 'timm-validate-flags.tsv'


def test_parser_has_every_timm_validate_flag_with_its_default_and_kind():
    rows = [line.split('\t') for line in _reference_flags_file().read_text().splitlines()
            if line.strip() and not line.startswith('#')]
    assert len(rows) > 50
    parser = get_args_parser()
    by_option = {opt: action for action in parser._actions for opt in action.option_strings}
    by_dest = {action.dest: action for action in parser._actions}
    help_text = parser.format_help()
    for _, names, default, kind in (row + [''] * (4 - len(row)) for row in rows):
        options = names.split('/')
        if options[0].startswith('-'):
            actions = {id(by_option.get(opt)) for opt in options}
            assert None not in [by_option.get(opt) for opt in options], f'missing flag {names}'
            assert len(actions) == 1, f'{names} are not one flag'
            action = by_option[options[0]]
            assert all(opt in help_text for opt in options)
        else:
            action = by_dest[options[0]]
        assert action.default == ast.literal_eval(default), f'{names}: default {action.default!r} != {default}'
        if 'store_true' in kind:
            assert isinstance(action, argparse._StoreTrueAction), names
        if 'type=int' in kind:
            assert action.type is int, names
        if 'type=float' in kind:
            assert action.type is float, names
        if 'nargs=3' in kind:
            assert action.nargs == 3, names
        if "nargs='+'" in kind:
            assert action.nargs == '+', names
        if 'choices=' in kind:
            assert list(action.choices) == ast.literal_eval(kind.split('choices=')[1]), names
        if "const='inductor'" in kind:
            assert action.const == 'inductor' and action.nargs == '?', names


def test_passed_flags_include_flags_given_at_their_default_value():
    assert 'seed' not in parse_args([]).passed_flags
    assert {'seed', 'model', 'img_size'} <= set(parse_args(['--seed', '42', '-m', 'dpn92', '--img-size', '3'])
                                                .passed_flags)


@pytest.mark.parametrize('flags, named', [
    (['--results-format', 'xml'], '--results-format'),
    (['--model-dtype', 'float64'], '--model-dtype'),
    (['--amp', '--model-dtype', 'float16'], '--model-dtype'),
    (['--amp', '--amp-dtype', 'int8'], '--amp-dtype'),
    (['--num-gpu', '2'], '--num-gpu'),
    (['-b', '0'], '--batch-size'),
])
def test_bad_option_values_raise_value_error_naming_the_flag(flags, named, checkpoint_with_args):
    with pytest.raises(ValueError, match=named):
        run('--checkpoint', str(checkpoint_with_args), *flags)


# -- equality with timm's evaluation -------------------------------------------------------------

def test_no_data_flags_evaluate_the_embedded_validation_split_like_timm(model10, checkpoint_with_args, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    caplog.set_level(logging.INFO, logger='timm_gsl.cli.common')
    # No --device: the default 'cuda' falls back to the CPU with a notice when CUDA is absent.
    device = ['--device', 'cpu'] if torch.cuda.is_available() else []
    results = validate(parse_args(['-j', '0', '-b', '300', '--checkpoint', str(checkpoint_with_args), *device]))
    if not torch.cuda.is_available():  # said, but not as a warning: the user did not ask for CUDA
        notices = [r for r in caplog.records if 'CUDA is not available' in r.getMessage()]
        assert [r.levelname for r in notices] == ['INFO'], notices
    assert "model='test_resnet'" in caplog.text and 'input_size=[3, 28, 28]' in caplog.text
    val = gsl_data.create_dataset(gsl_data.EMBEDDED_DATASET, split='validation')
    top1, top5 = reference_eval(model10, val, {'input_size': (3, SIZE, SIZE)})
    assert (results['top1'], results['top5']) == (top1, top5)
    assert 40 < top1 < 100 and top5 > top1  # a fitted model: the comparison is not at chance level
    assert results['top1_err'] == round(100 - top1, 4) and results['top5_err'] == round(100 - top5, 4)
    assert results['model'] == 'test_resnet' and results['img_size'] == SIZE
    assert results['param_count'] == round(sum(p.numel() for p in model10.parameters()) / 1e6, 2)
    assert list(results) == ['model', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'img_size',
                             'crop_pct', 'interpolation', 'nll', 'ece']


def test_class_subset_and_seed_recorded_in_checkpoint_are_applied_unless_passed(tmp_path, caplog):
    model = fitted_model(num_classes=3, class_subset=3, seed=3)
    path = tmp_path / 'last.pth.tar'
    trained = dict(model='test_resnet', num_classes=3, input_size=(3, SIZE, SIZE), class_subset=3, seed=3,
                   samples_per_class=40)
    torch.save({'epoch': 1, 'arch': 'resnet', 'state_dict': model.state_dict(), 'args': trained}, path)
    assert checkpoint_training_args(str(path)) == trained

    caplog.set_level(logging.INFO, logger=LOGGER)
    results = run('--checkpoint', str(path), '-b', '100')
    assert 'class_subset=3' in caplog.text and 'seed=3' in caplog.text
    same = gsl_data.create_dataset(gsl_data.EMBEDDED_DATASET, split='validation', class_subset=3, seed=3)
    assert len(same) == 300
    assert (results['top1'], results['top5']) == reference_eval(model, same, {'input_size': (3, SIZE, SIZE)})
    assert results['top1'] > 50

    # A flag given on the command line wins over the recorded one, even at its default value.
    results = run('--checkpoint', str(path), '--seed', '42', '-b', '100')
    other = gsl_data.create_dataset(gsl_data.EMBEDDED_DATASET, split='validation', class_subset=3, seed=42)
    assert other.indices != same.indices
    assert (results['top1'], results['top5']) == reference_eval(model, other, {'input_size': (3, SIZE, SIZE)})


def test_the_options_stay_as_parsed_and_a_run_record_supplies_what_was_not_passed(tmp_path):
    from timm_gsl.record import RECORD_KEY, from_training_arguments
    model = fitted_model(num_classes=3, class_subset=3, seed=3)
    path = tmp_path / 'recorded.pth.tar'
    # Only a run record (no training arguments): validate.py reads nothing else.
    record = from_training_arguments(dict(model='test_resnet', num_classes=3, input_size=(3, SIZE, SIZE),
                                          class_subset=3, seed=3, dataset=gsl_data.EMBEDDED_DATASET))
    torch.save({'epoch': 0, 'state_dict': model.state_dict(), RECORD_KEY: record.to_dict()}, path)
    args = parse_args(['-j', '0', '--device', 'cpu', '--checkpoint', str(path), '-b', '100'])
    before = copy.deepcopy(vars(args))
    results = validate(args)
    assert vars(args) == before
    same = gsl_data.create_dataset(gsl_data.EMBEDDED_DATASET, split='validation', class_subset=3, seed=3)
    assert (results['top1'], results['top5']) == reference_eval(model, same, {'input_size': (3, SIZE, SIZE)})
    assert results['model'] == 'test_resnet' and results['img_size'] == SIZE


def test_a_vit_trained_at_another_size_is_created_as_training_created_it():
    # train.py (like timm's) creates the ViT at its own size and feeds it --img-size 32 images; timm's rule for
    # a model of fixed input size would create it for 32x32 instead, and the checkpoint would not fit.
    from timm_gsl import hub
    fixture = str(Path(__file__).parent / 'data' / 'checkpoint_f088310.pth.tar')
    results = run('--checkpoint', fixture, '-b', '100')
    model = hub.build_model(hub.load_training_checkpoint(fixture))
    val = gsl_data.create_dataset(gsl_data.EMBEDDED_DATASET, split='validation', class_subset=3, seed=42)
    data_args = {'input_size': (3, 32, 32), 'mean': (0.286,) * 3, 'std': (0.353,) * 3, 'crop_pct': 1.0,
                 'interpolation': 'bilinear'}
    assert (results['top1'], results['top5']) == reference_eval(model, val, data_args)
    assert results['img_size'] == 32


def test_checkpoint_of_our_train_py_gives_the_top1_training_measured(tmp_path, capsys):
    from timm_gsl.cli.train import main as train_main
    train_main(['--model', 'test_resnet', '--class-subset', '3', '--samples-per-class', '8', '-b', '8',
                '--train-batches-per-epoch', '2', '-j', '0', '--epochs', '1', '--output', str(tmp_path),
                '--experiment', 'run'])
    run_dir = tmp_path / 'run'
    with open(run_dir / 'summary.csv', newline='') as f:
        trained_top1 = float(list(csv.DictReader(f))[-1]['eval_top1'])
    capsys.readouterr()
    # Nothing but the checkpoint: model, input size, normalisation, data and class subset come from it.
    results = run('--checkpoint', str(run_dir / 'model_best.pth.tar'), '-b', '100')
    assert results['top1'] == round(trained_top1, 4)
    recorded = checkpoint_training_args(str(run_dir / 'model_best.pth.tar'))
    model = timm.create_model('test_resnet', num_classes=3, in_chans=recorded['in_chans'])
    timm.models.load_checkpoint(model, str(run_dir / 'model_best.pth.tar'))
    val = gsl_data.create_dataset(recorded['dataset'], split='validation', class_subset=3, seed=recorded['seed'],
                                  input_img_mode=recorded['input_img_mode'] or 'L')
    data_args = {k: recorded[k] for k in ('img_size', 'in_chans', 'mean', 'std', 'crop_pct', 'interpolation')}
    assert (results['top1'], results['top5']) == reference_eval(model, val, data_args)


@pytest.mark.parametrize('flags, data_args, prefetcher', [
    ([], {'img_size': 24}, True),
    (['--no-prefetcher'], {'img_size': 24}, False),
    (['--crop-pct', '0.8', '--crop-mode', 'squash', '--interpolation', 'bicubic', '--mean', '0.3', '--std', '0.2'],
     {'img_size': 24, 'crop_pct': 0.8, 'crop_mode': 'squash', 'interpolation': 'bicubic', 'mean': (0.3,) * 3,
      'std': (0.2,) * 3}, True),
], ids=['prefetcher', 'no-prefetcher', 'crop-and-normalisation'])
def test_timm_model_name_with_checkpoint_on_image_folder_matches_timm(
        model10, image_folder, tmp_path, flags, data_args, prefetcher):
    path = tmp_path / 'weights.pth'
    torch.save(model10.state_dict(), path)  # a bare state dict, no training arguments
    results = run('--model', 'test_resnet', '--num-classes', '10', '--checkpoint', str(path),
                  '--data-dir', str(image_folder), '--img-size', '24', '-b', '16', *flags)
    folder = timm_create_dataset('', root=str(image_folder), split='validation')
    assert len(folder) == 60
    assert (results['top1'], results['top5']) == reference_eval(model10, folder, data_args, prefetcher=prefetcher)
    assert results['crop_pct'] == data_args.get('crop_pct', model10.pretrained_cfg['crop_pct'])
    assert results['interpolation'] == data_args.get('interpolation', 'bilinear') and results['img_size'] == 24


def test_use_ema_evaluates_the_ema_weights(model10, image_folder, tmp_path):
    ema = fitted_model()
    ema.fc.weight.data = ema.fc.weight.data.roll(1, 0)  # a different classifier: predictions shift by a class
    ema.fc.bias.data = ema.fc.bias.data.roll(1, 0)
    path = tmp_path / 'ema.pth.tar'
    torch.save({'state_dict': model10.state_dict(), 'state_dict_ema': ema.state_dict()}, path)
    common = ('--model', 'test_resnet', '--num-classes', '10', '--checkpoint', str(path), '--data-dir',
              str(image_folder), '--img-size', '24')
    folder = timm_create_dataset('', root=str(image_folder))
    plain, with_ema = run(*common), run(*common, '--use-ema')
    assert (plain['top1'], plain['top5']) == reference_eval(model10, folder, {'img_size': 24})
    assert (with_ema['top1'], with_ema['top5']) == reference_eval(ema, folder, {'img_size': 24})
    assert plain['top1'] != with_ema['top1']


def test_local_dir_model_matches_timm(model10, image_folder, tmp_path):
    timm.models.save_for_hf(model10, str(tmp_path / 'hf'), model_args={'num_classes': 10})
    results = run('--model', f'local-dir:{tmp_path / "hf"}', '--data-dir', str(image_folder), '--img-size', '24')
    folder = timm_create_dataset('', root=str(image_folder))
    assert (results['top1'], results['top5']) == reference_eval(model10, folder, {'img_size': 24})
    assert results['top1'] > 30


def test_class_subset_file_and_valid_labels_restrict_classes_like_timm(model10, image_folder, tmp_path):
    names = sorted(p.name for p in image_folder.iterdir())[:5]
    (tmp_path / 'classes.txt').write_text('\n'.join(names) + '\n')
    (tmp_path / 'valid.txt').write_text('0\n1\n2\n3\n4\n')
    results = run('--model', 'test_resnet', '--num-classes', '10', '--data-dir', str(image_folder), '--img-size',
                  '24', '--class-subset', str(tmp_path / 'classes.txt'), '--valid-labels',
                  str(tmp_path / 'valid.txt'), '--checkpoint', _save_state_dict(model10, tmp_path))
    subset = gsl_data.create_dataset('', root=str(image_folder), class_subset=str(tmp_path / 'classes.txt'))
    assert len(subset) == 30 and set(gsl_data.dataset_targets(subset)) == set(range(5))
    expected = reference_eval(model10, subset, {'img_size': 24}, valid_labels=[0, 1, 2, 3, 4])
    assert (results['top1'], results['top5']) == expected


def _save_state_dict(model, folder):
    path = Path(folder) / 'sd.pth'
    torch.save(model.state_dict(), path)
    return str(path)


# -- results ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('fmt', ['csv', 'json'])
def test_result_json_printed_and_results_file_written(checkpoint_with_args, tmp_path, capsys, fmt):
    out = tmp_path / f'results.{fmt}'
    results = main(['-j', '0', '--device', 'cpu', '--checkpoint', str(checkpoint_with_args), '--class-subset', '3',
                    '--results-file', str(out), '--results-format', fmt, '--metrics-avg', 'weighted'])
    printed = capsys.readouterr().out
    assert printed.startswith('--result\n')
    assert json.loads(printed[len('--result\n'):]) == json.loads(json.dumps(results))
    assert {'weighted_precision', 'weighted_recall', 'weighted_f1_score'} <= set(results)
    if fmt == 'json':
        assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    else:
        rows = list(csv.DictReader(out.open()))
        assert len(rows) == 1 and float(rows[0]['top1']) == results['top1'] and rows[0]['model'] == 'test_resnet'
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left behind


def test_checkpoint_folder_and_model_list_validate_each_best_first(model10, image_folder, tmp_path, capsys):
    worse = fitted_model()
    worse.fc.weight.data = worse.fc.weight.data.roll(3, 0)
    worse.fc.bias.data = worse.fc.bias.data.roll(3, 0)
    folder = tmp_path / 'run'
    folder.mkdir()
    torch.save({'state_dict': worse.state_dict()}, folder / 'checkpoint-0.pth.tar')
    torch.save({'state_dict': model10.state_dict()}, folder / 'model_best.pth.tar')
    common = ['-j', '0', '--device', 'cpu', '--data-dir', str(image_folder), '--img-size', '24']
    results = main([*common, '--model', 'test_resnet', '--num-classes', '10', '--checkpoint', str(folder)])
    assert [Path(r['checkpoint']).name for r in results] == ['model_best.pth.tar', 'checkpoint-0.pth.tar']
    assert results[0]['top1'] > results[1]['top1']

    for name, model in (('good', model10), ('bad', worse)):
        timm.models.save_for_hf(model, str(tmp_path / name), model_args={'num_classes': 10})
    names = tmp_path / 'models.txt'
    names.write_text(f'local-dir:{tmp_path / "bad"}\nlocal-dir:{tmp_path / "good"}\n')
    listed = main([*common, '--model', str(names)])
    assert [r['model'] for r in listed] == [f'local-dir:{tmp_path / "good"}', f'local-dir:{tmp_path / "bad"}']
    assert [r['top1'] for r in listed] == [r['top1'] for r in results]
    capsys.readouterr()


def test_runtime_options_keep_the_numbers(checkpoint_with_args, image_folder):
    common = ('--checkpoint', str(checkpoint_with_args), '--data-dir', str(image_folder), '-b', '32')
    base = run(*common)
    one_image = 100 / 60
    for flags in (['--channels-last', '--reparam', '--fast-norm', '--retry'], ['--torchcompile', 'eager'],
                  ['--amp', '--amp-dtype', 'bfloat16']):
        other = run(*common, *flags)
        tolerance = 5 * one_image if '--amp' in flags else one_image  # reduced precision may flip a few argmaxes
        assert abs(other['top1'] - base['top1']) <= tolerance + 1e-9, flags
        assert other['img_size'] == base['img_size'] == SIZE, flags


def test_test_pool_applies_when_input_exceeds_the_model_default(checkpoint_with_args, image_folder):
    # test_resnet's default input is 160: at 176 its classifier runs pooled over the larger map, crop 1.0.
    results = run('--checkpoint', str(checkpoint_with_args), '--data-dir', str(image_folder), '--img-size', '176',
                  '--test-pool', '--class-subset', '2', '-b', '12')
    assert results['crop_pct'] == 1.0 and results['img_size'] == 176


# -- metrics ---------------------------------------------------------------------------------------

def _slow_metrics(pred, true, average):
    classes = sorted(set(pred) | set(true))
    per = []
    for c in classes:
        tp = sum(1 for p, t in zip(pred, true) if p == c and t == c)
        npred = sum(1 for p in pred if p == c)
        nsup = sum(1 for t in true if t == c)
        precision = tp / npred if npred else 0.0
        recall = tp / nsup if nsup else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per.append((precision, recall, f1, nsup))
    if average == 'micro':
        acc = sum(1 for p, t in zip(pred, true) if p == t) / len(true)
        return acc, acc, acc
    if average == 'macro':
        return tuple(sum(m[i] for m in per) / len(per) for i in range(3))
    total = sum(m[3] for m in per)
    return tuple(sum(m[i] * m[3] for m in per) / total for i in range(3))


@pytest.mark.parametrize('average', ['micro', 'macro', 'weighted'])
def test_classification_metrics_match_a_slow_reference(average):
    rng = np.random.default_rng(0)
    for trial in range(20):
        true = rng.integers(0, 6, size=40).tolist()
        pred = [t if rng.random() < 0.5 else int(rng.integers(0, 8)) for t in true]  # classes 6, 7: no support
        got = classification_metrics(torch.tensor(pred), torch.tensor(true), average)
        expected = _slow_metrics(pred, true, average)
        assert list(got.values()) == [round(100 * v, 4) for v in expected]
        assert list(got) == [f'{average}_precision', f'{average}_recall', f'{average}_f1_score']
    with pytest.raises(ValueError, match='samples'):
        classification_metrics(torch.tensor([0]), torch.tensor([0]), 'samples')


def test_naflex_loader_evaluates_a_naflex_model(tmp_path, image_folder):
    kwargs = dict(embed_dim=32, depth=1, num_heads=2, img_size=32, patch_size=8)
    torch.manual_seed(0)
    model = timm.create_model('naflexvit_base_patch16_gap', num_classes=10, **kwargs)
    torch.save(model.state_dict(), tmp_path / 'naflex.pth')
    results = run('--model', 'naflexvit_base_patch16_gap', '--num-classes', '10', '--checkpoint',
                  str(tmp_path / 'naflex.pth'), '--model-kwargs', *[f'{k}={v}' for k, v in kwargs.items()],
                  '--naflex-loader', '--naflex-max-seq-len', '16', '--data-dir', str(image_folder), '-b', '20')
    assert 0 <= results['top1'] <= results['top5'] <= 100
    assert results['param_count'] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def test_cuda_fallback_is_a_warning_only_when_the_user_named_the_device(monkeypatch, caplog):
    from timm_gsl.cli.common import resolve_device
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    caplog.set_level(logging.INFO, logger='timm_gsl.cli.common')
    assert resolve_device('cuda', 'validating', asked=False) == torch.device('cpu')
    assert resolve_device('cuda:1', 'training') == torch.device('cpu')
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ('INFO', 'CUDA is not available: validating on the CPU.'),
        ('WARNING', "--device 'cuda:1' requested but CUDA is not available: training on the CPU instead.")]
