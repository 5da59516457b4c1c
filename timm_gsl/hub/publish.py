"""Export and push: the published files of a checkpoint (weights, ``config.json``, the card, the learning curves)
written into a local folder, or committed to a Hugging Face Hub repo.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn
import timm
from timm.data import resolve_data_config
from timm.models import save_for_hf

from .. import data as gsl_data
from ..record import RunRecord
from ..engine.atomic import atomic_path
from .card import CURVES_FILE, TrainingCommand, check_repo_id, hub_url, model_card
from .checkpoint import (TrainingCheckpoint, build_model, fold_into_classifier, load_training_checkpoint,
                         published_calibration)

_logger = logging.getLogger(__name__)


# Files the export may hold (and the learning curves, the card's CURVES_FILE).
WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
CARD_FILE = 'README.md'


class HubPublishError(RuntimeError):
    """The Hub refused or dropped the upload; nothing was published by this call (retrying is safe)."""


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
    data_config = resolve_data_config(checkpoint.record.input_options(), model=model)
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
