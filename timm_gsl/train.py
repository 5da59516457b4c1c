"""The command line of ``train.py``: timm's training flags plus the group softmax loss's own.

Every flag of timm's ``train.py`` is here with the same name and default (``tests/test_train.py``
checks them against timm's flag list); the help texts are ours. The flags added by this project
are ``--loss``, ``--gsl-groups``, ``--gsl-type``, ``--gsl-grouping``, ``--class-subset`` and
``--samples-per-class``.

Parsing follows timm: a YAML file given with ``-c/--config`` supplies defaults, and flags given on
the command line win over it. On top of that :func:`parse_args` records which options the user set
(on the command line or in the config file, even to their default value), which is what the
no-data-flags recipe of :mod:`timm_gsl.train` needs.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
import yaml
from timm import utils
from timm.data import AugMixDataset, FastCollateMixup, Mixup, create_loader, get_img_extensions
from timm.data import resolve_data_config
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.models import create_model, load_checkpoint, safe_model_name
from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask, TrainingTask, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import NativeScaler
from timm.loss import LOSS_TYPES as TIMM_LOSS_TYPES

from ._cli import ArgumentParser, check_at_least, check_can_create, check_class_subset, check_file
from ._cli import check_model_name, check_pretrained_weights, close_matches, exit_with_error, explicit_dests
from ._cli import one_line, resolve_device
from .data import EMBEDDED_DATASET, create_dataset, dataset_class_names, is_embedded
from .functional import GROUPINGS, LOSS_TYPES as GSL_TYPES
from .loss_factory import create_classification_loss
from .task import GroupSoftmaxTask
from .hub import publish_run, repo_id_type
from .head import classifier_layers
from .training import AtomicCheckpointSaver, NonFiniteLossError, TrainingState, evaluate, format_summary
from .training import check_checkpoint_fits, plot_learning_curves, read_checkpoint, train_one_epoch
from .training import GroupingMeter, read_summary, write_text_atomic

__all__ = ['TRAIN_LOSSES', 'GSL_TYPE_CHOICES', 'DATA_FLAGS', 'get_args_parser', 'parse_args']

_logger = logging.getLogger(__name__)

# timm losses that need multi-label targets; the rest take class indices and pass through to timm.
_MULTI_LABEL_ONLY = ('twoway', 'zlpr', 'db')
TRAIN_LOSSES: Tuple[str, ...] = ('gsl',) + tuple(t for t in TIMM_LOSS_TYPES if t not in _MULTI_LABEL_ONLY)
GSL_TYPE_CHOICES: Tuple[str, ...] = GSL_TYPES + ('auto',)
# Options that name training data; when the user sets none of them, train.py trains on the embedded set.
DATA_FLAGS: Tuple[str, ...] = ('data', 'data_dir', 'dataset')


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Dataset parameters')
    # The positional sits on the parser itself (timm keeps it out of the group too).
    parser.add_argument('data', nargs='?', metavar='DIR', const=None,
                        help='dataset root (deprecated positional form of --data-dir)')
    group.add_argument('--data-dir', metavar='DIR', help='dataset root folder')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset "<type>/<name>" as timm names it; empty: image folder or tar under '
                            '--data-dir. With no data flag at all, the embedded Fashion-MNIST subset is used')
    group.add_argument('--train-split', metavar='NAME', default='train', help='split to train on (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help='split to evaluate on (default: validation)')
    group.add_argument('--train-num-samples', type=int, default=None, metavar='N',
                       help='number of training samples (needed by some iterable datasets; default: None)')
    group.add_argument('--val-num-samples', type=int, default=None, metavar='N',
                       help='number of validation samples (needed by some iterable datasets; default: None)')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='let torch/ and tfds/ datasets download their files')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='file mapping class names to indices (default: "")')
    group.add_argument('--input-img-mode', default=None, type=str,
                       help='PIL mode images are converted to (default: None, the dataset\'s choice)')
    group.add_argument('--input-key', default=None, type=str, help='image column of a Hugging Face dataset')
    group.add_argument('--target-key', default=None, type=str, help='label column of a Hugging Face dataset')
    group.add_argument('--dataset-trust-remote-code', action='store_true', default=False,
                       help='allow a Hugging Face dataset to run its own loading code')
    group.add_argument('--class-subset', default=None, metavar='K|FILE',
                       help='train and evaluate on K classes drawn with --seed, or on the classes named in FILE '
                            '(one per line); kept classes are relabelled 0..K-1 (default: all classes)')
    group.add_argument('--samples-per-class', type=int, default=None, metavar='N',
                       help='keep N training images of every class, drawn with --seed (default: all)')


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='resnet50', type=str, metavar='MODEL',
                       help='timm architecture to train (default: "resnet50")')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='start from the architecture\'s pretrained weights')
    group.add_argument('--pretrained-path', default=None, type=str,
                       help='load pretrained weights from this local file instead of the hub '
                            '(the classifier is adapted as timm does)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='initialise the model from this checkpoint (default: none)')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='continue training from this checkpoint: model, optimiser, scheduler, EMA, epoch')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='with --resume, restore the model only, not the optimiser state')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of classes (default: None, from the dataset or the model)')
    group.add_argument('--gp', default=None, type=str, metavar='POOL',
                       help='global pooling type (fast, avg, max, avgmax, avgmaxc); default: the model\'s')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='square input size (default: None, the model\'s)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N',
                       help='input channels (default: None, 3)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                       help='input shape as channels height width, e.g. 3 224 224 (default: the model\'s)')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N',
                       help='centre-crop fraction for evaluation')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                       help='per-channel mean used to normalise images (default: the model\'s)')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                       help='per-channel standard deviation used to normalise images (default: the model\'s)')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                       help='resize interpolation for evaluation (default: the model\'s)')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                       help='training batch size per process (default: 128)')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='evaluation batch size (default: None, the training batch size)')
    group.add_argument('--channels-last', action='store_true', default=False,
                       help='use the channels-last memory layout')
    group.add_argument('--fuser', default='', type=str, help="TorchScript fuser: '', 'te', 'old' or 'nvfuser'")
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='accumulate gradients over N batches per update (default: 1)')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='recompute block activations in the backward pass to save memory')
    group.add_argument('--fast-norm', default=False, action='store_true', help='use timm\'s experimental fast norm')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                       help='extra key=value arguments for timm.create_model')
    group.add_argument('--head-init-scale', default=None, type=float, help='multiply the classifier\'s initial weights')
    group.add_argument('--head-init-bias', default=None, type=float, help='set the classifier\'s initial bias')
    group.add_argument('--torchcompile-mode', type=str, default=None,
                       help='torch.compile mode (default: None, torch\'s default)')
    scripting = group.add_mutually_exclusive_group()
    scripting.add_argument('--torchscript', dest='torchscript', action='store_true',
                           help='torch.jit.script the model (not with --loss gsl)')
    scripting.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                           help='torch.compile the model with this backend (default backend: inductor)')


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Device parameters')
    group.add_argument('--device', default='cuda', type=str,
                       help='device to train on (default: cuda; falls back to cpu with a notice when CUDA is absent)')
    group.add_argument('--amp', action='store_true', default=False, help='train in mixed precision (torch.autocast)')
    group.add_argument('--amp-dtype', default='float16', type=str,
                       help='autocast dtype, float16 (CUDA, with a gradient scaler) or bfloat16 (default: float16)')
    group.add_argument('--model-dtype', default=None, type=str,
                       help='dtype of the model weights, e.g. bfloat16 (default: None, float32)')
    group.add_argument('--no-ddp-bb', action='store_true', default=False,
                       help='do not broadcast buffers in DistributedDataParallel')
    group.add_argument('--synchronize-step', action='store_true', default=False,
                       help='synchronise the accelerator after every step')
    group.add_argument('--local_rank', default=0, type=int, help='set by the distributed launcher')
    group.add_argument('--device-modules', default=None, type=str, nargs='+',
                       help='python modules to import first, to register extra device types')


def _add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER',
                       help='optimiser name from timm.optim (default: "sgd")')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON',
                       help='optimiser epsilon (default: None, the optimiser\'s)')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA',
                       help='optimiser betas (default: None, the optimiser\'s)')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                       help='clip gradients at this value (default: None, no clipping)')
    group.add_argument('--clip-mode', type=str, default='norm', help='clipping mode: norm, value or agc')
    group.add_argument('--layer-decay', type=float, default=None,
                       help='layer-wise learning-rate decay factor (default: None)')
    group.add_argument('--layer-decay-min-scale', type=float, default=0,
                       help='lowest learning-rate scale layer decay may reach (default: 0)')
    group.add_argument('--layer-decay-no-opt-scale', type=float, default=None,
                       help='freeze layers whose layer-decay scale falls below this (default: None)')
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                       help='extra key=value arguments for the optimiser')


def _add_schedule_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                       help='learning-rate schedule from timm.scheduler (default: "cosine")')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='step the schedule every update instead of every epoch')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate; when unset it is --lr-base scaled by the global batch size')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='learning rate at a global batch of --lr-base-size (default: 0.1)')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV',
                       help='batch size --lr-base refers to (default: 256)')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                       help='how lr grows with batch size: linear or sqrt (default: by optimiser)')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                       help='epoch fractions between which the learning rate is perturbed')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT',
                       help='largest relative learning-rate perturbation (default: 0.67)')
    group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV',
                       help='standard deviation of the perturbation (default: 1.0)')
    group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT',
                       help='length multiplier of each restart cycle (default: 1.0)')
    group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT',
                       help='peak learning-rate factor per restart cycle (default: 0.5)')
    group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N',
                       help='number of restart cycles (default: 1)')
    group.add_argument('--lr-k-decay', type=float, default=1.0, help='k-decay of cosine/poly schedules (default: 1.0)')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR',
                       help='learning rate warm-up starts from (default: 1e-5)')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR',
                       help='floor of cyclic schedules (default: 0)')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='epochs to train (default: 300)')
    group.add_argument('--epoch-repeats', type=float, default=0., metavar='N',
                       help='pass over the training set this many times per epoch (default: 0, once)')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N',
                       help='epoch to start at (overrides the one restored by --resume)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='epochs at which the multistep schedule decays the learning rate')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N',
                       help='decay interval of the step schedule (default: 90)')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N',
                       help='epochs of learning-rate warm-up (default: 5)')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='do not count warm-up epochs in the decay schedule')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                       help='epochs at --min-lr after a cyclic schedule ends (default: 0)')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                       help='patience of the plateau schedule (default: 10)')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE',
                       help='learning-rate decay factor (default: 0.1)')


def _add_augmentation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False, help='switch off all training augmentation')
    group.add_argument('--train-crop-mode', type=str, default=None, help='training crop mode (default: timm\'s)')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='area range of the random resized crop (default: 0.08 1.0)')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='aspect-ratio range of the random resized crop (default: 0.75 1.33)')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability (default: 0.5)')
    group.add_argument('--vflip', type=float, default=0., help='vertical flip probability (default: 0)')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT',
                       help='colour jitter strength (default: 0.4)')
    group.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT',
                       help='apply colour jitter with this probability (default: None, always)')
    group.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT',
                       help='grayscale conversion probability (default: None)')
    group.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT',
                       help='gaussian blur probability (default: None)')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='AutoAugment / RandAugment policy string (default: None)')
    group.add_argument('--aug-repeats', type=float, default=0,
                       help='repeated-augmentation count, distributed only (default: 0)')
    group.add_argument('--aug-splits', type=int, default=0,
                       help='number of augmentation splits for AugMix/JSD (default: 0; valid: 0 or >= 2)')
    group.add_argument('--jsd-loss', action='store_true', default=False,
                       help='Jensen-Shannon divergence + CE over --aug-splits (not with --loss gsl)')
    group.add_argument('--bce-loss', action='store_true', default=False,
                       help='binary cross-entropy instead of softmax (not with --loss gsl)')
    group.add_argument('--bce-sum', action='store_true', default=False,
                       help='BCE: sum over classes before averaging over the batch')
    group.add_argument('--bce-target-thresh', type=float, default=None,
                       help='BCE: binarise soft targets at this threshold (default: None)')
    group.add_argument('--bce-pos-weight', type=float, default=None, help='BCE: weight of positive targets')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT',
                       help='random-erasing probability (default: 0)')
    group.add_argument('--remode', type=str, default='pixel', help='random-erasing fill mode (default: "pixel")')
    group.add_argument('--recount', type=int, default=1, help='random-erasing regions per image (default: 1)')
    group.add_argument('--resplit', action='store_true', default=False,
                       help='leave the first (clean) augmentation split unerased')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha; active when > 0 (default: 0)')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha; active when > 0 (default: 0)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                       help='cutmix area ratio range; overrides the alpha and enables cutmix (default: None)')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='probability of mixing a batch when mixup or cutmix is on (default: 1.0)')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='probability of cutmix rather than mixup when both are on (default: 0.5)')
    group.add_argument('--mixup-mode', type=str, default='batch', help='mix per "batch", "pair" or "elem"')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                       help='stop mixing from this epoch on; 0 never stops (default: 0)')
    group.add_argument('--smoothing', type=float, default=0.1,
                       help='label smoothing; reaches the group softmax loss as soft targets (default: 0.1)')
    group.add_argument('--train-interpolation', type=str, default='random',
                       help='training resize interpolation (default: "random")')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate (default: 0)')
    group.add_argument('--drop-connect', type=float, default=None, metavar='PCT',
                       help='deprecated name of --drop-path')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop-path rate (default: None)')
    group.add_argument('--drop-block', type=float, default=None, metavar='PCT',
                       help='drop-block rate (default: None)')


def _add_loss_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Group softmax loss parameters')
    group.add_argument('--loss', default='gsl', choices=TRAIN_LOSSES,
                       help='training loss: gsl (group softmax loss), ce (softmax cross-entropy) or one of timm\'s '
                            'single-label losses (default: gsl)')
    group.add_argument('--gsl-groups', type=int, default=4, metavar='G',
                       help='number of feature groups G of the group softmax loss (default: 4)')
    group.add_argument('--gsl-type', default='auto', choices=GSL_TYPE_CHOICES,
                       help='I, II, or auto: Type-II below 500K training images, Type-I above (default: auto)')
    group.add_argument('--gsl-grouping', default='discriminative', choices=GROUPINGS,
                       help='feature grouping: discriminative (the paper\'s), random or contiguous (ablations), or '
                            'zero-aware (discriminative, with zero-discriminativity features dealt evenly across '
                            'groups) (default: discriminative)')


def _add_fit_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Fit to the training set')
    group.add_argument('--train-eval-interval', type=int, default=0, metavar='N',
                       help='also measure top-1 and softmax loss on the un-augmented training images in eval mode '
                            'every N epochs; 0: after the last epoch only (default: 0)')
    group.add_argument('--no-train-eval', action='store_true', default=False,
                       help='never measure the un-augmented training images')


def _add_misc_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Batch norm parameters')
    group.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum override')
    group.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon override')
    group.add_argument('--sync-bn', action='store_true', default=False,
                       help='synchronised BatchNorm across processes (CUDA only)')
    group.add_argument('--dist-bn', type=str, default='reduce',
                       help='share BatchNorm statistics across processes after each epoch: broadcast, reduce or ""')
    group.add_argument('--split-bn', action='store_true', default=False,
                       help='separate BatchNorm layers per augmentation split')

    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False,
                       help='keep an exponential moving average of the weights (evaluated and checkpointed)')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                       help='keep the EMA on the CPU and do not evaluate it')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay (default: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true', default=False, help='warm the EMA decay up')

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    group.add_argument('--worker-seeding', type=str, default='all', help='data-loader worker seeding mode')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='log training progress every N updates (default: 50)')
    group.add_argument('--val-interval', type=int, default=1, metavar='N',
                       help='evaluate every N epochs, and after the last one (default: 1)')
    group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                       help='write a recovery checkpoint every N updates (default: 0, never)')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='number of ranked checkpoints to keep (default: 10)')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                       help='data-loading worker processes (default: 4)')
    group.add_argument('--save-images', action='store_true', default=False,
                       help='save a batch of training inputs at every log line')
    group.add_argument('--pin-mem', action='store_true', default=False, help='pin host memory in the data loader')
    group.add_argument('--no-prefetcher', action='store_true', default=False, help='disable timm\'s prefetcher')
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help='root folder of the outputs (default: ./output/train)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='name of the run\'s sub-folder (default: date-model-size)')
    group.add_argument('--push-to-hub', default=None, type=repo_id_type, metavar='ORG/NAME',
                       help='after the last epoch, publish the best checkpoint to this Hugging Face Hub repo as a '
                            'plain timm model with a model card (token: HF_TOKEN or `hf auth login`)')
    group.add_argument('--hub-private', action='store_true', default=False,
                       help='with --push-to-hub, create the repo private')
    group.add_argument('--hub-revision', default=None, type=str, metavar='BRANCH',
                       help='with --push-to-hub, commit to this branch, created when missing (default: main)')
    group.add_argument('--hub-create-pr', action='store_true', default=False,
                       help='open a pull request on the Hub repo instead of committing to its main branch '
                            '(with --push-to-hub)')
    group.add_argument('--hub-replace-card', action='store_true', default=False,
                       help='replace the repo\'s README.md (model card) when it has one; by default it is kept '
                            '(with --push-to-hub)')
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC',
                       help='metric that picks the best checkpoint (default: "top1")')
    group.add_argument('--tta', type=int, default=0, metavar='N',
                       help='test-time augmentation factor; an evaluation option, refused here (default: 0)')
    group.add_argument('--use-multi-epochs-loader', action='store_true', default=False,
                       help='keep data-loader workers alive across epochs')
    group.add_argument('--log-wandb', action='store_true', default=False,
                       help='log metrics to Weights & Biases (when installed)')
    group.add_argument('--wandb-project', default=None, type=str, help='wandb project (default: --experiment)')
    group.add_argument('--wandb-tags', default=[], type=str, nargs='+', help='wandb tags')
    group.add_argument('--wandb-resume-id', default='', type=str, help='wandb run id to resume')
    group.add_argument('--train-img-sizes', type=int, nargs='+', default=None,
                       help='train with a schedule over these square input sizes (default: None, one size)')
    group.add_argument('--train-batch-sizes', type=int, nargs='+', default=None,
                       help='batch size for each of --train-img-sizes (default: --batch-size for all)')
    group.add_argument('--train-size-probs', type=float, nargs='+', default=None,
                       help='sampling weights of --train-img-sizes (default: uniform)')
    group.add_argument('--train-size-schedule', type=str, default='constant', choices=('constant', 'progressive'),
                       help='size schedule: constant mixture or progressive (default: constant)')
    group.add_argument('--train-size-schedule-spread', type=float, default=0.65,
                       help='width of the progressive window, in size-choice units (default: 0.65)')
    group.add_argument('--train-size-random-mix', type=float, default=0.1,
                       help='share of uniformly drawn sizes in a progressive schedule (default: 0.1)')
    group.add_argument('--train-batches-per-epoch', '--train-steps-per-epoch', type=int, default=None,
                       help='fixed number of training batches per epoch (default: None, one pass)')
    group.add_argument('--variable-batch-loss-scale', type=str, default='none', choices=('none', 'sqrt', 'linear'),
                       help='scale the loss of a batch by its size relative to --batch-size (default: none)')
    group.add_argument('--naflex-loader', action='store_true', default=False,
                       help='NaFlex variable-resolution loader for NaFlexViT models (refused here)')
    group.add_argument('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024],
                       help='NaFlex training sequence lengths (needs --naflex-loader)')
    group.add_argument('--naflex-max-seq-len', type=int, default=576,
                       help='NaFlex evaluation sequence length (needs --naflex-loader)')
    group.add_argument('--naflex-patch-sizes', type=int, nargs='+', default=None,
                       help='NaFlex patch sizes (needs --naflex-loader)')
    group.add_argument('--naflex-patch-size-probs', type=float, nargs='+', default=None,
                       help='NaFlex patch size weights (needs --naflex-loader)')
    group.add_argument('--naflex-loss-scale', default='linear', type=str, choices=('none', 'sqrt', 'linear'),
                       help='NaFlex loss scaling (needs --naflex-loader)')
    group.add_argument('--naflex-patchify-channels-first', action='store_true', default=False,
                       help='NaFlex channels-first patchify (needs --naflex-loader)')

    # Knowledge distillation: on the parser itself, as in timm.
    parser.add_argument('--kd-model-name', default=None, type=str,
                        help='teacher model for knowledge distillation (not with --loss gsl)')
    parser.add_argument('--kd-distill-type', default='logit', type=str, choices=['logit', 'feature', 'token'],
                        help='distillation type (default: logit)')
    parser.add_argument('--kd-loss-type', default='kl', type=str, help='distillation loss (default: kl)')
    parser.add_argument('--distill-loss-weight', default=None, type=float, help='weight of the distillation loss')
    parser.add_argument('--task-loss-weight', default=None, type=float, help='weight of the task loss')
    parser.add_argument('--kd-temperature', default=4.0, type=float, help='distillation temperature (default: 4)')
    parser.add_argument('--kd-student-feature-dim', default=None, type=int, help='student feature size')
    parser.add_argument('--kd-teacher-feature-dim', default=None, type=int, help='teacher feature size')
    parser.add_argument('--kd-token-distill-type', default='soft', type=str, choices=['soft', 'hard'],
                        help='token distillation target (default: soft)')


def get_args_parser() -> argparse.ArgumentParser:
    """The parser of ``train.py``: every flag of timm's ``train.py`` plus the group softmax loss's.

    Returns:
        An ``argparse.ArgumentParser`` (``-c/--config`` included, for ``--help``).
    """
    parser = ArgumentParser(
        prog='train.py',
        description='Train a timm model with the group softmax loss with discriminative feature grouping. '
                    'With no data flag (DIR, --data-dir, --dataset) it trains a small model on the embedded '
                    'Fashion-MNIST subset with a recipe that takes a few minutes on a CPU; flags you pass win.')
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML file whose keys set the defaults of the flags below (command-line flags win)')
    _add_dataset_args(parser)
    _add_model_args(parser)
    _add_device_args(parser)
    _add_optimizer_args(parser)
    _add_schedule_args(parser)
    _add_augmentation_args(parser)
    _add_loss_args(parser)
    _add_fit_args(parser)
    _add_misc_args(parser)
    return parser


def _read_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    check_file(path, '-c/--config', 'a YAML file of flag names and values')
    try:
        with open(path, 'r') as f:
            config = yaml.safe_load(f) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f'-c/--config {path!r} is not a readable YAML file ({type(e).__name__}: '
                         f'{one_line(e)[:200]}); expected a mapping of flag names to values.') from e
    if not isinstance(config, dict):
        raise ValueError(f"Config file {path!r} must hold a mapping of flag names to values, got "
                         f"{type(config).__name__}.")
    known = {action.dest for action in parser._actions}
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        # An args.yaml written by a previous run also holds values train.py derives at run time
        # (distributed, world_size, ...): those are recomputed, so only say so.
        _logger.warning(f"Config {path!r}: keys {unknown} are not train.py flags and are ignored.")
    return {k: v for k, v in config.items() if k in known}


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, Set[str]]:
    """Parse ``train.py``'s command line the timm way.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        ``(args, explicit)``: the parsed namespace, and the destinations the user set on the command
        line or in the ``--config`` file (even to their default value).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_args_parser()
    config_parser = ArgumentParser(prog=parser.prog, add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str)
    config_args, _ = config_parser.parse_known_args(argv)
    config: Dict[str, Any] = {}
    if config_args.config:
        try:
            config = _read_config(config_args.config, parser)
        except ValueError as e:
            exit_with_error(parser.prog, e)
        parser.set_defaults(**config)
    args = parser.parse_args(argv)
    explicit = explicit_dests(parser, argv) | set(config)
    explicit.discard('config')
    return args, explicit


def format_args(args: argparse.Namespace) -> str:
    """The namespace as the YAML text of ``args.yaml`` (loadable again with ``-c``)."""
    return yaml.safe_dump(vars(args), default_flow_style=False)



# ----------------------------------------------------------------------------------------------
# The no-data-flags recipe and the checks
# ----------------------------------------------------------------------------------------------

# Applied, flag by flag, only where the user set no data flag and did not set that flag: a small model
# on the embedded 28x28 Fashion-MNIST subset (grayscale, given as RGB like any timm dataset) (5000 training images), a few minutes on 2 CPU
# cores. Every value replaces a default sized for ImageNet on GPUs.
EMBEDDED_RECIPE: Dict[str, Any] = dict(
    dataset=EMBEDDED_DATASET,
    model='resnet10t',
    epochs=10,
    batch_size=64,
    validation_batch_size=250,
    img_size=28,
    mean=[0.286],
    std=[0.353],
    crop_pct=1.0,
    interpolation='bilinear',
    train_interpolation='bilinear',
    scale=[0.8, 1.0],
    color_jitter=0.0,
    workers=0,
    opt='sgd',
    lr=0.1,
    weight_decay=5e-4,
    sched='cosine',
    sched_on_updates=True,
    warmup_epochs=1,
    warmup_lr=0.01,
    min_lr=1e-4,
    log_interval=20,
    checkpoint_hist=2,
)

# The paper's rule (SPEC.md): Type-II regularises best below about 500K training images, Type-I above.
GSL_AUTO_THRESHOLD: int = 500_000


def uses_embedded_recipe(explicit: Set[str]) -> bool:
    """Whether no data flag (DIR, ``--data-dir``, ``--dataset``) was set on the command line or in the config."""
    return not any(dest in explicit for dest in DATA_FLAGS)


def apply_embedded_recipe(args: argparse.Namespace, explicit: Set[str]) -> List[str]:
    """Put :data:`EMBEDDED_RECIPE` into ``args`` for every flag the user did not set.

    Args:
        args: parsed arguments (changed in place).
        explicit: destinations the user set (see :func:`parse_args`).

    Returns:
        The destinations the recipe changed (empty when a data flag was given).
    """
    if not uses_embedded_recipe(explicit):
        return []
    recipe = dict(EMBEDDED_RECIPE, device='cuda' if torch.cuda.is_available() else 'cpu')
    if 'input_size' in explicit:
        # The user's input shape sets channels and size; the recipe's would contradict it.
        del recipe['img_size']
    changed = [dest for dest in recipe if dest not in explicit]
    for dest in changed:
        setattr(args, dest, recipe[dest])
    # The grayscale statistics, repeated for as many channels as the model is given.
    channels = args.input_size[0] if args.input_size else (args.in_chans or 3)
    for dest in ('mean', 'std'):
        if dest in changed:
            setattr(args, dest, recipe[dest] * channels)
    return changed


def resolve_gsl_type(gsl_type: str, num_train_images: Optional[int]) -> str:
    """The group softmax loss type to train with: 'I' or 'II', choosing for 'auto' by data size.

    Args:
        gsl_type: 'I', 'II' or 'auto'.
        num_train_images: size of the training set (needed for 'auto').

    Returns:
        'I' or 'II'. 'auto' gives Type-II below :data:`GSL_AUTO_THRESHOLD` images, Type-I from there.
    """
    if gsl_type != 'auto':
        if gsl_type not in GSL_TYPES:
            raise ValueError(f"gsl_type must be one of {GSL_TYPE_CHOICES}, got {gsl_type!r}.")
        return gsl_type
    if num_train_images is None:
        raise ValueError("--gsl-type auto needs the number of training images, which this dataset does not "
                         "report; pass --train-num-samples N or choose --gsl-type I or II.")
    return 'II' if num_train_images < GSL_AUTO_THRESHOLD else 'I'


def _non_default(args: argparse.Namespace, parser: argparse.ArgumentParser, prefix: str) -> List[str]:
    flags = []
    for action in parser._actions:
        if action.option_strings and action.dest.startswith(prefix) and getattr(args, action.dest) != action.default:
            flags.append(action.option_strings[-1])
    return flags


def check_args(args: argparse.Namespace) -> None:
    """Refuse flags and combinations train.py cannot honour, before anything is created or written.

    Args:
        args: parsed arguments, after the recipe and the device fallback.

    Raises:
        ValueError: naming the flag, its value and what is allowed.
    """
    parser = get_args_parser()
    kd = [flag for prefix in ('kd_', 'distill_', 'task_loss') for flag in _non_default(args, parser, prefix)]
    if args.loss == 'gsl':
        incompatible = []
        if args.bce_loss:
            incompatible.append('--bce-loss (a sigmoid loss replaces the softmax the group loss is built on)')
        if args.jsd_loss or args.aug_splits:
            incompatible.append('--jsd-loss/--aug-splits (the JSD loss is its own criterion over augmentation splits)')
        if kd:
            incompatible.append(f'{"/".join(kd)} (distillation replaces the training task)')
        if args.torchscript:
            incompatible.append('--torchscript (a scripted model cannot hand its classifier input to the loss)')
        if incompatible:
            raise ValueError('--loss gsl cannot be combined with ' + '; '.join(incompatible)
                             + '. Use --loss ce (or another timm loss) for these.')
    if args.loss != 'gsl':
        gsl_flags = _non_default(args, parser, 'gsl_')
        if gsl_flags:
            raise ValueError(f'{"/".join(gsl_flags)} configure the group softmax loss, but --loss is '
                             f'{args.loss!r}; pass --loss gsl or drop them.')
    bce_options = [flag for flag, value in (
        ('--bce-sum', args.bce_sum), ('--bce-target-thresh', args.bce_target_thresh),
        ('--bce-pos-weight', args.bce_pos_weight)) if value not in (None, False)]
    if bce_options and _loss_name(args) != 'bce':
        raise ValueError(f'{"/".join(bce_options)} apply to the bce loss only, but the loss is '
                         f'{_loss_name(args)!r}; pass --loss bce or drop them.')
    if args.bce_loss and args.jsd_loss:
        raise ValueError('--bce-loss and --jsd-loss select different losses; pass one of them.')
    if args.bce_loss and args.loss not in ('ce', 'bce'):
        raise ValueError(f'--bce-loss selects the bce loss, but --loss is {args.loss!r}; pass --loss bce instead.')
    if args.jsd_loss and args.loss not in ('ce', 'jsd'):
        raise ValueError(f'--jsd-loss selects the jsd loss, but --loss is {args.loss!r}; pass --loss jsd instead.')
    if args.aug_splits == 1 or args.aug_splits < 0:
        raise ValueError(f'--aug-splits {args.aug_splits} is invalid, expected 0 (off) or >= 2.')
    if (args.jsd_loss or args.loss == 'jsd') and args.aug_splits < 2:
        raise ValueError('--jsd-loss needs --aug-splits >= 2.')
    if args.aug_splits and (args.train_batches_per_epoch or args.train_img_sizes):
        # Both go through timm's scheduled batch sampler, which cannot split augmentations.
        raise ValueError('--aug-splits cannot be combined with --train-batches-per-epoch or --train-img-sizes '
                         '(timm\'s scheduled batch sampler does not support augmentation splits).')
    if args.aug_splits and args.no_prefetcher:
        raise ValueError('--aug-splits needs timm\'s prefetcher (its collate joins the augmentation splits into '
                         'one batch); drop --no-prefetcher.')
    if args.split_bn and not (args.aug_splits > 1 or args.resplit):
        raise ValueError('--split-bn needs --aug-splits >= 2 or --resplit.')
    if kd:
        raise ValueError(f'{"/".join(kd)}: knowledge distillation is not supported by this train.py; '
                         f'use timm\'s own train.py for distillation.')
    naflex = _non_default(args, parser, 'naflex_')
    if naflex:
        raise ValueError(f'{"/".join(naflex)}: the NaFlex loader (NaFlexViT models only) is not supported by '
                         f'this train.py; use timm\'s own train.py for NaFlex training.')
    if args.tta:
        raise ValueError(f'--tta {args.tta}: test-time augmentation is an evaluation option and does nothing '
                         f'during training; expected 0 (evaluate with TTA through validate.py).')
    device = torch.device(args.device)
    if args.sync_bn and device.type != 'cuda':
        raise ValueError(f'--sync-bn needs CUDA (SyncBatchNorm has no CPU implementation), but the device is '
                         f'{args.device!r}; drop --sync-bn.')
    if args.amp:
        if args.amp_dtype not in ('float16', 'bfloat16'):
            raise ValueError(f"--amp-dtype {args.amp_dtype!r} is invalid, expected 'float16' or 'bfloat16'.")
        if args.amp_dtype == 'float16' and device.type == 'cpu':
            raise ValueError("--amp with --amp-dtype float16 needs CUDA (its gradient scaler is CUDA-only); "
                             "on the CPU pass --amp-dtype bfloat16.")
    if args.model_dtype is not None and not isinstance(getattr(torch, args.model_dtype, None), torch.dtype):
        raise ValueError(f'--model-dtype {args.model_dtype!r} is not a torch dtype, expected e.g. float32 or '
                         f'bfloat16.')
    if args.push_to_hub:
        from .hub import check_publish_options
        check_publish_options(args.hub_revision, args.hub_create_pr)
        from huggingface_hub import get_token
        if not get_token():
            # Found now, not after the last epoch: a run would otherwise train for hours and then fail to publish.
            raise ValueError(f'--push-to-hub {args.push_to_hub}: no Hugging Face token; set HF_TOKEN or run '
                             f'`hf auth login` before training (or drop --push-to-hub and publish later with '
                             f'`python -m timm_gsl push`).')
    if args.train_eval_interval < 0:
        raise ValueError(f'--train-eval-interval {args.train_eval_interval} is invalid, expected 0 (after the last '
                         f'epoch only) or an interval N >= 1; to skip the measurement pass --no-train-eval.')
    if args.no_train_eval and args.train_eval_interval:
        raise ValueError(f'--train-eval-interval {args.train_eval_interval} asks for the measurement that '
                         f'--no-train-eval turns off; pass one of them.')
    for flag, value in (('--gsl-groups', args.gsl_groups), ('--grad-accum-steps', args.grad_accum_steps),
                        ('--val-interval', args.val_interval), ('--checkpoint-hist', args.checkpoint_hist),
                        ('-b/--batch-size', args.batch_size), ('--epochs', args.epochs)):
        check_at_least(flag, value)
    for flag, value, minimum in (('-vb/--validation-batch-size', args.validation_batch_size, 1),
                                 ('--num-classes', args.num_classes, 1), ('-j/--workers', args.workers, 0)):
        if value is not None:
            check_at_least(flag, value, minimum)
    _check_names_and_files(args)


_CHECKPOINT_EXPECTED = 'a checkpoint written by train.py (.pth.tar) or a .safetensors file'


def _check_names_and_files(args: argparse.Namespace) -> None:
    """The cheap part of reading the inputs: names timm must know, files and folders that must exist.

    Runs before any dataset, model or checkpoint is read, so that a typo costs a second, not a folder scan.
    Reading the checkpoints themselves (and the model's classifier size) follows at the start of
    :func:`build_run`, still before the datasets.
    """
    check_model_name(args.model, '--model')
    if args.pretrained and not args.pretrained_path:
        check_pretrained_weights(args.model, '--pretrained')
    if args.pretrained_path:
        check_file(args.pretrained_path, '--pretrained-path', 'a weights file (.pth, .bin or .safetensors)')
    if args.resume and args.resume.lower().endswith('.safetensors'):
        raise ValueError(f'--resume {args.resume!r}: a .safetensors file holds weights only, without the '
                         f'optimiser, schedule and epoch a resume restores; expected a .pth.tar checkpoint of '
                         f'train.py, or pass the file to --initial-checkpoint.')
    for flag, path in (('--resume', args.resume), ('--initial-checkpoint', args.initial_checkpoint)):
        if path:
            check_file(path, flag, _CHECKPOINT_EXPECTED)
    check_class_subset(args.class_subset, '--class-subset')
    if args.class_map:
        check_file(args.class_map, '--class-map', 'a file mapping class names to indices')
    root = args.data_dir or args.data
    if (args.dataset or '').lower().startswith('torch/') and not args.dataset_download \
            and not (root and os.path.isdir(root)):
        where = f'--data-dir {root!r} does not exist' if root else 'no --data-dir was given'
        raise ValueError(f'--dataset {args.dataset}: {where}, and without --dataset-download torchvision does not '
                         f'fetch it; pass --dataset-download, or --data-dir FOLDER where it was downloaded.')
    output = args.output or './output/train'
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f'--output {output!r} is a file, not a folder; expected a folder to write the run into.')
    check_can_create(output, '--output')
    try:  # the name as timm's optimizer factory reads it: 'lookahead_adamw' is adamw with lookahead
        get_optimizer_info(args.opt.lower().split('_')[-1])
    except ValueError:
        suggestion = close_matches(args.opt.lower(), list_optimizers()) or ' (see timm.optim.list_optimizers())'
        raise ValueError(f'--opt {args.opt!r}: timm has no optimizer of that name{suggestion}') from None
    try:  # timm knows its schedules only by trying: on a throw-away optimiser, in microseconds
        create_scheduler_v2(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
                            **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
                            updates_per_epoch=1)
    except ValueError as e:
        raise ValueError(f'--sched {args.sched!r}: {e}') from None


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def _setup_logging() -> None:
    # timm's setup adds a handler on every call; add one only when nothing is configured.
    if not logging.root.handlers:
        utils.setup_default_logging()
    elif logging.root.level > logging.INFO or logging.root.level == logging.NOTSET:
        logging.root.setLevel(logging.INFO)


def _resolve_device(args: argparse.Namespace) -> None:
    if args.device_modules:
        for module in args.device_modules:
            importlib.import_module(module)
    args.device = str(resolve_device(args.device, 'training'))


def _loss_name(args: argparse.Namespace) -> str:
    if args.bce_loss:
        return 'bce'
    if args.jsd_loss:
        return 'jsd'
    return args.loss


def _dataset_options(args: argparse.Namespace) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The data conditions and timm's dataset options shared by every split."""
    conditions = dict(class_subset=args.class_subset, samples_per_class=args.samples_per_class, seed=args.seed)
    common = dict(class_map=args.class_map, download=args.dataset_download, batch_size=args.batch_size,
                  input_img_mode=args.input_img_mode, input_key=args.input_key, target_key=args.target_key,
                  trust_remote_code=args.dataset_trust_remote_code)
    if args.input_img_mode is None:
        # As timm: one-channel models read grayscale images, the others RGB (a grayscale image gives
        # three identical channels).
        channels = args.in_chans or (args.input_size[0] if args.input_size else 3)
        common['input_img_mode'] = 'L' if channels == 1 else 'RGB'
    return conditions, common


def _create_datasets(args: argparse.Namespace):
    if args.data and not args.data_dir:
        args.data_dir = args.data
    conditions, common = _dataset_options(args)
    try:
        train = create_dataset(
            args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
            num_samples=args.train_num_samples, repeats=args.epoch_repeats, **conditions, **common)
        val = create_dataset(
            args.dataset, root=args.data_dir, split=args.val_split, is_training=False,
            num_samples=args.val_num_samples, **conditions, **common)
    except ValueError as e:
        given = [f'--class-subset {args.class_subset}' if args.class_subset is not None else '',
                 f'--samples-per-class {args.samples_per_class}' if args.samples_per_class is not None else '']
        given = [g for g in given if g]
        if not given:
            raise
        raise ValueError(f'{" with ".join(given)}: {e}') from e
    return train, val


def _create_clean_train_dataset(args: argparse.Namespace):
    """The training images once each (same classes and images as training), for the eval-mode fit measurement.

    A separate dataset object, so that the evaluation transforms the loader gives it leave training alone.
    """
    conditions, common = _dataset_options(args)
    return create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                          num_samples=args.train_num_samples, **conditions, **common)


# Dataset names timm resolves through a reader that needs --data-dir to exist already (image folders, tars).
_DOWNLOADING_PREFIXES = ('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')


def _reads_local_folder(args: argparse.Namespace) -> bool:
    name = (args.dataset or '').lower()
    return not name.startswith(_DOWNLOADING_PREFIXES) and not is_embedded(name)


def check_data_source(args: argparse.Namespace) -> None:
    """Refuse a dataset root that does not exist, or an image folder with an empty class.

    Args:
        args: parsed arguments (``data``, ``data_dir``, ``dataset``).

    Raises:
        ValueError: naming ``--data-dir`` (or ``DIR``), the path and what is expected.
    """
    if not _reads_local_folder(args):
        return
    root = args.data_dir or args.data
    flag = '--data-dir' if args.data_dir else 'DIR'
    if not root:
        raise ValueError(f"--dataset {args.dataset!r} reads images from a local folder or tar, but no --data-dir "
                         f"was given; expected --data-dir PATH (or no data flag at all for the embedded set).")
    if not os.path.exists(root):
        raise ValueError(f"{flag} {root!r}: no such file or folder; expected an existing image folder (one "
                         f"sub-folder per class, optionally under {args.train_split}/ and {args.val_split}/) "
                         f"or a tar file.")
    if os.path.isdir(root) and (args.dataset or '').lower() in ('', 'folder'):
        for split in (args.train_split, args.val_split):
            check_no_empty_class(_split_folder(root, split), split)


def _split_folder(root: str, split: str) -> str:
    try:  # the folder timm's create_dataset reads for this split (the split name or a synonym of it)
        from timm.data.dataset_factory import _search_split
    except ImportError:
        return os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
    return _search_split(root, split)


def check_no_empty_class(folder: str, split: str) -> None:
    """Refuse an image folder with a class sub-folder that holds no images.

    timm's folder reader derives the classes from the images it finds, so an empty class folder
    would silently vanish and shift every later class index.

    Args:
        folder: the split's folder, whose sub-folders are the classes.
        split: the split's name, for the message.

    Raises:
        ValueError: naming ``--data-dir``, the class folder, the split and what is expected.
    """
    extensions = tuple(get_img_extensions(as_set=True))
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith('.'):
            continue
        has_image = any(f.lower().endswith(extensions) for _, _, names in os.walk(entry.path) for f in names)
        if not has_image:
            raise ValueError(f"--data-dir: class folder {entry.path!r} of split {split!r} holds no images "
                             f"(extensions {sorted(extensions)}); expected at least one image per class, or remove "
                             f"the folder.")


def _dataset_size(dataset: Any, fallback: Optional[int]) -> Optional[int]:
    try:
        return len(dataset)
    except TypeError:
        return fallback


def _in_chans(args: argparse.Namespace) -> int:
    return args.in_chans if args.in_chans is not None else (args.input_size[0] if args.input_size else 3)


def _model_options(args: argparse.Namespace) -> str:
    """The flags that shape the model besides --model, as the user wrote them, for messages."""
    given = [f'--model-kwargs {" ".join(f"{k}={v}" for k, v in args.model_kwargs.items())}'
             if args.model_kwargs else '', f'--gp {args.gp}' if args.gp else '',
             f'--in-chans {args.in_chans}' if args.in_chans is not None else '']
    return ' '.join(g for g in given if g)


def _probe_model(args: argparse.Namespace) -> Optional[nn.Module]:
    """The model on the meta device: its shapes without memory, weights or data, in well under a second.

    Returns:
        The model, or None where it cannot be built on the meta device (some architectures compute
        with their tensors while they are built, or it comes from the Hub); the checks that need it
        then run on the real model instead.

    Raises:
        ValueError: ``--model-kwargs`` (or ``--gp``) holds an argument the architecture does not take.
    """
    if ':' in args.model:
        return None
    try:
        with torch.device('meta'):
            return create_model(args.model, pretrained=False, in_chans=_in_chans(args), num_classes=args.num_classes,
                                global_pool=args.gp, scriptable=args.torchscript, **args.model_kwargs)
    except TypeError as e:
        if 'unexpected keyword argument' in str(e):
            raise ValueError(f'--model {args.model} cannot be created with {_model_options(args) or "these options"}'
                             f' ({one_line(e)}).') from None
        return None
    except Exception as e:  # noqa: BLE001 (anything meta-specific: the real model is checked later)
        _logger.debug(f'--model {args.model}: no meta-device probe ({type(e).__name__}: {e}).')
        return None


def _create_model(args: argparse.Namespace, device: torch.device,
                  initial_checkpoint: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The model to train, on ``device``, with ``--initial-checkpoint``'s weights when given.

    Args:
        args: parsed and checked arguments (``num_classes`` is filled in from the model when unset).
        device: where the model goes.
        initial_checkpoint: ``--initial-checkpoint`` already read with :func:`read_checkpoint` (read here
            when None).

    Raises:
        ValueError: timm cannot create the model with these options, or the checkpoint does not fit it.
    """
    overlay = dict(file=args.pretrained_path) if args.pretrained_path else None
    drop_path = args.drop_path if args.drop_path is not None else args.drop_connect
    try:
        model = create_model(
            args.model, pretrained=args.pretrained or bool(args.pretrained_path), pretrained_cfg_overlay=overlay,
            in_chans=_in_chans(args), num_classes=args.num_classes, drop_rate=args.drop, drop_path_rate=drop_path,
            drop_block_rate=args.drop_block, global_pool=args.gp, bn_momentum=args.bn_momentum,
            bn_eps=args.bn_eps, scriptable=args.torchscript, **args.model_kwargs)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001
        # An option the architecture does not take, pretrained weights that cannot be had or read, a bad tag.
        options = _model_options(args)
        weights = (f' with --pretrained-path {args.pretrained_path}' if args.pretrained_path
                   else ' with --pretrained' if args.pretrained else '')
        raise ValueError(f'--model {args.model}{" " + options if options else ""}{weights}: timm cannot create '
                         f'it ({type(e).__name__}: {one_line(e)[:300]}).') from e
    if args.initial_checkpoint:
        # Loaded as timm's create_model(checkpoint_path=...) would, after checking the weights fit.
        if initial_checkpoint is None:
            initial_checkpoint = read_checkpoint(args.initial_checkpoint, '--initial-checkpoint')
        check_checkpoint_fits(initial_checkpoint, model, args.model, '--initial-checkpoint', args.initial_checkpoint)
        load_checkpoint(model, args.initial_checkpoint)
    if args.head_init_scale is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
    if args.head_init_bias is not None:
        nn.init.constant_(model.get_classifier().bias, args.head_init_bias)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    model.to(device=device, dtype=getattr(torch, args.model_dtype) if args.model_dtype else None)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _check_groups_fit(args: argparse.Namespace, model: nn.Module) -> None:
    feature_size = sum(layer.weight.flatten(1).shape[1] for layer in classifier_layers(model))
    if args.gsl_groups > feature_size:
        raise ValueError(f'--gsl-groups {args.gsl_groups} is larger than the feature size of --model {args.model} '
                         f'({feature_size}, the input of its classifier); expected 1 <= --gsl-groups <= '
                         f'{feature_size}.')


def _create_task(args: argparse.Namespace, model: nn.Module, device: torch.device, soft_targets: bool,
                 num_aug_splits: int) -> TrainingTask:
    loss = _loss_name(args)
    if loss == 'gsl':
        criterion = create_classification_loss(
            loss_type='gsl', smoothing=args.smoothing, soft_targets=soft_targets, gsl_groups=args.gsl_groups,
            gsl_type=args.gsl_type, gsl_grouping=args.gsl_grouping)
        return GroupSoftmaxTask(model, criterion=criterion.to(device), device=device, grouping_statistics=True)
    timm_options = dict(jsd_splits=num_aug_splits) if loss == 'jsd' else {}
    if loss == 'bce':
        timm_options.update(bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum,
                            pos_weight=args.bce_pos_weight)
    criterion = create_classification_loss(
        loss_type=loss, smoothing=args.smoothing, soft_targets=soft_targets, **timm_options)
    if isinstance(criterion, nn.Module):
        criterion = criterion.to(device)
    return ClassificationTask(model, criterion=criterion, device=device)


def _softmax_loss_picker(args: argparse.Namespace):
    loss = _loss_name(args)
    if loss == 'gsl':
        return lambda result: result['softmax_loss']
    if loss == 'ce':
        # The training loss is the (smoothed / soft-target) softmax cross-entropy itself.
        return lambda result: result['loss'].detach()
    return lambda result: None


def _learning_rate(args: argparse.Namespace) -> None:
    if args.lr:
        return
    global_batch_size = args.batch_size * args.world_size * args.grad_accum_steps
    batch_ratio = global_batch_size / args.lr_base_size
    if not args.lr_base_scale:
        args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
    if args.lr_base_scale == 'sqrt':
        batch_ratio = batch_ratio ** 0.5
    args.lr = args.lr_base * batch_ratio
    if utils.is_primary(args):
        _logger.info(f'Learning rate ({args.lr}) from --lr-base ({args.lr_base}) and the global batch size '
                     f'({global_batch_size}) with {args.lr_base_scale} scaling.')


class _Run:
    """Everything the epoch loop needs, built before anything is written."""


def build_run(args: argparse.Namespace) -> _Run:
    """Create datasets, model, task, optimiser, AMP, EMA, loaders and schedule from ``args``.

    Writes nothing. Raises ``ValueError`` for bad input, so a refused run leaves no output folder.

    Args:
        args: parsed and checked arguments (updated in place with derived values: ``num_classes``,
            ``lr``, the resolved ``gsl_type``, ``prefetcher``, the distributed fields).

    Returns:
        A run object for :func:`train`.
    """
    run = _Run()
    run.args = args
    run.updates_done = 0
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    device = utils.init_distributed_device(args)
    run.device = device
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {args.device}.')
    else:
        _logger.info(f'Training with a single process on 1 device ({args.device}).')
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    if args.aug_repeats and not args.distributed:
        raise ValueError(f'--aug-repeats {args.aug_repeats:g} needs distributed training (timm\'s repeated-'
                         f'augmentation sampler splits the repeats across processes); expected 0 here.')
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    utils.random_seed(args.seed, args.rank)
    if args.fuser:
        utils.set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()

    check_data_source(args)
    # Everything about the model and the checkpoints that can be known without the data is checked
    # here, before the datasets (on ImageNet, a scan of 1.3M files): the classifier's feature size
    # against --gsl-groups, and that every checkpoint named is a readable one.
    if args.loss == 'gsl':
        probe = _probe_model(args)
        if probe is not None:
            _check_groups_fit(args, probe)
            del probe
    # Read before anything is built on them: an unsafe, damaged or foreign file stops the run here.
    resume_checkpoint = read_checkpoint(args.resume, '--resume') if args.resume else None
    initial_checkpoint = (read_checkpoint(args.initial_checkpoint, '--initial-checkpoint')
                          if args.initial_checkpoint else None)
    dataset_train, dataset_eval = _create_datasets(args)
    run.dataset_train = dataset_train
    names = dataset_class_names(dataset_train)
    if args.num_classes is None:
        if names:
            args.num_classes = len(names)
            _logger.info(f'{args.num_classes} classes, from the training set.')
    elif names and args.num_classes != len(names):
        raise ValueError(f'--num-classes {args.num_classes} disagrees with the training data, which has '
                         f'{len(names)} classes; expected --num-classes {len(names)} (or leave it unset).')
    num_train = _dataset_size(dataset_train, args.train_num_samples)
    if args.loss == 'gsl':
        requested = args.gsl_type
        args.gsl_type = resolve_gsl_type(args.gsl_type, num_train)
        if requested == 'auto':
            _logger.info(f'--gsl-type auto: Type-{args.gsl_type}, as the training set has {num_train} images '
                         f'({"below" if args.gsl_type == "II" else "at or above"} {GSL_AUTO_THRESHOLD}).')

    model = _create_model(args, device, initial_checkpoint)
    del initial_checkpoint
    if args.loss == 'gsl':
        _check_groups_fit(args, model)
    if resume_checkpoint is not None:
        check_checkpoint_fits(resume_checkpoint, model, args.model, '--resume', args.resume)
        # A recovery checkpoint was written inside its epoch: continue that epoch after its last update.
        run.updates_done = int((resume_checkpoint.get('saver') or {}).get('updates_done') or 0)
        del resume_checkpoint
    run.model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else None
    if utils.is_primary(args):
        _logger.info(f'Model {safe_model_name(args.model)} created, param count: '
                     f'{sum(p.numel() for p in model.parameters())}')
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))
    run.data_config = data_config

    num_aug_splits = args.aug_splits if args.aug_splits > 1 else 0
    if args.split_bn:
        model = convert_splitbn_model(model, max(num_aug_splits, 2))
        model.to(device)
    if args.distributed and args.sync_bn:
        args.dist_bn = ''
        model = convert_sync_batchnorm(model)
        if utils.is_primary(args):
            _logger.info('Converted BatchNorm layers to SyncBatchNorm (statistics shared by all processes).')
    elif args.sync_bn:
        _logger.warning('--sync-bn has no effect in a single process: BatchNorm statistics are already global.')
    if args.torchscript:
        model = torch.jit.script(model)

    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    task = _create_task(args, model, device, soft_targets=mixup_active, num_aug_splits=num_aug_splits)
    run.task = task
    _learning_rate(args)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    run.optimizer = optimizer

    run.amp_autocast = nullcontext
    run.loss_scaler = None
    if args.amp:
        run.amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type == 'cuda' and amp_dtype == torch.float16:
            run.loss_scaler = NativeScaler(device=device.type)
        _logger.info(f'Mixed precision: torch.autocast with {args.amp_dtype}'
                     f'{" and a gradient scaler" if run.loss_scaler else ""}.')
    else:
        _logger.info('AMP not enabled. Training in float32.' if run.model_dtype is None
                     else f'Training with {args.model_dtype} weights.')

    resume_epoch = None
    if args.resume:
        resume_epoch = resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else run.loss_scaler, log_info=utils.is_primary(args))
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device=torch.device('cpu') if args.model_ema_force_cpu else None)
        if args.resume:
            load_task_ema_checkpoint(task, args.resume)
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if args.model_ema:
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)

    # Data: mixing, augmentation splits, loaders.
    collate_fn = None
    run.mixup_fn = None
    if mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.num_classes)
        if args.prefetcher and not num_aug_splits:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            run.mixup_fn = Mixup(**mixup_args)
    if num_aug_splits > 1:
        dataset_train = AugMixDataset(dataset_train, num_splits=num_aug_splits)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    size_choices = args.train_img_sizes
    if size_choices is None and args.train_batches_per_epoch:
        # timm fixes the number of batches through its scheduled batch sampler; one size is a schedule too.
        size_choices = [data_config['input_size']]
    run.loader_train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        re_split=args.resplit, train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio,
        hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob or 0.,
        gaussian_blur_prob=args.gaussian_blur_prob or 0., auto_augment=args.aa,
        num_aug_repeats=args.aug_repeats, num_aug_splits=num_aug_splits, interpolation=train_interpolation,
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers,
        distributed=args.distributed, collate_fn=collate_fn, pin_memory=args.pin_mem, img_dtype=run.model_dtype
        or torch.float32, device=device, use_prefetcher=args.prefetcher,
        use_multi_epochs_loader=args.use_multi_epochs_loader, worker_seeding=args.worker_seeding,
        input_size_choices=size_choices, batch_size_choices=args.train_batch_sizes,
        batch_choice_weights=args.train_size_probs, batch_choice_seed=args.seed,
        batch_choice_schedule=args.train_size_schedule, batch_schedule_epochs=args.epochs,
        batch_schedule_spread=args.train_size_schedule_spread,
        batch_schedule_random_mix=args.train_size_random_mix, num_batches=args.train_batches_per_epoch)
    run.loader_eval = create_loader(
        dataset_eval, input_size=data_config['input_size'],
        batch_size=args.validation_batch_size or args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, distributed=args.distributed, crop_pct=data_config['crop_pct'],
        crop_mode=data_config.get('crop_mode'), pin_memory=args.pin_mem,
        img_dtype=run.model_dtype or torch.float32, device=device, use_prefetcher=args.prefetcher)

    run.loader_clean_train = None
    if not args.no_train_eval:
        run.loader_clean_train = create_loader(
            _create_clean_train_dataset(args), input_size=data_config['input_size'],
            batch_size=args.validation_batch_size or args.batch_size, is_training=False,
            interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
            num_workers=args.workers, distributed=args.distributed, crop_pct=data_config['crop_pct'],
            crop_mode=data_config.get('crop_mode'), pin_memory=args.pin_mem,
            img_dtype=run.model_dtype or torch.float32, device=device, use_prefetcher=args.prefetcher)

    updates_per_epoch = (len(run.loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    run.lr_scheduler, run.num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch)
    run.start_epoch = 0
    if args.start_epoch is not None:
        run.start_epoch = args.start_epoch
        run.updates_done = 0
    elif resume_epoch is not None:
        run.start_epoch = resume_epoch
        if run.updates_done:
            # timm moves a resumed run to the epoch after the checkpoint's; a recovery checkpoint's
            # epoch is unfinished, so it is continued instead.
            run.start_epoch -= 1
            run.updates_done = min(run.updates_done, updates_per_epoch)
            _logger.info(f'Resuming inside epoch {run.start_epoch}, after update {run.updates_done} of '
                         f'{updates_per_epoch}.')
    if run.lr_scheduler is not None and (run.start_epoch > 0 or run.updates_done):
        if args.sched_on_updates:
            run.lr_scheduler.step_update(run.start_epoch * updates_per_epoch + run.updates_done)
        else:
            run.lr_scheduler.step(run.start_epoch)
    _logger.info(f'Scheduled epochs: {run.num_epochs} (starting at {run.start_epoch}); '
                 f'{len(run.loader_train)} batches per epoch.')
    return run


def _output_dir(args: argparse.Namespace, data_config: Dict[str, Any]) -> str:
    experiment = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(data_config['input_size'][-1])])
    return utils.get_outdir(args.output or './output/train', experiment)


def train(run: _Run) -> Dict[str, Any]:
    """Run the epochs of a built run: train, evaluate, checkpoint, summarise, plot.

    Args:
        run: from :func:`build_run`.

    Returns:
        ``{'best_metric', 'best_epoch', 'eval_metric', 'output_dir', 'history', 'last_metrics'}``.
    """
    args, task = run.args, run.task
    started = time.time()
    primary = utils.is_primary(args)
    output_dir = saver = None
    if primary:
        output_dir = _output_dir(args, run.data_config)
        saver = AtomicCheckpointSaver(
            model=task.get_trainable_module(), optimizer=run.optimizer, args=args, amp_scaler=run.loss_scaler,
            checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=args.eval_metric == 'loss',
            max_history=args.checkpoint_hist, task=task)
        if args.resume and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(output_dir):
            saver.load_state_dict_from_checkpoint(args.resume)
        write_text_atomic(os.path.join(output_dir, 'args.yaml'), format_args(args))
        utils.trim_summary(os.path.join(output_dir, 'summary.csv'), run.start_epoch)
    wandb_run = None
    if primary and args.log_wandb:
        try:
            import wandb
        except ImportError:
            _logger.warning('--log-wandb: wandb is not installed (pip install wandb); metrics are not sent.')
        else:
            wandb_run = wandb.init(project=args.wandb_project or args.experiment or None, config=vars(args),
                                   tags=args.wandb_tags or None, id=args.wandb_resume_id or None,
                                   resume='must' if args.wandb_resume_id else None)
    progress = primary and sys.stderr.isatty()
    state = TrainingState(
        optimizer=run.optimizer, device=run.device, lr_scheduler=run.lr_scheduler, amp_autocast=run.amp_autocast,
        loss_scaler=run.loss_scaler, mixup_fn=run.mixup_fn, grad_accum_steps=args.grad_accum_steps,
        clip_grad=args.clip_grad, clip_mode=args.clip_mode, channels_last=args.channels_last,
        model_dtype=run.model_dtype, log_interval=args.log_interval, distributed=args.distributed,
        world_size=args.world_size, variable_batch_loss_scale=args.variable_batch_loss_scale,
        base_batch_size=args.batch_size, synchronize_step=args.synchronize_step, saver=saver,
        recovery_interval=args.recovery_interval, output_dir=output_dir, save_images=args.save_images,
        progress=progress)
    eval_options = dict(device=run.device, amp_autocast=run.amp_autocast, channels_last=args.channels_last,
                        model_dtype=run.model_dtype, distributed=args.distributed, log_interval=args.log_interval,
                        progress=progress)
    softmax_loss_of = _softmax_loss_picker(args)
    metric_names = task.create_evaluator().metric_names
    history: List[Dict[str, Any]] = []
    best_metric = best_epoch = None
    eval_metrics: Dict[str, float] = {}
    clean_metrics: Dict[str, float] = {}
    train_targets = _train_targets(args)
    try:
        for epoch in range(run.start_epoch, run.num_epochs):
            for sampler_owner in (run.dataset_train, getattr(run.loader_train, 'batch_sampler', None),
                                  getattr(run.loader_train, 'sampler', None) if args.distributed else None):
                if hasattr(sampler_owner, 'set_epoch'):
                    sampler_owner.set_epoch(epoch)
            if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
                if run.mixup_fn is not None:
                    run.mixup_fn.mixup_enabled = False
                elif getattr(run.loader_train, 'mixup_enabled', False):
                    run.loader_train.mixup_enabled = False
            train_metrics = train_one_epoch(epoch, task, run.loader_train, state, softmax_loss_of,
                                            updates_done=run.updates_done if epoch == run.start_epoch else 0)
            if getattr(task, 'grouping_statistics', False) and 'gsl_zero_frac' not in train_metrics:
                # An epoch resumed after its last update trained no batch: blank columns keep the CSV aligned.
                train_metrics.update(GroupingMeter.blank(args.gsl_groups))
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                utils.distribute_bn(task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')

            eval_metrics = {}
            if (epoch + 1) % args.val_interval == 0 or epoch + 1 == run.num_epochs:
                eval_metrics = evaluate(task.get_eval_model(), run.loader_eval, task, **eval_options)
                if task.has_ema() and not args.model_ema_force_cpu:
                    if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                        utils.distribute_bn(task.get_trainable_module(ema=True), args.world_size,
                                            args.dist_bn == 'reduce')
                    eval_metrics = evaluate(task.get_eval_model(ema=True), run.loader_eval, task,
                                            log_suffix=' (EMA)', **eval_options)

            if run.loader_clean_train is not None:
                # Blank columns on epochs without the measurement, so that every row matches the header.
                measured = _measure_clean_train(run, epoch, eval_options)
                clean_metrics = measured or clean_metrics
                train_metrics.update((f'clean_{k}', measured[k] if measured else '') for k in ('loss', 'top1'))
            lr = sum(g['lr'] for g in run.optimizer.param_groups) / len(run.optimizer.param_groups)
            row = dict(epoch=epoch, lr=lr, **{f'train_{k}': v for k, v in train_metrics.items() if v != ''},
                       **{f'eval_{k}': v for k, v in eval_metrics.items()})
            history.append(row)
            if output_dir is not None:
                # Epochs without evaluation keep the columns, empty, so that every row matches the header.
                utils.update_summary(epoch, train_metrics, eval_metrics or dict.fromkeys(metric_names, ''),
                                     os.path.join(output_dir, 'summary.csv'), lr=lr, log_wandb=False)
                if wandb_run is not None:
                    wandb_run.log(row)
            if output_dir is not None and (eval_metrics or epoch + 1 == run.num_epochs):
                # Redrawn when a validation point is added (a redraw costs about as much as a small epoch).
                plot_learning_curves(read_summary(os.path.join(output_dir, 'summary.csv')),
                                     os.path.join(output_dir, 'learning_curves.png'),
                                     title=_run_title(args), train_targets=train_targets)
            if saver is not None:
                metric = eval_metrics.get(args.eval_metric)
                best_metric, best_epoch = saver.save_checkpoint(epoch, metric=metric)
            if run.lr_scheduler is not None:
                run.lr_scheduler.step(epoch + 1, eval_metrics.get(args.eval_metric))
    except KeyboardInterrupt:
        _logger.warning('Interrupted: stopping after the last completed epoch.')
    except NonFiniteLossError:
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)
        raise
    if wandb_run is not None:
        wandb_run.finish()
    summary = format_summary(best_metric, best_epoch, args.eval_metric, output_dir,
                             last_metrics=eval_metrics or None, elapsed_s=time.time() - started,
                             clean_train_metrics=clean_metrics or None)
    if primary:
        for line in summary.splitlines():
            _logger.info(line)
    if primary and args.push_to_hub:
        publish_run(args, output_dir)
    return dict(best_metric=best_metric, best_epoch=best_epoch, eval_metric=args.eval_metric,
                output_dir=output_dir, history=history, last_metrics=eval_metrics,
                clean_train_metrics=clean_metrics)


def _measure_clean_train(run: _Run, epoch: int, eval_options: Dict[str, Any]) -> Dict[str, float]:
    """Top-1 and softmax loss on the un-augmented training images in eval mode, when due at ``epoch``.

    Due every ``--train-eval-interval`` epochs and after the last one. The model measured is the one the
    validation metrics come from (the EMA when it is evaluated).

    Returns:
        The evaluator's metrics (``loss``, ``top1``, ``top5``), or an empty dict when not due.
    """
    args, task = run.args, run.task
    interval = args.train_eval_interval
    if not (epoch + 1 == run.num_epochs or (interval and (epoch + 1) % interval == 0)):
        return {}
    ema = task.has_ema() and not args.model_ema_force_cpu
    return evaluate(task.get_eval_model(ema=ema), run.loader_clean_train, task,
                    log_suffix=' (clean train)', **eval_options)


def _train_targets(args: argparse.Namespace) -> str:
    """How the training targets differ from the labels, for the learning-curve legend."""
    kinds = []
    if args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None:
        kinds.append('mixed')
    if args.smoothing:
        kinds.append('smoothed')
    return f'{", ".join(kinds)} targets' if kinds else ''


def _run_title(args: argparse.Namespace) -> str:
    title = f'{args.model}, --loss {_loss_name(args)}'
    if args.loss == 'gsl':
        title += f' (Type-{args.gsl_type}, G={args.gsl_groups}, {args.gsl_grouping} grouping)'
    return title


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``train.py``: parse the command line, refuse what cannot run, train, and summarise.

    With no data flag the embedded Fashion-MNIST subset is trained with :data:`EMBEDDED_RECIPE`
    for every flag the user did not set.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        What :func:`train` returns. A refused command line (an unknown flag, a bad value or combination, a
        model timm does not have, a missing or unreadable file) exits with status 2 and one line,
        ``train.py: error: <message>``, before any dataset is read or anything is written.
    """
    _setup_logging()
    args, explicit = parse_args(argv)
    try:
        changed = apply_embedded_recipe(args, explicit)
        if changed:
            _logger.info(f"No data flag: training on the embedded dataset '{args.dataset}' with the built-in "
                         f"recipe for {', '.join('--' + d.replace('_', '-') for d in changed if d != 'dataset')}.")
        try:
            _resolve_device(args)
        except ImportError as e:
            raise ValueError(f'--device-modules {" ".join(args.device_modules)}: {e}.') from e
        check_args(args)
        run = build_run(args)
    except ValueError as e:
        exit_with_error('train.py', e)
    try:
        return train(run)
    except NonFiniteLossError as e:
        # Every process raised together (the check is collective), so all of them leave here.
        raise SystemExit(f'train.py: error: {e}') from None
    finally:
        # A process group left alive until interpreter exit can abort the process while its gloo
        # threads are torn down ("terminate called without an active exception").
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def cli() -> None:
    """Console-script entry point ``timm-gsl-train`` (and ``python -m timm_gsl.train``): run :func:`main`.

    :func:`main` returns the training summary; a console-script wrapper passes the return value to ``sys.exit``,
    which would print it and exit with status 1. This entry point drops it, so a finished run exits
    with status 0 and a refused command line with status 2.
    """
    main()


if __name__ == '__main__':
    # Run the imported timm_gsl.train, not this __main__ copy of it, so that every object it defines
    # (and anything pickled from it) belongs to one module whichever way the script was started.
    from timm_gsl.train import cli as _cli
    _cli()
