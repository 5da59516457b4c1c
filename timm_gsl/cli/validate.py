"""Evaluate a checkpoint or a timm model: timm's ``validate.py``, with the embedded dataset as default.

The command line is timm's (every flag, same name, default and meaning) plus ``--class-subset``.
The evaluation is timm's too: the data config comes from :func:`timm.data.resolve_input_data_config`,
the images from :func:`timm.data.create_loader` with its eval transforms, the metrics from timm's
``ClassificationEvaluator``, so on the same checkpoint and data top-1 and top-5 equal those of timm's
own script. What this front adds:

* with no data flags (``data``, ``--data-dir``, ``--dataset``) it evaluates on the validation split of
  the dataset shipped with the package (:data:`timm_gsl.data.EMBEDDED_DATASET`);
* ``--class-subset K|FILE`` with ``--seed`` selects and relabels classes exactly as training did;
* a checkpoint that records its training classes' names scores a dataset that names its classes (an image
  folder) by name: a folder with some of the trained classes is scored with the model's label ids for them,
  one with a class the model was not trained on is refused;
* a checkpoint written by our ``train.py`` carries its run record (:class:`timm_gsl.record.RunRecord`; for
  older checkpoints, read from their training arguments); every option the user did not pass that the
  record holds (model, number of classes, input size and preprocessing, training data, class subset, seed)
  is taken from it, and the log says which; the options as parsed are never changed;
* the evaluation is train.py's (:func:`timm_gsl.engine.evaluate`), so both measure alike;
* ``--device cuda`` falls back to the CPU with a notice when CUDA is absent;
* ``--metrics-avg`` is computed here, without scikit-learn;
* ``--results-file`` is written to a temporary name and renamed.

Examples:
    >>> from timm_gsl.validate import main, parse_args, validate
    >>> results = validate(parse_args(['--checkpoint', 'output/train/x/model_best.pth.tar']))
    >>> results['top1'], results['top5']
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import glob
import io
import json
import logging
import os
import sys
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.data import RealLabelsImagenet, create_loader, resolve_input_data_config
from timm.layers import apply_test_time_pool, set_fast_norm
from timm.models import is_model, list_models, load_checkpoint
from timm.utils import (
    check_batch_size_retry,
    decay_batch_step,
    natural_key,
    random_seed,
    reparameterize_model,
    set_jit_fuser,
)

from .. import data as gsl_data
from ..calibration import CalibrationMeter
from ..data.conditions import relabel_to_class_names
from ..engine import check_checkpoint_fits, evaluate, read_checkpoint, write_text_atomic
from ..record import RECORD_KEY, DataRecord, ModelRecord, RunRecord
from ..registry import create_model_from_record
from .common import ArgumentParser, check_at_least, check_can_create, check_class_subset, check_file
from .common import check_model_name, check_pretrained_weights, exit_with_error, explicit_dests, one_line
from .common import resolve_device, setup_logging
from .flags import add_dataset_flags, add_device_flags, add_loader_flags, add_model_flags, add_naflex_flags
from .flags import CHECKPOINT_FLAGS, DATA_SOURCE_FLAGS, class_subset_value, dataset_root

__all__ = [
    'METRICS_AVERAGES',
    'RESULTS_FORMATS',
    'classification_metrics',
    'check_args',
    'checkpoint_training_args',
    'get_args_parser',
    'main',
    'parse_args',
    'validate',
    'write_results',
]

_logger = logging.getLogger('timm_gsl.validate')

RESULTS_FORMATS = ('csv', 'json')
METRICS_AVERAGES = ('micro', 'macro', 'weighted')
MODEL_DTYPES = ('float32', 'float16', 'bfloat16')
AMP_DTYPES = ('float16', 'bfloat16')

# Pretrained tags that were not trained on ImageNet-1k, left out of `--model all` as timm does.
_NOT_IN1K_FILTERS = ('*_in21k', '*_in22k', '*in12k', '*_dino', '*fcmae', '*seer')

# Where the data came from: taken from a checkpoint's run record only when the user passed no data flag at all.
_DATA_SOURCE_FLAGS = ('data', 'data_dir', 'dataset')
# The flags timm's resolve_input_data_config and resolve_model_input_args read.
_INPUT_FLAGS = ('img_size', 'input_size', 'in_chans', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')


@dataclasses.dataclass(frozen=True)
class _Evaluation:
    """What one validation evaluates, resolved once from the flags as parsed and the checkpoint's run record.

    Attributes:
        model: the model to create (architecture, classes, channels, pooling, keyword arguments, whether timm's
            pretrained weights are loaded).
        data: the images: dataset, root (None for the embedded dataset), split (``eval_split``), class map,
            image mode and keys, the class subset with its seed, the trained class names.
        input_options: the input size and eval transform as timm's resolve functions read them.
        as_trained: the model is created as training created it (a checkpoint with a run record): not resized to
            the evaluated input, which timm's rule does for models of a fixed input size.
        data_flags: the data as the user (or the checkpoint) named it, for messages.
        subset_recorded: whether the class subset came from the checkpoint (not the command line).
        temperature: the temperature the checkpoint's training fitted for the weights evaluated, or None.
        taken: the settings taken from the checkpoint (flag dest -> value), for the log.
    """
    model: ModelRecord
    data: DataRecord
    input_options: Dict[str, Any]
    data_flags: str
    as_trained: bool = False
    subset_recorded: bool = False
    temperature: Optional[float] = None
    taken: Dict[str, Any] = dataclasses.field(default_factory=dict)


def get_args_parser() -> argparse.ArgumentParser:
    """The command line: timm's ``validate.py`` flags (same names, defaults and meaning) plus ``--class-subset``.

    The flags shared with ``train.py`` come from :mod:`timm_gsl.cli.flags`.

    Returns:
        A new parser.
    """
    parser = ArgumentParser(
        prog='validate.py',
        description='Evaluate a timm model or checkpoint (timm-gsl). With no data flags, the embedded '
                    f'{gsl_data.EMBEDDED_DATASET!r} validation split is used; a checkpoint of our train.py supplies '
                    f'its model, preprocessing and data conditions for every flag not given.')
    add_dataset_flags(parser, title='Dataset', class_subset_type=class_subset_value)
    data = parser.add_argument_group('Dataset')
    data.add_argument('--split', metavar='NAME', default='validation',
                      help='dataset split to evaluate (default: validation)')
    data.add_argument('--num-samples', default=None, type=int, metavar='N',
                      help='number of samples in the split, for iterable datasets that cannot count them')
    compiling = add_model_flags(parser, model_default='dpn92', batch_size_default=256, title='Model',
                                model_aliases=('-m',))
    compiling.add_argument('--aot-autograd', default=False, action='store_true',
                           help='AOT autograd memory-efficient fusion (functorch)')
    model = parser.add_argument_group('Model')
    model.add_argument('--checkpoint', default='', type=str, metavar='PATH',
                       help='checkpoint file to load, or a folder: every *.pth.tar and *.pth in it (default: none)')
    model.add_argument('--use-ema', dest='use_ema', action='store_true',
                       help='load the checkpoint\'s EMA weights when it has them')
    model.add_argument('--use-train-size', action='store_true', default=False,
                       help='use the train input size even when the model\'s config names a test size')
    model.add_argument('--crop-mode', default=None, type=str, metavar='N',
                       help='eval crop mode: squash, border or center (default: the model\'s)')
    model.add_argument('--crop-border-pixels', type=int, default=None, help='pixels cropped from each image border')
    model.add_argument('--test-pool', dest='test_pool', action='store_true',
                       help='test-time pooling when the input is larger than the model\'s default')
    model.add_argument('--reparam', default=False, action='store_true',
                       help='reparameterise the model (fuse branches) before evaluating')
    model.add_argument('--tf-preprocessing', action='store_true', default=False,
                       help='TensorFlow preprocessing pipeline (needs tensorflow installed)')
    add_device_flags(parser, title='Device')
    parser.add_argument('--num-gpu', type=int, default=1, help='number of GPUs (DataParallel when more than 1)')
    add_loader_flags(parser, title='Data loader')
    add_naflex_flags(parser, training=False, title='Data loader')
    results = parser.add_argument_group('Results')
    results.add_argument('--log-freq', default=10, type=int, metavar='N', help='log every N batches (default: 10)')
    results.add_argument('--results-file', default='', type=str, metavar='FILENAME',
                         help='also write the results to this file')
    results.add_argument('--results-format', default='csv', type=str,
                         help=f'results file format, one of {RESULTS_FORMATS} (default: csv)')
    results.add_argument('--real-labels', default='', type=str, metavar='FILENAME',
                         help='ImageNet "real labels" JSON file; top-1/top-5 are then measured against it')
    results.add_argument('--valid-labels', default='', type=str, metavar='FILENAME',
                         help='file of class indices (one per line): evaluate on that part of the label space only')
    results.add_argument('--retry', default=False, action='store_true', help='on failure, retry with smaller batches')
    results.add_argument('--metrics-avg', type=str, default=None, choices=list(METRICS_AVERAGES),
                         help='also report precision, recall and F1 with this averaging (default: None)')
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse a command line (``sys.argv[1:]`` when None).

    Args:
        argv: the arguments.

    Returns:
        The namespace :func:`validate` takes; ``passed_flags`` holds the options given explicitly, so
        that a checkpoint's training arguments fill in only the others.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.passed_flags = sorted(explicit_dests(parser, argv))
    return args


def _passed(args: argparse.Namespace) -> Set[str]:
    recorded = getattr(args, 'passed_flags', None)
    if recorded is not None:
        return set(recorded)
    # A namespace built in code: whatever differs from the parser's defaults counts as given.
    defaults = vars(get_args_parser().parse_args([]))
    return {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}


def checkpoint_training_args(path: str) -> Dict[str, Any]:
    """The training arguments a checkpoint records under ``args`` (a dict or an argparse namespace).

    Loads with :func:`timm_gsl.engine.read_checkpoint` (``weights_only=True``, argparse namespaces allowed).

    Args:
        path: a checkpoint file.

    Returns:
        The arguments as a dict; empty for safetensors/NumPy files and checkpoints without ``args``.

    Raises:
        ValueError: the file is missing or not a readable checkpoint (see :func:`read_checkpoint`).
    """
    return _recorded_args(_read_checkpoint_file(path))


_NUMPY_WEIGHTS = ('.npz', '.npy')  # JAX/NumPy weights: timm's load_checkpoint hands them to the model itself


def _read_checkpoint_file(path: str) -> Optional[Dict[str, Any]]:
    """``--checkpoint`` read with :func:`read_checkpoint` (safetensors included); None for NumPy weights."""
    if os.path.splitext(path)[1].lower() in _NUMPY_WEIGHTS:
        check_file(path, '--checkpoint', 'a checkpoint file')
        return None
    return read_checkpoint(path, '--checkpoint')


def _recorded_args(checkpoint: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    recorded = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    if isinstance(recorded, argparse.Namespace):
        recorded = vars(recorded)
    return dict(recorded) if isinstance(recorded, dict) else {}


def _checkpoint_record(checkpoint: Optional[Dict[str, Any]], path: str) -> Optional[RunRecord]:
    """The run record of a checkpoint of our (or timm's) train.py; None for one without (weights only).

    Raises:
        ValueError: the record is malformed or from a newer timm-gsl.
    """
    if not isinstance(checkpoint, dict) or not (checkpoint.get(RECORD_KEY) is not None
                                                or _recorded_args(checkpoint).get('model')):
        return None
    try:
        return RunRecord.from_checkpoint(checkpoint)
    except ValueError as e:
        raise ValueError(f'--checkpoint {path!r}: {one_line(e)}') from e


def _recorded_settings(record: RunRecord, with_source: bool) -> Dict[str, Any]:
    """What a run record supplies for validate.py's flags (flag dest -> value; None: not recorded).

    The model and the eval transform training used, the class subset and its seed; with ``with_source`` also
    where the data came from (dataset, root, class map, image mode, keys, split).
    """
    model, subset = record.model, record.data.class_subset
    settings = dict(model=model.architecture, num_classes=model.num_classes, gp=model.global_pool,
                    model_kwargs=dict(model.kwargs), seed=record.data.seed,
                    class_subset=None if subset is None else class_subset_value(subset), **record.input_options())
    if 'input_size' in settings:
        settings['input_size'] = list(settings['input_size'])  # as the flag parses it
    if with_source:
        data = record.data
        settings.update(data_dir=data.root, dataset=data.dataset or None, class_map=data.class_map or None,
                        input_img_mode=data.input_img_mode, input_key=data.input_key, target_key=data.target_key,
                        split=data.eval_split)
    return settings


def _taken_from_record(record: RunRecord, passed: Set[str], args: argparse.Namespace) -> Dict[str, Any]:
    """The settings a record supplies for the flags not passed (flag dest -> value), those that differ only."""
    # --img-size and --input-size both set the size: when the user gave one, the recorded one yields.
    skip = set(passed)
    if passed.intersection(('img_size', 'input_size')):
        skip.update(('img_size', 'input_size'))
    recorded = _recorded_settings(record, with_source=not passed.intersection(_DATA_SOURCE_FLAGS))
    return {dest: value for dest, value in recorded.items()
            if dest not in skip and value is not None and value != getattr(args, dest, None)}


def _resolve(args: argparse.Namespace, checkpoint: Optional[Dict[str, Any]]) -> _Evaluation:
    """What to evaluate: each flag as passed, else what the checkpoint's run record holds, else its default."""
    passed = _passed(args)
    record = _checkpoint_record(checkpoint, args.checkpoint) if args.checkpoint else None
    taken = _taken_from_record(record, passed, args) if record is not None else {}

    def value(dest: str) -> Any:
        return taken[dest] if dest in taken else getattr(args, dest)

    root = value('data_dir') or args.data
    dataset = value('dataset') or ''
    embedded = not (root or dataset) or gsl_data.is_embedded(dataset)
    if embedded:
        data_flags = f'the {gsl_data.EMBEDDED_DATASET!r} split {value("split")!r}'
    else:
        given = [f'--dataset {dataset!r}' if dataset else '',
                 f'{"--data-dir" if value("data_dir") else "DIR"} {root!r}' if root else '']
        data_flags = f'{" ".join(g for g in given if g)} (split {value("split")!r})'
    model = ModelRecord(architecture=value('model'), num_classes=value('num_classes'), in_chans=value('in_chans'),
                        pretrained=args.pretrained or not args.checkpoint, global_pool=value('gp'),
                        kwargs=dict(value('model_kwargs') or {}))
    data = DataRecord(dataset=gsl_data.EMBEDDED_DATASET if embedded else dataset, root=None if embedded else root,
                      eval_split=value('split'), class_names=_trained_class_names(record, model.num_classes, args),
                      class_subset=value('class_subset'), seed=value('seed'), class_map=value('class_map') or '',
                      input_img_mode=value('input_img_mode'), input_key=value('input_key'),
                      target_key=value('target_key'))
    return _Evaluation(model=model, data=data, input_options={k: value(k) for k in _INPUT_FLAGS}, data_flags=data_flags,
                       as_trained=record is not None and 'model' not in passed,
                       subset_recorded='class_subset' not in passed,
                       temperature=_checkpoint_temperature(record, checkpoint, args), taken=taken)


def classification_metrics(
        predictions: torch.Tensor,
        targets: torch.Tensor,
        average: str,
) -> Dict[str, float]:
    """Precision, recall and F1 (in %, 4 decimals) of single-label predictions.

    The classes are those present in ``targets`` or ``predictions``; a precision or recall whose
    denominator is zero counts as 0. ``micro`` pools every decision, ``macro`` is the plain mean over
    classes (F1 is the mean of per-class F1), ``weighted`` weights each class by its number of targets.
    These are scikit-learn's definitions (``zero_division=0``), so the keys and values are those of
    timm's ``--metrics-avg``.

    Args:
        predictions: N predicted class indices.
        targets: N true class indices.
        average: 'micro', 'macro' or 'weighted'.

    Returns:
        ``{'<average>_precision', '<average>_recall', '<average>_f1_score'}``.
    """
    if average not in METRICS_AVERAGES:
        raise ValueError(f"Unknown metrics average {average!r}, expected one of {METRICS_AVERAGES}.")
    predictions = predictions.reshape(-1).long().cpu()
    targets = targets.reshape(-1).long().cpu()
    if predictions.shape != targets.shape:
        raise ValueError(f'predictions and targets differ in length: {predictions.numel()} vs {targets.numel()}.')
    if predictions.numel() == 0 or min(int(predictions.min()), int(targets.min())) < 0:
        raise ValueError('predictions and targets must be non-empty and hold class indices >= 0.')
    size = int(max(predictions.max(), targets.max())) + 1
    support = torch.bincount(targets, minlength=size).double()
    predicted = torch.bincount(predictions, minlength=size).double()
    true_pos = torch.bincount(targets[predictions == targets], minlength=size).double()
    present = (support + predicted) > 0  # scikit-learn's label set: classes seen in either
    support, predicted, true_pos = support[present], predicted[present], true_pos[present]

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))

    if average == 'micro':
        tp, pred, sup = true_pos.sum(), predicted.sum(), support.sum()
        precision, recall = ratio(tp, pred), ratio(tp, sup)
        f1 = ratio(2 * precision * recall, precision + recall)
    else:
        per_precision, per_recall = ratio(true_pos, predicted), ratio(true_pos, support)
        per_f1 = ratio(2 * per_precision * per_recall, per_precision + per_recall)
        weights = support / support.sum() if average == 'weighted' else torch.full_like(support, 1 / len(support))
        precision, recall, f1 = ((w * weights).sum() for w in (per_precision, per_recall, per_f1))
    return {
        f'{average}_precision': round(100 * float(precision), 4),
        f'{average}_recall': round(100 * float(recall), 4),
        f'{average}_f1_score': round(100 * float(f1), 4),
    }


def _check_choices(args: argparse.Namespace) -> None:
    if args.results_format not in RESULTS_FORMATS:
        raise ValueError(f"Unknown --results-format {args.results_format!r}, expected one of {RESULTS_FORMATS}.")
    if args.model_dtype and args.model_dtype not in MODEL_DTYPES:
        raise ValueError(f"Unknown --model-dtype {args.model_dtype!r}, expected one of {MODEL_DTYPES}.")
    if args.amp and args.amp_dtype not in AMP_DTYPES:
        raise ValueError(f"Unknown --amp-dtype {args.amp_dtype!r}, expected one of {AMP_DTYPES}.")
    if args.amp and args.model_dtype not in (None, 'float32'):
        raise ValueError(f"--amp needs a float32 model, got --model-dtype {args.model_dtype!r}; drop one of them.")
    for flag, value in (('-b/--batch-size', args.batch_size), ('--num-gpu', args.num_gpu),
                        ('--log-freq', args.log_freq)):
        check_at_least(flag, value)


_WILDCARD = ('*', '?', '[')


def check_args(args: argparse.Namespace) -> None:
    """The cheap checks of a command line, run before any checkpoint, model or dataset is read.

    Option values and combinations, the model name (a timm architecture with a known tag, ``hf-hub:``,
    ``local-dir:``, a wildcard that matches, ``all`` or a file of names), and the files and folders
    named: ``--checkpoint`` (a file, or a folder holding ``*.pth.tar``/``*.pth``), ``--class-subset
    FILE``, ``--class-map``, ``--valid-labels``, ``--real-labels``, the data folder and where
    ``--results-file`` goes.

    Args:
        args: options from :func:`parse_args`.

    Raises:
        ValueError: naming the flag, the value and what is expected.
    """
    _check_choices(args)
    passed = _passed(args)
    if args.checkpoint:
        if os.path.isdir(args.checkpoint):
            if not _bulk_checkpoints(args.checkpoint):
                raise ValueError(f'--checkpoint {args.checkpoint!r} is a folder without any *.pth.tar or *.pth '
                                 f'file; expected a checkpoint file, or a folder of them.')
        else:
            check_file(args.checkpoint, '--checkpoint',
                       'a checkpoint written by train.py (.pth.tar), a .pth or a .safetensors file')
    if 'model' in passed or not args.checkpoint:
        name = args.model
        if any(c in name for c in _WILDCARD) and not name.startswith(('hf-hub:', 'local-dir:')):
            if not list_models(name, pretrained=True):
                raise ValueError(f'--model {name!r}: the pattern matches no pretrained timm model '
                                 f'(see timm.list_pretrained()).')
        elif name != 'all' and not (os.path.isfile(name) and not is_model(name)):
            check_model_name(name, '--model')
            if not args.checkpoint and not name.startswith(('hf-hub:', 'local-dir:')):
                try:
                    check_pretrained_weights(name, '--model')
                except ValueError:
                    raise ValueError(f'--model {name}: without --checkpoint its pretrained weights are evaluated, '
                                     f'but timm has none for it; pass --checkpoint FILE.') from None
    check_class_subset(args.class_subset, '--class-subset')
    for flag, path in (('--class-map', args.class_map), ('--valid-labels', args.valid_labels),
                       ('--real-labels', args.real_labels)):
        if path:
            check_file(path, flag)
    gsl_data.check_data_source(args.dataset, dataset_root(args), (args.split,),
                               flag='--data-dir' if args.data_dir else 'DIR', require_root=False,
                               names=DATA_SOURCE_FLAGS)
    if args.results_file:
        folder = os.path.dirname(args.results_file) or '.'
        if os.path.isdir(args.results_file):
            raise ValueError(f'--results-file {args.results_file!r} is a folder; expected a file name to write.')
        if not os.path.isdir(folder):
            raise ValueError(f'--results-file {args.results_file!r}: no such folder {folder!r}; expected a file in '
                             f'an existing folder.')
        check_can_create(args.results_file, '--results-file')
    try:
        torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"Unknown --device {args.device!r}: expected a torch device such as 'cuda' or 'cpu' "
                         f"({e}).") from None


def _compile(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    if args.torchscript:
        return torch.jit.script(model)
    if args.torchcompile:
        torch._dynamo.reset()
        return torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.aot_autograd:
        try:
            from functorch.compile import memory_efficient_fusion
        except ImportError as e:
            raise ValueError(f'--aot-autograd needs functorch.compile, which this torch lacks ({e}).')
        return memory_efficient_fusion(model)
    return model


def _create_eval_dataset(ev: _Evaluation, args: argparse.Namespace, input_img_mode: str) -> Any:
    """The evaluation split under the data conditions, labelled as the model was trained when names tell.

    Args:
        ev: what is evaluated (the data and the trained class names).
        args: the options (the loader's and the data reader's).
        input_img_mode: 'RGB' or 'L'.

    Returns:
        The dataset. With trained class names (and no ``--valid-labels``), its labels are the training label ids
        of its class names; a class subset the checkpoint recorded then keeps the trained classes by name, not
        by a new draw.
    """
    trained_names = ev.data.class_names
    by_name = trained_names is not None and not args.valid_labels
    keep_trained = by_name and ev.subset_recorded and ev.data.class_subset is not None
    timm_kwargs = dict(download=args.dataset_download, num_samples=args.num_samples, input_img_mode=input_img_mode,
                       trust_remote_code=args.dataset_trust_remote_code)
    if args.tf_preprocessing:
        timm_kwargs['load_bytes'] = True
    dataset = gsl_data.create_eval_dataset(ev.data, class_subset=None if keep_trained else ev.data.class_subset,
                                           **timm_kwargs)
    if keep_trained and gsl_data.dataset_class_names(dataset) is None:
        # No names to keep the trained classes by: the recorded draw, as for a checkpoint without names.
        dataset = gsl_data.apply_data_conditions(dataset, class_subset=ev.data.class_subset, seed=ev.data.seed)
    if trained_names is not None and args.valid_labels:
        _logger.info(f'--valid-labels {args.valid_labels!r}: the dataset\'s labels are read as positions in it; '
                     f'its class names are not matched with those the checkpoint records.')
    return _to_trained_labels(dataset, ev, args, keep_trained) if by_name else dataset


def _to_trained_labels(dataset: Any, ev: _Evaluation, args: argparse.Namespace, keep_trained: bool) -> Any:
    """``dataset`` labelled with the training label id of each image's class name.

    Args:
        dataset: the evaluation split.
        ev: what is evaluated (the trained class names in label order, the data as named, for messages).
        args: the options (for messages).
        keep_trained: leave out the classes the model was not trained on (a class subset recorded in the
            checkpoint) instead of refusing them.

    Returns:
        ``dataset`` itself when it records no class names or the trained ones, else the relabelled view.

    Raises:
        ValueError: the dataset has a class the model was not trained on (unless ``keep_trained``), or none it was.
    """
    names, trained_names = gsl_data.dataset_class_names(dataset), ev.data.class_names
    if names is None or names == trained_names:
        return dataset
    trained = set(trained_names)
    untrained = [n for n in names if n not in trained]
    where, shown = ev.data_flags, trained_names[:5] + (['...'] if len(trained_names) > 5 else [])
    if (untrained and not keep_trained) or len(untrained) == len(names):
        allowed = 'at least one class' if keep_trained else 'only classes'
        raise ValueError(f'--checkpoint {args.checkpoint!r} was trained on {len(trained_names)} classes and '
                         f'{where} has {len(untrained)} of its {len(names)} classes that are not among them: '
                         f'{untrained[:5]}; expected {allowed} (class folders) named as the trained ones: {shown}.')
    try:
        relabelled = relabel_to_class_names(dataset, trained_names, drop_others=keep_trained)
    except ValueError as e:
        raise ValueError(f'--checkpoint {args.checkpoint!r} with {where}: {one_line(e)}') from e
    if untrained:
        _logger.info(f'Evaluating the {len(names) - len(untrained)} classes of {where} the checkpoint was trained '
                     f'on (its --class-subset {ev.data.class_subset}), leaving out {len(untrained)}, by class name.')
    else:
        _logger.info(f'{where} has {len(names)} of the {len(trained_names)} classes the checkpoint was trained on: '
                     f'its images are scored with the model\'s own label ids for their class names.')
    return relabelled


def _read_valid_labels(path: str) -> List[int]:
    with open(path, 'r') as f:
        labels = [int(line.strip()) for line in f if line.strip()]
    if not labels:
        raise ValueError(f'--valid-labels {path!r} lists no class index.')
    return labels


def validate(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluate one model on one dataset split, as timm's ``validate.py`` does.

    Args:
        args: options from :func:`parse_args` (or :func:`get_args_parser`); not modified.

    Returns:
        timm's result dict: ``model``, ``top1``, ``top1_err``, ``top5``, ``top5_err`` (in %, 4 decimals),
        the ``--metrics-avg`` keys when asked, ``param_count`` (millions, 2 decimals), ``img_size``,
        ``crop_pct`` and ``interpolation``; then ``nll`` and ``ece`` (and their calibrated values with the
        ``temperature`` when the checkpoint holds one).

    Raises:
        ValueError: an option has a value it cannot take.
    """
    _check_choices(args)
    # Read (without running anything in it) before the model and the data: a damaged or foreign file stops here.
    checkpoint = _read_checkpoint_file(args.checkpoint) if args.checkpoint else None
    ev = _resolve(args, checkpoint)
    if ev.taken:
        settings = ', '.join(f'{k}={v!r}' for k, v in ev.taken.items())
        _logger.info(f'Using the training settings recorded in the checkpoint: {settings} (pass the flags to '
                     f'override).')
    if 'model' in ev.taken:
        check_model_name(ev.model.architecture, f'--checkpoint {args.checkpoint!r} records --model')
    device, model_dtype, autocast = _set_up(args, ev.data.seed)
    model = _create_model(ev, args)
    if checkpoint is not None:
        _check_weights_fit(model, ev, args, checkpoint)
    checkpoint_is_numpy = bool(args.checkpoint) and checkpoint is None
    del checkpoint  # before load_checkpoint reads the file again: one copy in memory at a time
    if args.checkpoint:
        if checkpoint_is_numpy and not hasattr(model, 'load_pretrained'):
            raise ValueError(f'--checkpoint {args.checkpoint!r} holds NumPy weights, which timm loads only into models '
                             f'with load_pretrained (the ViT family); {ev.model.architecture!r} has none: expected a '
                             f'.pth.tar, .pth or .safetensors checkpoint.')
        load_checkpoint(model, args.checkpoint, args.use_ema)
    if args.reparam:
        model = reparameterize_model(model)
    param_count = sum(p.numel() for p in model.parameters())
    _logger.info(f'Model {ev.model.architecture} created, param count: {param_count}')
    model, data_config, test_time_pool = _prepare_model(model, ev, args, device, model_dtype)
    loader, crop_pct, valid_labels, real_labels = _create_loader(
        ev, args, model, data_config, test_time_pool, device, model_dtype)
    metrics, measures = _evaluate(ev, args, model, loader, data_config, device, model_dtype, autocast, valid_labels,
                                  real_labels)
    return _results(ev, args, metrics, measures, param_count, data_config, crop_pct)


def _trained_class_names(record: Optional[RunRecord], num_classes: Optional[int],
                         args: argparse.Namespace) -> Optional[List[str]]:
    """The class names the checkpoint's training recorded, in label order.

    Args:
        record: the checkpoint's run record, or None.
        num_classes: the classifier's outputs, when known before the model is created.
        args: the options (for messages).

    Returns:
        The names; None when it records none (an older checkpoint, timm's) or a list that cannot name the
        classifier's outputs (not ``num_classes`` distinct strings; logged).
    """
    names = None if record is None else record.data.class_names
    if not names:
        return None
    if len(set(names)) != len(names) or (num_classes is not None and len(names) != num_classes):
        _logger.warning(f'--checkpoint {args.checkpoint!r}: its {len(names)} recorded class names are not '
                        f'{num_classes or len(names)} distinct names; the dataset\'s labels are used as they are.')
        return None
    return list(names)


def _checkpoint_temperature(record: Optional[RunRecord], checkpoint: Optional[Dict[str, Any]],
                            args: argparse.Namespace) -> Optional[float]:
    """The temperature train.py fitted for the weights evaluated (``--use-ema`` or not), or None."""
    fit = None if record is None else record.calibration
    if fit is None:
        return None
    evaluated = 'ema' if args.use_ema and isinstance((checkpoint or {}).get('state_dict_ema'), dict) else 'model'
    if fit.weights != evaluated:
        _logger.info(f'The checkpoint\'s temperature was fitted for its {fit.weights} weights, not the {evaluated} '
                     f'weights evaluated: no calibrated figures.')
        return None
    return fit.temperature


def _set_up(args: argparse.Namespace, seed: int):
    """The device, the model dtype and the autocast context; seeds and global switches."""
    device = resolve_device(args.device, 'validating', asked='device' in _passed(args))
    if args.num_gpu > 1 and (device.type != 'cuda' or torch.cuda.device_count() < args.num_gpu):
        available = torch.cuda.device_count() if device.type == 'cuda' else 0
        raise ValueError(f'--num-gpu {args.num_gpu} needs that many CUDA devices; {available} available on '
                         f'{device.type}.')
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else None
    autocast: Callable[[], Any] = nullcontext
    if args.amp:
        amp_dtype = getattr(torch, args.amp_dtype)
        autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        _logger.info(f'Validating in mixed precision ({args.amp_dtype} autocast).')
    else:
        _logger.info(f'Validating in {model_dtype or torch.float32}, AMP off.')

    random_seed(seed)
    if args.fuser:
        set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()

    return device, model_dtype, autocast


def _create_model(ev: _Evaluation, args: argparse.Namespace) -> nn.Module:
    """The model (with its pretrained weights when no --checkpoint is given)."""
    # A run record says how training created the model (train.py, like timm's, does not size it to the input);
    # otherwise timm's rule: a model of a fixed input size is created for the size evaluated.
    try:
        return create_model_from_record(ev.model, None if ev.as_trained else ev.input_options,
                                        pretrained=ev.model.pretrained, scriptable=args.torchscript)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001
        # An option the architecture does not take, pretrained weights that cannot be had, a bad tag.
        weights = '' if args.checkpoint else ' (its pretrained weights, as no --checkpoint is given)'
        raise ValueError(f'--model {ev.model.architecture}{weights}: timm cannot create it ({type(e).__name__}: '
                         f'{one_line(e)[:300]}).') from e


def _check_weights_fit(model: nn.Module, ev: _Evaluation, args: argparse.Namespace,
                       checkpoint: Dict[str, Any]) -> None:
    """Other names or shapes: one line naming the first mismatches, not load_state_dict's page of keys."""
    weights = checkpoint
    if args.use_ema and isinstance(checkpoint.get('state_dict_ema'), dict):
        weights = dict(state_dict=checkpoint['state_dict_ema'], arch=checkpoint.get('arch'))
    check_checkpoint_fits(weights, model, ev.model.architecture, '--checkpoint', args.checkpoint,
                          names=CHECKPOINT_FLAGS)


def _prepare_model(model: nn.Module, ev: _Evaluation, args: argparse.Namespace, device: torch.device,
                   model_dtype: Optional[torch.dtype]):
    """The data config, test-time pooling, device, dtype, memory layout, compilation and DataParallel."""
    data_config = resolve_input_data_config(model, ev.input_options, use_test_size=not args.use_train_size,
                                            verbose=True)
    test_time_pool = False
    if args.test_pool:
        model, test_time_pool = apply_test_time_pool(model, data_config)

    model = model.to(device=device, dtype=model_dtype)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = _compile(model, args)
    if args.num_gpu > 1:
        model = nn.DataParallel(model, device_ids=list(range(args.num_gpu)))

    return model, data_config, test_time_pool


def _create_loader(ev: _Evaluation, args: argparse.Namespace, model: nn.Module, data_config: Dict[str, Any],
                   test_time_pool: bool, device: torch.device, model_dtype: Optional[torch.dtype]):
    """The evaluation dataset and loader (timm's, or its NaFlex one), and the label restrictions."""
    input_img_mode = ev.data.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')
    if args.tf_preprocessing:
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise ValueError('--tf-preprocessing needs TensorFlow (pip install tensorflow-cpu); it is not installed.')
    dataset = _create_eval_dataset(ev, args, input_img_mode)
    valid_labels = _read_valid_labels(args.valid_labels) if args.valid_labels else None
    real_labels = None
    if args.real_labels:
        if not hasattr(dataset, 'filenames'):
            raise ValueError(f'--real-labels {args.real_labels!r} needs a dataset of image files (ImageNet); '
                             f'{type(dataset).__name__} has no file names.')
        real_labels = RealLabelsImagenet(dataset.filenames(basename=True), real_json=args.real_labels)

    crop_pct = 1.0 if test_time_pool else data_config['crop_pct']
    loader_kwargs = dict(
        batch_size=args.batch_size,
        use_prefetcher=not args.no_prefetcher,
        interpolation=data_config['interpolation'],
        mean=data_config['mean'],
        std=data_config['std'],
        num_workers=args.workers,
        crop_pct=crop_pct,
        crop_mode=data_config['crop_mode'],
        crop_border_pixels=args.crop_border_pixels,
        pin_memory=args.pin_mem,
        device=device,
        img_dtype=model_dtype or torch.float32,
    )
    if args.naflex_loader:
        from timm.data import create_naflex_loader
        patch_size = getattr(getattr(model, 'embeds', None), 'patch_size', None)
        loader = create_naflex_loader(
            dataset, patch_size=patch_size or (16, 16), max_seq_len=args.naflex_max_seq_len, **loader_kwargs)
    else:
        loader = create_loader(
            dataset, input_size=data_config['input_size'], tf_preprocessing=args.tf_preprocessing, **loader_kwargs)

    return loader, crop_pct, valid_labels, real_labels


class _Measures:
    """What validate.py measures besides :func:`timm_gsl.engine.evaluate`'s loss, top-1, top-5, NLL and ECE.

    Called with each batch's logits and labels: the images counted, ImageNet real labels, the predictions for
    ``--metrics-avg``, and the NLL and ECE at the checkpoint's temperature.
    """

    def __init__(self, device: torch.device, real_labels: Any, keep_predictions: bool,
                 temperature: Optional[float]):
        self.images = 0
        self.real_labels = real_labels
        self.keep_predictions = keep_predictions
        self.predictions: List[torch.Tensor] = []
        self.targets: List[torch.Tensor] = []
        self.temperature = temperature
        self.calibrated = CalibrationMeter(device) if temperature is not None else None

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.images += output.shape[0]
        if self.real_labels is not None:
            self.real_labels.add_result(output)
        if self.keep_predictions:
            self.predictions.append(output.argmax(dim=1).cpu())
            self.targets.append(target.cpu())
        if self.calibrated is not None:
            self.calibrated.update(output.float() / self.temperature, target)


def _evaluate(ev: _Evaluation, args: argparse.Namespace, model: nn.Module, loader: Any, data_config: Dict[str, Any],
              device: torch.device, model_dtype: Optional[torch.dtype], autocast: Callable[[], Any],
              valid_labels: Optional[List[int]], real_labels: Any) -> Tuple[Dict[str, float], _Measures]:
    """The evaluation of :func:`timm_gsl.engine.evaluate` (train.py's), with validate.py's measures beside it."""
    measures = _Measures(device, real_labels, bool(args.metrics_avg), ev.temperature)
    with torch.inference_mode():
        if not args.naflex_loader:
            # One throw-away batch so that the first timed batch does not pay for lazy initialisation.
            warmup = torch.randn((args.batch_size,) + tuple(data_config['input_size']), device=device,
                                 dtype=model_dtype)
            if args.channels_last:
                warmup = warmup.contiguous(memory_format=torch.channels_last)
            with autocast():
                model.eval()(warmup)
        metrics = evaluate(model, loader, None, device, amp_autocast=autocast, channels_last=args.channels_last,
                           model_dtype=model_dtype, log_interval=args.log_freq,
                           output_transform=None if valid_labels is None else (lambda out: out[:, valid_labels]),
                           on_batch=measures)
    return metrics, measures


def _results(ev: _Evaluation, args: argparse.Namespace, metrics: Dict[str, float], measures: _Measures,
             param_count: int, data_config: Dict[str, Any], crop_pct: float) -> Dict[str, Any]:
    """timm's result dict and summary line."""
    if measures.images == 0:
        raise ValueError(f'The {ev.data.eval_split!r} split of the dataset is empty: nothing to validate.')
    if measures.real_labels is not None:
        top1a, top5a = measures.real_labels.get_accuracy(k=1), measures.real_labels.get_accuracy(k=5)
    else:
        top1a, top5a = metrics['top1'], metrics['top5']
    extra = {}
    if args.metrics_avg:
        extra = classification_metrics(torch.cat(measures.predictions), torch.cat(measures.targets),
                                       args.metrics_avg)
    calibration = {'nll': metrics['nll'], 'ece': metrics['ece']}
    if measures.calibrated is not None:
        calibration.update({f'{k}_calibrated': v for k, v in measures.calibrated.compute().items()},
                           temperature=measures.temperature)
    results = OrderedDict(
        model=ev.model.architecture,
        top1=round(top1a, 4), top1_err=round(100 - top1a, 4),
        top5=round(top5a, 4), top5_err=round(100 - top5a, 4),
        **extra,
        param_count=round(param_count / 1e6, 2),
        img_size=data_config['input_size'][-1],
        crop_pct=crop_pct,
        interpolation=data_config['interpolation'],
        # After timm's keys, which keep their order.
        **{k: round(v, 4) for k, v in calibration.items()},
    )
    summary = (f" * Acc@1 {results['top1']:.3f} ({results['top1_err']:.3f}) "
               f"Acc@5 {results['top5']:.3f} ({results['top5_err']:.3f}) "
               f"NLL {results['nll']:.4f} ECE {results['ece']:.2f}%")
    if measures.calibrated is not None:
        summary += (f" | at the checkpoint's temperature {results['temperature']:.4g}: NLL "
                    f"{results['nll_calibrated']:.4f} ECE {results['ece_calibrated']:.2f}%")
    if extra:
        avg = args.metrics_avg
        summary += (f' | Precision({avg}) {extra[f"{avg}_precision"]:.3f} | Recall({avg}) '
                    f'{extra[f"{avg}_recall"]:.3f} | F1-score({avg}) {extra[f"{avg}_f1_score"]:.3f}')
    _logger.info(summary)
    return results


def _validate_with_retry(args: argparse.Namespace, initial_batch_size: int) -> Dict[str, Any]:
    """:func:`validate`, retried with smaller batches after a runtime error (out of memory, ...)."""
    batch_size = initial_batch_size
    error = 'Unknown'
    while batch_size:
        attempt = copy.copy(args)
        attempt.batch_size = batch_size * args.num_gpu  # DataParallel splits the batch over the GPUs
        try:
            if args.device.startswith('cuda') and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return validate(attempt)
        except RuntimeError as e:
            error = str(e)
            _logger.error(f'"{error}" while running validation.')
            if not check_batch_size_retry(error):
                break
        batch_size = decay_batch_step(batch_size)
        _logger.warning(f'Reducing batch size to {batch_size} for retry.')
    _logger.error(f'{args.model} failed to validate ({error}).')
    return OrderedDict(model=args.model, error=error)


def _bulk_checkpoints(folder: str) -> List[str]:
    """The ``*.pth.tar`` and ``*.pth`` files of a folder, in natural order."""
    found = glob.glob(os.path.join(folder, '*.pth.tar')) + glob.glob(os.path.join(folder, '*.pth'))
    return sorted(found, key=natural_key)


def _bulk_runs(args: argparse.Namespace) -> List[tuple]:
    """``(model, checkpoint)`` pairs for bulk validation; empty for a single run (timm's rules)."""
    if os.path.isdir(args.checkpoint):
        return [(args.model, path) for path in _bulk_checkpoints(args.checkpoint)]
    runs = []
    if args.model == 'all':  # each run has no checkpoint: its pretrained weights are evaluated
        runs = [(name, '') for name in list_models(pretrained=True, exclude_filters=list(_NOT_IN1K_FILTERS))]
    elif not is_model(args.model):
        runs = [(name, '') for name in list_models(args.model, pretrained=True)]
    if not runs and os.path.isfile(args.model):
        with open(args.model) as f:
            runs = [(line.strip(), '') for line in f if line.strip()]
    return runs


def write_results(
        path: str,
        results: Union[Dict[str, Any], List[Dict[str, Any]]],
        format: str = 'csv',
) -> None:
    """Write results as CSV (one row per result) or JSON, atomically (temporary file, then rename).

    Args:
        path: the file to write.
        results: one result dict or a list of them.
        format: 'csv' or 'json'.
    """
    if format not in RESULTS_FORMATS:
        raise ValueError(f"Unknown results format {format!r}, expected one of {RESULTS_FORMATS}.")
    if format == 'json':
        text = json.dumps(results, indent=4)
    else:
        rows = results if isinstance(results, (list, tuple)) else [results]
        columns = list(OrderedDict((k, None) for row in rows for k in row))
        buffer = io.StringIO()
        if rows:
            writer = csv.DictWriter(buffer, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        text = buffer.getvalue()
    write_text_atomic(path, text)


def main(argv: Optional[Sequence[str]] = None) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
    """Command-line entry: validate, write ``--results-file``, print ``--result`` and the JSON results.

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).

    Returns:
        The result dict, or for bulk validation (a checkpoint folder, ``--model all``, a wildcard or a
        file of model names) the list of results, best top-1 first. A refused command line (a bad value
        or combination, a model timm does not have, a missing or unreadable file) exits with status 2 and
        one line, ``validate.py: error: <message>``, before anything is evaluated or written.
    """
    setup_logging()
    args = parse_args(argv)
    try:
        return _main(args)
    except ValueError as e:
        exit_with_error('validate.py', e)


def _main(args: argparse.Namespace) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
    check_args(args)
    runs = _bulk_runs(args)
    if runs:
        _logger.info('Running bulk validation on: ' + ', '.join(c or m for m, c in runs))
        results = []
        # Runs over model names: each name is given, a checkpoint's recorded model must not replace it.
        passed = sorted(set(_passed(args)) | ({'model'} if not os.path.isdir(args.checkpoint) else set()))
        initial_batch_size = args.batch_size
        try:
            for model_name, checkpoint in runs:
                run_args = copy.copy(args)
                run_args.model, run_args.checkpoint, run_args.passed_flags = model_name, checkpoint, passed
                try:
                    result = _validate_with_retry(run_args, initial_batch_size)
                except Exception as e:  # one model that cannot be created or loaded must not end the sweep
                    _logger.error(f'{checkpoint or model_name} failed to validate: {type(e).__name__}: {e}')
                    continue
                if 'error' in result:
                    continue
                if checkpoint:
                    result['checkpoint'] = checkpoint
                results.append(result)
        except KeyboardInterrupt:
            pass
        results = sorted(results, key=lambda r: r['top1'], reverse=True)
    elif args.retry:
        results = _validate_with_retry(args, args.batch_size)
    else:
        results = validate(args)

    if args.results_file:
        write_results(args.results_file, results, format=args.results_format)
    print(f'--result\n{json.dumps(results, indent=4)}')
    return results


def cli() -> None:
    """Console-script entry point ``timm-gsl-validate`` (and ``python -m timm_gsl.validate``): run :func:`main`.

    :func:`main` returns the results; a console-script wrapper passes the return value to ``sys.exit``,
    which would print it and exit with status 1. This entry point drops it, so a finished run exits
    with status 0 and a refused command line with status 2.
    """
    main()


if __name__ == '__main__':
    # Run the imported timm_gsl.cli.validate, not this __main__ copy of it, so that every object it defines
    # (and anything pickled from it) belongs to one module whichever way the script was started.
    from timm_gsl.cli.validate import cli as _cli
    _cli()
