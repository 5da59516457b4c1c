"""Publishing to the Hugging Face Hub: a checkpoint of our ``train.py`` becomes a plain timm model repo.

A model trained with the group softmax loss predicts with its ordinary linear classifier (SPEC.md,
Inference), so what we publish is an ordinary timm export, loadable with
``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` by anyone, without ``timm_gsl``:

* ``model.safetensors``: the weights (never a pickle);
* ``config.json``: timm's own (:func:`timm.models.save_for_hf`) with the class names and the training
  preprocessing (input size, mean, std, crop), without ``num_classes`` inside ``model_args`` (timm
  reads it from the top level; Hugging Face transformers passes it again and fails on the duplicate),
  and without timm's provenance of the base architecture's weights (``origin_url``, paper, tag):
  ``origin_url`` is the published repo's address;
* ``README.md``: a model card with Hub metadata (``base_model`` when training started from a Hub
  model), the group softmax settings, the data conditions, the evaluation (from ``summary.csv`` beside
  the checkpoint), usage that runs as printed, the training command and the citation. It names the
  model as it loads where the files are: ``hf-hub:ORG/NAME`` on the Hub, ``local-dir:FOLDER`` for a
  local export. A card the repo already has is kept unless asked to replace it;
* ``learning_curves.png`` when ``train.py`` wrote one beside the checkpoint.

A checkpoint that records a fitted temperature T (``calibration``, a
:class:`timm_gsl.calibration.CalibrationFit`) is published calibrated: the classifier is divided by T, so
the model returns the trained logits / T (same predictions), and ``config.json`` and the card say so
(``fold_temperature=False`` publishes the weights as trained, with T in ``config.json`` and the card).

Everything that can be checked locally (repo id, token, checkpoint, architecture) is checked before
the first request to the Hub.

Examples:
    >>> from timm_gsl.hub import push_checkpoint
    >>> url = push_checkpoint('output/train/run/model_best.pth.tar', 'my-org/resnet50-gsl')
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import shlex
import shutil
import stat
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import timm
from timm.data import resolve_data_config
from timm.models import clean_state_dict, save_for_hf

from . import data as gsl_data
from .calibration import CalibrationFit
from .head import UnsupportedModelError, classifier_layers, is_converted, unconvert_model
from .registry import create_model_from_record
from .record import ModelRecord, RunRecord, from_training_arguments
from .engine.atomic import atomic_path
from .engine.checkpoint_io import read_checkpoint

__all__ = [
    'CITATION',
    'HubPublishError',
    'build_model',
    'TrainingCheckpoint',
    'base_model',
    'check_publish_options',
    'check_repo_id',
    'export_checkpoint',
    'fold_into_classifier',
    'hub_url',
    'model_card',
    'published_calibration',
    'push_checkpoint',
    'load_training_checkpoint',
    'transformers_loads',
]

_logger = logging.getLogger(__name__)

# Renders the training arguments of a checkpoint whose run record has no training command (written before the
# record kept one) as the command line that trains it again; the command line module knows its flags (see
# timm_gsl.cli.train_args.training_command).
TrainingCommand = Callable[[Dict[str, Any]], str]

CITATION = """@inproceedings{kobayashi2021group,
  title     = {Group Softmax Loss with Discriminative Feature Grouping},
  author    = {Kobayashi, Takumi},
  booktitle = {Proceedings of the IEEE/CVF Winter Conference on Applications of Computer Vision (WACV)},
  year      = {2021}
}"""

# The Hub's rule for a repo name: letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 characters.
_REPO_PART = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')
# Files the export may hold, in the order the card lists them.
WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
CARD_FILE = 'README.md'
CURVES_FILE = 'learning_curves.png'
SUMMARY_FILE = 'summary.csv'
# The Hub dataset the embedded subset comes from, for the card's `datasets` metadata.
_EMBEDDED_HUB_DATASET = 'zalando-datasets/fashion_mnist'
class HubPublishError(RuntimeError):
    """The Hub refused or dropped the upload; nothing was published by this call (retrying is safe)."""


class TrainingCheckpoint:
    """What a checkpoint of our ``train.py`` holds, read without unpickling arbitrary objects.

    Args:
        path: the checkpoint file.
        state_dict: the model weights (EMA weights when asked for and present).
        args: the training arguments (``argparse.Namespace`` as a dict).
        epoch: the epoch it was saved after, or None.
        metric: the value of the training's ``--eval-metric`` at that epoch, or None.
        used_ema: whether ``state_dict`` holds the EMA weights.
        calibration: the temperature fitted after training (its ``calibration`` entry), or None.
        record: the run's :class:`~timm_gsl.record.RunRecord` (read from ``args`` for checkpoints without one).
    """

    def __init__(self, path: str, state_dict: Dict[str, torch.Tensor], args: Dict[str, Any],
                 epoch: Optional[int], metric: Optional[float], used_ema: bool,
                 calibration: Optional[CalibrationFit] = None, record: Optional[RunRecord] = None):
        self.path = path
        self.state_dict = state_dict
        self.args = args
        self.epoch = epoch
        self.metric = metric
        self.used_ema = used_ema
        self.calibration = calibration
        self.record = record if record is not None else from_training_arguments(args, version=0)

    @property
    def model_name(self) -> str:
        """The name the model was created with."""
        return self.record.model.architecture


def check_repo_id(repo_id: Any) -> str:
    """Check a Hub repo id of the form ``ORG/NAME``.

    Args:
        repo_id: the id to check.

    Returns:
        ``repo_id``, unchanged.

    Raises:
        ValueError: ``repo_id`` is not ``ORG/NAME`` with Hub-valid parts.
    """
    allowed = ("expected 'ORG/NAME': two parts of letters, digits, '-', '_' or '.', not starting with "
               "'-' or '.', without '--' or '..', at most 96 characters each")
    parts = repo_id.split('/') if isinstance(repo_id, str) else []
    if len(parts) != 2 or not all(_REPO_PART.match(p) and len(p) <= 96 and '--' not in p and '..' not in p
                                  and not p.endswith(('.', '-')) for p in parts):
        raise ValueError(f'Invalid repo_id {repo_id!r}: {allowed}.')
    return repo_id


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
                              float(metric) if isinstance(metric, (int, float)) else None, used_ema,
                              record.calibration, record)


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


def _class_names(record: RunRecord, num_classes: int) -> Optional[List[str]]:
    """The names of the classes the model predicts, in label order: the record's, else (a checkpoint from before
    class names were recorded) the evaluation dataset's, when it names them."""
    names = record.data.class_names
    data = record.data
    if names is None and (gsl_data.is_embedded(data.dataset) or data.root):
        try:
            names = gsl_data.dataset_class_names(gsl_data.create_eval_dataset(data))
        except Exception as e:  # the data may live on the training machine only
            _logger.warning(f'No class names for the card: the dataset {data.dataset or data.root!r} cannot be read '
                            f'here ({e}).')
            return None
    return list(names) if names and len(names) == num_classes else None


def _evaluation(checkpoint: TrainingCheckpoint) -> Tuple[Dict[str, float], List[Dict[str, str]]]:
    """The checkpoint's epoch metrics and every evaluated epoch, from ``summary.csv`` beside it."""
    summary = os.path.join(os.path.dirname(os.path.abspath(checkpoint.path)), SUMMARY_FILE)
    rows: List[Dict[str, str]] = []
    if os.path.isfile(summary):
        with open(summary, newline='') as f:
            rows = [r for r in csv.DictReader(f) if r.get('eval_top1') not in (None, '')]
    final: Dict[str, float] = {}
    for row in rows:
        if checkpoint.epoch is not None and row.get('epoch') == str(checkpoint.epoch):
            final = {k[len('eval_'):]: float(v) for k, v in row.items() if k.startswith('eval_') and v != ''}
    record = checkpoint.record
    if not final and record.evaluation is not None and record.evaluation.epoch == checkpoint.epoch:
        final = dict(record.evaluation.metrics)  # no summary.csv beside the checkpoint: its record's
    if not final and checkpoint.metric is not None and record.training.eval_metric == 'top1':
        final = {'top1': checkpoint.metric}
    return final, rows


def _data_description(record: RunRecord) -> Tuple[str, Optional[str]]:
    """A readable dataset name and the Hub dataset id, when known."""
    dataset = record.data.dataset
    if gsl_data.is_embedded(dataset):
        return 'Fashion-MNIST (the subset embedded in timm-gsl)', _EMBEDDED_HUB_DATASET
    if dataset.startswith(('hfds/', 'hfids/')):
        name = dataset.split('/', 1)[1]
        return name, name
    if dataset:
        return dataset, None
    return f'image folder {record.data.folder!r}' if record.data.folder else 'unknown', None


def _fmt(value: float) -> str:
    return f'{value:.2f}'


def hub_url(repo_id: str) -> str:
    """The web address of a Hub model repo (on ``HF_ENDPOINT`` when set)."""
    from huggingface_hub import constants
    return f'{constants.ENDPOINT.rstrip("/")}/{repo_id}'


def base_model(spec: ModelRecord) -> Optional[str]:
    """The Hub model a training run started from, for the card's ``base_model``, or None.

    That is the repo of an initial checkpoint ``hf-hub:ORG/NAME``, or for a run that started from pretrained
    weights (not read from a file of its own) the repo of an architecture ``hf-hub:ORG/NAME`` or the Hub repo
    timm downloads a timm model's pretrained weights from (``resnet18`` -> ``timm/resnet18.a1_in1k``).

    Args:
        spec: the model section of the run's record.
    """
    def repo_of(name: str) -> Optional[str]:
        repo = name[len('hf-hub:'):].split('@')[0]
        try:
            return check_repo_id(repo)
        except ValueError:
            return None

    initial = spec.initial_checkpoint or ''
    if initial.startswith('hf-hub:'):
        return repo_of(initial)
    model = spec.architecture
    if not spec.pretrained or spec.pretrained_path:
        return None
    if model.startswith('hf-hub:'):
        return repo_of(model)
    if ':' in model:  # local-dir: and other local sources
        return None
    try:
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(model, allow_unregistered=True)
    except Exception:  # an unknown tag: no pretrained weights to name
        return None
    hub_id = getattr(cfg, 'hf_hub_id', None) if cfg is not None else None
    return repo_of(f'hf-hub:{hub_id}') if hub_id else None


def transformers_loads(config: Dict[str, Any]) -> bool:
    """Whether Hugging Face transformers (``TimmWrapper``) can load an export with this ``config.json``.

    transformers builds it with ``timm.create_model(config['architecture'], num_classes=..., **model_args)``:
    that needs an architecture timm has, and no ``num_classes`` (nor ``features_only``) among ``model_args``
    (our export removes ``num_classes``; timm's own repeats it, which transformers rejects).
    """
    architecture = config.get('architecture')
    model_args = config.get('model_args') or {}
    return (isinstance(architecture, str) and timm.is_model(architecture) and 'num_classes' not in model_args
            and not model_args.get('features_only'))


_IMAGE_MODES = {1: 'L', 3: 'RGB', 4: 'RGBA'}


def model_card(
        repo_id: Optional[str],
        checkpoint: TrainingCheckpoint,
        model: nn.Module,
        config: Dict[str, Any],
        license: str = 'apache-2.0',
        learning_curves: bool = False,
        local_dir: Optional[str] = None,
        revision: Optional[str] = None,
        training_command: Optional[TrainingCommand] = None,
) -> str:
    """The ``README.md`` of a published checkpoint: Hub metadata, settings, data, evaluation, usage, citation.

    Every name in it loads the files where they are: ``hf-hub:ORG/NAME`` (``@BRANCH`` when committed to
    a branch) for a Hub repo, ``local-dir:FOLDER`` for a local export.

    Args:
        repo_id: ``ORG/NAME`` the files are published to; None for a local export (``local_dir``).
        checkpoint: the published checkpoint.
        model: the model built from it.
        config: the exported ``config.json`` content.
        license: the Hub license id.
        learning_curves: whether ``learning_curves.png`` is published beside the card.
        local_dir: the folder of a local export (when ``repo_id`` is None).
        revision: the branch of ``repo_id`` the files are committed to (None or ``main``: the default one).
        training_command: renders the checkpoint's training arguments as a command line, for a checkpoint whose
            record holds none (the card shows the record's command, else this one's, else none).

    Returns:
        The card's text.
    """
    if repo_id:
        load_name = f'hf-hub:{repo_id}' + (f'@{revision}' if revision and revision != 'main' else '')
        title = repo_id.split('/')[-1]
    elif local_dir:
        load_name = f'local-dir:{os.path.abspath(local_dir)}'
        title = os.path.basename(os.path.normpath(local_dir))
    else:
        raise ValueError('model_card: give the Hub repo_id or the local_dir the files are in.')
    record = checkpoint.record
    final, rows = _evaluation(checkpoint)
    data_name, hub_dataset = _data_description(record)
    conditions = _conditions(record, config['num_classes'])
    split, split_source, hub_split = _evaluation_split(record)
    base = base_model(record.model)
    metadata = _card_metadata(config, final, data_name, hub_dataset, conditions, hub_split, license, base, title)
    lines = ['---', metadata, '---', '', f'# Model card for {title}', '']
    lines += _card_details(checkpoint, model, config, load_name, base)
    lines += _card_training(record, data_name, conditions, split, split_source)
    lines += _card_evaluation(final, rows, learning_curves, config.get('calibration'), _loss_labels(record))
    lines += _card_usage(record, config, load_name, data_name, model)
    # The command train.py recorded; for checkpoints from before the record kept it, rendered by the caller.
    command = record.training.command or (training_command(checkpoint.args) if training_command else None)
    if command:
        lines += ['## Training command', '', '```bash', command, '```', '']
    lines += ['## Citation', '', '```bibtex', CITATION, '```', '']
    return '\n'.join(lines)


def _evaluation_split(record: RunRecord) -> Tuple[str, str, str]:
    """The evaluation split: its name in the run, where its images come from (words), and its name in the Hub
    dataset of the card's metadata (the embedded validation images are a part of Fashion-MNIST's test set)."""
    split, dataset = record.data.eval_split, record.data.dataset
    if gsl_data.is_embedded(dataset):
        info = gsl_data.embedded_dataset_info()
        return split, (f"{info['val_per_class']} images per class of Fashion-MNIST's test set, never trained "
                       f"on"), 'test'
    if dataset:
        return split, f'the dataset\'s `{split}` split', split
    return split, f'the `{split}` folder beside the training images', split


def _loss_labels(record: RunRecord) -> Dict[str, str]:
    """What each loss column of ``summary.csv`` measures, in words, for this run's settings."""
    loss = record.loss
    targets = ['mixed targets'] if loss.mixes_targets else []
    if loss.smoothing:
        targets.append(f'label smoothing {loss.smoothing}')
    on = 'augmented training batches' + (f', {", ".join(targets)}' if targets else '')
    if loss.kind == 'gsl':
        trained = f'group softmax loss (the sum over groups, Type-{loss.group_type}), {on}'
    else:
        trained = f'training loss (`{loss.kind}`), {on}'
    if record.distillation is not None:
        trained += ', with the distillation term'
    return {'train_loss': trained,
            'train_softmax_loss': 'softmax cross-entropy of the same batches',
            'train_clean_loss': 'softmax cross-entropy of the training images without augmentation, eval mode',
            'eval_loss': 'softmax cross-entropy of the evaluation images'}


def _conditions(record: RunRecord, num_classes: int) -> str:
    """The data conditions in words: classes (and the subset drawn), training images per class."""
    subset = record.data.class_subset
    conditions = f'{num_classes} classes'
    if subset is not None:
        conditions += f' (class subset {subset!r} drawn with seed {record.data.seed})'
    per_class = record.data.samples_per_class
    return conditions + (f', {per_class} training images per class' if per_class else ', every training image')


def _card_metadata(config: Dict[str, Any], final: Dict[str, float], data_name: str, hub_dataset: Optional[str],
                   conditions: str, split: str, license: str, base: Optional[str], title: str) -> str:
    """The card's YAML header: library, license, tags, dataset, base model and the model-index results.

    The model-index names its dataset by Hub id: it is written only for a dataset that has one (an image folder
    or a dataset of another source has none; its metrics are in the card's evaluation table).
    """
    from huggingface_hub import EvalResult, ModelCardData

    eval_results = []
    for key, name in (('top1', 'Top-1 accuracy'), ('top5', 'Top-5 accuracy')):
        if key in final and hub_dataset:
            eval_results.append(EvalResult(
                task_type='image-classification', task_name='Image Classification',
                dataset_type=hub_dataset, dataset_name=f'{data_name}: {conditions}',
                dataset_split=split, metric_type='accuracy' if key == 'top1' else 'top_5_accuracy',
                metric_name=name, metric_value=round(final[key], 4)))
    tags = ['image-classification', 'timm', 'group-softmax-loss', 'timm-gsl']
    if transformers_loads(config):
        tags.append('transformers')
    card_data = ModelCardData(
        library_name='timm', license=license, tags=tags, pipeline_tag='image-classification',
        datasets=[hub_dataset] if hub_dataset else None, base_model=base, model_name=title,
        eval_results=eval_results or None)
    return card_data.to_yaml()


def _gmacs(model: nn.Module, input_size: Sequence[int]) -> Optional[float]:
    """Multiply-adds of one eval forward pass of one image, in billions (torch's FLOP counter / 2); None if the
    model cannot be run on a zero image on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model.eval()(torch.zeros(1, *input_size))
        return counter.get_total_flops() / 2 / 1e9
    except Exception:  # an unusual model: the card goes without the figure
        return None
    finally:
        model.train(was_training)


def _card_details(checkpoint: TrainingCheckpoint, model: nn.Module, config: Dict[str, Any], load_name: str,
                  base: Optional[str]) -> List[str]:
    """What the model is: the introduction and the model details."""
    architecture, pre = config['architecture'], config['pretrained_cfg']
    input_size = [int(s) for s in pre['input_size']]
    params = sum(p.numel() for p in model.parameters())
    gmacs = _gmacs(model, input_size)
    labels = f' ({", ".join(map(str, config["label_names"]))})' if config.get('label_names') else ''
    lines = [
        f'A timm `{architecture}` image classifier trained with the group softmax loss with discriminative '
        'feature grouping (Kobayashi, WACV 2021) using timm-gsl. '
        'The loss only shapes training: the model predicts with its ordinary linear classifier, so it is a '
        'plain timm model and loads without timm-gsl: '
        f'`timm.create_model({load_name!r}, pretrained=True)`.', '',
        '## Model details', '',
        f'- **Architecture:** `{architecture}` ({params / 1e6:.2f}M parameters'
        + (f', {gmacs:.3g} GMACs at {"x".join(map(str, input_size[1:]))}' if gmacs is not None else '') + ')',
        f'- **Classes:** {config["num_classes"]}{labels}',
        f'- **Input:** {"x".join(map(str, input_size))}, mean {pre.get("mean")}, std {pre.get("std")}, '
        f'crop {pre.get("crop_pct")} ({pre.get("interpolation")})',
        f'- **Weights:** {"EMA weights" if checkpoint.used_ema else "model weights"} after epoch '
        f'{checkpoint.epoch} (the best by {checkpoint.record.training.eval_metric})',
    ]
    if base:
        lines.append(f'- **Started from:** [{base}]({hub_url(base)})')
    if config.get('calibration'):
        lines.append(f'- **Calibration:** {_calibration_sentence(config["calibration"])}')
    return lines + ['']


def _calibration_sentence(calibration: Dict[str, Any]) -> str:
    """Whether the published logits are temperature-scaled, by which T, fitted on which images."""
    t = f'T = {calibration["temperature"]:.4g}'
    fitted = (f'fitted on {calibration["images"]} images: {calibration["source"]}; figures reported on '
              f'{calibration["reported_on"]}')
    if calibration['folded']:
        return (f'the logits are temperature-scaled by {t} ({fitted}): the published classifier is the trained '
                f'one divided by T, so the probabilities are calibrated and the predictions unchanged.')
    return (f'the published weights are not calibrated (they are the weights as trained); dividing the logits '
            f'by {t} ({fitted}) calibrates them.')


def _calibration_rows(calibration: Dict[str, Any]) -> List[str]:
    """NLL and ECE (percent) before and after temperature scaling, as rows of the metrics table."""
    after = f'after (T = {calibration["temperature"]:.4g})'
    return [f'| NLL, before temperature scaling | {calibration["nll_before"]:.3f} |',
            f'| NLL, {after} | {calibration["nll_after"]:.3f} |',
            f'| ECE (%), before temperature scaling | {_fmt(calibration["ece_before"])} |',
            f'| ECE (%), {after} | {_fmt(calibration["ece_after"])} |']


def _card_training(record: RunRecord, data_name: str, conditions: str, split: str,
                   split_source: str) -> List[str]:
    """How it was trained: the loss (and the teacher it was distilled from) and the data."""
    loss = record.loss
    lines = ['## Training loss', '']
    if loss.kind == 'gsl':
        lines += [
            f'- **Loss:** group softmax loss, Type-{loss.group_type}',
            f'- **Groups G:** {loss.groups}',
            f'- **Grouping:** {loss.grouping}',
            f'- **Label smoothing:** {loss.smoothing}',
        ]
    else:
        lines += [f'- **Loss:** `{loss.kind}` (a baseline run, not the group softmax loss)']
    if record.distillation is not None:
        lines.append(f'- **Distilled from:** `{record.distillation.teacher}` ({record.distillation.kind} '
                     f'distillation, the loss above as the task loss)')
    return lines + [
        '', '## Training data', '',
        f'- **Dataset:** {data_name}',
        f'- **Conditions:** {conditions}',
        f'- **Evaluated on:** the `{split}` split: {split_source}; same classes',
        '',
    ]


_LOSS_COLUMNS = (('train_loss', 'training loss'), ('train_softmax_loss', 'softmax loss, same batches'),
                 ('train_clean_loss', 'clean training loss'), ('eval_loss', 'evaluation loss'))


def _card_evaluation(final: Dict[str, float], rows: List[Dict[str, str]], learning_curves: bool,
                     calibration: Optional[Dict[str, Any]] = None,
                     loss_labels: Optional[Dict[str, str]] = None) -> List[str]:
    """The final metrics (with NLL and ECE before and after temperature scaling), every evaluated epoch with
    each loss named for what it measures (``loss_labels``, from :func:`_loss_labels`), and the learning
    curves."""
    loss_labels = loss_labels or {}
    lines = ['## Evaluation', '']
    if final or calibration:
        lines += ['| metric | value |', '|---|---|']
        lines += [f'| {name} | {_fmt(final[key])} |' for key, name in
                  (('top1', 'top-1 accuracy (%)'), ('top5', 'top-5 accuracy (%)'),
                   ('loss', 'evaluation loss (softmax cross-entropy)')) if key in final]
        lines += _calibration_rows(calibration) if calibration else []
        lines.append('')
    if calibration:
        lines += [f'NLL and ECE (expected calibration error) are measured on {calibration["reported_on"]} '
                  f'({calibration["reported_images"]} images).', '']
    if rows:
        columns = [(key, name) for key, name in _LOSS_COLUMNS if any(row.get(key) not in (None, '') for row in rows)]
        columns += [('eval_top1', 'top-1'), ('eval_top5', 'top-5')]
        lines += ['Every evaluated epoch:', '', '| epoch | ' + ' | '.join(name for _, name in columns) + ' |',
                  '|---' * (len(columns) + 1) + '|']
        for row in rows:
            lines.append('| ' + ' | '.join([row['epoch']] + [
                _fmt(float(row[k])) if row.get(k) not in (None, '') else '' for k, _ in columns]) + ' |')
        lines += [''] + [f'- **{name}:** {loss_labels[key]}' for key, name in columns if key in loss_labels]
        lines.append('')
    if not final and not rows and not calibration:
        lines += ['No evaluation was recorded with this checkpoint.', '']
    if learning_curves:
        lines += ['## Learning curves', '', f'![Learning curves]({CURVES_FILE})', '']
    return lines


def _card_features(model: nn.Module, load_name: str) -> List[str]:
    """timm's usual snippets: image embeddings (no classifier) and, for models that have them, feature maps."""
    lines = [
        'Image embeddings (the classifier\'s input; `num_classes=0` leaves the classifier out):', '',
        '```python',
        f'model = timm.create_model({load_name!r}, pretrained=True, num_classes=0).eval()',
        'with torch.no_grad():',
        '    embedding = model(transform(image).unsqueeze(0))  # (1, num_features)',
        '```', '',
    ]
    if getattr(model, 'feature_info', None):
        lines += [
            'Feature maps of every stage:', '',
            '```python',
            f'model = timm.create_model({load_name!r}, pretrained=True, features_only=True).eval()',
            'with torch.no_grad():',
            '    for feature_map in model(transform(image).unsqueeze(0)):',
            '        print(feature_map.shape)',
            '```', '',
        ]
    return lines


def _card_usage(record: RunRecord, config: Dict[str, Any], load_name: str, data_name: str,
                model: nn.Module) -> List[str]:
    """How to use it: the Python snippet, the validate.py command, a fine-tuning command."""
    loss, subset, dataset = record.loss, record.data.class_subset, record.data.dataset
    input_size = [int(s) for s in config['pretrained_cfg']['input_size']]
    num_classes = config['num_classes']
    validate = ['python', 'validate.py', '--model', load_name]
    if not gsl_data.is_embedded(dataset):
        # Never a path of the training machine: the folder's name, as a place to fill in.
        folder = f'path/to/{record.data.folder}' if record.data.folder else 'DIR'
        validate += (['--dataset', dataset] if dataset else []) + ['--data-dir', folder]
    if subset is not None:
        validate += ['--class-subset', str(subset), '--seed', str(record.data.seed)]
    # Fine-tuning elsewhere: only what this run fixes (input size, loss settings); the rest is the user's.
    finetune = ['python', 'train.py', '--model', load_name, '--pretrained', '--data-dir', 'DIR',
                '--num-classes', 'K', '--input-size'] + [str(s) for s in input_size]
    if loss.kind == 'gsl':
        finetune += ['--loss', 'gsl', '--gsl-groups', str(loss.groups or 4),
                     '--gsl-grouping', str(loss.grouping or 'discriminative')]
    else:
        finetune += ['--loss', loss.kind]
    image_mode = _IMAGE_MODES.get(input_size[0], 'RGB')
    return [
        '## Usage', '',
        f'The model takes {"x".join(map(str, input_size[1:]))} {image_mode} images (the transform below resizes '
        f'and normalises any image) and tells apart the {num_classes} classes of {data_name} it was trained on.',
        '',
        '```python',
        'import timm',
        'import torch',
        'from PIL import Image',
        '',
        f'model = timm.create_model({load_name!r}, pretrained=True).eval()',
        'config = timm.data.resolve_data_config({}, model=model)',
        'transform = timm.data.create_transform(**config)',
        "labels = model.pretrained_cfg.get('label_names') or [str(i) for i in range(model.num_classes)]",
        '',
        f"image = Image.open('image.jpg').convert('{image_mode}')  # your image",
        'with torch.no_grad():',
        '    probabilities = model(transform(image).unsqueeze(0)).softmax(dim=-1)[0]',
        'top = probabilities.topk(min(5, model.num_classes))',
        'for p, i in zip(top.values.tolist(), top.indices.tolist()):',
        "    print(f'{labels[i]}: {p:.3f}')",
        '```', '',
    ] + _card_features(model, load_name) + [
        'Evaluate it again (timm-gsl\'s `validate.py`, same data conditions):', '',
        '```bash', ' '.join(shlex.quote(w) for w in validate), '```', '',
        f'Fine-tune it on your own images (a folder `DIR` with `train` and `validation` splits, `K` classes; '
        f'with K other than {num_classes} timm replaces the classifier) with timm-gsl\'s `train.py`, at the '
        f'input size it was trained at and with its loss settings; choose the schedule for your data:', '',
        '```bash', ' '.join(shlex.quote(w) for w in finetune), '```', '',
    ]


# Fields of timm's pretrained_cfg about where the *base architecture's* weights come from (timm's release,
# its paper, its Hub repo): they do not describe the weights published here.
_FOREIGN_PROVENANCE = ('origin_url', 'hf_hub_id', 'hf_hub_filename', 'url', 'file', 'source', 'tag',
                       'paper_ids', 'paper_name', 'notes', 'description')


def _fold_published(model: nn.Module, checkpoint: TrainingCheckpoint, fold_temperature: bool,
                    input_size: Tuple[int, ...]) -> Optional[Dict[str, Any]]:
    """Divide the published classifier by the fitted temperature when folding (in place); return the
    ``calibration`` object of ``config.json`` (None when the checkpoint has none for these weights)."""
    calibration = published_calibration(checkpoint, fold_temperature)
    if calibration is None:
        return None
    if fold_temperature:
        fold_into_classifier(model, calibration.temperature, input_size)
    return dict(calibration.to_dict(), folded=fold_temperature)


def _export_to(folder: str, checkpoint: TrainingCheckpoint, repo_id: Optional[str], license: str,
               local_dir: Optional[str] = None, revision: Optional[str] = None,
               training_command: Optional[TrainingCommand] = None, fold_temperature: bool = True) -> List[str]:
    """Write the published files of ``checkpoint`` into the empty ``folder``; return their names.

    The card and ``config.json`` name ``repo_id`` (``revision``) when given, else the local folder
    ``local_dir``.
    """
    model = build_model(checkpoint)
    data_config = resolve_data_config(_input_options(checkpoint.record), model=model)
    calibration = _fold_published(model, checkpoint, fold_temperature, data_config['input_size'])
    labels = _class_names(checkpoint.record, model.num_classes)
    save_for_hf(model, folder, model_config=dict(label_names=labels) if labels else None,
                safe_serialization=True, data_config=data_config)
    config_path = os.path.join(folder, CONFIG_FILE)
    with open(config_path) as f:
        config = json.load(f)
    # The top-level num_classes builds the classifier; a second copy among the reconstruction
    # arguments makes transformers' TimmWrapper pass it twice.
    model_args = config.get('model_args') or {}
    model_args.pop('num_classes', None)
    model_args.pop('base_model', None)
    # timm's provenance of the base architecture's weights (origin, paper, tag, license) would attribute
    # these weights to timm: it is replaced by this repo's address and license.
    pretrained_cfg = config['pretrained_cfg']
    for key in _FOREIGN_PROVENANCE:
        pretrained_cfg.pop(key, None)
    pretrained_cfg['license'] = license
    if repo_id:
        pretrained_cfg['origin_url'] = hub_url(repo_id)
    if model_args:
        config['model_args'] = model_args
    else:
        config.pop('model_args', None)
    if calibration is not None:  # timm and transformers ignore keys they do not know
        config['calibration'] = calibration
    with atomic_path(config_path) as tmp, open(tmp, 'w') as f:
        json.dump(config, f, indent=2)
    files = [WEIGHTS_FILE, CONFIG_FILE]
    curves = os.path.join(os.path.dirname(os.path.abspath(checkpoint.path)), CURVES_FILE)
    if os.path.isfile(curves):
        shutil.copyfile(curves, os.path.join(folder, CURVES_FILE))
        files.append(CURVES_FILE)
    card = model_card(repo_id, checkpoint, model, config, license=license, learning_curves=CURVES_FILE in files,
                      local_dir=local_dir, revision=revision, training_command=training_command)
    with open(os.path.join(folder, CARD_FILE), 'w', encoding='utf-8') as f:
        f.write(card)
    files.append(CARD_FILE)
    return files


def _input_options(record: RunRecord) -> Dict[str, Any]:
    """The recorded input and evaluation transform, as timm's ``resolve_data_config`` reads them."""
    data = record.data
    options = dict(input_size=record.model.input_size, in_chans=record.model.in_chans, mean=data.mean, std=data.std,
                   crop_pct=data.crop_pct, crop_mode=data.crop_mode, interpolation=data.interpolation or None)
    return {k: v for k, v in options.items() if v is not None}


def _default_modes(folder: str) -> Tuple[int, int]:
    """The permissions ``open()`` and ``os.mkdir()`` give a new file and folder in ``folder``, measured there.

    (The process umask, and a default ACL where the file system has one; reading the umask with
    ``os.umask`` would briefly change it for every thread.)
    """
    probe = os.path.join(folder, '.permissions-probe')
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    os.mkdir(probe + '.d', 0o777)
    try:
        return stat.S_IMODE(os.stat(probe).st_mode), stat.S_IMODE(os.stat(probe + '.d').st_mode)
    finally:
        os.remove(probe)
        os.rmdir(probe + '.d')


def export_checkpoint(
        checkpoint: str,
        output_dir: str,
        repo_id: Optional[str] = None,
        use_ema: bool = False,
        license: str = 'apache-2.0',
        training_command: Optional[TrainingCommand] = None,
        fold_temperature: bool = True,
) -> List[str]:
    """Write what :func:`push_checkpoint` would publish into a local folder (``local-dir:`` loadable).

    The folder appears complete or not at all: it is written under a temporary name and renamed. Its
    files and the folder get the permissions of any new file (``0o666`` and ``0o777`` less the umask,
    e.g. 0644 and 0755), the weights included.

    Args:
        checkpoint: a checkpoint of our ``train.py``.
        output_dir: the folder to create (must not exist, or be empty).
        repo_id: the Hub repo the folder is meant for (to upload it yourself): the card and config then
            name it. Default: the card loads the folder itself (``local-dir:<output_dir>``).
        use_ema: publish the EMA weights when the checkpoint has them.
        license: the Hub license id written in the card.
        training_command: renders the training arguments as a command line for the card (see :func:`model_card`).
        fold_temperature: divide the classifier by the temperature the checkpoint records (if any), so
            that the published model returns calibrated logits; False publishes the weights as trained.

    Returns:
        The names of the files written.

    Raises:
        ValueError: a folder that is not new, a bad repo id, or a checkpoint that cannot be published (also:
            folding a temperature fitted for the other weights, or into a classifier that is not linear).
    """
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise ValueError(f'output_dir {output_dir!r} exists and is not an empty folder.')
    if repo_id is not None:
        check_repo_id(repo_id)
    loaded = load_training_checkpoint(checkpoint, use_ema=use_ema)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(output_dir)}.', dir=parent)
    try:
        files = _export_to(tmp, loaded, repo_id, license, local_dir=None if repo_id else output_dir,
                           training_command=training_command, fold_temperature=fold_temperature)
        # safetensors (and mkstemp, mkdtemp) create private files; give them what a plain write would.
        file_mode, folder_mode = _default_modes(tmp)
        for name in files:
            os.chmod(os.path.join(tmp, name), file_mode)
        os.chmod(tmp, folder_mode)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def check_publish_options(revision: Optional[str], create_pr: bool) -> None:
    """Refuse a pull request aimed at a branch other than main (``huggingface_hub`` opens them against main).

    Raises:
        ValueError: ``create_pr`` with a ``revision`` other than main.
    """
    if create_pr and revision not in (None, '', 'main'):
        raise ValueError(f'a pull request (--hub-create-pr) is opened against main, not branch {revision!r}: '
                         f'drop the revision or the pull request.')


def _human_size(size: int) -> str:
    if size < 1024:
        return f'{size} bytes'
    return f'{size / 1024:.1f} KiB' if size < 1024 ** 2 else f'{size / 1024 ** 2:.1f} MiB'


def push_checkpoint(
        checkpoint: str,
        repo_id: str,
        revision: Optional[str] = None,
        private: bool = False,
        commit_message: Optional[str] = None,
        token: Optional[str] = None,
        use_ema: bool = False,
        license: str = 'apache-2.0',
        create_pr: bool = False,
        replace_card: bool = False,
        training_command: Optional[TrainingCommand] = None,
        fold_temperature: bool = True,
) -> str:
    """Publish a checkpoint of our ``train.py`` to the Hugging Face Hub as a plain timm model.

    The repo is created when missing, and the branch ``revision`` too. The files go up in one commit,
    or in one pull request against main with ``create_pr``. A ``README.md`` the repo already has (at
    ``revision``) is kept, as timm's ``push_to_hf_hub`` keeps it, unless ``replace_card``.

    Args:
        checkpoint: the checkpoint file (``model_best.pth.tar`` of a run).
        repo_id: ``ORG/NAME``.
        revision: the branch to commit to (default: ``main``).
        private: create the repo private (an existing repo keeps its visibility).
        commit_message: the commit's summary (default: names the checkpoint).
        token: a Hub token (default: ``HF_TOKEN`` or the token saved by ``hf auth login``).
        use_ema: publish the EMA weights when the checkpoint has them.
        license: the Hub license id written in the card.
        create_pr: open a pull request against main instead of committing (``revision`` must be unset).
        replace_card: replace an existing ``README.md`` with this checkpoint's card.
        training_command: renders the training arguments as a command line for the card (see :func:`model_card`).
        fold_temperature: divide the classifier by the temperature the checkpoint records (if any), so
            that the published model returns calibrated logits; False publishes the weights as trained.

    Returns:
        The URL of the commit, or of the pull request with ``create_pr``.

    Raises:
        ValueError: bad repo id, no token, a pull request to a branch, or a checkpoint that cannot be
            published (also: folding a temperature fitted for the other weights, or into a classifier
            that is not linear); raised before any request to the Hub.
        HubPublishError: the Hub failed the upload; the commit was not made.
    """
    from huggingface_hub import HfApi, get_token

    check_repo_id(repo_id)
    check_publish_options(revision, create_pr)
    token = token or get_token()
    if not token:
        raise ValueError('token: no Hugging Face token; pass --token, set HF_TOKEN, or run `hf auth login`.')
    loaded = load_training_checkpoint(checkpoint, use_ema=use_ema)
    message = commit_message or f'Add {os.path.basename(checkpoint)} (epoch {loaded.epoch}), trained with timm-gsl'
    branch = revision if revision and revision != 'main' else None
    with tempfile.TemporaryDirectory(prefix='timm-gsl-push-') as folder:
        # Everything that can fail here (architecture, weights, card) fails before the Hub is contacted.
        files = _export_to(folder, loaded, repo_id, license, revision=branch, training_command=training_command,
                           fold_temperature=fold_temperature)
        api = HfApi(token=token, library_name='timm', library_version=timm.__version__)
        kept_card = False
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch:
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            if not replace_card and api.file_exists(repo_id, CARD_FILE, revision=branch):
                os.remove(os.path.join(folder, CARD_FILE))
                files.remove(CARD_FILE)
                kept_card = True
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=branch,
                                       commit_message=message, create_pr=create_pr)
        except Exception as e:  # HTTP errors and dropped connections alike
            raise HubPublishError(
                f'Publishing {checkpoint!r} to {repo_id!r} failed: {type(e).__name__}: {e}. Nothing was '
                f'committed; run the command again to retry.') from e
        sizes = {name: os.path.getsize(os.path.join(folder, name)) for name in files}
    for name in files:  # one line a file (the HTTP client's own request lines are the command line's to quiet)
        _logger.info(f'  uploaded {name} ({_human_size(sizes[name])})')
    if kept_card:
        _logger.info(f'{repo_id} already has a {CARD_FILE}: kept it (--replace-card replaces it with the card of '
                     f'this checkpoint).')
    url = (commit.pr_url if create_pr else None) or commit.commit_url
    _logger.info(f'Published {", ".join(files)} to {repo_id}'
                 f'{" as a pull request" if create_pr and commit.pr_url else ""} ({url}).')
    return url
