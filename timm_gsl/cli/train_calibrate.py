"""train.py's last step: a temperature fitted on held-out images for each checkpoint it may publish.

For ``model_best.pth.tar`` and ``last.pth.tar`` (once when they hold the same epoch) the published model is
rebuilt from the file (:func:`timm_gsl.hub.build_model`, so T belongs to exactly those weights), its logits are
computed on the calibration images and on the validation images, T is fitted
(:mod:`timm_gsl.calibration`), and the fit goes into the checkpoint's run record (its ``calibration`` section)
and, for readers of older checkpoints, into a ``calibration`` entry
(:meth:`~timm_gsl.calibration.CalibrationFit.to_dict`); ``python -m timm_gsl export|push`` fold it into the
classifier. Runs on the primary process, with loaders of its own.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import torch

from ..calibration import CalibrationFit, calibrate_cross_fitted, calibrate_held_out
from ..engine import add_checkpoint_entries, predict
from ..hub import build_model, load_training_checkpoint
from ..record import RECORD_KEY
from .train_args import MIN_CALIBRATION_IMAGES

__all__ = ['CALIBRATED_CHECKPOINTS', 'calibrate_checkpoints', 'format_calibration']

_logger = logging.getLogger('timm_gsl.train')

# The published one (the best, else the last) last, so that the run's final log line is its.
CALIBRATED_CHECKPOINTS = ('last.pth.tar', 'model_best.pth.tar')
HOLDOUT_SOURCE = 'training-pool hold-out, never trained on'
CROSSFIT_SOURCE = 'validation images, 2-fold cross-fitted'


def format_calibration(fit: CalibrationFit, name: str = '') -> str:
    """The log line of a fitted temperature, e.g. ``Calibration (model_best.pth.tar): T = 2.310 ...``."""
    where = f' ({name})' if name else ''
    return (f'Calibration{where}: T = {fit.temperature:.4g}, fitted on {fit.images} images ({fit.source}); '
            f'on {fit.reported_images} {_short(fit.reported_on)} NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f}, '
            f'ECE {fit.ece_before:.2f}% -> {fit.ece_after:.2f}%')


def _short(reported_on: str) -> str:
    return 'validation images (cross-fitted)' if 'cross-fitted' in reported_on else reported_on


def _fit(model: torch.nn.Module, loaders: Any, source: str, eval_options: Dict[str, Any], seed: int,
         weights: str) -> CalibrationFit:
    report_logits, report_target = predict(model, loaders.calibration_report, **eval_options)
    if source == 'holdout':
        fit_logits, fit_target = predict(model, loaders.calibration, **eval_options)
        return calibrate_held_out(fit_logits, fit_target, report_logits, report_target, HOLDOUT_SOURCE,
                                  'validation images', weights)
    if report_logits.shape[0] < MIN_CALIBRATION_IMAGES:
        # Only reached for datasets whose labels could not be counted before training.
        raise ValueError(f'--calibration-source val-crossfit: the validation split gave {report_logits.shape[0]} '
                         f'images, expected at least {MIN_CALIBRATION_IMAGES}.')
    return calibrate_cross_fitted(report_logits, report_target, CROSSFIT_SOURCE, seed, weights)


def calibrate_checkpoints(output_dir: str, loaders: Any, source: str, eval_options: Dict[str, Any],
                          use_ema: bool, seed: int = 0) -> Optional[CalibrationFit]:
    """Fit and store a temperature in each of :data:`CALIBRATED_CHECKPOINTS` found in ``output_dir``.

    Args:
        output_dir: the run's folder.
        loaders: the run's :class:`~timm_gsl.cli.train_build.Loaders` (``calibration``, ``calibration_report``).
        source: 'holdout' or 'val-crossfit'.
        eval_options: :func:`timm_gsl.engine.evaluate`'s options (device, autocast, TTA, ...).
        use_ema: calibrate the EMA weights (those the validation metrics came from).
        seed: seed of the cross-fitting split.

    Returns:
        The fit of the checkpoint train.py publishes (the best one, else the last), or None when there is none.
    """
    fits: Dict[str, CalibrationFit] = {}
    done: Dict[Any, CalibrationFit] = {}
    device, dtype = eval_options.get('device'), eval_options.get('model_dtype')
    for name in CALIBRATED_CHECKPOINTS:
        path = os.path.join(output_dir, name)
        if not os.path.isfile(path):
            continue
        checkpoint = load_training_checkpoint(path, use_ema=use_ema)
        key = (checkpoint.epoch, checkpoint.used_ema)
        if key not in done or checkpoint.epoch is None:
            model = build_model(checkpoint).to(device=device)
            if dtype is not None:
                model = model.to(dtype=dtype)
            if eval_options.get('channels_last'):
                model = model.to(memory_format=torch.channels_last)
            done[key] = _fit(model, loaders, source, eval_options, seed, 'ema' if checkpoint.used_ema else 'model')
            del model
        fits[name] = done[key]
        # Both in the run record and, for readers of older checkpoints, as the checkpoint's own entry.
        entries = {'calibration': fits[name].to_dict()}
        if checkpoint.record.version > 0:
            entries[RECORD_KEY] = checkpoint.record.replace(calibration=fits[name]).to_dict()
        add_checkpoint_entries(path, entries)
        _logger.info(format_calibration(fits[name], name))
    return fits.get('model_best.pth.tar') or fits.get('last.pth.tar')
