"""The training engine: what runs a training loop, below the command lines.

* :mod:`.train_epoch`: one epoch over a ``timm.task`` task (:func:`train_one_epoch`, :class:`TrainingState`,
  the grouping-health meter);
* :mod:`.evaluate`: :func:`evaluate` over a loader with the task's evaluator and the calibration meter,
  :func:`predict` (the logits, for fitting a temperature);
* :mod:`.batch`: what every batch goes through before the model;
* :mod:`.saver`: :class:`AtomicCheckpointSaver`, timm's checkpoint saver with atomic files;
* :mod:`.checkpoint_io`: safe checkpoint reading (:func:`read_checkpoint`) and shape checks;
* :mod:`.atomic`: atomic file writes, used by the package, its tools and experiments;
* :mod:`.report`: ``summary.csv`` read back, the learning-curve plot and the final summary;
* :mod:`.run_folder`: one run per output folder (the ownership check and the lock).
"""
from .atomic import atomic_path, write_bytes_atomic, write_json_atomic, write_text_atomic
from .checkpoint_io import add_checkpoint_entries, check_checkpoint_fits, read_checkpoint
from .evaluate import CALIBRATION_METRICS, evaluate, predict
from .report import format_summary, plot_learning_curves, read_summary
from .run_folder import RunFolder, RunFolderError, check_run_folder, claim_run_folder
from .saver import AtomicCheckpointSaver
from .train_epoch import (
    GroupingMeter, NonFiniteLossError, TrainingState, batch_loss_scale, format_grouping, loss_is_finite,
    train_one_epoch,
)

__all__ = [
    'AtomicCheckpointSaver', 'CALIBRATION_METRICS', 'GroupingMeter', 'NonFiniteLossError', 'RunFolder',
    'RunFolderError', 'TrainingState', 'add_checkpoint_entries', 'atomic_path', 'batch_loss_scale',
    'check_checkpoint_fits', 'check_run_folder', 'claim_run_folder', 'evaluate', 'format_grouping',
    'format_summary', 'loss_is_finite', 'plot_learning_curves', 'predict', 'read_checkpoint', 'read_summary',
    'train_one_epoch', 'write_bytes_atomic', 'write_json_atomic', 'write_text_atomic',
]
