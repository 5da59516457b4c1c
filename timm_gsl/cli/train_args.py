"""``train.py``'s command line: timm's training flags plus the group softmax loss's, and their checks.

Every flag of timm's ``train.py`` is here with the same name and default (``tests/test_train.py`` checks them
against timm's flag list); the help texts are ours. The flags ``train.py`` shares with ``validate.py`` are
declared once, in :mod:`timm_gsl.cli.flags`. The flags added by this project are ``--loss``, ``--gsl-groups``,
``--gsl-type``, ``--gsl-grouping``, ``--class-subset``, ``--samples-per-class``, ``--train-eval-interval`` and
``--no-train-eval``.

Parsing follows timm: a YAML file given with ``-c/--config`` supplies defaults, and flags given on the command
line win over it. On top of that :func:`parse_args` records which options the user set (on the command line or
in the config file, even to their default value), which is what the no-data-flags recipe needs. Then
:func:`check_args` refuses, in one line, what cannot run, before anything is read or written.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
import yaml
from timm import utils
from timm.loss import LOSS_TYPES as TIMM_LOSS_TYPES
from timm.optim import get_optimizer_info, list_optimizers
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from ..data import EMBEDDED_DATASET
from ..distillation import check_distillation_options
from ..engine.run_folder import check_run_folder
from ..engine.tta import check_tta
from ..functional import GROUPINGS
from ..hub import check_publish_options
from ..loss_factory import GSL_TYPE_CHOICES
from ..naflex import check_naflex_options
from .common import ArgumentParser, check_at_least, check_can_create, check_class_subset, check_file
from .common import check_model_name, check_pretrained_weights, close_matches, exit_with_error, explicit_dests
from .common import one_line, repo_id_type
from .flags import DATA_FLAGS, add_dataset_flags, add_device_flags, add_loader_flags, add_model_flags
from .flags import NAFLEX_FLAGS, add_naflex_flags, dataset_root, input_channels

__all__ = [
    'CALIBRATION_SOURCES', 'DATA_FLAGS', 'DISTILLATION_FLAGS', 'EMBEDDED_RECIPE', 'LOSS_FLAGS',
    'MIN_CALIBRATION_IMAGES', 'RUN_FOLDER_FLAGS', 'TRAIN_LOSSES', 'TTA_FLAGS', 'apply_embedded_recipe', 'calibrates',
    'check_args', 'format_args', 'get_args_parser', 'loss_name', 'parse_args', 'training_command',
    'uses_embedded_recipe',
]

_logger = logging.getLogger('timm_gsl.train')

# timm losses that need multi-label targets; the rest take class indices and pass through to timm.
_MULTI_LABEL_ONLY = ('twoway', 'zlpr', 'db')
TRAIN_LOSSES: Tuple[str, ...] = ('gsl',) + tuple(t for t in TIMM_LOSS_TYPES if t not in _MULTI_LABEL_ONLY)


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('--train-split', metavar='NAME', default='train', help='split to train on (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help='split to evaluate on (default: validation)')
    group.add_argument('--train-num-samples', type=int, default=None, metavar='N',
                       help='number of training samples (needed by some iterable datasets; default: None)')
    group.add_argument('--val-num-samples', type=int, default=None, metavar='N',
                       help='number of validation samples (needed by some iterable datasets; default: None)')
    group.add_argument('--samples-per-class', type=int, default=None, metavar='N',
                       help='keep N training images of every class, drawn with --seed (default: all)')


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Model parameters')
    group.add_argument('--pretrained-path', default=None, type=str,
                       help='load pretrained weights from this local file instead of the hub '
                            '(the classifier is adapted as timm does)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='initialise the model from this checkpoint (default: none)')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='continue training from this checkpoint: model, optimiser, scheduler, EMA, epoch')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='with --resume, restore the model only, not the optimiser state')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='evaluation batch size (default: None, the training batch size)')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='accumulate gradients over N batches per update (default: 1)')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='recompute block activations in the backward pass to save memory')
    group.add_argument('--head-init-scale', default=None, type=float, help='multiply the classifier\'s initial weights')
    group.add_argument('--head-init-bias', default=None, type=float, help='set the classifier\'s initial bias')


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Device parameters')
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


CALIBRATION_SOURCES = ('auto', 'holdout', 'val-crossfit')
MIN_CALIBRATION_IMAGES = 20


def _add_calibration_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Calibration (a temperature fitted after training)')
    group.add_argument('--calibrate', action=argparse.BooleanOptionalAction, default=None,
                       help='after training, fit a temperature T on held-out images and store it (with NLL and '
                            'ECE before and after) in the checkpoints; published models fold it into their '
                            'classifier (default: on for --loss gsl, off for other losses)')
    group.add_argument('--calibration-source', default='auto', choices=CALIBRATION_SOURCES,
                       help='images T is fitted on: holdout (the last N of each class\'s --seed draw from the '
                            'training split, never trained on; without --samples-per-class they leave the '
                            'training set), val-crossfit (the validation images, T fitted on all; the reported '
                            'figures score each half with the T of the other), or auto: holdout when '
                            '--samples-per-class leaves enough unused training images, else val-crossfit '
                            '(default: auto)')
    group.add_argument('--calibration-images-per-class', type=int, default=50, metavar='N',
                       help='held-out calibration images per class for --calibration-source holdout (default: 50)')


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
    group.add_argument('--worker-seeding', type=str, default='all', help='data-loader worker seeding mode')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='log training progress every N updates (default: 50)')
    group.add_argument('--val-interval', type=int, default=1, metavar='N',
                       help='evaluate every N epochs, and after the last one (default: 1)')
    group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                       help='write a recovery checkpoint every N updates (default: 0, never)')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='number of ranked checkpoints to keep (default: 10)')
    group.add_argument('--save-images', action='store_true', default=False,
                       help='save a batch of training inputs at every log line')
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
                       help='test-time augmentation at every evaluation: average the logits of each image and its '
                            'horizontal mirror (2); 0 or 1: off (default: 0)')
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


def _add_distillation_args(parser: argparse.ArgumentParser) -> None:
    # Knowledge distillation: on the parser itself, as in timm.
    parser.add_argument('--kd-model-name', default=None, type=str,
                        help='teacher for knowledge distillation: a timm model name with pretrained weights, '
                             'local-dir:FOLDER (e.g. a model exported by `python -m timm_gsl export`) or '
                             'hf-hub:ORG/NAME; '
                             'works with every --loss (with gsl the group softmax loss is the task loss)')
    parser.add_argument('--kd-pretrained-path', default=None, type=str, metavar='PATH',
                        help='teacher weights from this file (a checkpoint or .safetensors) for --kd-model-name ARCH '
                             '(ours; not a timm flag)')
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


DISTILLATION_FLAGS: Dict[str, str] = dict(
    loss='--loss',
    teacher='--kd-model-name',
    distill_type='--kd-distill-type',
    kd_loss_type='--kd-loss-type',
    distill_loss_weight='--distill-loss-weight',
    task_loss_weight='--task-loss-weight',
    temperature='--kd-temperature',
    student_feature_dim='--kd-student-feature-dim',
    teacher_feature_dim='--kd-teacher-feature-dim',
    token_distill_type='--kd-token-distill-type',
    teacher_pretrained_path='--kd-pretrained-path',
)
"""The flag each keyword of :func:`timm_gsl.distillation.create_distillation_task` stands for: the ``names``
train.py passes to the distillation functions, so their errors name its flags.

All are timm's ``train.py`` flags except ``--kd-pretrained-path``, which timm's ``train.py`` does not have
(its ``DistillationTeacher`` takes the path as ``pretrained_path``)."""

LOSS_FLAGS: Mapping[str, str] = MappingProxyType({
    'gsl_type': '--gsl-type',
    'num_train_images': '--train-num-samples',
})
"""The flags the keywords of :func:`timm_gsl.loss_factory.resolve_gsl_type` stand for (its ``names``)."""

TTA_FLAGS: Mapping[str, str] = MappingProxyType({'tta': '--tta', 'factor': '--tta'})
"""The flag the keywords of :mod:`timm_gsl.engine.tta` stand for (its functions' ``names``): ``tta``
(:func:`~timm_gsl.engine.tta.check_tta`) and ``factor`` (the others) are both ``--tta``."""

RUN_FOLDER_FLAGS: Mapping[str, str] = MappingProxyType({
    'folder': '--output/--experiment',
    'resume': '--resume',
    'experiment': '--experiment',
    'output': '--output',
})
"""The flags the keywords of :mod:`timm_gsl.engine.run_folder` stand for (its functions' ``names``); where the
folder's flags and values are known, ``folder`` names them (``--output out --experiment run``)."""


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
    add_dataset_flags(parser)
    _add_dataset_args(parser)
    add_model_flags(parser, model_default='resnet50', batch_size_default=128)
    _add_model_args(parser)
    add_device_flags(parser)
    _add_device_args(parser)
    add_loader_flags(parser)
    _add_optimizer_args(parser)
    _add_schedule_args(parser)
    _add_augmentation_args(parser)
    _add_loss_args(parser)
    _add_fit_args(parser)
    _add_calibration_args(parser)
    _add_misc_args(parser)
    _add_distillation_args(parser)
    add_naflex_flags(parser, training=True, title='NaFlex loader parameters (NaFlexViT models)')
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
# on the embedded 28x28 Fashion-MNIST subset (grayscale, given as RGB like any timm dataset; 5000 training
# images), a few minutes on 2 CPU cores. Every value replaces a default sized for ImageNet on GPUs.
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
    channels = input_channels(args)
    for dest in ('mean', 'std'):
        if dest in changed:
            setattr(args, dest, recipe[dest] * channels)
    return changed


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
    _check_loss_flags(args, parser)
    _check_augmentation_flags(args)
    _check_distillation_flags(args, parser)
    _check_naflex_flags(args, parser)
    _check_device_flags(args)
    _check_values(args)
    _check_calibration_flags(args, parser)
    _check_names_and_files(args)
    _check_output_folder(args)


def _distillation_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> List[str]:
    return [flag for prefix in ('kd_', 'distill_', 'task_loss') for flag in _non_default(args, parser, prefix)]


def _check_loss_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The loss flags agree with each other (--loss, --gsl-*, --bce-*, --jsd-loss, distillation)."""
    if args.loss == 'gsl':
        incompatible = []
        if args.bce_loss:
            incompatible.append('--bce-loss (a sigmoid loss replaces the softmax the group loss is built on)')
        if args.jsd_loss or args.aug_splits:
            incompatible.append('--jsd-loss/--aug-splits (the JSD loss is its own criterion over augmentation splits)')
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
    if bce_options and loss_name(args) != 'bce':
        raise ValueError(f'{"/".join(bce_options)} apply to the bce loss only, but the loss is '
                         f'{loss_name(args)!r}; pass --loss bce or drop them.')
    if args.bce_loss and args.jsd_loss:
        raise ValueError('--bce-loss and --jsd-loss select different losses; pass one of them.')
    if args.bce_loss and args.loss not in ('ce', 'bce'):
        raise ValueError(f'--bce-loss selects the bce loss, but --loss is {args.loss!r}; pass --loss bce instead.')
    if args.jsd_loss and args.loss not in ('ce', 'jsd'):
        raise ValueError(f'--jsd-loss selects the jsd loss, but --loss is {args.loss!r}; pass --loss jsd instead.')


def _check_augmentation_flags(args: argparse.Namespace) -> None:
    """Augmentation splits, the JSD loss and split BatchNorm go together the way timm's loaders allow."""
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


def _check_distillation_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Distillation flags need a teacher; with one, the options are checked without building it."""
    kd = [f for f in _distillation_flags(args, parser) if f != '--kd-model-name']
    if args.kd_model_name is None:
        if kd:
            raise ValueError(f'{"/".join(kd)} configure knowledge distillation, but no teacher was given; pass '
                             f'--kd-model-name NAME or drop them.')
        return
    check_distillation_options(
        loss=loss_name(args), teacher=args.kd_model_name, distill_type=args.kd_distill_type,
        kd_loss_type=args.kd_loss_type, distill_loss_weight=args.distill_loss_weight,
        task_loss_weight=args.task_loss_weight, temperature=args.kd_temperature,
        student_feature_dim=args.kd_student_feature_dim, teacher_feature_dim=args.kd_teacher_feature_dim,
        token_distill_type=args.kd_token_distill_type, teacher_pretrained_path=args.kd_pretrained_path,
        num_classes=args.num_classes, names=DISTILLATION_FLAGS)


def _check_naflex_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """NaFlex flags need --naflex-loader and a NaFlex model; --tta takes what the evaluation can make."""
    check_tta(args.tta, names=TTA_FLAGS)
    naflex = [f for f in _non_default(args, parser, 'naflex_') if f != '--naflex-loader']
    if not args.naflex_loader:
        if naflex:
            raise ValueError(f'{"/".join(naflex)} configure the NaFlex loader, which is off; pass --naflex-loader '
                             f'(with a NaFlexViT model) or drop them.')
        return
    check_naflex_options(
        naflex_loader=True, model_name=args.model, model_kwargs=args.model_kwargs, batch_size=args.batch_size,
        train_seq_lens=args.naflex_train_seq_lens, max_seq_len=args.naflex_max_seq_len,
        patch_sizes=args.naflex_patch_sizes, patch_size_probs=args.naflex_patch_size_probs,
        loss_scale=args.naflex_loss_scale, aug_splits=args.aug_splits, aug_repeats=args.aug_repeats,
        cutmix_minmax=args.cutmix_minmax, mixup_mode=args.mixup_mode, names=NAFLEX_FLAGS)
    clashing = [flag for flag, on in (('--train-img-sizes', args.train_img_sizes),
                                      ('--train-batches-per-epoch', args.train_batches_per_epoch),
                                      ('--variable-batch-loss-scale', args.variable_batch_loss_scale != 'none'))
                if on]
    if clashing:
        raise ValueError(f'--naflex-loader cannot be combined with {"/".join(clashing)}: the NaFlex loader sets the '
                         f'image sizes, batch sizes and loss scale itself (--naflex-train-seq-lens, '
                         f'--naflex-loss-scale).')


def _check_device_flags(args: argparse.Namespace) -> None:
    """SyncBatchNorm, AMP and the weight dtype fit the device; a Hub token exists before hours of training."""
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
        check_publish_options(args.hub_revision, args.hub_create_pr)
        from huggingface_hub import get_token
        if not get_token():
            # Found now, not after the last epoch: a run would otherwise train for hours and then fail to publish.
            raise ValueError(f'--push-to-hub {args.push_to_hub}: no Hugging Face token; set HF_TOKEN or run '
                             f'`hf auth login` before training (or drop --push-to-hub and publish later with '
                             f'`python -m timm_gsl push`).')


def calibrates(args: argparse.Namespace) -> bool:
    """Whether the run fits a temperature after training (``--calibrate``; by default with ``--loss gsl``)."""
    return args.loss == 'gsl' if args.calibrate is None else bool(args.calibrate)


def _check_calibration_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not calibrates(args):
        given = [f'--{dest.replace("_", "-")} {getattr(args, dest)}'
                 for dest in ('calibration_source', 'calibration_images_per_class')
                 if getattr(args, dest) != parser.get_default(dest)]
        if given:
            why = '--no-calibrate' if args.calibrate is False else f'--loss {args.loss} (pass --calibrate to fit one)'
            raise ValueError(f'{given[0]} would be ignored: no temperature is fitted with {why}.')
    check_at_least('--calibration-images-per-class', args.calibration_images_per_class)


def _check_learning_rates(args: argparse.Namespace) -> None:
    """Learning rates finite, ``--lr``/``--lr-base`` above zero, the others not below."""
    for flag, value, positive in (('--lr', args.lr, True), ('--lr-base', args.lr_base, True),
                                  ('--warmup-lr', args.warmup_lr, False), ('--min-lr', args.min_lr, False)):
        if value is not None and not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            allowed = 'a finite number > 0' if positive else 'a finite number >= 0'
            raise ValueError(f'{flag} {value} is invalid, expected {allowed}.')


def _check_values(args: argparse.Namespace) -> None:
    """Counts and intervals in range."""
    _check_learning_rates(args)
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


_CHECKPOINT_EXPECTED = 'a checkpoint written by train.py (.pth.tar) or a .safetensors file'


def _check_output_folder(args: argparse.Namespace) -> None:
    """The run's folder must be new (or resumed from a checkpoint in it), and its parent writable."""
    root = args.output or './output/train'
    flag = ' '.join(f for f in (f'--output {args.output}' if args.output else '',
                                f'--experiment {args.experiment}' if args.experiment else '') if f) or '--output'
    # Without --experiment the folder gets a new timestamped name: only the parent is checked.
    check_run_folder(os.path.join(root, args.experiment or '.a-new-run'), args.resume,
                     names={**RUN_FOLDER_FLAGS, 'folder': flag})


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
    root = dataset_root(args)
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

def loss_name(args: argparse.Namespace) -> str:
    """The loss the run trains with: ``--loss``, unless ``--bce-loss`` or ``--jsd-loss`` selects timm's."""
    if args.bce_loss:
        return 'bce'
    if args.jsd_loss:
        return 'jsd'
    return args.loss


# Options that say where a run goes or how it is published, not how it trains.
_NOT_TRAINING_FLAGS = frozenset({
    'config', 'data', 'device', 'output', 'experiment', 'resume', 'no_resume_opt', 'local_rank', 'log_wandb',
    'wandb_project', 'wandb_tags', 'wandb_resume_id', 'push_to_hub', 'hub_private', 'hub_revision',
    'hub_create_pr', 'hub_replace_card', 'log_interval', 'save_images', 'pin_mem',
})


def training_command(args: Dict[str, Any]) -> str:
    """The ``train.py`` command line that sets every training option ``args`` holds away from its default.

    What the model card shows (passed to :mod:`timm_gsl.hub` as its ``training_command``).

    Args:
        args: training arguments (a checkpoint's ``args``).

    Returns:
        ``python train.py --flag value ...``, shell-quoted. ``--workers`` is kept (each loader worker draws its
        own augmentations, so the number of workers changes the batches); an absolute ``--data-dir`` is shown as
        ``path/to/<its last folder>``, so that no path of the training machine is published.
    """
    words = ['python', 'train.py']
    for action in get_args_parser()._actions:
        dest = action.dest
        if not action.option_strings or dest in _NOT_TRAINING_FLAGS or dest not in args:
            continue
        value = args[dest]
        if value == action.default or value is None:
            continue
        if dest == 'data_dir' and os.path.isabs(str(value)):
            value = 'path/to/' + (os.path.basename(os.path.normpath(str(value))) or 'data')
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            words += [flag] if value else []
        elif isinstance(value, dict):
            words += [flag] + [f'{k}={v}' for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            words += [flag] + [str(v) for v in value]
        else:
            words += [flag, str(value)]
    return ' '.join(shlex.quote(w) for w in words)
