"""Tests for ``timm_gsl.head``: the grouped head on timm's model families.

The reference in every test is built without ``timm_gsl.head``: the test hooks the classifier
layer(s) that timm's own ``pretrained_cfg['classifier']`` names, takes what they receive and computes
the group softmax loss from it with :func:`timm_gsl.group_softmax_loss`.
"""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
import timm_gsl
from timm_gsl import GroupSoftmaxLoss, GroupSoftmaxOutput, UnsupportedModelError, convert_model


from _timm_cases import Case, ClassifierTap, batch


# A dozen families through timm's tiny test models.
TEST_FAMILIES = [
    Case('test_byobnet'),
    Case('test_coatnet', dict(img_size=64)),
    Case('test_convnext'),                          # NormMlpClassifierHead without hidden layer
    Case('test_efficientnet'),
    Case('test_efficientnet_gn'),
    Case('test_mambaout'),                          # ClNormMlpClassifierHead with an MLP
    Case('test_maxvit', dict(img_size=64)),
    Case('test_nfnet'),
    Case('test_resnet'),                            # bare nn.Linear fc
    Case('test_vit', size=32),
    Case('test_vit3', dict(img_size=32), size=32),  # attention-pool (MAP) head
    Case('test_vit_relpos', dict(img_size=32), size=32),
]

# The classifier shapes the issue names, on real (small) architectures.
SPECIAL_CASES = [
    Case('test_convnext', dict(head_hidden_size=24)),       # NormMlpClassifierHead with an MLP
    Case('dla46_c'),                                          # 1x1 nn.Conv2d classifier
    Case('mobilenetv3_small_050'),                            # classifier after conv_head
    Case('deit_tiny_distilled_patch16_224', dict(img_size=32), size=32),  # head + head_dist
    Case('levit_128s', dict(img_size=64)),                   # two NormLinear heads
    Case('repvit_m1', dict(img_size=64)),                    # head_dist inside the classifier module
    Case('crossvit_tiny_240'),                                # an nn.ModuleList of heads
]

ALL_CASES = TEST_FAMILIES + SPECIAL_CASES
CASE_IDS = [str(c) for c in ALL_CASES]


# ----------------------------------------------------------------------------------------------
# The independent reference
# ----------------------------------------------------------------------------------------------

def grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def classifier_params(model: nn.Module, arch: str) -> List[str]:
    names = timm.get_pretrained_cfg(arch).classifier
    names = (names,) if isinstance(names, str) else tuple(names)
    return [f'{n}.weight' for n in names]


def first_param(model: nn.Module) -> str:
    """The first parameter in registration order: the stem, the far end of the backbone."""
    return next(n for n, p in model.named_parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# Every case: training step, eval identity, state dict
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('case', ALL_CASES, ids=CASE_IDS)
def test_training_step_matches_hand_computed_group_loss_and_gradients(case: Case):
    torch.manual_seed(0)
    model = case.create()
    convert_model(model).train()
    tap = ClassifierTap(model, case.arch)
    images, target = batch(case)
    criterion = GroupSoftmaxLoss(groups=3, loss_type='II')

    torch.manual_seed(2)
    output = model(images)
    assert isinstance(output, GroupSoftmaxOutput)
    features, weight, bias = tap.linear()
    # The captured classifier really is the whole map from features to logits.
    torch.testing.assert_close(output.logits, F.linear(features, weight, bias), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(output.features, features, rtol=0, atol=0)
    loss = criterion(output, target)
    expected = timm_gsl.group_softmax_loss(features, weight, bias, target, groups=3, loss_type='II')
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    got = grads(model)

    # Same step again, with the loss built by hand from the tapped tensors only.
    model.zero_grad()
    torch.manual_seed(2)
    model(images)
    features, weight, bias = tap.linear()
    timm_gsl.group_softmax_loss(features, weight, bias, target, groups=3, loss_type='II').backward()
    want = grads(model)

    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in classifier_params(model, case.arch) + [first_param(model)]:
        assert name in got and got[name].abs().sum() > 0, f'no gradient reaches {name}'


@pytest.mark.parametrize('case', ALL_CASES, ids=CASE_IDS)
def test_eval_mode_is_the_plain_timm_model_with_strict_state_dict(case: Case):
    torch.manual_seed(0)
    model = case.create()
    plain_keys = list(case.create().state_dict())
    classes = [type(m) for m in model.modules()]
    convert_model(model)
    assert [type(m) for m in model.modules()] == classes
    assert model.pretrained_cfg['architecture'] == case.arch

    # One training step, so running statistics and weights move away from their initial values.
    images, target = batch(case)
    model.train()
    loss = GroupSoftmaxLoss(groups=2)(model(images), target)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.01).step()

    model.eval()
    assert list(model.state_dict()) == plain_keys
    twin = case.create().eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        got, want = model(images), twin(images)
    assert type(got) is torch.Tensor
    assert torch.equal(got, want)

    # And back: a plain checkpoint loads strictly into the converted model.
    back = convert_model(case.create())
    back.load_state_dict(twin.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(back.eval()(images), want)


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------

def test_model_without_classifier_is_refused_with_reason():
    model = timm.create_model('test_resnet', num_classes=0)
    with pytest.raises(UnsupportedModelError, match=r'num_classes=0'):
        convert_model(model)
    assert issubclass(UnsupportedModelError, ValueError)


def test_module_without_get_classifier_is_refused():
    with pytest.raises(UnsupportedModelError, match='get_classifier'):
        convert_model(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))


def test_model_doing_something_after_classifier_is_refused_on_first_training_step():
    # VOLO adds the max over tokens of an auxiliary head to the class-token head's logits.
    case = Case('volo_d1_224', dict(img_size=32), size=32)
    torch.manual_seed(0)
    model = convert_model(case.create())
    images, _ = batch(case, n=2)
    with pytest.raises(UnsupportedModelError, match='after its final linear classifier'):
        model.train()(images)
    # Eval mode is untouched: the refusal concerns training only.
    twin = case.create().eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), twin(images))


def test_distillation_training_outputs_are_refused():
    case = Case('deit_tiny_distilled_patch16_224', dict(img_size=32), size=32)
    model = convert_model(case.create())
    model.set_distilled_training(True)
    with pytest.raises(UnsupportedModelError, match='set_distilled_training'):
        model.train()(batch(case, n=2)[0])


# ----------------------------------------------------------------------------------------------
# reset_classifier, unconvert, idempotence
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('case', [Case('test_resnet'), Case('test_convnext', dict(head_hidden_size=24)),
                                  Case('deit_tiny_distilled_patch16_224', dict(img_size=32), size=32)],
                         ids=str)
def test_reset_classifier_keeps_training_on_the_new_classifier(case: Case):
    torch.manual_seed(0)
    model = convert_model(case.create(num_classes=5)).train()
    images, target = batch(case, num_classes=5)
    GroupSoftmaxLoss(groups=2)(model(images), target)  # verified and attached to the old head

    model.reset_classifier(7)
    tap = ClassifierTap(model, case.arch)
    images, target = batch(case, num_classes=7, seed=3)
    output = model(images)
    features, weight, bias = tap.linear()
    assert output.logits.shape == (len(images), 7)
    assert output.weight.shape[0] == 7
    expected = timm_gsl.group_softmax_loss(features, weight, bias, target, groups=2)
    torch.testing.assert_close(GroupSoftmaxLoss(groups=2)(output, target), expected, rtol=1e-5, atol=1e-6)


def test_reset_classifier_to_zero_classes_refuses_training_but_keeps_eval():
    case = Case('test_resnet')
    model = convert_model(case.create())
    images, _ = batch(case, n=2)
    model.reset_classifier(0)
    with pytest.raises(UnsupportedModelError, match='num_classes=0'):
        model.train()(images)
    with torch.no_grad():
        features = model.eval()(images)
    assert features.shape == (2, model.num_features)


def test_unconvert_restores_plain_training_output():
    case = Case('test_resnet')
    model = convert_model(case.create())
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks), len(model.fc._forward_pre_hooks))
    assert convert_model(model) is model  # idempotent: no second set of hooks
    assert (len(model._forward_pre_hooks), len(model._forward_hooks), len(model.fc._forward_pre_hooks)) == hooks
    assert timm_gsl.is_converted(model)
    timm_gsl.unconvert_model(model)
    assert not timm_gsl.is_converted(model)
    assert not model._forward_pre_hooks and not model._forward_hooks and not model.fc._forward_pre_hooks
    assert type(model.train()(batch(case, n=2)[0])) is torch.Tensor


def test_plain_logits_are_refused_by_the_loss_with_advice():
    case = Case('test_resnet')
    model = case.create().train()
    images, target = batch(case, n=2)
    with pytest.raises(ValueError, match='convert_model'):
        GroupSoftmaxLoss(groups=2)(model(images), target)
