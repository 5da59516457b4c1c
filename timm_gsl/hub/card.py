"""The model card (``README.md``) of a published checkpoint, written from its run record: Hub metadata, settings,
data, evaluation, usage, training command and citation; and the Hub names it uses (repo ids, addresses, base model).
"""
from __future__ import annotations

import csv
import os
import re
import shlex
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import timm

from .. import data as gsl_data
from ..record import ModelRecord, RunRecord
from .checkpoint import TrainingCheckpoint


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
# Files train.py writes beside the checkpoint that the card uses: the learning curves (published beside the card,
# which shows them) and the evaluation of every epoch.
CURVES_FILE = 'learning_curves.png'
SUMMARY_FILE = 'summary.csv'
# The Hub dataset the embedded subset comes from, for the card's `datasets` metadata.
_EMBEDDED_HUB_DATASET = 'zalando-datasets/fashion_mnist'


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
            f'- **Probabilities:** {CALIBRATION_CAVEAT}',
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


# What the pre-registered replication measured (docs/results.md, "Replication"), said on every card of the loss.
CALIBRATION_CAVEAT = (
    'the group softmax loss makes a model over-confident. A temperature fitted after training removes most of '
    "it, but in timm-gsl's pre-registered replication (ResNet-18, Fashion-MNIST, 10 classes x 100 images, five "
    'seeds) calibrated Type-II models still had a slightly higher test NLL than calibrated softmax models of the '
    'same recipe (0.550 against 0.516, higher on 5 of 5 seeds). Where the probabilities matter, compare with a '
    'softmax model.')

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
