"""Reading a training checkpoint of our ``train.py`` (its weights and run record, never unpickling arbitrary
objects), the trained model rebuilt from it, and the fitted temperature folded into its classifier.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import timm
from timm.models import clean_state_dict

from ..calibration import CalibrationFit
from ..head import UnsupportedModelError, classifier_layers, is_converted, unconvert_model
from ..registry import create_model_from_record
from ..record import RunRecord, from_training_arguments
from ..engine.checkpoint_io import read_checkpoint

_logger = logging.getLogger(__name__)


class TrainingCheckpoint:
    """What a checkpoint of our ``train.py`` holds, read without unpickling arbitrary objects.

    Args:
        path: the checkpoint file.
        state_dict: the model weights (EMA weights when asked for and present).
        args: the training arguments (``argparse.Namespace`` as a dict).
        epoch: the epoch it was saved after, or None.
        metric: the value of the training's ``--eval-metric`` at that epoch, or None.
        used_ema: whether ``state_dict`` holds the EMA weights.
        record: the run's :class:`~timm_gsl.record.RunRecord` (read from ``args`` for checkpoints without one).
    """

    def __init__(self, path: str, state_dict: Dict[str, torch.Tensor], args: Dict[str, Any],
                 epoch: Optional[int], metric: Optional[float], used_ema: bool, record: Optional[RunRecord] = None):
        self.path = path
        self.state_dict = state_dict
        self.args = args
        self.epoch = epoch
        self.metric = metric
        self.used_ema = used_ema
        self.record = record if record is not None else from_training_arguments(args, version=0)

    @property
    def calibration(self) -> Optional[CalibrationFit]:
        """The temperature fitted after training (the record's calibration section), or None."""
        return self.record.calibration

    @property
    def model_name(self) -> str:
        """The name the model was created with."""
        return self.record.model.architecture


def load_training_checkpoint(path: str, use_ema: bool = False) -> TrainingCheckpoint:
    """Read a timm training checkpoint without running any code it might carry.

    Reading is :func:`timm_gsl.engine.read_checkpoint`'s (``torch.load(weights_only=True)``: tensors,
    plain containers and ``argparse.Namespace`` only); this adds the checks that it is a *training*
    checkpoint, one that names its model.

    Args:
        path: a ``.pth.tar`` / ``.pth`` written by our (or timm's) ``train.py``.
        use_ema: take ``state_dict_ema`` when the checkpoint has one.

    Returns:
        The checkpoint, with its ``calibration`` when it records one.

    Raises:
        ValueError: the file is missing, unreadable, holds other objects, is not a timm training
            checkpoint (a dict with ``state_dict`` and the training ``args`` naming the model), or records
            a malformed ``calibration``.
    """
    raw = read_checkpoint(path, 'checkpoint')
    expected = ("expected a timm training checkpoint: a dict with 'state_dict' (name -> tensor) and 'args' "
                "(the training arguments, with 'model')")
    if not isinstance(raw.get('state_dict'), dict):
        found = sorted(map(str, raw))[:8]
        raise ValueError(f'checkpoint {path!r} is not a timm checkpoint (found {found}): {expected}.')
    args = raw.get('args')
    args = args if isinstance(args, dict) or args is None else vars(args)  # an argparse.Namespace
    if not isinstance(args, dict) or not isinstance(args.get('model'), str) or not args['model']:
        raise ValueError(f'checkpoint {path!r} records no training arguments naming the model: {expected}.')
    used_ema = bool(use_ema and isinstance(raw.get('state_dict_ema'), dict))
    if use_ema and not used_ema:
        _logger.warning(f'checkpoint {path!r} has no EMA weights: publishing its model weights.')
    state_dict = raw['state_dict_ema' if used_ema else 'state_dict']
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"checkpoint {path!r}: 'state_dict' holds values other than tensors: {expected}.")
    # Weights saved from a DistributedDataParallel or compiled model carry a prefix.
    state_dict = clean_state_dict(state_dict)
    try:
        record = RunRecord.from_checkpoint(raw)
    except ValueError as e:
        raise ValueError(f'checkpoint {path!r}: {e}') from e
    metric = raw.get('metric')
    return TrainingCheckpoint(path, state_dict, dict(args), raw.get('epoch'),
                              float(metric) if isinstance(metric, (int, float)) else None, used_ema, record)


def build_model(checkpoint: TrainingCheckpoint) -> nn.Module:
    """The trained model, as an ordinary timm model in eval mode, weights loaded strictly.

    Raises:
        ValueError: timm does not know the architecture, or the weights do not fit it.
    """
    spec = checkpoint.record.model
    name = spec.architecture
    prefix = name.split(':')[0] if ':' in name else ''
    if not prefix and not timm.is_model(name):
        raise ValueError(f'checkpoint {checkpoint.path!r}: unknown architecture {name!r}; timm has no model of '
                         f'that name (timm {timm.__version__}; see timm.list_models()).')
    try:
        model = create_model_from_record(spec)
    except (RuntimeError, ValueError, TypeError, OSError) as e:
        raise ValueError(f'checkpoint {checkpoint.path!r}: cannot create architecture {name!r} '
                         f'({type(e).__name__}: {e}).') from e
    if is_converted(model):
        model = unconvert_model(model)
    try:
        model.load_state_dict(checkpoint.state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(f'checkpoint {checkpoint.path!r}: its weights do not fit {name!r} with '
                         f'num_classes={spec.num_classes} ({e}).') from e
    return model.eval()


_WEIGHTS = {'model': 'model weights', 'ema': 'EMA weights'}
_UNFOLDED = 'publish the weights unfolded with --no-fold-temperature (fold_temperature=False)'


def fold_into_classifier(model: nn.Module, temperature: float,
                         input_size: Optional[Tuple[int, ...]] = None) -> nn.Module:
    """Divide the classifier's weight and bias by ``temperature``, in place, and check that it worked.

    The layers are those the group softmax head trains (:func:`timm_gsl.head.classifier_layers`: the final
    linear layer of each head). The model then returns its former logits / T (same predictions). When
    ``input_size`` is given, that is checked on a random batch; a classifier whose output is not linear in
    those layers (say, followed by a softmax) is restored and refused.

    Args:
        model: a timm model in eval mode.
        temperature: T > 0.
        input_size: (C, H, W) of the model's input, for the check.

    Returns:
        ``model``.

    Raises:
        ValueError: no linear classifier, or its output does not scale with it; one line naming
            ``--no-fold-temperature``.
    """
    try:
        layers = {id(layer): layer for layer in classifier_layers(model)}  # a layer shared by two heads: once
    except UnsupportedModelError as e:
        raise ValueError(f'fold_temperature: {e} To {_UNFOLDED}.') from e
    probe = None if input_size is None else torch.randn(
        2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = None if probe is None else model(probe).double()
        saved = [(layer.weight.clone(), None if layer.bias is None else layer.bias.clone())
                 for layer in layers.values()]
        for layer in layers.values():
            layer.weight.div_(temperature)
            if layer.bias is not None:
                layer.bias.div_(temperature)
        if probe is None:
            return model
        after = model(probe).double()
        if torch.allclose(after * temperature, before, rtol=1e-4, atol=1e-5 * (1 + before.abs().max().item())):
            return model
        for layer, (weight, bias) in zip(layers.values(), saved):
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
    raise ValueError(f'fold_temperature: dividing the final linear layer of {type(model).__name__} by T does not '
                     f'divide its output by T (something non-linear follows it); {_UNFOLDED}.')


def published_calibration(checkpoint: TrainingCheckpoint, fold_temperature: bool) -> Optional[CalibrationFit]:
    """The checkpoint's calibration when it was fitted for the weights published, else None.

    Args:
        checkpoint: the checkpoint to publish.
        fold_temperature: whether the temperature is to be folded into the published classifier.

    Returns:
        ``checkpoint.calibration``; None when there is none, or (unfolded) it was fitted for other weights.

    Raises:
        ValueError: ``fold_temperature`` with a temperature fitted for the other weights (EMA or model).
    """
    fit = checkpoint.calibration
    published = 'ema' if checkpoint.used_ema else 'model'
    if fit is None or fit.weights == published:
        return fit
    if fold_temperature:
        fix = 'pass --use-ema (use_ema=True)' if fit.weights == 'ema' else 'drop --use-ema (use_ema=False)'
        raise ValueError(f'checkpoint {checkpoint.path!r}: its temperature was fitted for the {_WEIGHTS[fit.weights]}, '
                         f'not the {_WEIGHTS[published]} being published: {fix}, or publish the weights unfolded '
                         f'with --no-fold-temperature (fold_temperature=False).')
    _logger.warning(f'checkpoint {checkpoint.path!r}: its temperature was fitted for the {_WEIGHTS[fit.weights]}, '
                    f'not the {_WEIGHTS[published]} published: the published files do not mention it.')
    return None
