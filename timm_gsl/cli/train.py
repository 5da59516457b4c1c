"""``train.py``: train a timm model with the group softmax loss (or any of timm's losses), the timm way.

The command reads as a recipe, each step a function of this module:

1. **parse** (:func:`timm_gsl.cli.train_args.parse_args`): timm's flags, a ``-c`` YAML config, the no-data-flags
   recipe and the device;
2. **check** (:func:`timm_gsl.cli.train_args.check_args`): one line per mistake, before anything is read or
   written;
3. **build** (:func:`build_run`): the derived settings, the datasets, the model, the task, the optimiser and AMP,
   the loaders and the schedule, each from a builder that returns what it made;
4. **loop** (:func:`train`): :func:`timm_gsl.engine.train_one_epoch` and :func:`timm_gsl.engine.evaluate` per
   epoch, checkpoints, ``summary.csv``, the learning curves, and publishing to the Hub at the end.

The user's arguments are not rewritten after the checks: what the run works out from them (the device, the
class count, the learning rate, the loss type 'auto' resolves to, ...) lives in :class:`Settings`, and the
two together are what ``args.yaml`` and every checkpoint record.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm import utils
from timm.data import AugMixDataset, FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.models import create_model, load_checkpoint, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask, TrainingTask, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import NativeScaler

from ..data import check_data_source, create_dataset, dataset_class_names
from ..distillation import create_distillation_task, distillation_loss_names
from ..engine import AtomicCheckpointSaver, GroupingMeter, NonFiniteLossError, TrainingState, evaluate
from ..engine import check_checkpoint_fits, format_summary, plot_learning_curves, read_checkpoint, read_summary
from ..engine import train_one_epoch, write_text_atomic
from ..head import classifier_layers
from ..hub import HubPublishError, push_checkpoint
from ..loss_factory import GSL_AUTO_THRESHOLD, create_classification_loss, resolve_gsl_type
from ..naflex import check_naflex_model, create_naflex_eval_loader, create_naflex_mixup, create_naflex_train_loader
from ..naflex import set_naflex_epoch
from ..task import GroupSoftmaxTask
from .common import exit_with_error, one_line, resolve_device
from .flags import dataset_root, input_channels
from .train_args import EMBEDDED_RECIPE, apply_embedded_recipe, check_args, format_args, get_args_parser
from .train_args import loss_name, parse_args, training_command, uses_embedded_recipe

__all__ = [
    'EMBEDDED_RECIPE', 'GSL_AUTO_THRESHOLD', 'Run', 'Settings', 'apply_embedded_recipe', 'build_run', 'check_args',
    'cli', 'get_args_parser', 'main', 'parse_args', 'publish_run', 'resolve_gsl_type', 'train',
    'uses_embedded_recipe',
]

_logger = logging.getLogger('timm_gsl.train')


# ----------------------------------------------------------------------------------------------
# What the build step makes
# ----------------------------------------------------------------------------------------------

@dataclass
class Settings:
    """What the run works out from the flags, kept beside them instead of written back into ``args``.

    Attributes:
        device: the device of this process.
        distributed: whether several processes train together (torchrun).
        world_size: number of processes.
        rank: this process's rank (0: the primary, which writes the outputs).
        local_rank: this process's rank on its machine.
        num_classes: classes of the classifier (``--num-classes``, else the training set's, else the model's).
        gsl_type: the group softmax loss type ``--gsl-type auto`` resolved to (None for other losses).
        lr: the learning rate (``--lr``, else ``--lr-base`` scaled by the global batch size).
        lr_base_scale: how ``--lr-base`` was scaled ('linear', 'sqrt'; '' when ``--lr`` was given).
        dist_bn: how BatchNorm statistics are shared after each epoch ('' with SyncBatchNorm).
        data_dir: the dataset root (``--data-dir``, else the positional ``DIR``).
    """
    device: torch.device
    distributed: bool = False
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    num_classes: Optional[int] = None
    gsl_type: Optional[str] = None
    lr: Optional[float] = None
    lr_base_scale: str = ''
    dist_bn: str = 'reduce'
    data_dir: Optional[str] = None

    @property
    def primary(self) -> bool:
        """Whether this process writes the outputs (rank 0)."""
        return self.rank == 0

    def record(self, args: argparse.Namespace) -> argparse.Namespace:
        """``args`` with these values filled in: what ``args.yaml`` and the checkpoints record.

        A new namespace; ``args`` is left as the user's. The result is also what timm's helpers that read a
        namespace (``optimizer_kwargs``, ``scheduler_kwargs``) are given.
        """
        recorded = argparse.Namespace(**vars(args))
        recorded.device = str(self.device)
        recorded.distributed, recorded.world_size = self.distributed, self.world_size
        recorded.rank, recorded.local_rank = self.rank, self.local_rank
        recorded.prefetcher = not args.no_prefetcher
        recorded.grad_accum_steps = max(1, args.grad_accum_steps)
        recorded.data_dir = self.data_dir
        for name in ('num_classes', 'lr'):
            if getattr(self, name) is not None:
                setattr(recorded, name, getattr(self, name))
        if self.gsl_type is not None:
            recorded.gsl_type = self.gsl_type
        if self.lr_base_scale:
            recorded.lr_base_scale = self.lr_base_scale
        recorded.dist_bn = self.dist_bn
        return recorded


@dataclass
class Datasets:
    """The datasets of a run: training, evaluation, and the training images once each for the clean fit."""
    train: Any
    eval: Any
    clean_train: Optional[Any]
    class_names: Optional[List[str]]
    num_train: Optional[int]


@dataclass
class Precision:
    """How the steps compute: the autocast context, the float16 gradient scaler and the weight dtype."""
    amp_autocast: Callable[[], ContextManager] = nullcontext
    loss_scaler: Optional[NativeScaler] = None
    model_dtype: Optional[torch.dtype] = None


@dataclass
class Loaders:
    """The data loaders; timm's ``Mixup`` when mixing happens in the loop; the model's NaFlex patch size."""
    train: Any
    eval: Any
    clean_train: Optional[Any] = None
    mixup_fn: Optional[Mixup] = None
    naflex_patch_size: Optional[Tuple[int, int]] = None


@dataclass
class Run:
    """Everything the epoch loop needs, built before anything is written.

    Attributes:
        args: the user's arguments, as parsed and checked (not changed by the build).
        settings: what the run worked out from them.
        config: ``args`` with ``settings`` filled in (:meth:`Settings.record`): recorded in args.yaml and checkpoints.
        task: the ``timm.task`` training task (a :class:`~timm_gsl.GroupSoftmaxTask` for ``--loss gsl``).
        optimizer, lr_scheduler: timm's.
        num_epochs: epochs of the schedule (cool-down included).
        start_epoch: the epoch training starts at (after ``--resume``).
        updates_done: updates of ``start_epoch`` already done (a recovery checkpoint resumes inside its epoch).
    """
    args: argparse.Namespace
    settings: Settings
    config: argparse.Namespace
    datasets: Datasets
    data_config: Dict[str, Any]
    task: TrainingTask
    optimizer: torch.optim.Optimizer
    precision: Precision
    loaders: Loaders
    lr_scheduler: Any
    num_epochs: int
    start_epoch: int = 0
    updates_done: int = 0

    @property
    def device(self) -> torch.device:
        """The device of this process (``settings.device``)."""
        return self.settings.device

    @property
    def loader_train(self) -> Any:
        """The training loader (``loaders.train``)."""
        return self.loaders.train

    @property
    def loader_eval(self) -> Any:
        """The validation loader (``loaders.eval``)."""
        return self.loaders.eval


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------

def build_settings(args: argparse.Namespace) -> Settings:
    """The process's device and place among the processes (timm's distributed set-up), and the data root.

    Also seeds every generator and applies the global switches (TF32 on CUDA, the JIT fuser, fast norm).
    """
    probe = argparse.Namespace(**vars(args))  # timm's set-up writes its findings into the namespace it is given
    device = utils.init_distributed_device(probe)
    settings = Settings(device=device, distributed=probe.distributed, world_size=probe.world_size, rank=probe.rank,
                        local_rank=probe.local_rank, dist_bn=args.dist_bn, data_dir=dataset_root(args))
    if settings.distributed:
        _logger.info(f'Distributed training: process {settings.rank} of {settings.world_size}, device {device}.')
    else:
        _logger.info(f'Training with a single process on 1 device ({device}).')
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.aug_repeats and not settings.distributed:
        raise ValueError(f'--aug-repeats {args.aug_repeats:g} needs distributed training (timm\'s repeated-'
                         f'augmentation sampler splits the repeats across processes); expected 0 here.')
    utils.random_seed(args.seed, settings.rank)
    if args.fuser:
        utils.set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()
    return settings


def _dataset_options(args: argparse.Namespace, settings: Settings):
    """The data conditions and timm's dataset options shared by every split."""
    conditions = dict(class_subset=args.class_subset, samples_per_class=args.samples_per_class, seed=args.seed)
    common = dict(root=settings.data_dir, class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, input_img_mode=args.input_img_mode, input_key=args.input_key,
                  target_key=args.target_key, trust_remote_code=args.dataset_trust_remote_code)
    if args.input_img_mode is None:
        # As timm: one-channel models read grayscale images, the others RGB (a grayscale image gives
        # three identical channels).
        common['input_img_mode'] = 'L' if input_channels(args) == 1 else 'RGB'
    return conditions, common


def build_datasets(args: argparse.Namespace, settings: Settings) -> Datasets:
    """The training and evaluation datasets under the data conditions, and the clean-fit copy of the training set.

    Raises:
        ValueError: a data condition the dataset cannot meet, named with the flags that set it.
    """
    conditions, common = _dataset_options(args, settings)
    try:
        train = create_dataset(args.dataset, split=args.train_split, is_training=True,
                               num_samples=args.train_num_samples, repeats=args.epoch_repeats, **conditions, **common)
        evaluation = create_dataset(args.dataset, split=args.val_split, is_training=False,
                                    num_samples=args.val_num_samples, **conditions, **common)
    except ValueError as e:
        given = [f'--class-subset {args.class_subset}' if args.class_subset is not None else '',
                 f'--samples-per-class {args.samples_per_class}' if args.samples_per_class is not None else '']
        given = [g for g in given if g]
        if not given:
            raise
        raise ValueError(f'{" with ".join(given)}: {e}') from e
    # The training images once each, for the eval-mode fit measurement: a separate dataset object, so that
    # the evaluation transforms its loader gives it leave training alone.
    clean = None if args.no_train_eval else create_dataset(
        args.dataset, split=args.train_split, is_training=True, num_samples=args.train_num_samples,
        **conditions, **common)
    try:
        num_train = len(train)
    except TypeError:
        num_train = args.train_num_samples
    return Datasets(train, evaluation, clean, dataset_class_names(train), num_train)


def _model_options(args: argparse.Namespace) -> str:
    """The flags that shape the model besides --model, as the user wrote them, for messages."""
    given = [f'--model-kwargs {" ".join(f"{k}={v}" for k, v in args.model_kwargs.items())}'
             if args.model_kwargs else '', f'--gp {args.gp}' if args.gp else '',
             f'--in-chans {args.in_chans}' if args.in_chans is not None else '']
    return ' '.join(g for g in given if g)


def probe_model(args: argparse.Namespace) -> Optional[nn.Module]:
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
            return create_model(args.model, pretrained=False, in_chans=input_channels(args),
                                num_classes=args.num_classes, global_pool=args.gp, scriptable=args.torchscript,
                                **args.model_kwargs)
    except TypeError as e:
        if 'unexpected keyword argument' in str(e):
            raise ValueError(f'--model {args.model} cannot be created with {_model_options(args) or "these options"}'
                             f' ({one_line(e)}).') from None
        return None
    except Exception as e:  # noqa: BLE001 (anything meta-specific: the real model is checked later)
        _logger.debug(f'--model {args.model}: no meta-device probe ({type(e).__name__}: {e}).')
        return None


def check_groups_fit(args: argparse.Namespace, model: nn.Module) -> None:
    """Refuse ``--gsl-groups`` larger than the classifier's feature size."""
    feature_size = sum(layer.weight.flatten(1).shape[1] for layer in classifier_layers(model))
    if args.gsl_groups > feature_size:
        raise ValueError(f'--gsl-groups {args.gsl_groups} is larger than the feature size of --model {args.model} '
                         f'({feature_size}, the input of its classifier); expected 1 <= --gsl-groups <= '
                         f'{feature_size}.')


def build_model(args: argparse.Namespace, settings: Settings,
                initial_checkpoint: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The model to train, on the run's device, with ``--initial-checkpoint``'s weights when given.

    Args:
        args: parsed and checked arguments.
        settings: the run's settings (``num_classes`` is filled in from the model when still unknown).
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
            in_chans=input_channels(args), num_classes=settings.num_classes, drop_rate=args.drop,
            drop_path_rate=drop_path, drop_block_rate=args.drop_block, global_pool=args.gp,
            bn_momentum=args.bn_momentum, bn_eps=args.bn_eps, scriptable=args.torchscript, **args.model_kwargs)
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
    _initialise_head(model, args)
    if settings.num_classes is None:
        settings.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    model.to(device=settings.device, dtype=getattr(torch, args.model_dtype) if args.model_dtype else None)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _initialise_head(model: nn.Module, args: argparse.Namespace) -> None:
    if args.head_init_scale is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
    if args.head_init_bias is not None:
        nn.init.constant_(model.get_classifier().bias, args.head_init_bias)


def _adapt_batch_norm(model: nn.Module, args: argparse.Namespace, settings: Settings) -> nn.Module:
    """Split BatchNorm per augmentation split, SyncBatchNorm across processes, or TorchScript, as asked."""
    if args.split_bn:
        model = convert_splitbn_model(model, max(_aug_splits(args), 2))
        model.to(settings.device)
    if settings.distributed and args.sync_bn:
        settings.dist_bn = ''
        model = convert_sync_batchnorm(model)
        if settings.primary:
            _logger.info('Converted BatchNorm layers to SyncBatchNorm (statistics shared by all processes).')
    elif args.sync_bn:
        _logger.warning('--sync-bn has no effect in a single process: BatchNorm statistics are already global.')
    if args.torchscript:
        model = torch.jit.script(model)
    return model


def _aug_splits(args: argparse.Namespace) -> int:
    return args.aug_splits if args.aug_splits > 1 else 0


def _mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None


def _criterion(args: argparse.Namespace, settings: Settings) -> Any:
    """The task loss: the group softmax loss or one of timm's, as ``--loss`` (``--bce-loss``, ``--jsd-loss``) says."""
    loss, soft_targets = loss_name(args), _mixup_active(args)
    if loss == 'gsl':
        criterion = create_classification_loss(
            loss_type='gsl', smoothing=args.smoothing, soft_targets=soft_targets, gsl_groups=args.gsl_groups,
            gsl_type=settings.gsl_type, gsl_grouping=args.gsl_grouping)
    else:
        timm_options = dict(jsd_splits=_aug_splits(args)) if loss == 'jsd' else {}
        if loss == 'bce':
            timm_options.update(bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum,
                                pos_weight=args.bce_pos_weight)
        criterion = create_classification_loss(
            loss_type=loss, smoothing=args.smoothing, soft_targets=soft_targets, **timm_options)
    return criterion.to(settings.device) if isinstance(criterion, nn.Module) else criterion


def build_task(args: argparse.Namespace, settings: Settings, model: nn.Module, data_config: Dict[str, Any],
               model_dtype: Optional[torch.dtype] = None) -> TrainingTask:
    """The training task: the group softmax loss's or timm's classification task, or, with ``--kd-model-name``,
    timm's distillation task around either loss (:func:`timm_gsl.distillation.create_distillation_task`)."""
    loss, device, criterion = loss_name(args), settings.device, _criterion(args, settings)
    if args.kd_model_name:
        return create_distillation_task(
            model, loss=loss, criterion=criterion, teacher=args.kd_model_name, distill_type=args.kd_distill_type,
            kd_loss_type=args.kd_loss_type, distill_loss_weight=args.distill_loss_weight,
            task_loss_weight=args.task_loss_weight, temperature=args.kd_temperature,
            student_feature_dim=args.kd_student_feature_dim, teacher_feature_dim=args.kd_teacher_feature_dim,
            token_distill_type=args.kd_token_distill_type, num_classes=settings.num_classes,
            in_chans=input_channels(args), teacher_pretrained_path=args.kd_pretrained_path,
            input_mean=data_config['mean'], input_std=data_config['std'], device=device, dtype=model_dtype, grouping_statistics=loss == 'gsl',
            verbose=settings.primary)
    if loss == 'gsl':
        return GroupSoftmaxTask(model, criterion=criterion, device=device, grouping_statistics=True)
    return ClassificationTask(model, criterion=criterion, device=device)


def resolve_learning_rate(args: argparse.Namespace, settings: Settings) -> None:
    """``--lr``, or ``--lr-base`` scaled by the global batch size as timm scales it (into ``settings``)."""
    if args.lr:
        settings.lr = args.lr
        return
    global_batch_size = args.batch_size * settings.world_size * max(1, args.grad_accum_steps)
    batch_ratio = global_batch_size / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    if scale == 'sqrt':
        batch_ratio = batch_ratio ** 0.5
    settings.lr, settings.lr_base_scale = args.lr_base * batch_ratio, scale
    if settings.primary:
        _logger.info(f'Learning rate ({settings.lr}) from --lr-base ({args.lr_base}) and the global batch size '
                     f'({global_batch_size}) with {scale} scaling.')


def build_precision(args: argparse.Namespace, settings: Settings) -> Precision:
    """Autocast and the gradient scaler for ``--amp``, or float32 (or ``--model-dtype``) steps."""
    precision = Precision(model_dtype=getattr(torch, args.model_dtype) if args.model_dtype else None)
    device = settings.device
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        precision.amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type == 'cuda' and amp_dtype == torch.float16:
            precision.loss_scaler = NativeScaler(device=device.type)
        _logger.info(f'Mixed precision: torch.autocast with {args.amp_dtype}'
                     f'{" and a gradient scaler" if precision.loss_scaler else ""}.')
    else:
        _logger.info('AMP not enabled. Training in float32.' if precision.model_dtype is None
                     else f'Training with {args.model_dtype} weights.')
    return precision


def prepare_task(task: TrainingTask, args: argparse.Namespace, settings: Settings, optimizer: torch.optim.Optimizer,
                 precision: Precision) -> Optional[int]:
    """Resume, EMA, compilation and DistributedDataParallel, in timm's order.

    Returns:
        The epoch ``--resume`` restored, or None.
    """
    resume_epoch = None
    if args.resume:
        resume_epoch = resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else precision.loss_scaler, log_info=settings.primary)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device=torch.device('cpu') if args.model_ema_force_cpu else None)
        if args.resume:
            load_task_ema_checkpoint(task, args.resume)
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if args.model_ema:
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if settings.distributed:
        device = settings.device
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)
    return resume_epoch


def _eval_loader(dataset: Any, args: argparse.Namespace, settings: Settings, data_config: Dict[str, Any],
                 precision: Precision) -> Any:
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=settings.distributed,
        crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'), pin_memory=args.pin_mem,
        img_dtype=precision.model_dtype or torch.float32, device=settings.device,
        use_prefetcher=not args.no_prefetcher)


def build_loaders(args: argparse.Namespace, settings: Settings, datasets: Datasets, data_config: Dict[str, Any],
                  precision: Precision) -> Loaders:
    """timm's loaders: training (augmentation, mixing, size schedule), evaluation and the clean training set."""
    prefetcher, num_aug_splits = not args.no_prefetcher, _aug_splits(args)
    collate_fn = mixup_fn = None
    if _mixup_active(args):
        mixup_args = dict(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=settings.num_classes)
        if prefetcher and not num_aug_splits:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    dataset_train = AugMixDataset(datasets.train, num_splits=num_aug_splits) if num_aug_splits > 1 else datasets.train
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    size_choices = args.train_img_sizes
    if size_choices is None and args.train_batches_per_epoch:
        # timm fixes the number of batches through its scheduled batch sampler; one size is a schedule too.
        size_choices = [data_config['input_size']]
    train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        re_split=args.resplit, train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio,
        hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob or 0.,
        gaussian_blur_prob=args.gaussian_blur_prob or 0., auto_augment=args.aa,
        num_aug_repeats=args.aug_repeats, num_aug_splits=num_aug_splits, interpolation=train_interpolation,
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers,
        distributed=settings.distributed, collate_fn=collate_fn, pin_memory=args.pin_mem,
        img_dtype=precision.model_dtype or torch.float32, device=settings.device, use_prefetcher=prefetcher,
        use_multi_epochs_loader=args.use_multi_epochs_loader, worker_seeding=args.worker_seeding,
        input_size_choices=size_choices, batch_size_choices=args.train_batch_sizes,
        batch_choice_weights=args.train_size_probs, batch_choice_seed=args.seed,
        batch_choice_schedule=args.train_size_schedule, batch_schedule_epochs=args.epochs,
        batch_schedule_spread=args.train_size_schedule_spread,
        batch_schedule_random_mix=args.train_size_random_mix, num_batches=args.train_batches_per_epoch)
    evaluation = _eval_loader(datasets.eval, args, settings, data_config, precision)
    clean = None if datasets.clean_train is None else _eval_loader(
        datasets.clean_train, args, settings, data_config, precision)
    return Loaders(train, evaluation, clean, mixup_fn)


def build_naflex_loaders(args: argparse.Namespace, settings: Settings, datasets: Datasets,
                         data_config: Dict[str, Any], precision: Precision, patch_size: Tuple[int, int]) -> Loaders:
    """timm's NaFlex loaders (``--naflex-loader``): variable sequence lengths in training, one length in evaluation."""
    mixup = create_naflex_mixup(
        num_classes=settings.num_classes, mixup=args.mixup, cutmix=args.cutmix, cutmix_minmax=args.cutmix_minmax,
        mixup_prob=args.mixup_prob, mixup_switch_prob=args.mixup_switch_prob, mixup_mode=args.mixup_mode,
        smoothing=args.smoothing, mixup_off_epoch=args.mixup_off_epoch)
    common = dict(data_config=data_config, model_patch_size=patch_size,
                  patchify_channels_first=args.naflex_patchify_channels_first, workers=args.workers,
                  distributed=settings.distributed, use_prefetcher=not args.no_prefetcher, pin_memory=args.pin_mem,
                  img_dtype=precision.model_dtype, device=settings.device)
    train = create_naflex_train_loader(
        datasets.train, batch_size=args.batch_size, train_seq_lens=args.naflex_train_seq_lens,
        patch_sizes=args.naflex_patch_sizes, patch_size_probs=args.naflex_patch_size_probs, mixup_fn=mixup,
        no_aug=args.no_aug, reprob=args.reprob, remode=args.remode, recount=args.recount, resplit=args.resplit,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob or 0., gaussian_blur_prob=args.gaussian_blur_prob or 0.,
        auto_augment=args.aa, train_interpolation=args.train_interpolation, worker_seeding=args.worker_seeding,
        rank=settings.rank, world_size=settings.world_size, seed=args.seed, **common)
    eval_batch = args.validation_batch_size or args.batch_size
    evaluation = create_naflex_eval_loader(datasets.eval, batch_size=eval_batch,
                                           max_seq_len=args.naflex_max_seq_len, **common)
    clean = None if datasets.clean_train is None else create_naflex_eval_loader(
        datasets.clean_train, batch_size=eval_batch, max_seq_len=args.naflex_max_seq_len, **common)
    return Loaders(train, evaluation, clean, naflex_patch_size=patch_size)


def build_schedule(args: argparse.Namespace, config: argparse.Namespace, optimizer: torch.optim.Optimizer,
                   loader_train: Any, resume_epoch: Optional[int], updates_done: int):
    """timm's learning-rate schedule, moved to where training starts (``--start-epoch``, ``--resume``).

    Returns:
        ``(lr_scheduler, num_epochs, start_epoch, updates_done)``.
    """
    accum = max(1, args.grad_accum_steps)
    updates_per_epoch = (len(loader_train) + accum - 1) // accum
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(config, decreasing_metric=args.eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch)
    start_epoch = 0
    if args.start_epoch is not None:
        start_epoch, updates_done = args.start_epoch, 0
    elif resume_epoch is not None:
        start_epoch = resume_epoch
        if updates_done:
            # timm moves a resumed run to the epoch after the checkpoint's; a recovery checkpoint's
            # epoch is unfinished, so it is continued instead.
            start_epoch -= 1
            updates_done = min(updates_done, updates_per_epoch)
            _logger.info(f'Resuming inside epoch {start_epoch}, after update {updates_done} of '
                         f'{updates_per_epoch}.')
    else:
        updates_done = 0
    if lr_scheduler is not None and (start_epoch > 0 or updates_done):
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch + updates_done)
        else:
            lr_scheduler.step(start_epoch)
    _logger.info(f'Scheduled epochs: {num_epochs} (starting at {start_epoch}); {len(loader_train)} batches per epoch.')
    return lr_scheduler, num_epochs, start_epoch, updates_done


def _read_checkpoints(args: argparse.Namespace):
    """``--resume`` and ``--initial-checkpoint`` read (safely) before anything is built on them."""
    resume = read_checkpoint(args.resume, '--resume') if args.resume else None
    initial = read_checkpoint(args.initial_checkpoint, '--initial-checkpoint') if args.initial_checkpoint else None
    return resume, initial


def _resolve_classes_and_loss(args: argparse.Namespace, settings: Settings, datasets: Datasets) -> None:
    """The class count from the training set, and the loss type ``--gsl-type auto`` picks for its size."""
    names = datasets.class_names
    settings.num_classes = args.num_classes
    if args.num_classes is None and names:
        settings.num_classes = len(names)
        _logger.info(f'{settings.num_classes} classes, from the training set.')
    elif names and args.num_classes != len(names):
        raise ValueError(f'--num-classes {args.num_classes} disagrees with the training data, which has '
                         f'{len(names)} classes; expected --num-classes {len(names)} (or leave it unset).')
    if args.loss == 'gsl':
        settings.gsl_type = resolve_gsl_type(args.gsl_type, datasets.num_train)
        if args.gsl_type == 'auto':
            _logger.info(f'--gsl-type auto: Type-{settings.gsl_type}, as the training set has {datasets.num_train} '
                         f'images ({"below" if settings.gsl_type == "II" else "at or above"} {GSL_AUTO_THRESHOLD}).')


def build_run(args: argparse.Namespace) -> Run:
    """Build everything a run needs from checked arguments, in timm's order. Writes nothing.

    The cheap checks that need the model or the checkpoints come first (the classifier's feature size against
    ``--gsl-groups`` on a meta-device model, every checkpoint read safely), then the datasets (on ImageNet, a
    scan of 1.3M files), the model, the task, the optimiser, the loaders and the schedule. A ``ValueError``
    here leaves no output folder.

    Args:
        args: parsed and checked arguments (left unchanged: derived values go into :class:`Settings`).

    Returns:
        The run, for :func:`train`.
    """
    settings = build_settings(args)
    check_data_source(args.dataset, settings.data_dir, (args.train_split, args.val_split),
                      flag='--data-dir' if args.data_dir else 'DIR')
    if args.loss == 'gsl':
        probe = probe_model(args)
        if probe is not None:
            check_groups_fit(args, probe)
            del probe
    resume_checkpoint, initial_checkpoint = _read_checkpoints(args)
    datasets = build_datasets(args, settings)
    _resolve_classes_and_loss(args, settings, datasets)
    model = build_model(args, settings, initial_checkpoint)
    del initial_checkpoint
    if args.loss == 'gsl':
        check_groups_fit(args, model)
    updates_done = 0
    if resume_checkpoint is not None:
        check_checkpoint_fits(resume_checkpoint, model, args.model, '--resume', args.resume)
        # A recovery checkpoint was written inside its epoch: continue that epoch after its last update.
        updates_done = int((resume_checkpoint.get('saver') or {}).get('updates_done') or 0)
        del resume_checkpoint
    if settings.primary:
        _logger.info(f'Model {safe_model_name(args.model)} created, param count: '
                     f'{sum(p.numel() for p in model.parameters())}')
    data_config = resolve_data_config(vars(args), model=model, verbose=settings.primary)
    # timm reads the NaFlex patch size from the model as created, before anything wraps it.
    naflex_patch_size = check_naflex_model(
        model, model_name=args.model, patch_sizes=args.naflex_patch_sizes,
        patchify_channels_first=args.naflex_patchify_channels_first) if args.naflex_loader else None
    model = _adapt_batch_norm(model, args, settings)
    precision = build_precision(args, settings)
    task = build_task(args, settings, model, data_config, precision.model_dtype)
    resolve_learning_rate(args, settings)
    config = settings.record(args)
    # The trainable module: the model, or with feature distillation the model and its projection.
    optimizer = create_optimizer_v2(task.get_trainable_module(), **optimizer_kwargs(cfg=config), **args.opt_kwargs)
    resume_epoch = prepare_task(task, args, settings, optimizer, precision)
    if args.naflex_loader:
        loaders = build_naflex_loaders(args, settings, datasets, data_config, precision, naflex_patch_size)
    else:
        loaders = build_loaders(args, settings, datasets, data_config, precision)
    lr_scheduler, num_epochs, start_epoch, updates_done = build_schedule(
        args, config, optimizer, loaders.train, resume_epoch, updates_done)
    return Run(args=args, settings=settings, config=config, datasets=datasets,
               data_config=data_config, task=task, optimizer=optimizer, precision=precision, loaders=loaders,
               lr_scheduler=lr_scheduler, num_epochs=num_epochs, start_epoch=start_epoch, updates_done=updates_done)


# ----------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------

@dataclass
class _Outputs:
    """Where the primary process writes: the run folder, the checkpoint saver, wandb."""
    output_dir: Optional[str] = None
    saver: Optional[AtomicCheckpointSaver] = None
    wandb_run: Any = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    metric_names: Sequence[str] = ()


def _open_outputs(run: Run) -> _Outputs:
    args, task = run.args, run.task
    outputs = _Outputs(metric_names=task.create_evaluator().metric_names)
    if not run.settings.primary:
        return outputs
    experiment = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(run.data_config['input_size'][-1])])
    outputs.output_dir = output_dir = utils.get_outdir(args.output or './output/train', experiment)
    outputs.saver = AtomicCheckpointSaver(
        model=task.get_trainable_module(), optimizer=run.optimizer, args=run.config,
        amp_scaler=run.precision.loss_scaler, checkpoint_dir=output_dir, recovery_dir=output_dir,
        decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist, task=task)
    if args.resume and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(output_dir):
        outputs.saver.load_state_dict_from_checkpoint(args.resume)
    write_text_atomic(os.path.join(output_dir, 'args.yaml'), format_args(run.config))
    utils.trim_summary(os.path.join(output_dir, 'summary.csv'), run.start_epoch)
    if args.log_wandb:
        try:
            import wandb
        except ImportError:
            _logger.warning('--log-wandb: wandb is not installed (pip install wandb); metrics are not sent.')
        else:
            outputs.wandb_run = wandb.init(
                project=args.wandb_project or args.experiment or None, config=vars(run.config),
                tags=args.wandb_tags or None, id=args.wandb_resume_id or None,
                resume='must' if args.wandb_resume_id else None)
    return outputs


def _training_state(run: Run, outputs: _Outputs, progress: bool) -> TrainingState:
    args, settings, precision = run.args, run.settings, run.precision
    return TrainingState(
        optimizer=run.optimizer, device=settings.device, lr_scheduler=run.lr_scheduler,
        amp_autocast=precision.amp_autocast, loss_scaler=precision.loss_scaler, mixup_fn=run.loaders.mixup_fn,
        grad_accum_steps=max(1, args.grad_accum_steps), clip_grad=args.clip_grad, clip_mode=args.clip_mode,
        channels_last=args.channels_last, model_dtype=precision.model_dtype, log_interval=args.log_interval,
        distributed=settings.distributed, world_size=settings.world_size,
        variable_batch_loss_scale=args.variable_batch_loss_scale, base_batch_size=args.batch_size,
        synchronize_step=args.synchronize_step, saver=outputs.saver, recovery_interval=args.recovery_interval,
        output_dir=outputs.output_dir, save_images=args.save_images, progress=progress,
        naflex_loss_scale=args.naflex_loss_scale if args.naflex_loader else None,
        loss_parts=distillation_loss_names(args.kd_distill_type) if args.kd_model_name else ())


def _tta_options(run: Run) -> Dict[str, Any]:
    """How the test-time views are made: for NaFlex batches, the patch layout to mirror."""
    if run.loaders.naflex_patch_size is None:
        return {}
    return dict(patch_size=run.loaders.naflex_patch_size, channels=input_channels(run.args),
                channels_last=not run.args.naflex_patchify_channels_first)


def _softmax_loss_picker(args: argparse.Namespace) -> Callable[[Dict[str, Any]], Optional[torch.Tensor]]:
    """Where a step's result holds the plain softmax cross-entropy of its batch (logged beside the loss)."""
    loss = loss_name(args)
    if loss == 'gsl':
        return lambda result: result['softmax_loss']
    if loss == 'ce':
        # The training loss is the (smoothed / soft-target) softmax cross-entropy itself.
        return lambda result: result['loss'].detach()
    return lambda result: None


def _start_epoch(run: Run, epoch: int) -> None:
    """Reseed the samplers for ``epoch`` and switch mixing off from ``--mixup-off-epoch``."""
    loader = run.loaders.train
    for sampler_owner in (run.datasets.train, getattr(loader, 'batch_sampler', None),
                          getattr(loader, 'sampler', None) if run.settings.distributed else None):
        if hasattr(sampler_owner, 'set_epoch'):
            sampler_owner.set_epoch(epoch)
    set_naflex_epoch(loader, epoch)  # NaFlex: reshuffles its batches, and mixing stops at --mixup-off-epoch
    if run.args.mixup_off_epoch and epoch >= run.args.mixup_off_epoch:
        if run.loaders.mixup_fn is not None:
            run.loaders.mixup_fn.mixup_enabled = False
        elif getattr(loader, 'mixup_enabled', False):
            loader.mixup_enabled = False


def _distribute_bn(run: Run, ema: bool = False) -> None:
    settings = run.settings
    if settings.distributed and settings.dist_bn in ('broadcast', 'reduce'):
        utils.distribute_bn(run.task.get_trainable_module(ema=ema), settings.world_size, settings.dist_bn == 'reduce')


def _evaluate_epoch(run: Run, epoch: int, eval_options: Dict[str, Any]) -> Dict[str, float]:
    """Validation metrics when due (every ``--val-interval`` epochs and the last one): of the EMA when it runs."""
    args, task = run.args, run.task
    if not ((epoch + 1) % args.val_interval == 0 or epoch + 1 == run.num_epochs):
        return {}
    metrics = evaluate(task.get_eval_model(), run.loaders.eval, task, **eval_options)
    if task.has_ema() and not args.model_ema_force_cpu:
        _distribute_bn(run, ema=True)
        metrics = evaluate(task.get_eval_model(ema=True), run.loaders.eval, task, log_suffix=' (EMA)', **eval_options)
    return metrics


def _measure_clean_train(run: Run, epoch: int, eval_options: Dict[str, Any]) -> Dict[str, float]:
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
    return evaluate(task.get_eval_model(ema=ema), run.loaders.clean_train, task,
                    log_suffix=' (clean train)', **eval_options)


def _record_epoch(run: Run, outputs: _Outputs, epoch: int, train_metrics: Dict[str, Any],
                  eval_metrics: Dict[str, float]) -> None:
    """One row of history, ``summary.csv`` and wandb; the curves redrawn when a validation point is added."""
    lr = sum(g['lr'] for g in run.optimizer.param_groups) / len(run.optimizer.param_groups)
    row = dict(epoch=epoch, lr=lr, **{f'train_{k}': v for k, v in train_metrics.items() if v != ''},
               **{f'eval_{k}': v for k, v in eval_metrics.items()})
    outputs.history.append(row)
    if outputs.output_dir is None:
        return
    summary = os.path.join(outputs.output_dir, 'summary.csv')
    # Epochs without evaluation keep the columns, empty, so that every row matches the header.
    utils.update_summary(epoch, train_metrics, eval_metrics or dict.fromkeys(outputs.metric_names, ''), summary,
                         lr=lr, log_wandb=False)
    if outputs.wandb_run is not None:
        outputs.wandb_run.log(row)
    if eval_metrics or epoch + 1 == run.num_epochs:
        # (A redraw costs about as much as a small epoch.)
        plot_learning_curves(read_summary(summary), os.path.join(outputs.output_dir, 'learning_curves.png'),
                             title=_run_title(run), train_targets=_train_targets(run.args))


def train(run: Run) -> Dict[str, Any]:
    """Run the epochs of a built run: train, evaluate, checkpoint, summarise, plot, publish.

    Args:
        run: from :func:`build_run`.

    Returns:
        ``{'best_metric', 'best_epoch', 'eval_metric', 'output_dir', 'history', 'last_metrics',
        'clean_train_metrics'}``.
    """
    args, task = run.args, run.task
    started = time.time()
    outputs = _open_outputs(run)
    progress = run.settings.primary and sys.stderr.isatty()
    state = _training_state(run, outputs, progress)
    eval_options = dict(device=run.device, amp_autocast=run.precision.amp_autocast, channels_last=args.channels_last,
                        model_dtype=run.precision.model_dtype, distributed=run.settings.distributed,
                        log_interval=args.log_interval, progress=progress, tta=args.tta,
                        tta_options=_tta_options(run))
    softmax_loss_of = _softmax_loss_picker(args)
    best_metric = best_epoch = None
    eval_metrics: Dict[str, float] = {}
    clean_metrics: Dict[str, float] = {}
    try:
        for epoch in range(run.start_epoch, run.num_epochs):
            _start_epoch(run, epoch)
            train_metrics = train_one_epoch(epoch, task, run.loaders.train, state, softmax_loss_of,
                                            updates_done=run.updates_done if epoch == run.start_epoch else 0)
            if getattr(task, 'grouping_statistics', False) and 'gsl_zero_frac' not in train_metrics:
                # An epoch resumed after its last update trained no batch: blank columns keep the CSV aligned.
                train_metrics.update(GroupingMeter.blank(args.gsl_groups))
            _distribute_bn(run)
            eval_metrics = _evaluate_epoch(run, epoch, eval_options)
            if run.loaders.clean_train is not None:
                # Blank columns on epochs without the measurement, so that every row matches the header.
                measured = _measure_clean_train(run, epoch, eval_options)
                clean_metrics = measured or clean_metrics
                train_metrics.update((f'clean_{k}', measured[k] if measured else '') for k in ('loss', 'top1'))
            _record_epoch(run, outputs, epoch, train_metrics, eval_metrics)
            if outputs.saver is not None:
                metric = eval_metrics.get(args.eval_metric)
                best_metric, best_epoch = outputs.saver.save_checkpoint(epoch, metric=metric)
            if run.lr_scheduler is not None:
                run.lr_scheduler.step(epoch + 1, eval_metrics.get(args.eval_metric))
    except KeyboardInterrupt:
        _logger.warning('Interrupted: stopping after the last completed epoch.')
    except NonFiniteLossError:
        if outputs.wandb_run is not None:
            outputs.wandb_run.finish(exit_code=1)
        raise
    if outputs.wandb_run is not None:
        outputs.wandb_run.finish()
    summary = format_summary(best_metric, best_epoch, args.eval_metric, outputs.output_dir,
                             last_metrics=eval_metrics or None, elapsed_s=time.time() - started,
                             clean_train_metrics=clean_metrics or None)
    if run.settings.primary:
        for line in summary.splitlines():
            _logger.info(line)
        if args.push_to_hub:
            publish_run(run.config, outputs.output_dir)
    return dict(best_metric=best_metric, best_epoch=best_epoch, eval_metric=args.eval_metric,
                output_dir=outputs.output_dir, history=outputs.history, last_metrics=eval_metrics,
                clean_train_metrics=clean_metrics)


def _train_targets(args: argparse.Namespace) -> str:
    """How the training targets differ from the labels, for the learning-curve legend."""
    kinds = []
    if _mixup_active(args):
        kinds.append('mixed')
    if args.smoothing:
        kinds.append('smoothed')
    return f'{", ".join(kinds)} targets' if kinds else ''


def _run_title(run: Run) -> str:
    args = run.args
    title = f'{args.model}, --loss {loss_name(args)}'
    if args.loss == 'gsl':
        title += f' (Type-{run.settings.gsl_type}, G={args.gsl_groups}, {args.gsl_grouping} grouping)'
    return title


def publish_run(args: argparse.Namespace, output_dir: str) -> str:
    """``train.py --push-to-hub``: publish the best checkpoint of a finished run (the last one if none is best).

    Args:
        args: the run's recorded arguments (``push_to_hub``, ``hub_revision``, ``hub_private``, ``model_ema``,
            ``hub_create_pr``, ``hub_replace_card``).
        output_dir: the run's folder.

    Returns:
        The URL of the commit (of the pull request with ``hub_create_pr``).

    Raises:
        ValueError, HubPublishError: as :func:`timm_gsl.hub.push_checkpoint`; the message says how to retry.
    """
    best = os.path.join(output_dir, 'model_best.pth.tar')
    checkpoint = best if os.path.isfile(best) else os.path.join(output_dir, 'last.pth.tar')
    # The metrics that chose the best checkpoint were measured on the EMA weights when EMA was evaluated.
    use_ema = bool(getattr(args, 'model_ema', False) and not getattr(args, 'model_ema_force_cpu', False))
    create_pr = bool(getattr(args, 'hub_create_pr', False))
    replace_card = bool(getattr(args, 'hub_replace_card', False))
    revision = getattr(args, 'hub_revision', None)
    private = bool(getattr(args, 'hub_private', False))
    try:
        return push_checkpoint(checkpoint, args.push_to_hub, revision=revision, private=private, use_ema=use_ema,
                               create_pr=create_pr, replace_card=replace_card, training_command=training_command)
    except (ValueError, HubPublishError) as e:
        retry = ['python', '-m', 'timm_gsl', 'push', checkpoint, '--repo-id', args.push_to_hub]
        retry += ['--revision', revision] if revision else []
        retry += (['--private'] if private else []) + (['--use-ema'] if use_ema else [])
        retry += (['--hub-create-pr'] if create_pr else []) + (['--replace-card'] if replace_card else [])
        raise type(e)(f'{e} The run itself is saved; publish it later with: '
                      f'{" ".join(shlex.quote(w) for w in retry)}') from e


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def _setup_logging() -> None:
    # timm's setup adds a handler on every call; add one only when nothing is configured.
    if not logging.root.handlers:
        utils.setup_default_logging()
    elif logging.root.level > logging.INFO or logging.root.level == logging.NOTSET:
        logging.root.setLevel(logging.INFO)


def resolve_args(args: argparse.Namespace, explicit) -> None:
    """The parse step's last part: the no-data-flags recipe and the device (with its CUDA-to-CPU fallback).

    Raises:
        ValueError: ``--device`` names no device, or ``--device-modules`` cannot be imported.
    """
    changed = apply_embedded_recipe(args, explicit)
    if changed:
        _logger.info(f"No data flag: training on the embedded dataset '{args.dataset}' with the built-in "
                     f"recipe for {', '.join('--' + d.replace('_', '-') for d in changed if d != 'dataset')}.")
    try:
        for module in args.device_modules or ():
            importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f'--device-modules {" ".join(args.device_modules)}: {e}.') from e
    args.device = str(resolve_device(args.device, 'training'))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``train.py``: parse, check, build, loop.

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
        resolve_args(args, explicit)
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
    # Run the imported module, not this __main__ copy of it, so that every object it defines
    # (and anything pickled from it) belongs to one module whichever way the script was started.
    from timm_gsl.cli.train import cli as _cli
    _cli()
