"""Class names: recorded in every checkpoint by train.py, matched by validate.py, compared across splits.

An image folder numbers its class folders in name order, so a folder with some of the trained classes (or
a validation split with other class folders than the training split) gives the same class another label.
The runs train one short epoch on six solid-colour classes; the classifier is then fitted in closed form on
the training images, so the model tells the colours apart and a label that names the wrong class shows.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from timm.data import create_transform, resolve_data_config

from timm_gsl import data as gsl_data
from timm_gsl.cli.train import main as train_main
from timm_gsl.cli.validate import checkpoint_training_args, main as validate_main, parse_args, validate
from timm_gsl.data.conditions import relabel_to_class_names

COLOURS = {'ant': (230, 20, 20), 'bee': (20, 230, 20), 'cat': (20, 20, 230), 'dog': (230, 230, 20),
           'eel': (20, 230, 230), 'fox': (230, 20, 230)}
NAMES = sorted(COLOURS)
# A tiny model, one epoch of two batches: about a second on one core.
TRAIN = ['--model', 'test_resnet', '-b', '8', '--train-batches-per-epoch', '2', '-j', '0', '--no-calibrate',
         '--no-train-eval', '--epochs', '1', '--img-size', '16']
LOGGER = 'timm_gsl.validate'


def make_folder(root, classes, per_class=4, seed=0):
    """8x8 PNGs of each class's colour with a little noise, one sub-folder per class under ``root``."""
    rng = np.random.default_rng(seed)
    for name in classes:
        os.makedirs(root / name)
        for k in range(per_class):
            pixels = np.array(COLOURS.get(name, (120, 120, 120)))[None, None] + rng.integers(-20, 20, (8, 8, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f'{k}.png')
    return root


def _images(folder, names):
    """(file, class name) of every image of the class folders ``names`` under ``folder``, in name order."""
    return [(folder / name / file, name) for name in names for file in sorted(os.listdir(folder / name))]


def _model_and_transform(checkpoint):
    trained = checkpoint_training_args(str(checkpoint))
    model = timm.create_model(trained['model'], num_classes=trained['num_classes'])
    timm.models.load_checkpoint(model, str(checkpoint))
    transform = create_transform(**resolve_data_config(trained, model=model), is_training=False)
    return model.eval(), transform


def fit_classifier(checkpoint, train_folder, ridge=1e-3):
    """Replace the checkpoint's classifier by the ridge fit of one-hot training labels on its frozen features."""
    model, transform = _model_and_transform(checkpoint)
    names = checkpoint_training_args(str(checkpoint))['class_names']
    images = _images(train_folder, names)
    x = torch.stack([transform(Image.open(file).convert('RGB')) for file, _ in images])
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True).double()
    feats = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.double)], 1)
    onehot = torch.nn.functional.one_hot(torch.tensor([names.index(n) for _, n in images]), len(names)).double()
    solution = torch.linalg.solve(feats.T @ feats + ridge * torch.eye(feats.shape[1], dtype=torch.double),
                                  feats.T @ onehot)
    saved = torch.load(checkpoint, map_location='cpu', weights_only=False)
    saved['state_dict']['fc.weight'] = solution[:-1].T.float().contiguous()
    saved['state_dict']['fc.bias'] = solution[-1].float().contiguous()
    torch.save(saved, checkpoint)


def train_run(tmp_path, data, *extra, name='run'):
    """train.py on ``data`` (train/ and validation/), then the closed-form classifier; the best checkpoint."""
    train_main([str(data), *TRAIN, '--output', str(tmp_path / 'out'), '--experiment', name, *extra])
    checkpoint = tmp_path / 'out' / name / 'model_best.pth.tar'
    fit_classifier(checkpoint, data / 'train')
    return checkpoint


def evaluate(*flags):
    return validate(parse_args(['-j', '0', '--device', 'cpu', '-b', '16', *flags]))


def slow_reference(checkpoint, folder):
    """top-1 / top-5 (%) image by image, against the TRAINING label id of each image's class folder name."""
    model, transform = _model_and_transform(checkpoint)
    trained_names = checkpoint_training_args(str(checkpoint))['class_names']
    hits1 = hits5 = total = 0
    with torch.inference_mode():
        for file, name in _images(folder, sorted(os.listdir(folder))):
            label = trained_names.index(name)
            logits = model(transform(Image.open(file).convert('RGB'))[None])[0]
            hits1 += int(logits.argmax()) == label
            hits5 += label in logits.topk(min(5, len(logits))).indices.tolist()
            total += 1
    return round(100 * hits1 / total, 4), round(100 * hits5 / total, 4)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A run on six classes (train/ and validation/), and its best checkpoint."""
    tmp = tmp_path_factory.mktemp('trained')
    data = tmp / 'data'
    make_folder(data / 'train', NAMES, per_class=8)
    make_folder(data / 'validation', NAMES, per_class=3, seed=1)
    return train_run(tmp, data)


def test_checkpoint_and_args_yaml_record_the_training_class_names_in_label_order(trained):
    assert checkpoint_training_args(str(trained))['class_names'] == NAMES
    with open(trained.parent / 'args.yaml') as f:
        assert yaml.safe_load(f)['class_names'] == NAMES
    assert evaluate('--checkpoint', str(trained))['top1'] == 100  # the run's own validation split, learnt


def test_class_subset_run_records_the_kept_names_in_their_new_label_order(tmp_path, trained):
    (tmp_path / 'classes.txt').write_text('fox\ncat\ndog\n')
    data = trained.parent.parent.parent / 'data'
    path = train_run(tmp_path, data, '--class-subset', str(tmp_path / 'classes.txt'), name='subset')
    recorded = checkpoint_training_args(str(path))
    assert recorded['class_names'] == ['cat', 'dog', 'fox'] and recorded['num_classes'] == 3
    # A folder with two of them: kept by name, with the subset's label ids (a new draw of 3 classes from two
    # folders could not be made).
    folder = make_folder(tmp_path / 'two', ['dog', 'fox'], seed=2)
    results = evaluate('--checkpoint', str(path), '--data-dir', str(folder))
    assert (results['top1'], results['top5']) == slow_reference(path, folder)
    assert results['top1'] == 100


def test_folder_with_some_trained_classes_is_scored_with_the_training_label_ids(trained, tmp_path, caplog):
    folder = make_folder(tmp_path / 'three', ['bee', 'dog', 'fox'], seed=3)
    caplog.set_level(logging.INFO, logger=LOGGER)
    results = evaluate('--checkpoint', str(trained), str(folder))
    assert 'scored with the model\'s own label ids' in caplog.text
    assert (results['top1'], results['top5']) == slow_reference(trained, folder)
    assert results['top1'] == 100  # with the folder's own labels 0..2 (ant, bee, cat) it would be 0


def test_folder_with_an_untrained_class_is_refused_in_one_line(trained, tmp_path, capsys):
    folder = make_folder(tmp_path / 'unknown', ['bee', 'yak', 'zebu'], seed=4)
    with pytest.raises(SystemExit) as exit_info:
        validate_main(['-j', '0', '--device', 'cpu', '--checkpoint', str(trained), '--data-dir', str(folder)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('validate.py: error: --checkpoint')
    assert str(folder) in lines[0] and "['yak', 'zebu']" in lines[0] and "'ant'" in lines[0]
    assert '--result' not in captured.out  # nothing evaluated


def test_train_and_validation_splits_with_other_classes_are_refused_before_any_output(tmp_path, capsys):
    data = tmp_path / 'data'
    make_folder(data / 'train', NAMES, per_class=2)
    make_folder(data / 'validation', ['ant', 'bee', 'cat', 'dog', 'eel', 'gnu'], per_class=2)
    with pytest.raises(SystemExit) as exit_info:
        train_run(tmp_path, data)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('train.py: error: ')
    for text in ("--train-split 'train'", "--val-split 'validation'", "['fox']", "['gnu']", 'same class folders'):
        assert text in lines[0], text
    assert not (tmp_path / 'out').exists()


def test_checkpoint_without_class_names_evaluates_as_before(trained, tmp_path):
    checkpoint = torch.load(trained, map_location='cpu', weights_only=False)
    del checkpoint['args'].class_names  # as written before class names were recorded: no run record either
    del checkpoint['run_record']
    old = tmp_path / 'old.pth.tar'
    torch.save(checkpoint, old)
    folder = make_folder(tmp_path / 'three', ['bee', 'dog', 'fox'], seed=3)
    results = evaluate('--checkpoint', str(old), '--data-dir', str(folder))
    # The folder's own labels (bee 0, dog 1, fox 2), as validate.py always read them.
    model, transform = _model_and_transform(old)
    dataset = gsl_data.create_dataset('', root=str(folder))
    with torch.inference_mode():
        predictions = [int(model(transform(img.convert('RGB'))[None]).argmax()) for img, _ in dataset]
    expected = 100 * np.mean(np.array(predictions) == np.array(gsl_data.dataset_targets(dataset)))
    assert results['top1'] == round(expected, 4) and results['top1'] < 100


def test_relabel_to_class_names_keeps_images_and_maps_labels_by_name(tmp_path):
    folder = make_folder(tmp_path / 'f', ['bee', 'dog', 'yak'], per_class=2)
    dataset = gsl_data.create_dataset('', root=str(folder))
    assert relabel_to_class_names(dataset, ['bee', 'dog', 'yak']) is dataset
    relabelled = relabel_to_class_names(dataset, ['yak', 'ant', 'bee', 'dog'])
    assert gsl_data.dataset_targets(relabelled) == [2, 2, 3, 3, 0, 0]
    assert [label for _, label in relabelled] == [2, 2, 3, 3, 0, 0]
    with pytest.raises(ValueError, match=r"classes \['yak'\]"):
        relabel_to_class_names(dataset, NAMES)
    kept = relabel_to_class_names(dataset, NAMES, drop_others=True)
    assert gsl_data.dataset_targets(kept) == [1, 1, 3, 3] and len(kept) == 4
