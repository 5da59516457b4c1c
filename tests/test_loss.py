"""Tests of ``timm_gsl.loss``: the ``GroupSoftmaxLoss`` criterion against the functional loss."""
from __future__ import annotations

import pytest
import torch

from timm_gsl import GroupSoftmaxLoss, GroupSoftmaxOutput
from timm_gsl.functional import group_softmax_loss

from _assertions import assert_same_value_and_grads, assert_value_error_says

TOL = dict(rtol=1e-12, atol=1e-12)
B, D, C = 6, 10, 5


def make_output(seed: int = 0, with_bias: bool = True) -> GroupSoftmaxOutput:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(B, D, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(C, D, generator=gen, dtype=torch.float64).requires_grad_()
    bias = torch.randn(C, generator=gen, dtype=torch.float64).requires_grad_() if with_bias else None
    logits = torch.nn.functional.linear(features, weight, bias)
    return GroupSoftmaxOutput(logits, features, weight, bias)


def labels(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(seed))


def soft_targets(seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    e = -torch.log(torch.rand(B, C, generator=gen, dtype=torch.float64))
    return e / e.sum(1, keepdim=True)


def smoothed(y: torch.Tensor, eps: float) -> torch.Tensor:
    return (1 - eps) * torch.eye(C, dtype=torch.float64)[y] + eps / C


def inputs_of(out: GroupSoftmaxOutput):
    return [t for t in (out.features, out.weight, out.bias) if t is not None]


@pytest.mark.parametrize('loss_type', ['I', 'II'])
@pytest.mark.parametrize('groups', [1, 3, 4])
@pytest.mark.parametrize('grouping', ['discriminative', 'contiguous'])
@pytest.mark.parametrize('with_bias', [True, False], ids=['bias', 'no_bias'])
@pytest.mark.parametrize('target_kind', ['hard', 'soft'])
def test_criterion_on_model_output_equals_functional_loss(loss_type, groups, grouping, with_bias, target_kind):
    out = make_output(with_bias=with_bias)
    target = labels() if target_kind == 'hard' else soft_targets()
    criterion = GroupSoftmaxLoss(groups=groups, loss_type=loss_type, grouping=grouping)
    loss = criterion(out, target)
    expected = group_softmax_loss(
        out.features, out.weight, out.bias, target, groups, loss_type=loss_type, grouping=grouping)
    assert_same_value_and_grads(loss, expected, inputs_of(out), TOL)


def test_criterion_on_plain_tensors_equals_criterion_on_model_output():
    out = make_output()
    criterion = GroupSoftmaxLoss(groups=2, loss_type='I')
    loss = criterion(out.features, labels(), weight=out.weight, bias=out.bias)
    assert_same_value_and_grads(loss, criterion(out, labels()), inputs_of(out), TOL)


def test_random_grouping_draws_from_the_global_generator_like_the_functional_loss():
    out = make_output()
    torch.manual_seed(123)
    loss = GroupSoftmaxLoss(groups=3, grouping='random')(out, labels())
    torch.manual_seed(123)
    expected = group_softmax_loss(out.features, out.weight, out.bias, labels(), 3, grouping='random')
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


@pytest.mark.parametrize('loss_type', ['I', 'II'])
def test_smoothing_turns_class_indices_into_smoothed_targets(loss_type):
    out = make_output()
    y = labels()
    loss = GroupSoftmaxLoss(groups=3, loss_type=loss_type, smoothing=0.1)(out, y)
    expected = group_softmax_loss(out.features, out.weight, out.bias, smoothed(y, 0.1), 3, loss_type=loss_type)
    assert_same_value_and_grads(loss, expected, inputs_of(out), TOL)
    unsmoothed = GroupSoftmaxLoss(groups=3, loss_type=loss_type)(out, y)
    assert not torch.allclose(loss, unsmoothed)


@pytest.mark.parametrize('loss_type', ['I', 'II'])
def test_soft_targets_ignore_smoothing(loss_type):
    out = make_output()
    t = soft_targets()
    loss = GroupSoftmaxLoss(groups=3, loss_type=loss_type, smoothing=0.3)(out, t)
    expected = group_softmax_loss(out.features, out.weight, out.bias, t, 3, loss_type=loss_type)
    assert_same_value_and_grads(loss, expected, inputs_of(out), TOL)


def test_loss_type_aliases_are_normalised_and_shown_in_repr():
    assert GroupSoftmaxLoss(loss_type='ii').loss_type == 'II'
    assert GroupSoftmaxLoss(loss_type=1).loss_type == 'I'
    text = repr(GroupSoftmaxLoss(groups=8, loss_type='i', grouping='contiguous', smoothing=0.1))
    assert "groups=8" in text and "loss_type='I'" in text and "grouping='contiguous'" in text
    assert "smoothing=0.1" in text


def test_criterion_has_no_parameters_or_buffers():
    criterion = GroupSoftmaxLoss()
    assert list(criterion.parameters()) == [] and list(criterion.buffers()) == []
    assert criterion.state_dict() == {}


BAD_CONSTRUCTOR_ARGS = [
    # (case id, arguments, pieces the message must hold: name, value, what is allowed)
    ('groups_zero', dict(groups=0), ['groups', '0', '>= 1']),
    ('groups_float', dict(groups=2.0), ['groups', '2.0', 'int']),
    ('groups_bool', dict(groups=True), ['groups', 'True', 'int']),
    ('groups_str', dict(groups='4'), ['groups', "'4'", 'int']),
    ('loss_type_unknown', dict(loss_type='III'), ['loss_type', "'III'", "('I', 'II')"]),
    ('loss_type_none', dict(loss_type=None), ['loss_type', 'None', "('I', 'II')"]),
    ('grouping_unknown', dict(grouping='sorted'), ['grouping', "'sorted'", "'discriminative'"]),
    ('grouping_tensor', dict(grouping=torch.zeros(10, dtype=torch.long)),
     ['grouping', 'tensor of shape (10,)', "'discriminative'"]),
    ('smoothing_negative', dict(smoothing=-0.1), ['smoothing', '-0.1', '[0, 1)']),
    ('smoothing_one', dict(smoothing=1.0), ['smoothing', '1.0', '[0, 1)']),
    ('smoothing_bool', dict(smoothing=True), ['smoothing', 'True', 'float']),
    ('smoothing_str', dict(smoothing='0.1'), ['smoothing', "'0.1'", 'float']),
]


@pytest.mark.parametrize('kwargs, pieces', [c[1:] for c in BAD_CONSTRUCTOR_ARGS],
                         ids=[c[0] for c in BAD_CONSTRUCTOR_ARGS])
def test_bad_constructor_argument_raises_value_error_naming_argument_value_and_allowed(kwargs, pieces):
    assert_value_error_says(lambda: GroupSoftmaxLoss(**kwargs), pieces)


def test_more_groups_than_features_is_refused_at_call_time():
    with pytest.raises(ValueError, match=rf'groups=11 .*<= {D}'):
        GroupSoftmaxLoss(groups=11)(make_output(), labels())


def test_plain_logits_are_refused_with_a_hint_to_convert_the_model():
    out = make_output()
    with pytest.raises(ValueError, match='convert_model'):
        GroupSoftmaxLoss()(out.logits, labels())


def test_weight_passed_beside_a_model_output_is_refused():
    out = make_output()
    with pytest.raises(ValueError, match='weight and bias come from the GroupSoftmaxOutput'):
        GroupSoftmaxLoss()(out, labels(), weight=out.weight)


def test_keep_statistics_measures_the_forwards_own_grouping():
    import timm_gsl.functional as gsl
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 16).relu(), torch.randn(5, 16), torch.randn(5)
    y = torch.randint(0, 5, (6,))
    criterion = GroupSoftmaxLoss(groups=4, loss_type='II', grouping='random', smoothing=0.1)
    assert criterion.last_statistics is None
    torch.manual_seed(7)
    plain = criterion(x, y, weight=w, bias=b)
    assert criterion.last_statistics is None  # off by default: nothing measured
    criterion.keep_statistics = True
    torch.manual_seed(7)  # the same random partition as the plain call
    loss = criterion(x, y, weight=w, bias=b)
    torch.testing.assert_close(loss, plain)
    torch.manual_seed(7)
    expected = gsl.grouping_statistics(x, w, b, y, 4, 'II', 'random', label_smoothing=0.1)
    for got, want in zip(criterion.last_statistics, expected):
        torch.testing.assert_close(got, want)
    assert float(criterion.last_statistics.group_loss.sum()) == pytest.approx(float(loss), rel=1e-6)
