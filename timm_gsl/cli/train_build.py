"""The build step of ``train.py``: from checked arguments to the typed pieces a run is made of.

Each builder takes the parsed arguments (and what earlier builders made) and returns a value: :class:`Settings`
(what the run works out from the flags: device and processes, class count, learning rate, loss type),
:class:`Datasets`, the model, the task, :class:`Precision`, :class:`Loaders`, the schedule.
:func:`timm_gsl.cli.train.build_run` calls them in timm's order.
"""
from __future__ import annotations

import argparse
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm import utils
from timm.data import AugMixDataset, FastCollateMixup, Mixup, create_loader
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.models import create_model, load_checkpoint
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask, TrainingTask, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import NativeScaler

from ..data import ConditionedDataset, create_dataset, dataset_class_names, dataset_targets
from ..distillation import create_distillation_task
from ..engine import check_checkpoint_fits, read_checkpoint
from ..head import classifier_layers
from ..loss_factory import GSL_AUTO_THRESHOLD, create_classification_loss, resolve_gsl_type
from ..naflex import create_naflex_eval_loader, create_naflex_mixup, create_naflex_train_loader
from ..task import GroupSoftmaxTask
from .common import one_line
from .flags import CHECKPOINT_FLAGS, NAFLEX_FLAGS, dataset_root, input_channels
from .train_args import DISTILLATION_FLAGS, LOSS_FLAGS, MIN_CALIBRATION_IMAGES, calibrates, loss_name

__all__ = [
    'Datasets', 'Loaders', 'Precision', 'Settings', 'adapt_batch_norm', 'build_datasets', 'build_loaders',
    'build_model', 'build_naflex_loaders', 'build_precision', 'build_schedule', 'build_settings', 'build_task',
    'check_groups_fit', 'mixup_active', 'prepare_task', 'probe_model', 'read_checkpoints', 'resolve_classes_and_loss',
    'resolve_learning_rate',
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
        class_names: the training set's class names in label order (after ``--class-subset``), None when the
            dataset records none; checkpoints keep them so that validate.py can score another dataset by name.
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
    class_names: Optional[List[str]] = None

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
        recorded.class_names = None if self.class_names is None else [str(n) for n in self.class_names]
        return recorded


@dataclass
class Datasets:
    """The datasets of a run: training, evaluation, and the training images once each for the clean fit.

    ``calibration_source`` is where the temperature fitted after training comes from: 'holdout' (then
    ``calibration`` holds those images, never trained on), 'val-crossfit' (the evaluation images), or None
    (no calibration).
    """
    train: Any
    eval: Any
    clean_train: Optional[Any]
    class_names: Optional[List[str]]
    num_train: Optional[int]
    calibration: Optional[Any] = None
    calibration_source: Optional[str] = None


@dataclass
class Precision:
    """How the steps compute: the autocast context, the float16 gradient scaler and the weight dtype."""
    amp_autocast: Callable[[], ContextManager] = nullcontext
    loss_scaler: Optional[NativeScaler] = None
    model_dtype: Optional[torch.dtype] = None


@dataclass
class Loaders:
    """The data loaders; timm's ``Mixup`` when mixing happens in the loop; the model's NaFlex patch size.

    ``calibration`` (the held-out calibration images) and ``calibration_report`` (the evaluation images) are
    loaders of the primary process alone, for the temperature fitted after training; None without calibration.
    """
    train: Any
    eval: Any
    clean_train: Optional[Any] = None
    mixup_fn: Optional[Mixup] = None
    naflex_patch_size: Optional[Tuple[int, int]] = None
    calibration: Optional[Any] = None
    calibration_report: Optional[Any] = None


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
    calibration, source = _calibration_dataset(args, conditions, common)
    if source == 'holdout' and args.samples_per_class is None:
        # The held-out images leave the training set (with --samples-per-class they were never in it).
        conditions = dict(conditions, holdout_per_class=args.calibration_images_per_class)
    try:
        train = create_dataset(args.dataset, split=args.train_split, is_training=True,
                               num_samples=args.train_num_samples, repeats=args.epoch_repeats, **conditions, **common)
        evaluation = create_dataset(args.dataset, split=args.val_split, is_training=False,
                                    num_samples=args.val_num_samples, **conditions, **common)
    except ValueError as e:
        raise _with_condition_flags(args, e) from e
    except RuntimeError as e:
        if 'Found 0 images' not in str(e):  # timm's image-folder reader on a split without an image
            raise
        raise ValueError(f'{_data_name(args, settings)}: {one_line(e)}; no metric is computed over zero images: '
                         f'expected one sub-folder of images per class in each split.') from e
    names = dataset_class_names(train)
    _check_split_class_names(args, settings, train, evaluation)
    # The training images once each, for the eval-mode fit measurement: a separate dataset object, so that
    # the evaluation transforms its loader gives it leave training alone.
    clean = None if args.no_train_eval else create_dataset(
        args.dataset, split=args.train_split, is_training=True, num_samples=args.train_num_samples,
        **conditions, **common)
    try:
        num_train = len(train)
    except TypeError:
        num_train = args.train_num_samples
    if source == 'val-crossfit':
        check_calibration_images(evaluation, '--calibration-source val-crossfit (the validation images)',
                                 len(names) if names else None)
    return Datasets(train, evaluation, clean, names, num_train, calibration, source)


def _check_split_class_names(args: argparse.Namespace, settings: Settings, train: Any, evaluation: Any) -> None:
    """Refuse training and validation splits whose classes differ (when both record their class names).

    An image folder numbers its class folders in name order, split by split: with other folders in the
    validation split, the same label would mean another class there (and ``--class-subset K`` would draw
    other classes).

    Raises:
        ValueError: naming both splits, the data and the first names only in one of them.
    """
    kept = dataset_class_names(train), dataset_class_names(evaluation)
    if None in kept or kept[0] == kept[1]:
        return
    # Under --class-subset, the classes the splits hold before the subset is taken: where a difference comes from.
    whole = tuple(dataset_class_names(d.base if isinstance(d, ConditionedDataset) else d) for d in (train, evaluation))
    train_names, eval_names = whole if None not in whole and whole[0] != whole[1] else kept
    in_train, in_eval = set(train_names), set(eval_names)
    only_train, only_eval = [n for n in train_names if n not in in_eval], [n for n in eval_names if n not in in_train]
    differ = (f'only in the training split: {only_train[:5]}, only in the validation split: {only_eval[:5]}'
              if only_train or only_eval else 'the same classes in another label order')
    data = f' of {settings.data_dir!r}' if settings.data_dir else (f' of {args.dataset!r}' if args.dataset else '')
    error = ValueError(f'--train-split {args.train_split!r} and --val-split {args.val_split!r}{data} have different '
                       f'classes ({differ}), so one label would name two classes; expected the same class folders '
                       f'in both splits.')
    raise _with_condition_flags(args, error)


def _with_condition_flags(args: argparse.Namespace, error: ValueError) -> ValueError:
    """``error`` prefixed with the data-condition flags that caused it (itself when none was given)."""
    given = [f'--class-subset {args.class_subset}' if args.class_subset is not None else '',
             f'--samples-per-class {args.samples_per_class}' if args.samples_per_class is not None else '']
    given = [g for g in given if g]
    return ValueError(f'{" with ".join(given)}: {error}') if given else error


def _calibration_dataset(args: argparse.Namespace, conditions: Dict[str, Any],
                         common: Dict[str, Any]) -> Tuple[Optional[Any], Optional[str]]:
    """The calibration images and their source ('holdout', 'val-crossfit'), or (None, None) without calibration.

    ``auto`` takes the training-pool hold-out when ``--samples-per-class`` leaves enough unused images of every
    class (the training images are then exactly those of a run without calibration), else the validation images.

    Raises:
        ValueError: ``--calibration-source holdout`` the training split cannot provide (too few images, a
            class without any), naming the flags.
    """
    if not calibrates(args):
        return None, None
    wanted = args.calibration_source
    if wanted == 'val-crossfit' or (wanted == 'auto' and args.samples_per_class is None):
        return None, 'val-crossfit'
    per_class = args.calibration_images_per_class
    try:
        holdout = create_dataset(args.dataset, split=args.train_split, is_training=True,
                                 num_samples=args.train_num_samples, **conditions, **common,
                                 holdout_per_class=per_class, part='holdout')
        check_calibration_images(holdout, f'--calibration-images-per-class {per_class}')
    except ValueError as e:
        if wanted == 'auto':
            _logger.info(f'Calibration: the training split cannot hold out {per_class} unused images per class '
                         f'({one_line(e)}); the temperature is cross-fitted on the validation images instead.')
            return None, 'val-crossfit'
        raise ValueError(f'--calibration-source holdout with --calibration-images-per-class {per_class}: '
                         f'{one_line(_with_condition_flags(args, e))}') from e
    return holdout, 'holdout'


def check_calibration_images(dataset: Any, what: str, num_classes: Optional[int] = None) -> None:
    """Refuse calibration images that cannot fit a temperature: fewer than ``MIN_CALIBRATION_IMAGES``, or
    (when ``num_classes`` is given) a class without any.

    A dataset whose labels cannot be read without decoding images (an iterable one) is checked after its
    logits are computed instead.

    Raises:
        ValueError: naming ``what`` (the flag) and what is needed.
    """
    try:
        targets = dataset_targets(dataset)
    except (ValueError, TypeError):
        return
    if len(targets) < MIN_CALIBRATION_IMAGES:
        raise ValueError(f'{what} gives {len(targets)} calibration images, expected at least '
                         f'{MIN_CALIBRATION_IMAGES}; pass --no-calibrate to train without a fitted temperature.')
    missing = sorted(set(range(num_classes)) - set(int(t) for t in targets)) if num_classes else []
    if missing:
        raise ValueError(f'{what} has no image of class {missing[0]} ({len(missing)} of {num_classes} classes '
                         f'missing), expected every class; pass --no-calibrate to train without a fitted '
                         f'temperature.')


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
        check_checkpoint_fits(initial_checkpoint, model, args.model, '--initial-checkpoint', args.initial_checkpoint,
                              names=CHECKPOINT_FLAGS)
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


def adapt_batch_norm(model: nn.Module, args: argparse.Namespace, settings: Settings) -> nn.Module:
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


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None


def _criterion(args: argparse.Namespace, settings: Settings) -> Any:
    """The task loss: the group softmax loss or one of timm's, as ``--loss`` (``--bce-loss``, ``--jsd-loss``) says."""
    loss, soft_targets = loss_name(args), mixup_active(args)
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
            input_mean=data_config['mean'], input_std=data_config['std'], device=device, dtype=model_dtype,
            grouping_statistics=loss == 'gsl', verbose=settings.primary, names=DISTILLATION_FLAGS)
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
                 precision: Precision, distributed: Optional[bool] = None) -> Any:
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers,
        distributed=settings.distributed if distributed is None else distributed,
        crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'), pin_memory=args.pin_mem,
        img_dtype=precision.model_dtype or torch.float32, device=settings.device,
        use_prefetcher=not args.no_prefetcher)


def build_loaders(args: argparse.Namespace, settings: Settings, datasets: Datasets, data_config: Dict[str, Any],
                  precision: Precision) -> Loaders:
    """timm's loaders: training (augmentation, mixing, size schedule), evaluation and the clean training set."""
    prefetcher, num_aug_splits = not args.no_prefetcher, _aug_splits(args)
    collate_fn = mixup_fn = None
    if mixup_active(args):
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
    local = partial(_eval_loader, args=args, settings=settings, data_config=data_config, precision=precision,
                    distributed=False)
    return Loaders(train, evaluation, clean, mixup_fn, None, *_calibration_loaders(datasets, settings, local))


def _calibration_loaders(datasets: Datasets, settings: Settings,
                         local_loader: Callable[[Any], Any]) -> Tuple[Optional[Any], Optional[Any]]:
    """(calibration images, evaluation images) loaders of the primary process, or (None, None)."""
    if datasets.calibration_source is None or not settings.primary:
        return None, None
    # Under torchrun the evaluation loader is distributed; the primary scores every image with its own loader.
    report = local_loader(datasets.eval)
    calibration = None if datasets.calibration is None else local_loader(datasets.calibration)
    return calibration, report


def build_naflex_loaders(args: argparse.Namespace, settings: Settings, datasets: Datasets,
                         data_config: Dict[str, Any], precision: Precision, patch_size: Tuple[int, int]) -> Loaders:
    """timm's NaFlex loaders (``--naflex-loader``): variable sequence lengths in training, one length in evaluation."""
    mixup = create_naflex_mixup(
        num_classes=settings.num_classes, mixup=args.mixup, cutmix=args.cutmix, cutmix_minmax=args.cutmix_minmax,
        mixup_prob=args.mixup_prob, mixup_switch_prob=args.mixup_switch_prob, mixup_mode=args.mixup_mode,
        smoothing=args.smoothing, mixup_off_epoch=args.mixup_off_epoch, names=NAFLEX_FLAGS)
    common = dict(data_config=data_config, model_patch_size=patch_size,
                  patchify_channels_first=args.naflex_patchify_channels_first, workers=args.workers,
                  distributed=settings.distributed, use_prefetcher=not args.no_prefetcher, pin_memory=args.pin_mem,
                  img_dtype=precision.model_dtype, device=settings.device, names=NAFLEX_FLAGS)
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
    local = partial(create_naflex_eval_loader, batch_size=eval_batch, max_seq_len=args.naflex_max_seq_len,
                    **dict(common, distributed=False))
    calibration, report = _calibration_loaders(datasets, settings, local)
    return Loaders(train, evaluation, clean, naflex_patch_size=patch_size, calibration=calibration,
                   calibration_report=report)


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


def read_checkpoints(args: argparse.Namespace):
    """``--resume`` and ``--initial-checkpoint`` read (safely) before anything is built on them."""
    resume = read_checkpoint(args.resume, '--resume') if args.resume else None
    initial = read_checkpoint(args.initial_checkpoint, '--initial-checkpoint') if args.initial_checkpoint else None
    if resume is not None:
        _check_resumed_learning_rate(args, resume)
    return resume, initial


def _check_resumed_learning_rate(args: argparse.Namespace, checkpoint: Dict[str, Any]) -> None:
    """Refuse ``--lr`` that differs from the resumed run's: the optimiser state it restores would override it."""
    recorded = checkpoint.get('args')
    recorded = vars(recorded) if isinstance(recorded, argparse.Namespace) else recorded
    old = recorded.get('lr') if isinstance(recorded, dict) else None
    if args.lr is not None and isinstance(old, (int, float)) and not math.isclose(args.lr, old, rel_tol=1e-9):
        raise ValueError(f'--lr {args.lr:g} with --resume {args.resume!r}: the resumed run trained with lr {old:g}, '
                         f'and resuming restores its optimiser and schedule, so --lr would be ignored; drop --lr to '
                         f'continue the run, or start a new one from its weights with --initial-checkpoint.')


def check_data_sizes(args: argparse.Namespace, settings: Settings, datasets: Datasets) -> None:
    """Refuse data that cannot train or be measured: no image, one class, fewer images than one batch.

    Datasets whose size or labels cannot be read without decoding (iterable ones) are left to the loop.

    Raises:
        ValueError: one line naming the flag or folder and what is needed.
    """
    where = _data_name(args, settings)
    if datasets.num_train is not None and datasets.num_train == 0:
        raise ValueError(f'{where}: the training split {args.train_split!r} has no image; an image folder needs one '
                         f'sub-folder of images per class.')
    names = datasets.class_names
    if names is not None and len(names) < 2 and args.num_classes is None:
        raise ValueError(f'{where}: the training split {args.train_split!r} has {len(names)} class '
                         f'({names[:1]}); a classifier needs at least 2: an image folder needs one sub-folder of '
                         f'images per class.')
    try:
        num_eval = len(datasets.eval)
    except TypeError:
        num_eval = None
    if num_eval == 0:
        raise ValueError(f'{where}: the validation split {args.val_split!r} has no image; no metric is computed '
                         f'over zero images (point --val-split at a split with images).')
    global_batch = args.batch_size * settings.world_size
    if datasets.num_train is not None and not args.train_batches_per_epoch and datasets.num_train < global_batch:
        per = f' ({settings.world_size} processes x -b {args.batch_size})' if settings.world_size > 1 else ''
        given = f' with --samples-per-class {args.samples_per_class}' if args.samples_per_class is not None else ''
        raise ValueError(f'-b/--batch-size {args.batch_size}: the training split has {datasets.num_train} images'
                         f'{given}, fewer than one batch of {global_batch}{per} (a last partial batch is dropped, as '
                         f'timm does); lower -b or train on more images.')


def _data_name(args: argparse.Namespace, settings: Settings) -> str:
    if settings.data_dir:
        return f'data folder {settings.data_dir!r}'
    return f'--dataset {args.dataset!r}' if args.dataset else 'the data'


def resolve_classes_and_loss(args: argparse.Namespace, settings: Settings, datasets: Datasets) -> None:
    """The class count from the training set, and the loss type ``--gsl-type auto`` picks for its size."""
    names = datasets.class_names
    settings.num_classes, settings.class_names = args.num_classes, names
    if args.num_classes is None and names:
        settings.num_classes = len(names)
        _logger.info(f'{settings.num_classes} classes, from the training set.')
    elif names and args.num_classes != len(names):
        raise ValueError(f'--num-classes {args.num_classes} disagrees with the training data, which has '
                         f'{len(names)} classes; expected --num-classes {len(names)} (or leave it unset).')
    if args.loss == 'gsl':
        settings.gsl_type = resolve_gsl_type(args.gsl_type, datasets.num_train, names=LOSS_FLAGS)
        if args.gsl_type == 'auto':
            _logger.info(f'--gsl-type auto: Type-{settings.gsl_type}, as the training set has {datasets.num_train} '
                         f'images ({"below" if settings.gsl_type == "II" else "at or above"} {GSL_AUTO_THRESHOLD}).')


