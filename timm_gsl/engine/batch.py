"""What the training step and the evaluation do to every batch before the model sees it."""
from __future__ import annotations

import sys
from typing import Any, Optional

import torch

__all__ = ['prepare_input', 'progress_bar']


def prepare_input(
        input: torch.Tensor,
        target: torch.Tensor,
        device: torch.device,
        model_dtype: Optional[torch.dtype],
        channels_last: bool,
):
    """Move a batch to ``device``, cast the images to ``model_dtype`` and to channels-last when asked.

    A no-op for batches timm's prefetcher already moved.

    Returns:
        ``(input, target)``.
    """
    input, target = input.to(device), target.to(device)
    if model_dtype is not None:
        input = input.to(model_dtype)
    if channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    return input, target


def progress_bar(loader: Any, enabled: bool, desc: str):
    """A tqdm bar over ``loader``'s batches on stderr when ``enabled`` (an interactive primary process), else None."""
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=len(loader), desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
