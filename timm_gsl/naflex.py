"""NaFlex training: timm's variable-resolution, variable-sequence-length loaders for NaFlexViT models.

timm's ``train.py --naflex-loader`` replaces the image loaders by :func:`timm.data.create_naflex_loader`:

* training: a ``NaFlexMapDatasetWrapper`` that yields whole batches. Each batch draws one sequence
  length from ``--naflex-train-seq-lens``, resizes every image (random-resized-crop style, aspect
  ratio kept) so that it fits that many patches of the model's patch size (or of a size drawn from
  ``--naflex-patch-sizes`` / ``--naflex-patch-size-probs``), patchifies it and pads the batch to the
  sequence length. The batch size follows the sequence length: ``batch_size * max(train_seq_lens)``
  patches per batch, the batch size floored to a multiple of 8 (at least 1), so the longest
  sequences come in batches of about ``--batch-size`` and shorter ones in larger batches. Mixup/CutMix, when on, runs inside the
  wrapper (:class:`timm.data.NaFlexMixup`, on the variable-size images before patchifying), so the
  loader already yields soft targets and the training step must not mix again;
* evaluation: every image resized to at most ``--naflex-max-seq-len`` patches of the model's patch
  size, batches of ``--validation-batch-size`` padded to that length.

A batch is ``(input, target)`` with ``input`` a dict: ``patches`` (B x N x P*P*C, or
B x N x Ph x Pw x C with variable patch sizes), ``patch_coord`` (B x N x 2 int64, (y, x) of each
patch), ``patch_valid`` (B x N bool, False on padding) and ``seq_len`` (an int). NaFlexViT's
``forward`` takes that dict as is; its attention and pooling ignore the padding.

Under ``--naflex-loss-scale`` timm multiplies each batch's loss by ``batch / --batch-size``
('linear') or its square root ('sqrt'), so a batch of many short sequences weighs more than one of
few long ones, and when distributed also by ``world_size * batch / global batch`` (each process has
its own batch size while DDP averages gradients over processes).

Everything here takes plain keyword arguments (the values of the command-line flags), not an
argparse namespace. The group softmax head (:func:`timm_gsl.convert_model`) needs no change for
NaFlexViT: its classifier receives the masked-pooled, normed B x D features.

Messages name an option by its keyword (``patch_sizes``). The functions that raise take ``names``, a
mapping of keywords to how the caller's users know the options: the command lines pass their flags
(``timm_gsl.cli.flags.NAFLEX_FLAGS``), so their messages read ``--naflex-patch-sizes``.
"""
from __future__ import annotations

import math
import os
from functools import partial
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .naming import Names, option_name

__all__ = [
    'NAFLEX_LOSS_SCALES',
    'NAFLEX_BATCH_DIVISOR',
    'is_naflex_model',
    'is_naflex_model_name',
    'check_naflex_options',
    'check_naflex_model',
    'create_naflex_mixup',
    'create_naflex_train_loader',
    'create_naflex_eval_loader',
    'set_naflex_epoch',
    'is_naflex_batch',
    'batch_size_of',
    'prepare_naflex_input',
    'naflex_loss_scale',
    'naflex_distributed_scale',
]

NAFLEX_LOSS_SCALES = ('none', 'sqrt', 'linear')
# NaFlexMapDatasetWrapper floors every batch size to a multiple of this (its ``batch_divisor``).
NAFLEX_BATCH_DIVISOR = 8

_NAFLEX_MODULES = ('naflexvit',)
# Families timm builds as NaFlexVit on request: module -> environment variable and its "on" test.
_USE_NAFLEX_ENV = {
    'vision_transformer': ('TIMM_USE_NAFLEXVIT', lambda v: v.lower() == 'true'),
    'eva': ('TIMM_USE_NAFLEX', lambda v: v == '1'),
}

IntOrPair = Union[int, Tuple[int, int]]


def _fmt(values: Any) -> str:
    if values is None:
        return 'None'
    if isinstance(values, (list, tuple)):
        return ' '.join(str(v) for v in values)
    return str(values)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / DataParallel keep the model in .module, torch.compile in ._orig_mod.
    for _ in range(4):
        inner = getattr(model, 'module', None) or getattr(model, '_orig_mod', None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _pair(size: IntOrPair) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def is_naflex_model(model: nn.Module) -> bool:
    """Whether ``model`` (unwrapped from DDP/compile) is a timm NaFlexViT, i.e. takes NaFlex dict batches."""
    from timm.models.naflexvit import NaFlexVit
    return isinstance(_unwrap(model), NaFlexVit)


def is_naflex_model_name(model_name: str, model_kwargs: Optional[Mapping[str, Any]] = None) -> Optional[bool]:
    """Whether timm builds ``model_name`` as a NaFlexViT, without building it.

    Args:
        model_name: a timm model name, with or without a pretrained tag.
        model_kwargs: the ``--model-kwargs``; ``use_naflex=True`` turns a classic ViT or EVA into a
            NaFlexViT (so do timm's ``TIMM_USE_NAFLEXVIT=true`` / ``TIMM_USE_NAFLEX=1`` environment
            variables).

    Returns:
        True or False, or None when the name cannot be judged without building the model
        (``hf-hub:``/``local-dir:`` names, unknown names).
    """
    from timm.models import get_arch_name, is_model, is_model_in_modules
    if not model_name or ':' in model_name:
        return None
    if not is_model(get_arch_name(model_name)):
        return None
    if is_model_in_modules(model_name, _NAFLEX_MODULES):
        return True
    for module, (env, is_on) in _USE_NAFLEX_ENV.items():
        if is_model_in_modules(model_name, module):
            use_naflex = (model_kwargs or {}).get('use_naflex')
            if use_naflex is None:
                use_naflex = is_on(os.environ.get(env, ''))
            return bool(use_naflex)
    return False


def check_naflex_options(
        *,
        naflex_loader: bool,
        model_name: str = '',
        model_kwargs: Optional[Mapping[str, Any]] = None,
        batch_size: Optional[int] = None,
        train_seq_lens: Sequence[int] = (128, 256, 576, 784, 1024),
        max_seq_len: int = 576,
        patch_sizes: Optional[Sequence[int]] = None,
        patch_size_probs: Optional[Sequence[float]] = None,
        loss_scale: str = 'linear',
        aug_splits: int = 0,
        aug_repeats: float = 0,
        cutmix_minmax: Optional[Sequence[float]] = None,
        mixup_mode: str = 'batch',
        names: Names = None,
) -> None:
    """Check the NaFlex options cheaply (no model, no data), before anything is built.

    Does nothing when ``naflex_loader`` is False; that the other ``--naflex-*`` flags need
    ``--naflex-loader`` is for the command line to check (it knows which flags were given).

    Args:
        naflex_loader: ``--naflex-loader``.
        model_name: ``--model``; must be a NaFlexViT (judged by name where possible).
        model_kwargs: ``--model-kwargs`` (``use_naflex=True`` makes a classic ViT a NaFlexViT).
        batch_size: ``--batch-size``: samples per batch at the longest training sequence length.
        train_seq_lens: ``--naflex-train-seq-lens``.
        max_seq_len: ``--naflex-max-seq-len``.
        patch_sizes: ``--naflex-patch-sizes`` (None: the model's patch size).
        patch_size_probs: ``--naflex-patch-size-probs`` (None: uniform).
        loss_scale: ``--naflex-loss-scale``.
        aug_splits: ``--aug-splits`` (the NaFlex loader has none).
        aug_repeats: ``--aug-repeats`` (the NaFlex loader has none).
        cutmix_minmax: ``--cutmix-minmax`` (NaFlex Mixup/CutMix has no min/max ratio).
        mixup_mode: ``--mixup-mode`` (NaFlex Mixup/CutMix always mixes pairs of images).
        names: keyword -> how the messages name it (train.py passes its flags); default: the keyword.

    Raises:
        ValueError: one line naming the option, the value and what is allowed.
    """
    if not naflex_loader:
        return
    n = partial(option_name, names=names)
    if is_naflex_model_name(model_name, model_kwargs) is False:
        raise ValueError(f'{n("naflex_loader")} needs a NaFlex model (timm\'s naflexvit family, or a ViT with '
                         f'{n("model_kwargs")} use_naflex=True), got {n("model_name")} {model_name}')
    if batch_size is not None and batch_size < NAFLEX_BATCH_DIVISOR:
        raise ValueError(f'{n("batch_size")} {batch_size}: the NaFlex loader floors batch sizes to multiples of '
                         f'{NAFLEX_BATCH_DIVISOR}, so {n("naflex_loader")} needs {n("batch_size")} >= '
                         f'{NAFLEX_BATCH_DIVISOR}')
    seq_lens = list(train_seq_lens or ())
    if not seq_lens or not all(_is_positive_int(s) for s in seq_lens):
        raise ValueError(f'{n("train_seq_lens")} {_fmt(train_seq_lens)}: expected one or more positive '
                         f'integers (patches per image)')
    _check_max_seq_len(max_seq_len, n)
    _check_patch_sizes(patch_sizes, patch_size_probs, n)
    if loss_scale not in NAFLEX_LOSS_SCALES:
        raise ValueError(f'{n("loss_scale")} {loss_scale!r}: expected one of {", ".join(NAFLEX_LOSS_SCALES)}')
    if aug_splits and aug_splits > 1:
        raise ValueError(f'{n("aug_splits")} {aug_splits}: the NaFlex loader has no augmentation splits; '
                         f'expected 0 with {n("naflex_loader")}')
    if aug_repeats:
        raise ValueError(f'{n("aug_repeats")} {aug_repeats}: the NaFlex loader does not repeat augmentations; '
                         f'expected 0 with {n("naflex_loader")}')
    _check_naflex_mixup(cutmix_minmax, mixup_mode, n)


def _check_max_seq_len(max_seq_len: int, n: Callable[[str], str]) -> None:
    if not _is_positive_int(max_seq_len):
        raise ValueError(f'{n("max_seq_len")} {max_seq_len}: expected a positive integer (patches per image)')


def _check_patch_sizes(patch_sizes: Optional[Sequence[int]], patch_size_probs: Optional[Sequence[float]],
                       n: Callable[[str], str]) -> None:
    if patch_sizes is not None and (not list(patch_sizes) or not all(_is_positive_int(p) for p in patch_sizes)):
        raise ValueError(f'{n("patch_sizes")} {_fmt(patch_sizes)}: expected one or more positive integers')
    if patch_size_probs is None:
        return
    if patch_sizes is None:
        raise ValueError(f'{n("patch_size_probs")} {_fmt(patch_size_probs)}: needs {n("patch_sizes")} '
                         f'(one weight per patch size)')
    if len(patch_size_probs) != len(patch_sizes):
        raise ValueError(f'{n("patch_size_probs")} {_fmt(patch_size_probs)}: expected one weight per '
                         f'{n("patch_sizes")} {_fmt(patch_sizes)}, got {len(patch_size_probs)} for '
                         f'{len(patch_sizes)}')
    if any(not math.isfinite(p) or p < 0 for p in patch_size_probs) or sum(patch_size_probs) <= 0:
        raise ValueError(f'{n("patch_size_probs")} {_fmt(patch_size_probs)}: expected finite weights >= 0 '
                         f'with a positive sum')


def _check_naflex_mixup(cutmix_minmax: Optional[Sequence[float]], mixup_mode: str, n: Callable[[str], str]) -> None:
    if cutmix_minmax is not None:
        raise ValueError(f'{n("cutmix_minmax")} {_fmt(cutmix_minmax)}: NaFlex Mixup/CutMix has no min/max box '
                         f'ratio; use {n("cutmix")} ALPHA with {n("naflex_loader")}')
    if mixup_mode != 'batch':
        raise ValueError(f'{n("mixup_mode")} {mixup_mode!r}: NaFlex Mixup/CutMix always mixes pairs of neighbouring '
                         f'images; expected the default \'batch\' with {n("naflex_loader")}')


def check_naflex_model(
        model: nn.Module,
        *,
        model_name: str = '',
        patch_sizes: Optional[Sequence[int]] = None,
        patchify_channels_first: bool = False,
        names: Names = None,
) -> Tuple[int, int]:
    """Check a built model against the NaFlex options and return its patch size.

    Call it on the model as created (before DDP/compile, like timm, which reads the patch size
    "before mutating the model").

    Args:
        model: the timm model.
        model_name: ``--model``, for the messages.
        patch_sizes: ``--naflex-patch-sizes``; sizes other than the model's need a model built with
            ``enable_patch_interpolator=True``.
        patchify_channels_first: ``--naflex-patchify-channels-first``; must match the model's
            ``patchify_channels_last`` setting.
        names: keyword -> how the messages name it (train.py passes its flags); default: the keyword.
            Besides this function's keywords the messages name ``naflex_loader`` and ``model_kwargs``.

    Returns:
        The model's patch size ``(h, w)`` (timm's ``model.embeds.patch_size``): the single patch size
        of the training loader and the patch size of the evaluation loader.

    Raises:
        ValueError: one line naming the option, the value and what is allowed.
    """
    n = partial(option_name, names=names)
    inner = _unwrap(model)
    name = model_name or type(inner).__name__
    if not is_naflex_model(inner):
        raise ValueError(f'{n("naflex_loader")} needs a NaFlex model (timm\'s naflexvit family), got '
                         f'{n("model_name")} {name} ({type(inner).__name__})')
    embeds = inner.embeds
    if not getattr(embeds, 'is_linear', True):
        raise ValueError(f'{n("naflex_loader")} needs a NaFlexViT with a linear patch embedding '
                         f'(proj_type=\'linear\'), got {n("model_name")} {name} with a convolutional one')
    patch_size = _pair(embeds.patch_size)
    channels_last = bool(getattr(embeds, 'channels_last', True))
    if channels_last == bool(patchify_channels_first):
        flag = n('patchify_channels_first')
        given = flag if patchify_channels_first else f'no {flag}'
        layout = 'channels-last (P-P-C)' if channels_last else 'channels-first (C-P-P)'
        raise ValueError(f'{given}: {n("model_name")} {name} embeds patches laid out {layout}, so train it '
                         f'{"without" if channels_last else "with"} {flag}')
    if patch_sizes and any(_pair(p) != patch_size for p in patch_sizes) and \
            getattr(embeds, 'patch_interpolator', None) is None:
        raise ValueError(f'{n("patch_sizes")} {_fmt(patch_sizes)}: {n("model_name")} {name} embeds only '
                         f'{patch_size[0]}x{patch_size[1]} patches; other sizes need '
                         f'{n("model_kwargs")} enable_patch_interpolator=True')
    return patch_size


def create_naflex_mixup(
        *,
        num_classes: int,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        cutmix_minmax: Optional[Sequence[float]] = None,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: str = 'batch',
        smoothing: float = 0.1,
        mixup_off_epoch: int = 0,
        names: Names = None,
) -> Optional[Any]:
    """The Mixup/CutMix of the NaFlex training loader, as timm's ``train.py`` builds it.

    Returns None when ``--mixup`` and ``--cutmix`` are both 0 (Mixup off). Otherwise a
    :class:`timm.data.NaFlexMixup`, to pass as ``mixup_fn`` to :func:`create_naflex_train_loader`; the
    loader then yields B x C soft targets (smoothed by ``smoothing``) and the training step must not
    apply a Mixup of its own. ``--mixup-off-epoch`` takes effect through :func:`set_naflex_epoch`.
    ``names`` maps keywords to how the messages name them (train.py passes its flags); default: the
    keyword (the messages also name ``naflex_loader``).

    Raises:
        ValueError: ``--cutmix-minmax`` given or ``--mixup-mode`` other than 'batch' (the NaFlex
            mixer supports neither; timm's ``train.py`` drops them silently).
    """
    if not (mixup > 0 or cutmix > 0 or cutmix_minmax is not None):
        return None
    _check_naflex_mixup(cutmix_minmax, mixup_mode, partial(option_name, names=names))
    from timm.data import NaFlexMixup
    return NaFlexMixup(
        num_classes=num_classes,
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        switch_prob=mixup_switch_prob,
        prob=mixup_prob,
        label_smoothing=smoothing,
        mixup_off_epoch=mixup_off_epoch,
    )


def _common_kwargs(
        data_config: Mapping[str, Any],
        patchify_channels_first: bool,
        distributed: bool,
        use_prefetcher: bool,
        pin_memory: bool,
        img_dtype: Optional[torch.dtype],
        device: Union[str, torch.device],
) -> Dict[str, Any]:
    # timm's common_loader_kwargs, plus the channel count and patch layout.
    return dict(
        mean=tuple(data_config['mean']),
        std=tuple(data_config['std']),
        channels=int(data_config.get('input_size', (3,))[0]),
        pin_memory=pin_memory,
        img_dtype=img_dtype or torch.float32,
        device=torch.device(device),
        distributed=distributed,
        use_prefetcher=use_prefetcher,
        patchify_channels_last=not patchify_channels_first,
    )


def create_naflex_train_loader(
        dataset: Any,
        *,
        data_config: Mapping[str, Any],
        batch_size: int,
        model_patch_size: IntOrPair,
        train_seq_lens: Sequence[int] = (128, 256, 576, 784, 1024),
        patch_sizes: Optional[Sequence[int]] = None,
        patch_size_probs: Optional[Sequence[float]] = None,
        patchify_channels_first: bool = False,
        mixup_fn: Optional[Any] = None,
        no_aug: bool = False,
        reprob: float = 0.0, remode: str = 'pixel', recount: int = 1, resplit: bool = False,
        train_crop_mode: Optional[str] = None,
        scale: Optional[Sequence[float]] = (0.08, 1.0),
        ratio: Optional[Sequence[float]] = (3. / 4., 4. / 3.),
        hflip: float = 0.5, vflip: float = 0.0,
        color_jitter: float = 0.4, color_jitter_prob: Optional[float] = None,
        grayscale_prob: float = 0.0, gaussian_blur_prob: float = 0.0,
        auto_augment: Optional[str] = None,
        train_interpolation: Optional[str] = 'random',
        workers: int = 4,
        worker_seeding: str = 'all',
        distributed: bool = False, rank: int = 0, world_size: int = 1,
        seed: int = 42,
        epoch: int = 0,
        use_prefetcher: bool = True,
        pin_memory: bool = False,
        img_dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device] = 'cuda',
        names: Names = None,
) -> Any:
    """The NaFlex training loader, built as timm's ``train.py --naflex-loader`` builds it.

    Args:
        dataset: a map-style dataset of ``(PIL image, label)`` with no transform of its own (the
            loader makes one transform per sequence length and patch size).
        data_config: the resolved data config (``mean``, ``std``, ``interpolation``, ``input_size``).
        batch_size: ``--batch-size``: samples per batch at the longest sequence length; every batch
            holds about ``batch_size * max(train_seq_lens)`` patches.
        model_patch_size: the model's patch size (:func:`check_naflex_model`); used unless
            ``patch_sizes`` is given.
        train_seq_lens: ``--naflex-train-seq-lens``.
        patch_sizes: ``--naflex-patch-sizes`` (variable patch size training; patches then come as
            B x N x Ph x Pw x C).
        patch_size_probs: ``--naflex-patch-size-probs``.
        patchify_channels_first: ``--naflex-patchify-channels-first``.
        mixup_fn: :func:`create_naflex_mixup`'s result (None: no Mixup/CutMix).
        no_aug, reprob, remode, recount, resplit, train_crop_mode, scale, ratio, hflip, vflip,
        color_jitter, color_jitter_prob, grayscale_prob, gaussian_blur_prob, auto_augment: the
            augmentation flags of the same names (``--aa`` is ``auto_augment``).
        train_interpolation: ``--train-interpolation``; the data config's interpolation when empty
            or with ``no_aug`` (as timm).
        workers: ``--workers``.
        worker_seeding: ``--worker-seeding``.
        distributed, rank, world_size: the process group; each rank gets the same number of batches.
        seed: seeds the batch schedule and the shuffling (timm's ``train.py`` leaves timm's default 42).
        epoch: the starting epoch of the shuffling; call :func:`set_naflex_epoch` every epoch.
        use_prefetcher: ``not --no-prefetcher``: normalise (and random-erase) on ``device``.
        pin_memory: ``--pin-mem``.
        img_dtype: ``--model-dtype`` (patches are cast to it by the prefetcher).
        device: the training device.
        names: keyword -> how the messages name it (train.py passes its flags); default: the keyword.

    Returns:
        A loader of ``(input dict, target)`` batches (a ``NaFlexPrefetchLoader`` with the prefetcher,
        else a ``DataLoader``); ``len()`` is the number of batches per epoch.

    Raises:
        ValueError: the dataset has a transform of its own, or an option is invalid.
    """
    from timm.data import create_naflex_loader
    _check_untransformed(dataset, partial(option_name, names=names))
    check_naflex_options(naflex_loader=True, batch_size=batch_size, train_seq_lens=train_seq_lens,
                         patch_sizes=patch_sizes, patch_size_probs=patch_size_probs, names=names)
    augmentation = _train_augmentation_kwargs(
        data_config, no_aug=no_aug, reprob=reprob, remode=remode, recount=recount, resplit=resplit,
        train_crop_mode=train_crop_mode, scale=scale, ratio=ratio, hflip=hflip, vflip=vflip,
        color_jitter=color_jitter, color_jitter_prob=color_jitter_prob, grayscale_prob=grayscale_prob,
        gaussian_blur_prob=gaussian_blur_prob, auto_augment=auto_augment, train_interpolation=train_interpolation)
    return create_naflex_loader(
        dataset=dataset, train_seq_lens=tuple(train_seq_lens), mixup_fn=mixup_fn,
        rank=rank, world_size=world_size, seed=seed, epoch=epoch,
        **_patch_size_kwargs(model_patch_size, patch_sizes, patch_size_probs),
        **_common_kwargs(data_config, patchify_channels_first, distributed, use_prefetcher, pin_memory,
                         img_dtype, device),
        batch_size=batch_size, is_training=True, **augmentation,
        num_workers=workers, worker_seeding=worker_seeding,
    )


def _check_untransformed(dataset: Any, n: Callable[[str], str]) -> None:
    """The training dataset must yield PIL images: the NaFlex loader makes the transforms."""
    if getattr(dataset, 'transform', None) is not None:
        raise ValueError(f'{n("naflex_loader")}: the training dataset ({type(dataset).__name__}) already has a '
                         f'transform; the NaFlex loader makes its own per sequence length, so the dataset must '
                         f'yield PIL images (transform=None)')


def _patch_size_kwargs(
        model_patch_size: IntOrPair,
        patch_sizes: Optional[Sequence[int]],
        patch_size_probs: Optional[Sequence[float]],
) -> Dict[str, Any]:
    """timm's patch size keywords: the model's one patch size, or the sizes to draw from and their weights."""
    if not patch_sizes:
        return dict(patch_size=_pair(model_patch_size))
    kwargs: Dict[str, Any] = dict(patch_size_choices=list(patch_sizes))
    if patch_size_probs:
        kwargs['patch_size_choice_probs'] = list(patch_size_probs)
    return kwargs


def _train_augmentation_kwargs(
        data_config: Mapping[str, Any],
        *,
        no_aug: bool, reprob: float, remode: str, recount: int, resplit: bool,
        train_crop_mode: Optional[str],
        scale: Optional[Sequence[float]],
        ratio: Optional[Sequence[float]],
        hflip: float, vflip: float,
        color_jitter: float, color_jitter_prob: Optional[float],
        grayscale_prob: float, gaussian_blur_prob: float,
        auto_augment: Optional[str],
        train_interpolation: Optional[str],
) -> Dict[str, Any]:
    """timm's augmentation keywords from train.py's flag names: random erasing as ``re_*``, the
    interpolation (the data config's when ``train_interpolation`` is empty or with ``no_aug``), and
    neither repeated augmentation nor augmentation splits."""
    interpolation = train_interpolation
    if no_aug or not interpolation:
        interpolation = data_config['interpolation']
    return dict(
        no_aug=no_aug, re_prob=reprob, re_mode=remode, re_count=recount, re_split=resplit,
        train_crop_mode=train_crop_mode,
        scale=tuple(scale) if scale is not None else None,
        ratio=tuple(ratio) if ratio is not None else None,
        hflip=hflip, vflip=vflip, color_jitter=color_jitter, color_jitter_prob=color_jitter_prob,
        grayscale_prob=grayscale_prob, gaussian_blur_prob=gaussian_blur_prob, auto_augment=auto_augment,
        num_aug_repeats=0, num_aug_splits=0, interpolation=interpolation,
    )


def create_naflex_eval_loader(
        dataset: Any,
        *,
        data_config: Mapping[str, Any],
        batch_size: int,
        model_patch_size: IntOrPair,
        max_seq_len: int = 576,
        patchify_channels_first: bool = False,
        workers: int = 4,
        distributed: bool = False,
        use_prefetcher: bool = True,
        pin_memory: bool = False,
        img_dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device] = 'cuda',
        names: Names = None,
) -> Any:
    """The NaFlex evaluation loader, built as timm's ``train.py --naflex-loader`` builds it.

    Every image is resized (aspect ratio kept) to at most ``max_seq_len`` patches of the model's
    patch size; batches are padded to ``max_seq_len`` patches. Sets ``dataset.transform``, as
    :func:`timm.data.create_loader` does; distributed, each rank gets an ordered slice
    (``OrderedDistributedSampler``, which pads with repeated samples).

    Args:
        dataset: a map-style dataset of ``(PIL image, label)`` with a settable ``transform``.
        data_config: the resolved data config (``mean``, ``std``, ``interpolation``, ``crop_pct``).
        batch_size: ``--validation-batch-size`` or ``--batch-size``.
        model_patch_size: the model's patch size (:func:`check_naflex_model`).
        max_seq_len: ``--naflex-max-seq-len``.
        patchify_channels_first: ``--naflex-patchify-channels-first``.
        workers: ``--workers`` (timm uses at most 2 for distributed tfds/wds datasets).
        distributed: whether to shard over the process group.
        use_prefetcher: ``not --no-prefetcher``.
        pin_memory: ``--pin-mem``.
        img_dtype: ``--model-dtype``.
        device: the evaluation device.
        names: keyword -> how the messages name it (train.py passes its flags); default: the keyword.

    Returns:
        A loader of ``(input dict, target)`` batches.
    """
    from timm.data import create_naflex_loader
    _check_max_seq_len(max_seq_len, partial(option_name, names=names))
    return create_naflex_loader(
        dataset=dataset,
        patch_size=_pair(model_patch_size),
        max_seq_len=max_seq_len,
        **_common_kwargs(data_config, patchify_channels_first, distributed, use_prefetcher, pin_memory,
                         img_dtype, device),
        batch_size=batch_size,
        is_training=False,
        interpolation=data_config['interpolation'],
        num_workers=workers,
        crop_pct=data_config.get('crop_pct'),
    )


def set_naflex_epoch(loader: Any, epoch: int) -> bool:
    """Start epoch ``epoch`` of a NaFlex training loader: reshuffles its batches, and turns Mixup off
    from ``--mixup-off-epoch`` on. Call it before each epoch (also epoch 0 after a resume).

    Returns:
        True when the loader has an epoch to set (a NaFlex training loader), else False.
    """
    dataset = getattr(loader, 'dataset', None)
    if hasattr(dataset, 'set_epoch'):
        dataset.set_epoch(epoch)
        return True
    return False


def is_naflex_batch(input: Any) -> bool:
    """Whether a loader batch's input is a NaFlex dict (``patches``, ``patch_coord``, ``patch_valid``)."""
    return isinstance(input, Mapping) and 'patches' in input


def batch_size_of(input: Union[torch.Tensor, Mapping[str, Any]]) -> int:
    """Samples in a batch input: ``input.size(0)`` for images, ``len(patches)`` for a NaFlex dict."""
    if is_naflex_batch(input):
        return int(input['patches'].shape[0])
    return int(input.size(0))


def prepare_naflex_input(
        input: Mapping[str, Any],
        target: torch.Tensor,
        device: Union[str, torch.device],
        dtype: Optional[torch.dtype] = None,
) -> Tuple[Dict[str, Any], torch.Tensor]:
    """Move a NaFlex batch to ``device``: the NaFlex counterpart of moving an image batch.

    Every tensor of the dict goes to ``device``; only the floating-point ``patches`` are cast to
    ``dtype`` (``patch_coord`` stays int64, ``patch_valid`` bool); other entries (``seq_len``) are
    kept. A no-op for batches the NaFlex prefetcher already moved. The loader's dict is not modified.

    Args:
        input: the batch input dict.
        target: B class indices or B x C soft targets.
        device: where the model is.
        dtype: ``--model-dtype`` (None: keep the patches' dtype).

    Returns:
        ``(input, target)`` on ``device``.

    Raises:
        TypeError: ``input`` is not a NaFlex dict.
    """
    if not is_naflex_batch(input):
        raise TypeError(f'prepare_naflex_input expects a NaFlex batch dict with \'patches\', got '
                        f'{type(input).__name__}')
    device = torch.device(device)
    out: Dict[str, Any] = {}
    for key, value in input.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, non_blocking=True)
            if key == 'patches' and dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out, target.to(device=device, non_blocking=True)


def naflex_loss_scale(batch_size: int, base_batch_size: int, mode: str = 'linear', *, names: Names = None) -> float:
    """The factor timm's ``train.py`` multiplies a NaFlex batch's loss by (``--naflex-loss-scale``).

    Batches of short sequences hold more samples; 'linear' weighs a batch by its size relative to
    ``--batch-size`` (the batch size at the longest sequence length), 'sqrt' by the square root of
    that, 'none' not at all.

    Args:
        batch_size: samples in this batch (:func:`batch_size_of`).
        base_batch_size: ``--batch-size``.
        mode: 'none', 'sqrt' or 'linear'.
        names: keyword -> how the messages name it; default: the keyword (``mode``, ``base_batch_size``).

    Returns:
        The factor (1.0 for 'none').

    Note:
        The copies of timm's ``train.py`` seen while writing this compare the ratio, not the mode,
        with 'sqrt' (``if local_scale == 'sqrt'``), so there 'sqrt' scales linearly; here 'sqrt'
        takes the square root, as the flag says.
    """
    n = partial(option_name, names=names)
    if mode not in NAFLEX_LOSS_SCALES:
        raise ValueError(f'{n("mode")} {mode!r}: expected one of {", ".join(NAFLEX_LOSS_SCALES)}')
    if mode == 'none':
        return 1.0
    if base_batch_size <= 0:
        raise ValueError(f'{n("base_batch_size")} {base_batch_size}: expected a positive integer')
    ratio = batch_size / base_batch_size
    return math.sqrt(ratio) if mode == 'sqrt' else ratio


def naflex_distributed_scale(
        batch_size: int,
        world_size: int,
        device: Union[str, torch.device],
) -> Tuple[float, int]:
    """The factor that makes DDP's gradient mean over processes a mean over samples.

    Each process has its own NaFlex batch size while DDP averages gradients over processes; timm
    multiplies each process's loss by ``world_size * batch_size / global_batch_size``. Runs one
    all-reduce (every process must call it, every step, even the ones without a backward sync).

    Args:
        batch_size: this process's batch size.
        world_size: processes in the default group (1: no all-reduce, factor 1).
        device: where the all-reduce tensor lives (the backend's device).

    Returns:
        ``(factor, global_batch_size)``; the latter is the sum of all processes' batch sizes.
    """
    if world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1.0, int(batch_size)
    total = torch.tensor(float(batch_size), device=torch.device(device), dtype=torch.float32)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    global_batch_size = int(round(total.item()))
    return world_size * batch_size / global_batch_size, global_batch_size
