"""``AtomicCheckpointSaver``: timm's checkpoint saver, with every file appearing by rename."""
from __future__ import annotations

import errno
import os
import shutil
from typing import Any, Dict, Optional

import torch
from timm import utils

from .atomic import atomic_path

__all__ = ['AtomicCheckpointSaver']

_NEARLY_FULL = 1 << 20  # bytes free under which a failed checkpoint write is taken for a full disk


class AtomicCheckpointSaver(utils.CheckpointSaver):
    """timm's ``CheckpointSaver`` whose every file appears by rename, never by a partial write.

    timm writes ``last.pth.tar`` through a temporary file but deletes the old one before the rename,
    and hard-links the others to it, falling back to a plain copy where hard links are unavailable.
    Here every file, timm's staging files included, is written under a hidden temporary name and
    replaced in one rename, so a process killed at any moment leaves only complete checkpoints.
    A recovery checkpoint also records, in its ``saver`` entry, how many updates of its epoch it holds
    (``updates_done``), so a resumed run finishes that epoch rather than skipping its remainder.

    Args:
        *args, **kwargs: timm's ``CheckpointSaver`` arguments.
        extra_state: entries saved beside timm's in every checkpoint (train.py's: the run's
            :class:`timm_gsl.record.RunRecord` under ``run_record``).
    """

    def __init__(self, *args: Any, extra_state: Optional[Dict[str, Any]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.extra_state = dict(extra_state or {})

    def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
        # timm writes its staging files ('tmp.pth.tar', 'recovery_tmp.pth.tar') in place; a kill
        # during that write would leave a file that looks like a checkpoint but does not load.
        with atomic_path(save_path) as tmp:
            try:
                torch.save(self._checkpoint_state(epoch, metric), tmp)
            except RuntimeError as e:
                # torch.save reports a full disk as "basic_ios::clear: iostream error": say what it is.
                if shutil.disk_usage(os.path.dirname(os.path.abspath(tmp))).free >= _NEARLY_FULL:
                    raise
                raise OSError(errno.ENOSPC, f'No space left on device ({e})', save_path) from e

    def _checkpoint_state(self, epoch: int, metric: Optional[float]) -> Dict[str, Any]:
        """What timm's ``CheckpointSaver`` saves (timm 1.0.x: epoch, arch, optimizer, version 2, args, the AMP
        scaler, the task's or model's weights and EMA weights, metric, saver), plus :attr:`extra_state`."""
        state: Dict[str, Any] = dict(epoch=epoch, arch=type(self.model).__name__.lower(),
                                     optimizer=self.optimizer.state_dict(), version=2)
        if self.args is not None:
            state.update(arch=self.args.model, args=self.args)
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if self.task is not None:
            state.update(self.task.get_checkpoint_state(unwrap_fn=self.unwrap_fn))
            state.update(self.task.get_checkpoint_state(ema=True, unwrap_fn=self.unwrap_fn))
        else:
            state['state_dict'] = utils.get_state_dict(self.model, self.unwrap_fn)
            if self.model_ema is not None:
                state['state_dict_ema'] = utils.get_state_dict(self.model_ema, self.unwrap_fn)
        if metric is not None:
            state['metric'] = metric
        state['saver'] = self.state_dict(epoch, metric)
        state.update(self.extra_state)
        return state

    def _replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def save_recovery(self, epoch: int, batch_idx: int = 0) -> None:
        """Write a mid-epoch recovery checkpoint that records how many updates of ``epoch`` it holds.

        Args:
            epoch: the epoch in progress.
            batch_idx: index of the update just made (0-based), as timm's loop passes it.
        """
        # Kept in the saver's bookkeeping, so --resume continues inside the epoch instead of skipping it.
        self._updates_done = batch_idx + 1
        try:
            super().save_recovery(epoch, batch_idx)
        finally:
            self._updates_done = None

    def state_dict(self, epoch: Optional[int] = None, metric: Optional[float] = None) -> Dict[str, Any]:
        """timm's bookkeeping, plus ``updates_done`` (updates of the epoch) in a recovery checkpoint."""
        state = super().state_dict(epoch, metric)
        if getattr(self, '_updates_done', None) is not None:
            state['updates_done'] = self._updates_done
        return state

    def _duplicate(self, src: str, dst: str) -> None:
        if self.can_hardlink:
            try:
                # Link under a temporary name first, so dst is replaced in one step.
                with atomic_path(dst) as tmp:
                    os.remove(tmp)
                    os.link(src, tmp)
                return
            except (OSError, NotImplementedError):
                self.can_hardlink = False
        with atomic_path(dst) as tmp:
            shutil.copy2(src, tmp)
