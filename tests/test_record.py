"""Tests of ``timm_gsl.record``: the typed, versioned run record saved in every checkpoint (issue 26)."""
import argparse
import json
import os

import pytest
import torch
from timm import utils

from timm_gsl.cli.train import main as train_main
from timm_gsl.engine import AtomicCheckpointSaver, read_checkpoint
from timm_gsl.record import (RECORD_KEY, RECORD_VERSION, DistillationRecord, ModelRecord, RunRecord,
                             from_training_arguments)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
# Written by train.py at commit f088310, before the run record existed (its optimizer state removed to keep the
# file small): python -m timm_gsl.train --model test_vit --img-size 32 --class-subset 3 --samples-per-class 8
# -b 8 -j 0 --epochs 1 --train-batches-per-epoch 1 --device cpu --no-calibrate --log-interval 1
OLD_CHECKPOINT = os.path.join(DATA, 'checkpoint_f088310.pth.tar')


def test_a_checkpoint_from_before_the_record_is_read_from_its_training_arguments():
    record = RunRecord.from_checkpoint(read_checkpoint(OLD_CHECKPOINT, 'checkpoint'))
    assert record.version == 0
    assert record.model == ModelRecord(architecture='test_vit', num_classes=3, in_chans=3, input_size=(3, 32, 32),
                                       pretrained=False, initial_checkpoint=None, kwargs={})
    data = record.data
    assert (data.dataset, data.root, data.folder, data.train_split, data.eval_split) == (
        'embedded/fashion-mnist', None, None, 'train', 'validation')
    assert (data.class_subset, data.samples_per_class, data.seed) == ('3', 8, 42)
    assert data.class_names == ['T-shirt/top', 'Sandal', 'Shirt']
    assert (data.mean, data.std, data.crop_pct, data.interpolation) == ([0.286] * 3, [0.353] * 3, 1.0, 'bilinear')
    loss = record.loss
    assert (loss.kind, loss.group_type, loss.groups, loss.grouping, loss.smoothing) == (
        'gsl', 'II', 4, 'discriminative', 0.1)
    assert not loss.mixes_targets and record.distillation is None
    training = record.training
    assert (training.epochs, training.batch_size, training.workers, training.eval_metric) == (1, 8, 0, 'top1')


def test_the_record_round_trips_through_plain_data():
    args = dict(model='resnet18', num_classes=5, img_size=64, in_chans=3, data_dir='/home/someone/flowers/',
                class_subset=None, samples_per_class=20, seed=1, loss='ce', smoothing=0.0, mixup=0.2,
                kd_model_name='convnext_tiny', kd_distill_type='feature', epochs=3, opt='adamw', workers=2)
    record = from_training_arguments(args)
    assert record.version == RECORD_VERSION
    assert record.data.folder == 'flowers'  # what a card may name
    assert record.data.root == '/home/someone/flowers/'  # for validation on the same machine, never published
    assert record.model.input_size == (3, 64, 64)
    assert (record.loss.kind, record.loss.groups, record.loss.mixes_targets) == ('ce', None, True)
    assert record.distillation == DistillationRecord('convnext_tiny', 'feature')
    plain = json.loads(json.dumps(record.to_dict()))  # plain data only
    assert RunRecord.from_dict(plain) == record


def test_a_newer_or_malformed_record_is_refused_in_one_line():
    record = from_training_arguments(dict(model='resnet18')).to_dict()
    newer = RECORD_VERSION + 1
    with pytest.raises(ValueError, match=rf'^run record version {newer} is not one this timm-gsl reads '
                                         rf'\(1 to {RECORD_VERSION}\); update timm-gsl to read it$'):
        RunRecord.from_dict(dict(record, version=newer))
    with pytest.raises(ValueError, match=f'does not fit version {RECORD_VERSION}'):
        RunRecord.from_dict(dict(record, model=dict(record['model'], colour='red')))
    with pytest.raises(ValueError, match='neither a run record nor training arguments'):
        RunRecord.from_checkpoint({'state_dict': {}})


def test_the_saver_writes_what_timms_saver_writes_plus_the_extra_state(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    args = argparse.Namespace(model='linear')
    ours = AtomicCheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(tmp_path / 'ours'))
    record_saver = AtomicCheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(tmp_path / 'ours'),
                                         extra_state={RECORD_KEY: {'version': 1}})
    theirs = utils.CheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(tmp_path / 'theirs'))
    for saver in (ours, theirs):
        os.makedirs(saver.checkpoint_dir)
        saver._save(os.path.join(saver.checkpoint_dir, 'c.pth.tar'), epoch=3, metric=0.5)
    load = lambda d: torch.load(tmp_path / d / 'c.pth.tar', weights_only=False)  # noqa: E731
    mine, timms = load('ours'), load('theirs')
    assert list(mine) == list(timms) and repr(mine) == repr(timms)
    record_saver._save(str(tmp_path / 'ours' / 'd.pth.tar'), epoch=3, metric=0.5)
    assert torch.load(tmp_path / 'ours' / 'd.pth.tar', weights_only=False)[RECORD_KEY] == {'version': 1}


def test_a_version_1_record_reads_with_the_later_sections_unset():
    # As train.py wrote it at commit dc80743 (record version 1).
    v1 = {'model': {'architecture': 'test_resnet', 'num_classes': 3, 'in_chans': 3, 'input_size': [3, 28, 28],
                    'pretrained': False, 'initial_checkpoint': None, 'global_pool': None, 'kwargs': {}},
          'data': {'dataset': 'embedded/fashion-mnist', 'root': None, 'folder': None, 'train_split': 'train',
                   'eval_split': 'validation', 'class_names': ['a', 'b', 'c'], 'class_subset': 3,
                   'samples_per_class': 8, 'seed': 42, 'mean': [0.286] * 3, 'std': [0.353] * 3, 'crop_pct': 1.0,
                   'interpolation': 'bilinear'},
          'loss': {'kind': 'ce', 'group_type': None, 'groups': None, 'grouping': None, 'smoothing': 0.1,
                   'mixup': 0.0, 'cutmix': 0.0},
          'training': {'epochs': 1, 'batch_size': 8, 'lr': 0.1, 'optimizer': 'sgd', 'scheduler': 'cosine',
                       'workers': 0, 'eval_metric': 'top1'},
          'distillation': None, 'version': 1}
    record = RunRecord.from_dict(v1)
    assert record.version == 1 and record.model.input_size == (3, 28, 28)
    assert (record.evaluation, record.calibration, record.training.command, record.data.crop_mode) == (
        None, None, None, None)


def test_a_temperature_written_beside_an_older_record_goes_into_its_calibration_section():
    raw = read_checkpoint(OLD_CHECKPOINT, 'checkpoint')
    fit = dict(temperature=2.0, images=30, source='hold-out', nll_before=1.0, ece_before=10.0, nll_after=0.8,
               ece_after=2.0, reported_on='validation images', reported_images=300, weights='model')
    record = RunRecord.from_checkpoint(dict(raw, calibration=fit))
    assert record.calibration is not None and record.calibration.to_dict() == fit
    with pytest.raises(ValueError, match="^its 'calibration' entry is malformed: "):
        RunRecord.from_checkpoint(dict(raw, calibration=dict(fit, temperature=-1.0)))


def test_train_py_saves_its_record_in_every_checkpoint(tmp_path):
    result = train_main(['--model', 'test_resnet', '--class-subset', '3', '--samples-per-class', '8', '-b', '8',
                         '--train-batches-per-epoch', '1', '--epochs', '2', '-j', '0', '--device', 'cpu',
                         '--loss', 'ce', '--output', str(tmp_path), '--experiment', 'run', '--val-interval', '2'])
    names = sorted(n for n in os.listdir(result['output_dir']) if n.endswith('.pth.tar'))
    assert names == ['checkpoint-0.pth.tar', 'checkpoint-1.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    evaluated = {}
    for name in names:
        raw = read_checkpoint(os.path.join(result['output_dir'], name), 'checkpoint')  # weights_only reading
        record = RunRecord.from_checkpoint(raw)
        assert record.version == RECORD_VERSION
        args = vars(raw['args']) if not isinstance(raw['args'], dict) else raw['args']
        assert record.replace(evaluation=None) == from_training_arguments(args, command=record.training.command)
        assert (record.model.architecture, record.model.num_classes, record.loss.kind) == ('test_resnet', 3, 'ce')
        command = record.training.command
        assert command.startswith('python train.py ') and '--model test_resnet' in command and '--epochs 2' in command
        evaluated[name] = record.evaluation
    # Epoch 0 was not validated (--val-interval 2); each checkpoint of epoch 1 holds that epoch's validation.
    assert evaluated['checkpoint-0.pth.tar'] is None
    last = result['history'][-1]
    for name in ('checkpoint-1.pth.tar', 'last.pth.tar', 'model_best.pth.tar'):
        assert evaluated[name].epoch == 1
        assert evaluated[name].metrics == {k[len('eval_'):]: v for k, v in last.items() if k.startswith('eval_')}


def test_publishing_refuses_a_checkpoint_from_a_newer_timm_gsl_in_one_line(tmp_path):
    from timm_gsl import hub
    raw = torch.load(OLD_CHECKPOINT, weights_only=False)
    raw[RECORD_KEY] = dict(from_training_arguments(vars(raw['args'])).to_dict(), version=RECORD_VERSION + 1)
    path = tmp_path / 'newer.pth.tar'
    torch.save(raw, path)
    with pytest.raises(ValueError) as e:
        hub.load_training_checkpoint(str(path))
    assert str(e.value) == (f"checkpoint {str(path)!r}: run record version {RECORD_VERSION + 1} is not one this "
                            f"timm-gsl reads (1 to {RECORD_VERSION}); update timm-gsl to read it")
    # The checkpoint as written before the record existed still loads, its record read from its arguments.
    assert hub.load_training_checkpoint(OLD_CHECKPOINT).record.version == 0


def test_input_options_are_the_recorded_transform_keyed_as_timm_reads_it():
    record = from_training_arguments(dict(model='resnet18', img_size=64, in_chans=1, mean=[0.5], std=[0.25],
                                          crop_pct=0.9, crop_mode='squash', interpolation=''))
    assert record.input_options() == dict(input_size=(1, 64, 64), in_chans=1, mean=[0.5], std=[0.25], crop_pct=0.9,
                                          crop_mode='squash')  # an empty interpolation: the model's own
