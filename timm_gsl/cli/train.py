"""``train.py``: train a timm model with the group softmax loss (or any of timm's losses), the timm way.

The command reads as a recipe:

1. **parse** (:func:`timm_gsl.cli.train_args.parse_args`): timm's flags, a ``-c`` YAML config, the no-data-flags
   recipe and the device;
2. **check** (:func:`timm_gsl.cli.train_args.check_args`): one line per mistake, before anything is read or
   written;
3. **build** (:func:`build_run`): the derived settings, the datasets, the model, the task, the optimiser and AMP,
   the loaders and the schedule, each from a builder of :mod:`timm_gsl.cli.train_build` that returns what it made;
4. **loop** (:func:`train`): :func:`timm_gsl.engine.train_one_epoch` and :func:`timm_gsl.engine.evaluate` per
   epoch, checkpoints, ``summary.csv``, the learning curves, and publishing to the Hub at the end.

The user's arguments are not rewritten after the checks: what the run works out from them (the device, the
class count, the learning rate, the loss type 'auto' resolves to, ...) lives in :class:`Settings`, and the
two together are what ``args.yaml`` and every checkpoint record.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from timm import utils
from timm.data import resolve_data_config
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.task import TrainingTask

from ..data import check_data_source
from ..distillation import distillation_loss_names
from ..engine import CALIBRATION_METRICS, AtomicCheckpointSaver, GroupingMeter, NonFiniteLossError, TrainingState
from ..engine import RunFolder, RunFolderError, claim_run_folder, evaluate
from ..engine import check_checkpoint_fits, format_summary, plot_learning_curves, read_checkpoint, read_summary
from ..engine import train_one_epoch, write_text_atomic
from ..hub import HubPublishError, push_checkpoint
from ..loss_factory import GSL_AUTO_THRESHOLD, resolve_gsl_type
from ..record import RECORD_KEY, EvaluationRecord, RunRecord, from_training_arguments
from ..naflex import check_naflex_model, set_naflex_epoch
from .common import exit_with_error, resolve_device, setup_logging
from .flags import CHECKPOINT_FLAGS, DATA_SOURCE_FLAGS, NAFLEX_FLAGS, input_channels
from .train_build import Datasets, Loaders, Precision, Settings, adapt_batch_norm, build_datasets, build_loaders
from .train_build import build_model, build_naflex_loaders, build_precision, build_schedule, build_settings
from .train_build import build_task, check_groups_fit, mixup_active, prepare_task, probe_model, read_checkpoints
from .train_build import check_data_sizes, resolve_classes_and_loss, resolve_learning_rate
from .train_calibrate import calibrate_checkpoints
from .train_args import DISTILLATION_FLAGS, EMBEDDED_RECIPE, RUN_FOLDER_FLAGS, TTA_FLAGS, apply_embedded_recipe
from .train_args import check_args, format_args
from .train_args import get_args_parser, loss_name, parse_args, training_command, uses_embedded_recipe

__all__ = [
    'EMBEDDED_RECIPE', 'GSL_AUTO_THRESHOLD', 'Run', 'RunInterrupted', 'Settings', 'apply_embedded_recipe',
    'build_run', 'check_args', 'cli', 'get_args_parser', 'interrupted_message', 'main', 'parse_args', 'publish_run',
    'resolve_gsl_type', 'train', 'uses_embedded_recipe',
]

_logger = logging.getLogger('timm_gsl.train')


class RunInterrupted(KeyboardInterrupt):
    """A signal (SIGINT, SIGTERM) stopped the run; the exit status is 128 + the signal number, as shells expect.

    A ``KeyboardInterrupt``, so that no ``except Exception`` on the way swallows it.

    Attributes:
        signum: the signal.
        output_dir: the run's folder (None on a process that writes none, or before it exists).
    """

    def __init__(self, signum: int, output_dir: Optional[str] = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.output_dir = output_dir


_MAIN_PID = [0]  # the process that installed the handlers; forked data-loader workers inherit them


def _raise_interrupted(signum: int, frame: Any) -> None:
    if os.getpid() != _MAIN_PID[0]:
        # A data-loader worker: PyTorch's worker loop expects KeyboardInterrupt and exits quietly on it.
        raise KeyboardInterrupt
    raise RunInterrupted(signum)


def interrupted_message(error: RunInterrupted, argv: Sequence[str]) -> str:
    """What an interrupted run says: nothing was published, and how to resume (one line)."""
    name = signal.Signals(error.signum).name
    head = f'train.py: interrupted by {name}; nothing was published and no temperature was fitted.'
    last = os.path.join(error.output_dir, 'last.pth.tar') if error.output_dir else None
    if last is None or not os.path.isfile(last):
        return f'{head} No epoch was completed, so there is no checkpoint to resume from.'
    epoch = read_checkpoint(last, 'last.pth.tar').get('epoch')
    kept = [a for i, a in enumerate(argv) if a != '--resume' and (i == 0 or argv[i - 1] != '--resume')]
    command = ' '.join(shlex.quote(a) for a in ['python', 'train.py', *kept, '--resume', last])
    return f'{head} The checkpoints hold the completed epochs (last.pth.tar: epoch {epoch}); resume with: {command}'


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------

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
                      flag='--data-dir' if args.data_dir else 'DIR', names=DATA_SOURCE_FLAGS)
    if args.loss == 'gsl':
        probe = probe_model(args)
        if probe is not None:
            check_groups_fit(args, probe)
            del probe
    resume_checkpoint, initial_checkpoint = read_checkpoints(args)
    datasets = build_datasets(args, settings)
    check_data_sizes(args, settings, datasets)
    resolve_classes_and_loss(args, settings, datasets)
    model = build_model(args, settings, initial_checkpoint)
    del initial_checkpoint
    if args.loss == 'gsl':
        check_groups_fit(args, model)
    updates_done = 0
    if resume_checkpoint is not None:
        check_checkpoint_fits(resume_checkpoint, model, args.model, '--resume', args.resume, names=CHECKPOINT_FLAGS)
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
        patchify_channels_first=args.naflex_patchify_channels_first,
        names=NAFLEX_FLAGS) if args.naflex_loader else None
    model = adapt_batch_norm(model, args, settings)
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
    folder: Optional[RunFolder] = None
    record: Optional[RunRecord] = None


def _open_outputs(run: Run) -> _Outputs:
    args, task = run.args, run.task
    outputs = _Outputs(metric_names=tuple(task.create_evaluator().metric_names) + CALIBRATION_METRICS)
    if not run.settings.primary:
        return outputs
    outputs.folder = _claim_output_folder(run)
    outputs.output_dir = output_dir = outputs.folder.path
    config = vars(run.config)
    outputs.record = from_training_arguments(config, command=training_command(config))
    outputs.saver = AtomicCheckpointSaver(
        model=task.get_trainable_module(), optimizer=run.optimizer, args=run.config,
        amp_scaler=run.precision.loss_scaler, checkpoint_dir=output_dir, recovery_dir=output_dir,
        decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist, task=task,
        extra_state={RECORD_KEY: outputs.record.to_dict()})
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


def _claim_output_folder(run: Run) -> RunFolder:
    """Lock the run's folder: ``--experiment``'s, or a new timestamped one (timm's name; '-1', '-2' when taken)."""
    args = run.args
    root = args.output or './output/train'
    if args.experiment:
        return claim_run_folder(os.path.join(root, args.experiment), args.resume, names=RUN_FOLDER_FLAGS)
    name = '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model),
                     str(run.data_config['input_size'][-1])])
    for suffix in [''] + [f'-{i}' for i in range(1, 100)]:
        try:
            return claim_run_folder(os.path.join(root, name + suffix), args.resume, names=RUN_FOLDER_FLAGS)
        except RunFolderError:
            continue  # another run took this name in the same second
    raise RunFolderError(f'--output {root!r}: 100 runs named {name!r} already; pass --experiment NAME.')


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
        loss_parts=(distillation_loss_names(args.kd_distill_type, names=DISTILLATION_FLAGS) if args.kd_model_name
                    else ()))


def _tta_options(run: Run) -> Dict[str, Any]:
    """How the test-time views are made: for NaFlex batches, the patch layout to mirror; the messages name --tta."""
    if run.loaders.naflex_patch_size is None:
        return dict(names=TTA_FLAGS)
    return dict(patch_size=run.loaders.naflex_patch_size, channels=input_channels(run.args),
                channels_last=not run.args.naflex_patchify_channels_first, names=TTA_FLAGS)


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


def _save_checkpoints(outputs: _Outputs, epoch: int, eval_metrics: Dict[str, float],
                      eval_metric: str) -> Tuple[Any, Any]:
    """The epoch's checkpoints (timm's saver), each with the run record holding the validation of its weights."""
    evaluation = EvaluationRecord(epoch, {k: float(v) for k, v in eval_metrics.items()}) if eval_metrics else None
    outputs.saver.extra_state[RECORD_KEY] = outputs.record.replace(evaluation=evaluation).to_dict()
    try:
        return outputs.saver.save_checkpoint(epoch, metric=eval_metrics.get(eval_metric))
    finally:  # recovery checkpoints inside the next epoch hold other weights than those validated
        outputs.saver.extra_state[RECORD_KEY] = outputs.record.to_dict()


def train(run: Run) -> Dict[str, Any]:
    """Run the epochs of a built run: train, evaluate, checkpoint, summarise, plot, publish.

    Args:
        run: from :func:`build_run`.

    Returns:
        ``{'best_metric', 'best_epoch', 'eval_metric', 'output_dir', 'history', 'last_metrics',
        'clean_train_metrics', 'calibration'}`` (the published checkpoint's
        :class:`~timm_gsl.calibration.CalibrationFit`, or None).

    Raises:
        RunFolderError: the output folder belongs to another run (live or finished) and this run does not
            resume it.
        RunInterrupted: SIGINT or SIGTERM (the completed epochs' checkpoints stay; nothing is published).
    """
    started = time.time()
    outputs = _open_outputs(run)
    try:
        return _train(run, outputs, started)
    finally:
        if outputs.folder is not None:
            outputs.folder.release()


def _train(run: Run, outputs: _Outputs, started: float) -> Dict[str, Any]:
    """:func:`train` once its folder is claimed."""
    args, task = run.args, run.task
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
                train_metrics.update((f'clean_{k}', measured[k] if measured else '')
                                     for k in ('loss', 'top1', *CALIBRATION_METRICS))
            _record_epoch(run, outputs, epoch, train_metrics, eval_metrics)
            if outputs.saver is not None:
                best_metric, best_epoch = _save_checkpoints(outputs, epoch, eval_metrics, args.eval_metric)
            if run.lr_scheduler is not None:
                run.lr_scheduler.step(epoch + 1, eval_metrics.get(args.eval_metric))
    except KeyboardInterrupt as e:  # RunInterrupted too
        signum = getattr(e, 'signum', signal.SIGINT)
        if outputs.wandb_run is not None:
            outputs.wandb_run.finish(exit_code=128 + signum)
        raise RunInterrupted(signum, outputs.output_dir) from None
    except NonFiniteLossError:
        if outputs.wandb_run is not None:
            outputs.wandb_run.finish(exit_code=1)
        raise
    if outputs.wandb_run is not None:
        outputs.wandb_run.finish()
    summary = format_summary(best_metric, best_epoch, args.eval_metric, outputs.output_dir,
                             last_metrics=eval_metrics or None, elapsed_s=time.time() - started,
                             clean_train_metrics=clean_metrics or None)
    calibration = None
    if run.settings.primary:
        for line in summary.splitlines():
            _logger.info(line)
        calibration = _calibrate(run, outputs, eval_options)
        if args.push_to_hub:
            publish_run(run.config, outputs.output_dir)
    return dict(best_metric=best_metric, best_epoch=best_epoch, eval_metric=args.eval_metric,
                output_dir=outputs.output_dir, history=outputs.history, last_metrics=eval_metrics,
                clean_train_metrics=clean_metrics, calibration=calibration)


def _calibrate(run: Run, outputs: _Outputs, eval_options: Dict[str, Any]) -> Optional[Any]:
    """The temperature fitted after training (:mod:`timm_gsl.cli.train_calibrate`), when the run calibrates."""
    source = run.datasets.calibration_source
    if source is None or outputs.output_dir is None:
        return None
    use_ema = run.task.has_ema() and not run.args.model_ema_force_cpu
    return calibrate_checkpoints(outputs.output_dir, run.loaders, source, eval_options, use_ema, run.args.seed)


def _train_targets(args: argparse.Namespace) -> str:
    """How the training targets differ from the labels, for the learning-curve legend."""
    kinds = []
    if mixup_active(args):
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
    args.device = str(resolve_device(args.device, 'training', asked='device' in explicit))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``train.py``: parse, check, build, loop.

    With no data flag the embedded Fashion-MNIST subset is trained with :data:`EMBEDDED_RECIPE`
    for every flag the user did not set.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        What :func:`train` returns. A refused command line (an unknown flag, a bad value or combination, a
        model timm does not have, a missing or unreadable file) exits with status 2 and one line,
        ``train.py: error: <message>``, before any dataset is read or anything is written. SIGINT (Ctrl-C) and
        SIGTERM stop the run with status 130 and 143: the completed epochs' checkpoints stay, nothing is
        calibrated or published, and one line says how to resume.
    """
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, explicit = parse_args(argv)
    handlers = _catch_signals()
    try:
        try:
            resolve_args(args, explicit)
            check_args(args)
            run = build_run(args)
        except ValueError as e:
            exit_with_error('train.py', e)
        return train(run)
    except NonFiniteLossError as e:
        # Every process raised together (the check is collective), so all of them leave here.
        raise SystemExit(f'train.py: error: {e}') from None
    except RunFolderError as e:
        exit_with_error('train.py', e)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        # atomic_path removed the half-written file; every checkpoint under its own name is complete.
        where = os.path.dirname(os.path.abspath(e.filename)) if e.filename else "the run's folder"
        print(f'train.py: error: no space left on the device while writing into {where}; the checkpoints already '
              f'there are complete (each is written under a temporary name, then renamed): free some space and '
              f'resume with --resume {os.path.join(where, "last.pth.tar")}.', file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as e:  # RunInterrupted too
        # Interrupted while building (nothing written yet), in the loop (RunInterrupted names the run's folder),
        # or after it, while calibrating or publishing (the checkpoints are complete; a Hub commit is all or
        # nothing). Every process leaves with 128 + the signal number; the primary says how to resume.
        error = e if isinstance(e, RunInterrupted) else RunInterrupted(signal.SIGINT)
        if int(os.environ.get('RANK', '0')) == 0:
            _logger.warning(interrupted_message(error, argv))
        raise SystemExit(128 + error.signum) from None
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        # A process group left alive until interpreter exit can abort the process while its gloo
        # threads are torn down ("terminate called without an active exception").
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _catch_signals() -> Dict[int, Any]:
    """Turn SIGINT and SIGTERM into :class:`RunInterrupted` (main thread only); returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    _MAIN_PID[0] = os.getpid()
    return {signum: signal.signal(signum, _raise_interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}


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

