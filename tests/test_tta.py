"""Tests for ``timm_gsl.engine.tta``: timm's ``--tta`` reduction and the views that feed it.

The reduction is checked against a literal loop over samples and copies; the NaFlex mirror against
patchifying mirrored images with timm's own ``Patchify`` and ``NaFlexCollator``.
"""
from __future__ import annotations

from typing import List

import pytest
import torch
import torch.nn as nn

import timm
from timm.data.naflex_dataset import NaFlexCollator
from timm.data.naflex_transforms import Patchify

from timm_gsl.cli.train_args import TTA_FLAGS
from timm_gsl.engine.tta import (
    check_tta,
    hflip_images,
    hflip_naflex,
    tta_expand,
    tta_forward,
    tta_reduce,
    tta_views,
)


def literal_reduce(output: torch.Tensor, target: torch.Tensor, factor: int):
    """Sample i's output is the mean of rows i*N .. i*N+N-1; its target is row i*N's."""
    outputs: List[torch.Tensor] = []
    targets: List[torch.Tensor] = []
    for i in range(output.shape[0] // factor):
        total = torch.zeros_like(output[0])
        for j in range(factor):
            total = total + output[i * factor + j]
        outputs.append(total / factor)
        targets.append(target[i * factor])
    return torch.stack(outputs), torch.stack(targets)


@pytest.mark.parametrize('factor', [2, 3, 5])
@pytest.mark.parametrize('soft', [False, True])
def test_reduce_matches_literal_loop(factor, soft):
    g = torch.Generator().manual_seed(factor)
    samples, classes = 7, 6
    output = torch.randn(samples * factor, classes, generator=g, dtype=torch.float64)
    if soft:
        target = torch.rand(samples, classes, generator=g).softmax(-1).repeat_interleave(factor, 0)
    else:
        target = torch.randint(0, classes, (samples,), generator=g).repeat_interleave(factor)
    got_output, got_target = tta_reduce(output, target, factor)
    want_output, want_target = literal_reduce(output, target, factor)
    assert got_output.shape == (samples, classes)
    torch.testing.assert_close(got_output, want_output)
    assert torch.equal(got_target, want_target)
    # timm's own expression, verbatim.
    torch.testing.assert_close(got_output, output.unfold(0, factor, factor).mean(dim=2))


def test_reduce_edge_cases():
    output, target = torch.randn(4, 3), torch.arange(4)
    for factor in (0, 1):
        same_output, same_target = tta_reduce(output, target, factor)
        assert same_output is output and same_target is target
    reduced, none = tta_reduce(output, None, 2)
    assert none is None and reduced.shape == (2, 3)
    with pytest.raises(ValueError, match=r'--tta 3: the batch has 4 outputs, not a multiple of 3'):
        tta_reduce(output, target, 3, names=TTA_FLAGS)
    with pytest.raises(ValueError, match='4 outputs but 2 targets'):
        tta_reduce(output, target[:2], 2)


def test_check_tta():
    for ok in (0, 1, 2):
        check_tta(ok)
    check_tta(4, custom_views=True)
    with pytest.raises(ValueError, match=r'^--tta -1: expected an integer >= 0'):
        check_tta(-1, names=TTA_FLAGS)
    with pytest.raises(ValueError, match=r'^--tta 3: .*takes 0 \(off\), 1 \(off\) or 2$'):
        check_tta(3, names=TTA_FLAGS)


def test_messages_name_the_keyword_and_through_names_the_flag():
    # The library's words: its keywords (check_tta's ``tta``, the others' ``factor``).
    with pytest.raises(ValueError, match=r'^tta 3: .*so tta takes 0 \(off\), 1 \(off\) or 2$'):
        check_tta(3)
    with pytest.raises(ValueError, match=r'^factor 3: the test-time views .*so factor takes 0'):
        tta_views(3)
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r'^factor 3: the batch has 4 outputs, not a multiple of 3'):
        tta_reduce(x, None, 3)
    with pytest.raises(ValueError, match=r'^factor 2: got 1 views, expected 2$'):
        tta_expand(x, 2, [lambda b: b])
    # train.py's words: its mapping names --tta for both keywords.
    with pytest.raises(ValueError, match=r'^--tta 3: .*so --tta takes 0 \(off\), 1 \(off\) or 2$'):
        tta_views(3, names=TTA_FLAGS)
    with pytest.raises(ValueError, match=r'^--tta 2: got 1 views, expected 2$'):
        tta_forward(nn.Identity(), x, 2, [lambda b: b], names=TTA_FLAGS)


def test_expand_puts_copies_next_to_each_other():
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    expanded = tta_expand(x, 2)
    assert expanded.shape == (4, 3, 2, 4)
    assert torch.equal(expanded[0], x[0]) and torch.equal(expanded[1], x[0].flip(-1))
    assert torch.equal(expanded[2], x[1]) and torch.equal(expanded[3], x[1].flip(-1))
    assert tta_expand(x, 1) is x
    views = [lambda b: b, lambda b: b + 1, lambda b: b * 2]
    three = tta_expand(x, 3, views)
    assert torch.equal(three[3:6], torch.stack([x[1], x[1] + 1, x[1] * 2]))
    with pytest.raises(ValueError, match='got 3 views, expected 2'):
        tta_expand(x, 2, views)


def test_tta_forward_images():
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=5).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = tta_forward(model, x, 2)
        want = (model(x) + model(hflip_images(x))) / 2
        plain = tta_forward(model, x, 1)
        assert torch.equal(plain, model(x))
    torch.testing.assert_close(got, want)
    assert got.shape == (3, 5)


def naflex_batch(images, patch: int, flatten: bool = True, channels_last: bool = True, seq_len: int = 12):
    patchify = Patchify(patch, flatten_patches=flatten, channels_last=channels_last)
    input, _ = NaFlexCollator(seq_len)([(patchify(img), 0) for img in images])
    return input


@pytest.mark.parametrize('channels_last', [True, False])
@pytest.mark.parametrize('flatten', [True, False])
def test_naflex_mirror_equals_patchifying_the_mirrored_image(channels_last, flatten):
    torch.manual_seed(0)
    images = [torch.randn(3, 16, 24), torch.randn(3, 8, 32), torch.randn(3, 24, 8), torch.randn(3, 8, 8)]
    input = naflex_batch(images, 8, flatten, channels_last)
    want = naflex_batch([img.flip(-1) for img in images], 8, flatten, channels_last)
    got = hflip_naflex(input, channels_last=channels_last)
    for key in ('patches', 'patch_coord', 'patch_valid'):
        assert torch.equal(got[key], want[key]), key
    assert got['seq_len'] == input['seq_len']
    assert not torch.equal(input['patches'], got['patches'])     # the input is left alone
    if flatten:
        torch.testing.assert_close(hflip_naflex(input, patch_size=(8, 8), channels_last=channels_last)['patches'],
                                   want['patches'])


def test_naflex_patch_size_errors():
    input = naflex_batch([torch.randn(3, 8, 8)], 8)
    with pytest.raises(ValueError, match='do not fit patch_size 4x4'):
        hflip_naflex(input, patch_size=4)
    odd = dict(input, patches=torch.zeros(1, 12, 10))
    with pytest.raises(ValueError, match='not square 3-channel patches'):
        hflip_naflex(odd)


def test_tta_forward_naflex():
    torch.manual_seed(0)
    model = timm.create_model('naflexvit_base_patch16_gap', num_classes=5, embed_dim=32, depth=1, num_heads=2,
                              patch_size=8, img_size=32).eval()
    images = [torch.randn(3, 16, 24), torch.randn(3, 8, 32), torch.randn(3, 24, 8)]
    input = naflex_batch(images, 8)
    mirrored = naflex_batch([img.flip(-1) for img in images], 8)
    with torch.no_grad():
        got = tta_forward(model, input, 2)
        want = (model(input) + model(mirrored)) / 2
        expanded = tta_expand(input, 2, tta_views(2))
    torch.testing.assert_close(got, want)
    assert expanded['patches'].shape[0] == 6 and expanded['seq_len'] == input['seq_len']
    assert torch.equal(expanded['patch_valid'][1], mirrored['patch_valid'][0])


def test_tta_forward_with_a_converted_model_in_eval_mode():
    # The eval model of a group-softmax run is the converted model in eval mode: plain logits.
    from timm_gsl import convert_model
    torch.manual_seed(0)
    model = convert_model(timm.create_model('test_resnet', num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = tta_forward(model, x, 2)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)


class _TupleModel(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :4], None


def test_tta_forward_takes_the_first_of_a_tuple():
    x = torch.randn(2, 1, 2, 2)
    out = tta_forward(_TupleModel(), x, 2)
    torch.testing.assert_close(out, (x.flatten(1) + x.flip(-1).flatten(1)) / 2)
