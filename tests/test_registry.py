"""Tests for ``timm_gsl.registry``: ``timm.create_model('group_softmax', base_model=...)``."""
from __future__ import annotations

import json

import pytest
import torch

import timm
import timm_gsl
from timm.models import save_for_hf
from timm_gsl import GroupSoftmaxLoss, GroupSoftmaxOutput

from _timm_cases import Case, ClassifierTap, batch

BASE = Case('test_resnet')


def create(**kwargs) -> torch.nn.Module:
    return timm.create_model('group_softmax', base_model=BASE.arch, num_classes=5, **kwargs)


def test_entrypoint_is_registered_with_timm():
    assert 'group_softmax' in timm.list_models('group_softmax')
    assert timm.is_model('group_softmax')


def test_created_model_is_the_base_architecture_converted():
    model = create(drop_rate=0.25)
    plain = BASE.create()
    assert type(model) is type(plain)
    assert timm_gsl.is_converted(model)
    assert model.pretrained_cfg['architecture'] == BASE.arch
    assert model.num_classes == 5
    assert model.drop_rate == 0.25  # keywords reach the base architecture
    assert list(model.state_dict()) == list(plain.state_dict())


def test_trains_with_only_create_model_and_the_loss():
    torch.manual_seed(0)
    model = create().train()
    tap = ClassifierTap(model, BASE.arch)
    images, target = batch(BASE, n=8)
    criterion = GroupSoftmaxLoss(groups=4, loss_type='II')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        output = model(images)
        assert isinstance(output, GroupSoftmaxOutput)
        loss = criterion(output, target)
        features, weight, bias = tap.linear()
        torch.testing.assert_close(
            loss, timm_gsl.group_softmax_loss(features, weight, bias, target, groups=4), rtol=1e-5, atol=1e-6)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Fitting one fixed batch: the loss must come down.
    assert losses[-1] < 0.8 * losses[0], losses


def test_export_names_the_base_architecture_and_reloads_into_plain_timm(tmp_path):
    torch.manual_seed(0)
    model = create()
    images, target = batch(BASE, n=4)
    GroupSoftmaxLoss(groups=2)(model.train()(images), target).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()

    save_for_hf(model, tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == BASE.arch
    assert 'base_model' not in config.get('model_args', {})

    reloaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    assert type(reloaded) is type(model) and not timm_gsl.is_converted(reloaded)
    assert reloaded.pretrained_cfg['architecture'] == BASE.arch
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(images), model.eval()(images))


def test_state_dict_loads_strictly_into_plain_create_model():
    model = create()
    plain = BASE.create()
    plain.load_state_dict(model.state_dict(), strict=True)
    images, _ = batch(BASE, n=2)
    with torch.no_grad():
        assert torch.equal(plain.eval()(images), model.eval()(images))


@pytest.mark.parametrize('base_model, match', [
    ('', 'base_model must name a timm architecture'),
    (None, 'base_model must name a timm architecture'),
    ('group_softmax', "not 'group_softmax' itself"),
])
def test_bad_base_model_is_refused(base_model, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('group_softmax', base_model=base_model)


def test_base_model_without_classifier_is_refused():
    with pytest.raises(timm_gsl.UnsupportedModelError, match='num_classes=0'):
        timm.create_model('group_softmax', base_model=BASE.arch, num_classes=0)


def test_a_model_is_created_again_from_its_record_as_training_created_it():
    from timm_gsl.record import ModelRecord
    from timm_gsl.registry import create_model_from_record
    spec = ModelRecord(architecture='test_resnet', num_classes=4, in_chans=1, global_pool='max')
    model = create_model_from_record(spec)
    torch.manual_seed(0)
    expected = timm.create_model('test_resnet', num_classes=4, in_chans=1, global_pool='max')
    assert type(model) is type(expected) and model.num_classes == 4
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in expected.state_dict().items()}
    # A model with a fixed input size is built for the size asked, as timm's scripts do; overrides win.
    vit = create_model_from_record(ModelRecord(architecture='test_vit', num_classes=3), {'img_size': 32},
                                   num_classes=5)
    assert vit.patch_embed.img_size == (32, 32) and vit.num_classes == 5
