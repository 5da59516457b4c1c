"""Test-time augmentation (``--tta N``) for evaluation.

timm's ``train.py`` defines ``--tta N`` only as a reduction inside its ``validate``: the model's
outputs for a batch are averaged over groups of N consecutive rows
(``output.unfold(0, N, N).mean(dim=2)``) and the targets are taken every N-th
(``target[0::N]``); loss and top-1/top-5 are then measured on the reduced batch, and the meters
count ``output.shape[0]`` (reduced) samples. It assumes the loader yields the N augmented copies of
each sample next to each other, but no timm loader does so (timm's ``validate.py`` has no
``--tta``), so with timm's own loaders the flag averages *different* samples.

Here the copies are made from the batch itself: :func:`tta_expand` puts N views of every sample
(the sample and its horizontal mirror by default) next to each other, the model runs once on the
expanded batch, and :func:`tta_reduce` is timm's reduction. :func:`tta_forward` does all three. The
evaluation loader stays as it is (same samples, same targets, same distributed sharding), so the
metrics count each sample once. Images (B x C x H x W) and NaFlex dicts (``patches``,
``patch_coord``, ``patch_valid``) are both supported.

Messages name the factor by its keyword (``tta`` in :func:`check_tta`, ``factor`` elsewhere); the functions
take ``names`` (:mod:`timm_gsl.naming`), through which train.py names its flag ``--tta``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..naming import Names, option_name

__all__ = [
    'MAX_BUILTIN_TTA',
    'check_tta',
    'tta_reduce',
    'tta_views',
    'tta_expand',
    'tta_forward',
    'hflip_images',
    'hflip_naflex',
]

Batch = Union[torch.Tensor, Mapping[str, Any]]
View = Callable[[Batch], Batch]

# The built-in views: the sample itself and its horizontal mirror.
MAX_BUILTIN_TTA = 2


def check_tta(tta: int, *, custom_views: bool = False, names: Names = None) -> None:
    """Check a ``--tta`` value.

    Args:
        tta: the test-time augmentation factor; 0 and 1 mean off.
        custom_views: the caller passes its own ``views`` to :func:`tta_expand`, so any N >= 2 works.
        names: keyword -> how the messages name it (train.py passes its flags); default: the keyword (``tta``).

    Raises:
        ValueError: one line naming the option, the value and what is allowed.
    """
    name = option_name('tta', names)
    if not isinstance(tta, int) or isinstance(tta, bool) or tta < 0:
        raise ValueError(f'{name} {tta}: expected an integer >= 0 (0 or 1: off, N: average N views of each sample)')
    if tta > MAX_BUILTIN_TTA and not custom_views:
        raise ValueError(f'{name} {tta}: the test-time views are each image and its horizontal mirror, so {name} '
                         f'takes 0 (off), 1 (off) or 2')


def tta_reduce(
        output: torch.Tensor,
        target: Optional[torch.Tensor],
        factor: int,
        *,
        names: Names = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """timm's test-time-augmentation reduction: average every ``factor`` consecutive outputs.

    Rows ``i * factor .. i * factor + factor - 1`` of ``output`` are the ``factor`` augmented copies
    of sample ``i``; their outputs (logits, as in timm, not probabilities) are averaged, and the
    target of sample ``i`` is the target of its first copy:
    ``output.unfold(0, factor, factor).mean(-1)``, ``target[0::factor]``.

    Args:
        output: B x ... model outputs (B x C logits), B a multiple of ``factor``.
        target: B targets (class indices or B x C soft targets), or None.
        factor: copies per sample; 0 or 1 returns the inputs unchanged.
        names: keyword -> how the messages name it (train.py passes its flags); default: the keyword (``factor``).

    Returns:
        ``(output, target)`` with B / factor rows (target None when None was given).

    Raises:
        ValueError: B is not a multiple of ``factor``, or target has another length than output.
    """
    if factor <= 1:
        return output, target
    rows, name = output.shape[0], option_name('factor', names)
    if rows % factor:
        raise ValueError(f'{name} {factor}: the batch has {rows} outputs, not a multiple of {factor} '
                         f'(each sample needs its {factor} copies in the same batch)')
    if target is not None and target.shape[0] != rows:
        raise ValueError(f'{name} {factor}: {rows} outputs but {target.shape[0]} targets')
    output = output.unfold(0, factor, factor).mean(dim=-1)
    if target is not None:
        target = target[0:rows:factor]
    return output, target


def hflip_images(input: torch.Tensor) -> torch.Tensor:
    """Mirror a B x C x H x W image batch left to right."""
    return input.flip(-1)


def _patch_layout(
        patches: torch.Tensor,
        patch_size: Optional[Union[int, Tuple[int, int]]],
        channels: int,
        channels_last: bool,
) -> Tuple[int, int, int]:
    # (ph, pw, c) of the patches; flat patches need the patch size or a square one to infer it.
    if patches.ndim == 5:
        if channels_last:
            return int(patches.shape[2]), int(patches.shape[3]), int(patches.shape[4])
        return int(patches.shape[3]), int(patches.shape[4]), int(patches.shape[2])
    if patches.ndim != 3:
        raise ValueError(f'NaFlex patches must be B x N x D or B x N x Ph x Pw x C, got shape {tuple(patches.shape)}')
    dim = int(patches.shape[2])
    if patch_size is None:
        side = math.isqrt(dim // channels) if dim % channels == 0 else 0
        if side * side * channels != dim:
            raise ValueError(f'NaFlex patches of {dim} values are not square {channels}-channel patches; '
                             f'pass patch_size')
        return side, side, channels
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else (int(patch_size[0]), int(patch_size[1]))
    if ph * pw * channels != dim:
        raise ValueError(f'NaFlex patches of {dim} values do not fit patch_size {ph}x{pw} with {channels} channels')
    return ph, pw, channels


def hflip_naflex(
        input: Mapping[str, Any],
        *,
        patch_size: Optional[Union[int, Tuple[int, int]]] = None,
        channels: int = 3,
        channels_last: bool = True,
) -> Dict[str, Any]:
    """Mirror a NaFlex batch left to right, as if each image had been mirrored before patchifying.

    Each patch's pixels are mirrored, its column becomes ``width - 1 - x`` (``width`` counted over
    the sample's valid patches), and the valid patches are put back in row-major order with the
    padding last, which is what patchifying the mirrored image gives (exactly so for images whose
    size is a multiple of the patch size, as the NaFlex resize makes them).

    Args:
        input: the batch dict (``patches`` B x N x P*P*C or B x N x Ph x Pw x C / B x N x C x Ph x Pw,
            ``patch_coord`` B x N x 2 as (y, x), ``patch_valid`` B x N); other entries are kept.
        patch_size: ``(ph, pw)`` of flat patches (None: square patches inferred from their size).
        channels: image channels.
        channels_last: the patch layout (``not --naflex-patchify-channels-first``).

    Returns:
        A new dict; ``input`` is not modified.
    """
    patches = input['patches']
    coord = input['patch_coord']
    valid = input['patch_valid'].bool()
    batch, length = valid.shape
    ph, pw, c = _patch_layout(patches, patch_size, channels, channels_last)
    flat = patches.ndim == 3
    if channels_last:
        grid = patches.reshape(batch, length, ph, pw, c).flip(3)
    else:
        grid = patches.reshape(batch, length, c, ph, pw).flip(4)
    flipped = grid.reshape(patches.shape) if flat else grid

    y, x = coord[..., 0], coord[..., 1]
    width = torch.where(valid, x, torch.full_like(x, -1)).amax(dim=1, keepdim=True) + 1
    new_x = torch.where(valid, width - 1 - x, x)
    new_coord = torch.stack([y, new_x], dim=-1)
    # Row-major order of the valid patches, then the padding in its original order.
    # The stable sort keeps the padding (all one key) in its original order.
    padding_key = torch.iinfo(torch.int64).max
    key = torch.where(valid, y.long() * width.long() + new_x.long(), torch.full_like(x, padding_key, dtype=torch.long))
    order = key.argsort(dim=1, stable=True)

    def gather(t: torch.Tensor) -> torch.Tensor:
        index = order.reshape(batch, length, *([1] * (t.ndim - 2))).expand_as(t)
        return t.gather(1, index)

    out = dict(input)
    out['patches'] = gather(flipped)
    out['patch_coord'] = gather(new_coord)
    out['patch_valid'] = gather(input['patch_valid'])
    return out


def tta_views(
        factor: int,
        *,
        patch_size: Optional[Union[int, Tuple[int, int]]] = None,
        channels: int = 3,
        channels_last: bool = True,
        names: Names = None,
) -> List[View]:
    """The built-in test-time views for ``--tta factor``: the batch itself, then its mirror.

    Each view takes and returns a whole batch (images or NaFlex dict); the keyword arguments
    describe NaFlex patches (see :func:`hflip_naflex`). ``names``: keyword -> how the messages name it
    (train.py passes its flags); default: the keyword (``factor``).
    """
    check_tta(factor, names={'tta': option_name('factor', names)})

    def identity(batch: Batch) -> Batch:
        return batch

    def mirror(batch: Batch) -> Batch:
        if isinstance(batch, Mapping):
            return hflip_naflex(batch, patch_size=patch_size, channels=channels, channels_last=channels_last)
        return hflip_images(batch)

    return [identity, mirror][:max(factor, 1)]


def _interleave(views: Sequence[torch.Tensor]) -> torch.Tensor:
    # [v0, v1, ...] each B x ... -> (B * k) x ..., row i * k + j = view j of sample i.
    return torch.stack(list(views), dim=1).flatten(0, 1)


def tta_expand(
        input: Batch,
        factor: int,
        views: Optional[Sequence[View]] = None,
        *,
        names: Names = None,
        **view_kwargs: Any,
) -> Batch:
    """Make ``factor`` views of every sample, the copies of a sample next to each other.

    Row ``i * factor + j`` of the result is view ``j`` of sample ``i``: the layout
    :func:`tta_reduce` (timm's reduction) expects.

    Args:
        input: B x C x H x W images or a NaFlex batch dict.
        factor: views per sample; 0 or 1 returns ``input`` unchanged.
        views: ``factor`` callables batch -> batch (default :func:`tta_views`).
        names: keyword -> how the messages name it (train.py passes its flags); default: the keyword (``factor``).
        **view_kwargs: passed to :func:`tta_views` (NaFlex patch layout).

    Returns:
        The expanded batch, of the same kind as ``input``, with B * factor samples.
    """
    if factor <= 1:
        return input
    if views is None:
        views = tta_views(factor, names=names, **view_kwargs)
    if len(views) != factor:
        raise ValueError(f'{option_name("factor", names)} {factor}: got {len(views)} views, expected {factor}')
    batches = [view(input) for view in views]
    if isinstance(input, Mapping):
        out = dict(input)
        for key, value in input.items():
            if isinstance(value, torch.Tensor) and value.ndim >= 1:
                out[key] = _interleave([b[key] for b in batches])
        return out
    return _interleave(batches)


def tta_forward(
        model: nn.Module,
        input: Batch,
        factor: int,
        views: Optional[Sequence[View]] = None,
        *,
        names: Names = None,
        **view_kwargs: Any,
) -> torch.Tensor:
    """Evaluate ``model`` with test-time augmentation: expand, run once, average (timm's reduction).

    Args:
        model: the eval model (plain logits; a tuple/list output contributes its first element, as in
            timm's ``validate``).
        input: B x C x H x W images or a NaFlex batch dict.
        factor: ``--tta``; 0 or 1 is a plain forward pass.
        views: see :func:`tta_expand`.
        names: keyword -> how the messages name it (train.py passes its flags); default: the keyword (``factor``).
        **view_kwargs: see :func:`tta_views`.

    Returns:
        B x C logits, the mean over each sample's views.
    """
    output = model(tta_expand(input, factor, views, names=names, **view_kwargs))
    if isinstance(output, (tuple, list)):
        output = output[0]
    output, _ = tta_reduce(output, None, factor, names=names)
    return output
