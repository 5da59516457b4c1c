"""Tests for ``timm_gsl.naflex``: timm's NaFlex loaders with the group softmax head and loss.

A tiny NaFlexViT (one block, 32 channels, 8 x 8 patches) trains on an in-memory dataset of PIL
images of different sizes and aspect ratios, through the loaders :mod:`timm_gsl.naflex` builds, with
``GroupSoftmaxTask`` (loss gsl) and timm's ``ClassificationTask`` (loss ce). The reference for the
group softmax features is the model's own ``forward_features`` + ``forward_head(pre_logits=True)``.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import timm
from timm.task import ClassificationTask

from timm_gsl import GroupSoftmaxOutput, GroupSoftmaxTask, naflex
from timm_gsl.cli.flags import NAFLEX_FLAGS
from timm_gsl.naflex import (
    batch_size_of,
    check_naflex_model,
    check_naflex_options,
    create_naflex_eval_loader,
    create_naflex_mixup,
    create_naflex_train_loader,
    is_naflex_batch,
    is_naflex_model_name,
    naflex_distributed_scale,
    naflex_loss_scale,
    prepare_naflex_input,
    set_naflex_epoch,
)

NUM_CLASSES = 4
PATCH = 8
TINY = dict(embed_dim=32, depth=1, num_heads=2, patch_size=PATCH, img_size=32)
DATA_CONFIG = dict(input_size=(3, 32, 32), interpolation='bilinear', mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                   crop_pct=1.0, crop_mode='center')
CPU = torch.device('cpu')


class PilDataset:
    """(PIL image, label) pairs of varied sizes; a settable ``transform`` like timm's datasets."""

    def __init__(self, n: int = 24, seed: int = 0):
        rng = np.random.RandomState(seed)
        self.items: List[Tuple[Image.Image, int]] = []
        for i in range(n):
            label = i % NUM_CLASSES
            h, w = 24 + 8 * (i % 3), 48 - 8 * (i % 4)
            # Class-dependent colour so that a few steps can fit the labels.
            base = np.zeros((h, w, 3), dtype=np.float32)
            base[..., label % 3] = 160 + 60 * (label // 3)
            noise = rng.randint(0, 60, (h, w, 3))
            self.items.append((Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)), label))
        self.transform = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img, label = self.items[index]
        return (self.transform(img) if self.transform is not None else img), label


def tiny_naflexvit(name: str = 'naflexvit_base_patch16_gap', seed: int = 0, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=NUM_CLASSES, **dict(TINY, **kwargs))


def train_loader(dataset=None, **kwargs: Any):
    args: Dict[str, Any] = dict(
        data_config=DATA_CONFIG, batch_size=8, model_patch_size=(PATCH, PATCH), train_seq_lens=(8, 16),
        workers=0, use_prefetcher=True, device=CPU, seed=1)
    args.update(kwargs)
    return create_naflex_train_loader(dataset if dataset is not None else PilDataset(), **args)


def pooled_features(model: nn.Module, input: Dict[str, torch.Tensor]) -> torch.Tensor:
    """What the classifier receives, from the model's own NaFlex feature and head functions."""
    feats = model.forward_features(input['patches'], patch_coord=input['patch_coord'],
                                   patch_valid=input['patch_valid'])
    return model.forward_head(**feats, pre_logits=True)


# -- the loaders ---------------------------------------------------------------------------------

@pytest.mark.parametrize('prefetcher', [True, False])
def test_train_loader_batches_follow_sequence_length(prefetcher):
    loader = train_loader(use_prefetcher=prefetcher)
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    assert sum(batch_size_of(x) for x, _ in batches) == 24
    seen_lens = set()
    for input, target in batches:
        assert is_naflex_batch(input)
        b, n, d = input['patches'].shape
        seen_lens.add(n)
        assert n == input['seq_len'] in (8, 16)
        assert d == PATCH * PATCH * 3 and input['patches'].dtype == torch.float32
        assert input['patch_coord'].shape == (b, n, 2) and input['patch_coord'].dtype == torch.int64
        assert input['patch_valid'].shape == (b, n) and input['patch_valid'].dtype == torch.bool
        assert target.shape == (b,) and target.dtype == torch.int64
        # 8 * 16 tokens per batch: 16 samples of 8 patches, 8 of 16 (the rest of the data at the end).
        assert b <= 8 * 16 // n
    assert seen_lens == {8, 16}


def test_set_epoch_reshuffles():
    loader = train_loader()
    first = [t.tolist() for _, t in loader]
    assert set_naflex_epoch(loader, 1)
    second = [t.tolist() for _, t in loader]
    assert set_naflex_epoch(loader, 0)
    assert [t.tolist() for _, t in loader] == first
    assert second != first
    assert not set_naflex_epoch([], 0)


def test_train_loader_refuses_a_dataset_with_a_transform():
    dataset = PilDataset(8)
    dataset.transform = lambda img: img
    with pytest.raises(ValueError, match='already has a transform'):
        train_loader(dataset)


def test_eval_loader_fixed_sequence_length():
    dataset = PilDataset(10)
    loader = create_naflex_eval_loader(dataset, data_config=DATA_CONFIG, batch_size=4, model_patch_size=PATCH,
                                       max_seq_len=12, workers=0, use_prefetcher=True, device=CPU)
    batches = list(loader)
    assert [batch_size_of(x) for x, _ in batches] == [4, 4, 2]
    assert torch.cat([t for _, t in batches]).tolist() == [i % NUM_CLASSES for i in range(10)]
    for input, _ in batches:
        assert input['patches'].shape[1:] == (12, PATCH * PATCH * 3)
        assert (input['patch_valid'].sum(1) <= 12).all()
    model = tiny_naflexvit().eval()
    with torch.no_grad():
        assert model(batches[0][0]).shape == (4, NUM_CLASSES)


def test_mixup_gives_soft_targets():
    mixup = create_naflex_mixup(num_classes=NUM_CLASSES, mixup=0.8, cutmix=1.0, smoothing=0.1)
    assert create_naflex_mixup(num_classes=NUM_CLASSES) is None
    for input, target in train_loader(mixup_fn=mixup):
        assert target.shape == (batch_size_of(input), NUM_CLASSES) and target.is_floating_point()
        assert torch.allclose(target.sum(1), torch.ones(len(target)))


def test_variable_patch_sizes():
    model = tiny_naflexvit(enable_patch_interpolator=True)
    assert check_naflex_model(model, patch_sizes=[8, 16]) == (8, 8)
    loader = train_loader(patch_sizes=[8, 16], patch_size_probs=[1, 1])
    shapes = set()
    for input, _ in loader:
        shapes.add(tuple(input['patches'].shape[2:]))
        assert model(input).shape == (batch_size_of(input), NUM_CLASSES)
    assert shapes <= {(8, 8, 3), (16, 16, 3)} and shapes


# -- the training step ---------------------------------------------------------------------------

def test_prepare_naflex_input():
    input, target = next(iter(train_loader()))
    moved, moved_target = prepare_naflex_input(input, target, 'cpu', torch.bfloat16)
    assert moved['patches'].dtype == torch.bfloat16
    assert moved['patch_coord'].dtype == torch.int64 and moved['patch_valid'].dtype == torch.bool
    assert moved['seq_len'] == input['seq_len']
    assert input['patches'].dtype == torch.float32          # the loader's dict is left alone
    assert torch.equal(moved_target, target)
    same, _ = prepare_naflex_input(input, target, CPU)
    assert same['patches'].dtype == torch.float32
    with pytest.raises(TypeError):
        prepare_naflex_input(torch.zeros(2, 3, 8, 8), target, CPU)


def test_loss_scale():
    assert naflex_loss_scale(32, 8, 'none') == 1.0
    assert naflex_loss_scale(32, 8, 'linear') == 4.0
    assert naflex_loss_scale(32, 8, 'sqrt') == 2.0
    assert naflex_loss_scale(8, 8, 'sqrt') == 1.0
    with pytest.raises(ValueError, match=r"^mode 'log': expected one of none, sqrt, linear$"):
        naflex_loss_scale(8, 8, 'log')
    with pytest.raises(ValueError, match=r'^base_batch_size 0: expected a positive integer$'):
        naflex_loss_scale(8, 0, 'linear')
    with pytest.raises(ValueError, match=r"^--naflex-loss-scale 'log'"):
        naflex_loss_scale(8, 8, 'log', names={'mode': '--naflex-loss-scale'})
    assert naflex_distributed_scale(5, 1, CPU) == (1.0, 5)
    assert batch_size_of(torch.zeros(3, 3, 4, 4)) == 3


def _train(task, model: nn.Module, loader, epochs: int = 2) -> List[float]:
    """The engine's step for NaFlex batches: prepare the dict, forward, scale the loss, step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    task.train()
    for epoch in range(epochs):
        set_naflex_epoch(loader, epoch)
        for input, target in loader:
            input, target = prepare_naflex_input(input, target, CPU, None)
            result = task(input, target)
            loss = result['loss']
            assert torch.isfinite(loss)
            losses.append(float(loss.detach()))
            scale = naflex_loss_scale(batch_size_of(input), 8, 'linear')
            optimizer.zero_grad()
            (loss * scale).backward()
            head = model.get_classifier()
            assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
            assert model.embeds.proj.weight.grad.abs().sum() > 0
            optimizer.step()
    return losses


@pytest.mark.parametrize('loss', ['gsl', 'ce'])
def test_training_steps(loss):
    model = tiny_naflexvit()
    check_naflex_model(model, model_name='naflexvit_base_patch16_gap')
    if loss == 'gsl':
        task = GroupSoftmaxTask(model, criterion_kwargs=dict(gsl_groups=4), verbose=False)
    else:
        task = ClassificationTask(model, criterion=nn.CrossEntropyLoss(), verbose=False)
    loader = train_loader()
    losses = _train(task, model, loader, epochs=2)
    assert len(losses) == 2 * len(loader)
    # Overfit one batch: the loss goes down.
    input, target = next(iter(loader))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        loss_value = task(input, target)['loss']
        first = float(loss_value.detach()) if first is None else first
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
    assert float(task(input, target)['loss'].detach()) < first
    model.eval()
    with torch.no_grad():
        assert isinstance(task.get_eval_model()(input), torch.Tensor)


def test_gsl_training_with_mixup_soft_targets():
    model = tiny_naflexvit()
    task = GroupSoftmaxTask(model, criterion_kwargs=dict(gsl_groups=4, soft_targets=True), verbose=False)
    loader = train_loader(mixup_fn=create_naflex_mixup(num_classes=NUM_CLASSES, mixup=0.8, cutmix=1.0))
    assert len(_train(task, model, loader, epochs=1)) == len(loader)


@pytest.mark.parametrize('name', ['naflexvit_base_patch16_gap', 'naflexvit_base_patch16_map'])
def test_gsl_features_are_the_masked_pooled_features(name):
    model = tiny_naflexvit(name)
    GroupSoftmaxTask(model, criterion_kwargs=dict(gsl_groups=4), verbose=False)
    model.train()
    padded = 0
    for input, _ in train_loader():
        padded += int((~input['patch_valid']).sum())
        out = model(input)
        assert isinstance(out, GroupSoftmaxOutput)
        with torch.no_grad():
            expect = pooled_features(model, input)
            torch.testing.assert_close(out.features, expect)
            torch.testing.assert_close(out.logits, out.features @ out.weight.T + out.bias)
            # Padding is masked: changing padded patches changes nothing.
            noisy = dict(input, patches=input['patches'].masked_fill(~input['patch_valid'][..., None], 50.0))
            torch.testing.assert_close(model(noisy).features, out.features)
    assert padded > 0
    model.eval()
    with torch.no_grad():
        logits = model(input)
    assert isinstance(logits, torch.Tensor)
    torch.testing.assert_close(logits, model.get_classifier()(pooled_features(model, input)))


# -- option checks -------------------------------------------------------------------------------

def test_model_name_checks():
    assert is_naflex_model_name('naflexvit_base_patch16_gap')
    assert is_naflex_model_name('naflexvit_base_patch16_gap.e300_s576_in1k')
    assert is_naflex_model_name('vit_base_patch16_224', {'use_naflex': True})
    assert is_naflex_model_name('resnet18') is False
    assert is_naflex_model_name('hf-hub:timm/anything') is None
    with pytest.raises(ValueError, match=r'^--naflex-loader needs a NaFlex model .*got --model resnet18$'):
        check_naflex_options(naflex_loader=True, model_name='resnet18', names=NAFLEX_FLAGS)
    check_naflex_options(naflex_loader=False, model_name='resnet18', train_seq_lens=[-1])   # off: no checks


OPTION_ERRORS = [
    (dict(train_seq_lens=[128, 0]), r'--naflex-train-seq-lens 128 0: expected one or more positive'),
    (dict(train_seq_lens=[]), r'--naflex-train-seq-lens : expected'),
    (dict(max_seq_len=0), r'--naflex-max-seq-len 0: expected a positive integer'),
    (dict(patch_sizes=[16, -8]), r'--naflex-patch-sizes 16 -8: expected'),
    (dict(patch_size_probs=[1.0]), r'--naflex-patch-size-probs 1.0: needs --naflex-patch-sizes'),
    (dict(patch_sizes=[16, 32], patch_size_probs=[1.0]), r'expected one weight per --naflex-patch-sizes 16 32'),
    (dict(patch_sizes=[16, 32], patch_size_probs=[1.0, -1.0]), r'expected finite weights >= 0'),
    (dict(patch_sizes=[16, 32], patch_size_probs=[0.0, 0.0]), r'with a positive sum'),
    (dict(loss_scale='log'), r"--naflex-loss-scale 'log': expected one of none, sqrt, linear"),
    (dict(batch_size=4), r'--batch-size 4: .*needs --batch-size >= 8'),
    (dict(aug_splits=2), r'--aug-splits 2'),
    (dict(aug_repeats=3), r'--aug-repeats 3'),
    (dict(cutmix_minmax=[0.2, 0.8]), r'--cutmix-minmax 0.2 0.8'),
    (dict(mixup_mode='elem'), r"--mixup-mode 'elem'"),
]


@pytest.mark.parametrize('kwargs, match', OPTION_ERRORS)
def test_option_errors(kwargs, match):
    args = dict(naflex_loader=True, model_name='naflexvit_base_patch16_gap', names=NAFLEX_FLAGS)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match) as info:
        check_naflex_options(**args)
    assert '\n' not in str(info.value)


@pytest.mark.parametrize('kwargs', [kwargs for kwargs, _ in OPTION_ERRORS])
def test_option_errors_name_keywords_without_names(kwargs):
    with pytest.raises(ValueError) as info:
        check_naflex_options(naflex_loader=True, model_name='naflexvit_base_patch16_gap', **kwargs)
    message = str(info.value)
    assert '--' not in message and message.split()[0] in kwargs, message


def test_good_options_pass():
    check_naflex_options(naflex_loader=True, model_name='naflexvit_base_patch16_gap', batch_size=64,
                         train_seq_lens=[128, 256], max_seq_len=256, patch_sizes=[16, 32],
                         patch_size_probs=[0.5, 0.5], loss_scale='sqrt')


def test_model_errors():
    with pytest.raises(ValueError, match=r'^--naflex-loader needs a NaFlex model .*got --model resnet18 \(ResNet\)$'):
        check_naflex_model(timm.create_model('resnet18', num_classes=2), model_name='resnet18', names=NAFLEX_FLAGS)
    model = tiny_naflexvit()
    with pytest.raises(ValueError, match=r'--naflex-patch-sizes 8 16: .*enable_patch_interpolator=True'):
        check_naflex_model(model, patch_sizes=[8, 16], names=NAFLEX_FLAGS)
    assert check_naflex_model(model, patch_sizes=[8]) == (8, 8)
    with pytest.raises(ValueError, match=r'^--naflex-patchify-channels-first: .*without'):
        check_naflex_model(model, patchify_channels_first=True, names=NAFLEX_FLAGS)
    first = tiny_naflexvit(patchify_channels_last=False)
    assert check_naflex_model(first, patchify_channels_first=True) == (8, 8)
    with pytest.raises(ValueError, match=r'^no --naflex-patchify-channels-first: .* with '):
        check_naflex_model(first, names=NAFLEX_FLAGS)
    with pytest.raises(ValueError, match='--cutmix-minmax'):
        create_naflex_mixup(num_classes=2, cutmix_minmax=[0.3, 0.7], names=NAFLEX_FLAGS)


# Library checks: (call, the message without names, the message with NAFLEX_FLAGS), each the message's start.
def _transformed_dataset():
    dataset = PilDataset(2)
    dataset.transform = lambda img: img
    return dataset


LIBRARY_CHECKS = {
    'options': (lambda **kw: check_naflex_options(naflex_loader=True, patch_size_probs=[1.0], **kw),
                'patch_size_probs 1.0: needs patch_sizes ',
                '--naflex-patch-size-probs 1.0: needs --naflex-patch-sizes '),
    'model': (lambda **kw: check_naflex_model(tiny_naflexvit(), model_name='tiny', patchify_channels_first=True, **kw),
              'patchify_channels_first: model_name tiny embeds',
              '--naflex-patchify-channels-first: --model tiny embeds'),
    'cnn': (lambda **kw: check_naflex_model(timm.create_model('resnet18', num_classes=2), **kw),
            'naflex_loader needs a NaFlex model', '--naflex-loader needs a NaFlex model'),
    'mixup': (lambda **kw: create_naflex_mixup(num_classes=2, mixup=0.5, mixup_mode='elem', **kw),
              "mixup_mode 'elem': ", "--mixup-mode 'elem': "),
    'cutmix_minmax': (lambda **kw: create_naflex_mixup(num_classes=2, cutmix_minmax=[0.3, 0.7], **kw),
                      'cutmix_minmax 0.3 0.7: ', '--cutmix-minmax 0.3 0.7: '),
    'train_loader': (lambda **kw: train_loader(_transformed_dataset(), **kw),
                     'naflex_loader: the training dataset', '--naflex-loader: the training dataset'),
    'train_loader_options': (lambda **kw: train_loader(batch_size=4, **kw),
                             'batch_size 4: ', '--batch-size 4: '),
    'eval_loader': (lambda **kw: create_naflex_eval_loader(PilDataset(2), data_config=DATA_CONFIG, batch_size=2,
                                                           model_patch_size=PATCH, max_seq_len=0, device=CPU, **kw),
                    'max_seq_len 0: ', '--naflex-max-seq-len 0: '),
}


@pytest.mark.parametrize('check', sorted(LIBRARY_CHECKS))
def test_messages_name_keywords_unless_given_names(check):
    call, keyword_start, flag_start = LIBRARY_CHECKS[check]
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(keyword_start) and '--' not in str(info.value), str(info.value)
    with pytest.raises(ValueError) as info:
        call(names=NAFLEX_FLAGS)
    assert str(info.value).startswith(flag_start), str(info.value)


def test_the_flag_mapping_names_train_flags_for_library_keywords():
    from timm_gsl.cli.train_args import get_args_parser
    keywords = set()
    for name in naflex.__all__:
        function = getattr(naflex, name)
        if callable(function):
            keywords |= set(inspect.signature(function).parameters)
    assert set(NAFLEX_FLAGS) <= keywords, sorted(set(NAFLEX_FLAGS) - keywords)
    flags = {option for action in get_args_parser()._actions for option in action.option_strings}
    assert set(NAFLEX_FLAGS.values()) <= flags, sorted(set(NAFLEX_FLAGS.values()) - flags)


def test_channels_first_training_step():
    model = tiny_naflexvit(patchify_channels_last=False)
    task = GroupSoftmaxTask(model, criterion_kwargs=dict(gsl_groups=2), verbose=False)
    loader = train_loader(patchify_channels_first=True)
    model.train()
    input, target = next(iter(loader))
    out = model(input)
    torch.testing.assert_close(out.features, pooled_features(model, input))
    assert torch.isfinite(task(input, target)['loss'])
