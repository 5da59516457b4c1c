"""Tests of ``timm_gsl.loss_factory``: 'gsl' builds a ``GroupSoftmaxLoss``, every other type is timm's."""
from __future__ import annotations

from typing import Any, Dict

import pytest
import torch
import torch.nn as nn
from timm.loss import LOSS_TYPES as TIMM_LOSS_TYPES
from timm.loss import create_classification_loss as timm_create_classification_loss

from timm_gsl import GroupSoftmaxLoss, create_classification_loss
from timm_gsl.cli.train_args import LOSS_FLAGS
from timm_gsl.loss_factory import LOSS_TYPES, resolve_gsl_type

from _assertions import assert_value_error_says


def settings_of(module: nn.Module) -> Dict[str, Any]:
    """Every public attribute, parameter and buffer of a criterion and of its submodules."""
    out = {}
    for prefix, sub in module.named_modules():
        out[(prefix, 'class')] = type(sub)
        for key, value in vars(sub).items():
            if not key.startswith('_'):
                out[(prefix, key)] = value
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        out[('tensor', name)] = tensor
    return out


def assert_same_settings(got: nn.Module, expected: nn.Module) -> None:
    a, b = settings_of(got), settings_of(expected)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor) or isinstance(b[key], torch.Tensor):
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
        else:
            assert a[key] == b[key], key


def test_gsl_builds_a_group_softmax_loss_with_the_given_settings():
    criterion = create_classification_loss('gsl', gsl_groups=8, gsl_type='I', gsl_grouping='random', smoothing=0.1)
    assert type(criterion) is GroupSoftmaxLoss
    assert (criterion.groups, criterion.loss_type, criterion.grouping, criterion.smoothing) == (8, 'I', 'random', 0.1)


def test_gsl_defaults_match_the_criterion_defaults():
    assert_same_settings(create_classification_loss('gsl'), GroupSoftmaxLoss())


def test_gsl_with_soft_targets_drops_smoothing():
    # Mixup/CutMix have already smoothed the soft targets; smoothing them again would double it.
    criterion = create_classification_loss('gsl', soft_targets=True, smoothing=0.1)
    assert criterion.smoothing == 0.0


def test_gsl_accepts_timm_only_options_left_at_their_defaults():
    # A training script may forward every loss option; only the ones actually set are refused.
    criterion = create_classification_loss(
        'gsl', jsd_splits=0, bce_sum=False, class_weight=None, asl_clip=0.05, poly_epsilon=2.0)
    assert type(criterion) is GroupSoftmaxLoss


def test_loss_types_are_timms_plus_gsl():
    assert LOSS_TYPES == tuple(TIMM_LOSS_TYPES) + ('gsl',)


TIMM_CASES = [
    dict(),
    dict(multi_label=True),
    dict(loss_type='ce'),
    dict(loss_type='ce', smoothing=0.1),
    dict(loss_type='ce', soft_targets=True, smoothing=0.1),
    dict(loss_type='bce', smoothing=0.1, bce_target_thresh=0.2, bce_sum=True, pos_weight=2.0),
    dict(loss_type='bce', soft_targets=True, class_weight=[1., 2., 3., 4., 5.]),
    dict(loss_type='asl', asl_gamma_neg=3.),
    dict(loss_type='asl', multi_label=True, asl_clip=0.1),
    dict(loss_type='poly', poly_epsilon=1.5, smoothing=0.1),
    dict(loss_type='poly', multi_label=True, poly_gamma=2.),
    dict(loss_type='jsd', jsd_splits=3, smoothing=0.1),
    dict(loss_type='twoway', multi_label=True, twoway_tp=3.),
    dict(loss_type='zlpr', multi_label=True),
    dict(loss_type='db', multi_label=True, class_counts=[5., 3., 2., 7., 1.], num_samples=10),
]


@pytest.mark.parametrize('kwargs', TIMM_CASES, ids=lambda kw: '-'.join(f'{k}={v}' for k, v in kw.items()) or 'default')
def test_other_loss_types_are_exactly_timms(kwargs):
    got = create_classification_loss(**kwargs)
    expected = timm_create_classification_loss(**kwargs)
    assert type(got) is type(expected)
    assert_same_settings(got, expected)


@pytest.mark.parametrize('kwargs', [
    dict(loss_type='ce', multi_label=True),
    dict(loss_type='jsd', jsd_splits=1),
    dict(loss_type='asl', soft_targets=True),
])
def test_timm_refusals_pass_through_unchanged(kwargs):
    with pytest.raises(ValueError) as expected:
        timm_create_classification_loss(**kwargs)
    with pytest.raises(ValueError) as got:
        create_classification_loss(**kwargs)
    assert str(got.value) == str(expected.value)


BAD_FACTORY_ARGS = [
    # (case id, arguments, pieces the message must hold: name, value, what is allowed)
    ('unknown_loss_type', dict(loss_type='focal'), ['loss type', "'focal'", "'gsl'"]),
    ('gsl_multi_label', dict(loss_type='gsl', multi_label=True), ['multi_label', 'True', 'single-label']),
    ('gsl_jsd_splits', dict(loss_type='gsl', jsd_splits=3), ['jsd_splits', '3', 'jsd_splits=0']),
    ('gsl_poly_epsilon', dict(loss_type='gsl', poly_epsilon=3.0), ['poly_epsilon', '3.0', 'poly_epsilon=2.0']),
    ('gsl_class_weight', dict(loss_type='gsl', class_weight=[1., 2.]), ['class_weight', '[1.0, 2.0]', 'None']),
    ('gsl_bce_sum', dict(loss_type='gsl', bce_sum=True), ['bce_sum', 'True', 'bce_sum=False']),
    ('gsl_unknown_option', dict(loss_type='gsl', jsd_split=3), ['jsd_split', 'jsd_splits', 'gsl_groups']),
    ('gsl_groups_zero', dict(loss_type='gsl', gsl_groups=0), ['groups', '0', '>= 1']),
    ('gsl_groups_float', dict(loss_type='gsl', gsl_groups=4.0), ['groups', '4.0', 'int']),
    ('gsl_type_unknown', dict(loss_type='gsl', gsl_type='III'), ['loss_type', "'III'", "('I', 'II')"]),
    ('gsl_grouping_unknown', dict(loss_type='gsl', gsl_grouping='sorted'), ['grouping', "'sorted'", 'random']),
    ('gsl_smoothing_one', dict(loss_type='gsl', smoothing=1.0), ['smoothing', '1.0', '[0, 1)']),
]


@pytest.mark.parametrize('kwargs, pieces', [c[1:] for c in BAD_FACTORY_ARGS], ids=[c[0] for c in BAD_FACTORY_ARGS])
def test_bad_factory_argument_raises_value_error_naming_argument_value_and_allowed(kwargs, pieces):
    assert_value_error_says(lambda: create_classification_loss(**kwargs), pieces)


def test_gsl_type_auto_without_a_size_names_the_keywords_and_through_names_the_flags():
    with pytest.raises(ValueError) as info:
        resolve_gsl_type('auto', None)
    assert str(info.value) == ('gsl_type auto needs the number of training images, which this dataset does not '
                               'report; pass num_train_images N or choose gsl_type I or II.')
    with pytest.raises(ValueError) as info:
        resolve_gsl_type('auto', None, names=LOSS_FLAGS)  # train.py's words
    assert str(info.value) == ('--gsl-type auto needs the number of training images, which this dataset does not '
                               'report; pass --train-num-samples N or choose --gsl-type I or II.')
