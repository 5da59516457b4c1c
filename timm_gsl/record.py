"""``RunRecord``: what a training run was, typed and versioned, saved in every checkpoint of ``train.py``.

The record is the contract between training and what reads its checkpoints (validation, publishing, the model
card): the model, the data, the loss, distillation and the settings that reproduce the run, each in its own
section and named in the library's own words. ``train.py`` builds it once from its settings and saves it under
``run_record`` beside timm's ``args``; :meth:`RunRecord.from_checkpoint` reads it back, and reads the
checkpoints written before it existed (version 0: only the saved training arguments) the same way.

Plain data only (str, int, float, bool, None, lists, dicts), so that ``torch.load(weights_only=True)`` reads it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .calibration import CalibrationFit

__all__ = ['RECORD_KEY', 'RECORD_VERSION', 'DataRecord', 'DistillationRecord', 'EvaluationRecord', 'LossRecord',
           'ModelRecord', 'RunRecord', 'TrainingRecord', 'from_training_arguments']

#: The checkpoint key the record is saved under.
RECORD_KEY = 'run_record'
#: The version this code writes; it reads every version up to it (0: checkpoints with only ``args``).
#: Version 2 added the data source's details (crop mode, class map, image mode, keys), the pretrained-weights file,
#: the training command, and the evaluation and calibration sections; a version-1 record reads with them unset.
RECORD_VERSION = 2


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """The network: the timm architecture and how it was made.

    Attributes:
        architecture: the name given to ``timm.create_model`` (may be ``hf-hub:ORG/NAME``).
        num_classes: outputs of the classifier.
        in_chans: input channels.
        input_size: ``(channels, height, width)`` of the training input, when recorded.
        pretrained: whether it started from timm's pretrained weights for ``architecture``.
        initial_checkpoint: the checkpoint it started from, when one was given.
        pretrained_path: the file the pretrained weights were read from instead of timm's, when one was given.
        global_pool: the pooling given to ``timm.create_model`` (None: the model's own).
        kwargs: extra keyword arguments of ``timm.create_model``.
    """
    architecture: str
    num_classes: Optional[int] = None
    in_chans: Optional[int] = None
    input_size: Optional[Tuple[int, int, int]] = None
    pretrained: bool = False
    initial_checkpoint: Optional[str] = None
    pretrained_path: Optional[str] = None
    global_pool: Optional[str] = None
    kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataRecord:
    """The images: which dataset, which part of it, how they were prepared.

    Attributes:
        dataset: timm's dataset name (``''`` for an image folder).
        root: the data root as given to training, for the tools that read the data again on the same machine
            (validation); never published (what is published names ``folder`` only).
        folder: the last folder of the data root, or None.
        train_split, eval_split: the split names.
        class_names: the classes in label order, when the dataset names them.
        class_subset: the class-subset setting, when classes were drawn (a number or a list of classes).
        samples_per_class: training images kept per class, None for all.
        seed: the seed of the draws (and of training).
        mean, std: the normalisation.
        crop_pct, interpolation, crop_mode: the evaluation transform's crop and resize.
        class_map: the file mapping class names to label ids, when one was given (timm's ``class_map``).
        input_img_mode: the image mode the images were read in (``'RGB'``, ``'L'``), when given.
        input_key, target_key: the image and label columns of a Hub dataset, when given.
    """
    dataset: str = ''
    root: Optional[str] = None
    folder: Optional[str] = None
    train_split: str = 'train'
    eval_split: str = 'validation'
    class_names: Optional[List[str]] = None
    class_subset: Any = None
    samples_per_class: Optional[int] = None
    seed: Optional[int] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    crop_pct: Optional[float] = None
    interpolation: str = ''
    crop_mode: Optional[str] = None
    class_map: str = ''
    input_img_mode: Optional[str] = None
    input_key: Optional[str] = None
    target_key: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class LossRecord:
    """The training loss.

    Attributes:
        kind: ``'gsl'`` for the group softmax loss, else the baseline's name (``'ce'``, ...).
        group_type: ``'I'`` or ``'II'`` (group softmax loss only).
        groups: the number of groups G (group softmax loss only).
        grouping: how features are grouped (group softmax loss only).
        smoothing: label smoothing.
        mixup, cutmix: the mixing alphas (0: off).
    """
    kind: str = 'gsl'
    group_type: Optional[str] = None
    groups: Optional[int] = None
    grouping: Optional[str] = None
    smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0

    @property
    def mixes_targets(self) -> bool:
        """Whether the training targets were mixed (Mixup or CutMix)."""
        return bool(self.mixup or self.cutmix)


@dataclasses.dataclass(frozen=True)
class DistillationRecord:
    """Knowledge distillation, when a teacher was used.

    Attributes:
        teacher: the teacher model's name.
        kind: the distillation type (``'logit'``, ``'feature'``, ``'token'``).
    """
    teacher: str
    kind: str = 'logit'


@dataclasses.dataclass(frozen=True)
class TrainingRecord:
    """The schedule and the settings that decide the batches and the updates.

    Attributes:
        epochs, batch_size, lr, optimizer, scheduler: as trained.
        workers: data-loader processes (each draws its own augmentations, so it changes the batches).
        eval_metric: the metric the best checkpoint was chosen by.
        command: the ``train.py`` command line that runs it again (the data root shown as ``path/to/FOLDER``),
            when the training command line recorded one.
    """
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    optimizer: Optional[str] = None
    scheduler: Optional[str] = None
    workers: Optional[int] = None
    eval_metric: str = 'top1'
    command: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class EvaluationRecord:
    """The validation of the checkpoint's weights at the epoch it was saved after.

    Attributes:
        epoch: that epoch (0-based).
        metrics: the validation metrics (``loss``, ``top1``, ``top5``, ``nll``, ``ece``; percent for the last
            three but ``nll``).
    """
    epoch: int
    metrics: Dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A training run, section by section (see the module docstring).

    Attributes:
        version: the record format (:data:`RECORD_VERSION` for records this code builds; 0 for one read from a
            checkpoint that held only its training arguments).
        model, data, loss, training: the sections.
        distillation: the teacher, None without distillation.
        evaluation: the validation of this checkpoint's weights, None before the first evaluated epoch.
        calibration: the temperature fitted after training for this checkpoint's weights, None until then.
    """
    model: ModelRecord
    data: DataRecord = dataclasses.field(default_factory=DataRecord)
    loss: LossRecord = dataclasses.field(default_factory=LossRecord)
    training: TrainingRecord = dataclasses.field(default_factory=TrainingRecord)
    distillation: Optional[DistillationRecord] = None
    evaluation: Optional[EvaluationRecord] = None
    calibration: Optional[CalibrationFit] = None
    version: int = RECORD_VERSION

    def input_options(self) -> Dict[str, Any]:
        """The recorded input and evaluation transform, keyed as timm's data-config functions read them
        (``input_size``, ``in_chans``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``, ``interpolation``); what the
        record does not hold is left out."""
        data = self.data
        options = dict(input_size=self.model.input_size, in_chans=self.model.in_chans, mean=data.mean, std=data.std,
                       crop_pct=data.crop_pct, crop_mode=data.crop_mode, interpolation=data.interpolation or None)
        return {k: v for k, v in options.items() if v is not None}

    def replace(self, **sections: Any) -> 'RunRecord':
        """A copy with the given sections replaced (``record.replace(evaluation=...)``)."""
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> Dict[str, Any]:
        """Plain data for a checkpoint (lists for tuples)."""
        def plain(value: Any) -> Any:
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {str(k): plain(v) for k, v in value.items()}
            return value
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> 'RunRecord':
        """The record :meth:`to_dict` wrote.

        Raises:
            ValueError: not a record, a version newer than this code reads, or a section that does not fit.
        """
        if not isinstance(value, Mapping) or not isinstance(value.get('version'), int):
            raise ValueError(f'a run record is a dict with an int version, got {type(value).__name__}')
        if not 1 <= value['version'] <= RECORD_VERSION:
            raise ValueError(f"run record version {value['version']} is not one this timm-gsl reads (1 to "
                             f"{RECORD_VERSION}); update timm-gsl to read it")
        try:
            model = dict(value['model'])
            if model.get('input_size') is not None:
                model['input_size'] = tuple(model['input_size'])
            teacher, evaluation = value.get('distillation'), value.get('evaluation')
            return cls(model=ModelRecord(**model), data=DataRecord(**value.get('data', {})),
                       loss=LossRecord(**value.get('loss', {})), training=TrainingRecord(**value.get('training', {})),
                       distillation=None if teacher is None else DistillationRecord(**teacher),
                       evaluation=None if evaluation is None else EvaluationRecord(**evaluation),
                       calibration=CalibrationFit.from_dict(value.get('calibration')),
                       version=value['version'])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f'run record does not fit version {value["version"]}: {e}') from e

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> 'RunRecord':
        """The record of a loaded training checkpoint: its ``run_record``, else (version 0) one read from its
        saved training arguments; a temperature fitted before records kept it (the checkpoint's ``calibration``
        entry) goes into its calibration section.

        Raises:
            ValueError: neither is there, or the record is malformed or of a newer version.
        """
        if checkpoint.get(RECORD_KEY) is not None:
            record = cls.from_dict(checkpoint[RECORD_KEY])
        else:
            args = checkpoint.get('args')
            args = args if isinstance(args, Mapping) or args is None else vars(args)
            if not isinstance(args, Mapping) or not args.get('model'):
                raise ValueError("checkpoint holds neither a run record nor training arguments naming the model")
            record = from_training_arguments(args, version=0)
        if record.calibration is None and checkpoint.get('calibration') is not None:
            # Written before the record kept it: the checkpoint's own 'calibration' entry.
            try:
                record = record.replace(calibration=CalibrationFit.from_dict(checkpoint['calibration']))
            except ValueError as e:
                raise ValueError(f"its 'calibration' entry is malformed: {e}") from e
        return record


def _get(args: Mapping[str, Any], name: str, default: Any = None) -> Any:
    value = args.get(name, default)
    return default if value is None else value


def _folder(path: Any) -> Optional[str]:
    if not path:
        return None
    return os.path.basename(os.path.normpath(str(path))) or None


def from_training_arguments(args: Mapping[str, Any], version: int = RECORD_VERSION,
                            command: Optional[str] = None) -> RunRecord:
    """Read a record from the training arguments a checkpoint saves (``train.py``'s namespace as a dict).

    The format of those arguments is what checkpoints of version 0 hold; ``train.py`` also builds its own record
    with it, so that both read alike.

    Args:
        args: the arguments.
        version: the version the record says it is (0 for one read from an old checkpoint).
        command: the training command line (:attr:`TrainingRecord.command`), when the caller renders one.
    """
    input_size = args.get('input_size')
    # As train.py builds the model: --in-chans, else the channels of --input-size, else timm's 3.
    in_chans = int(args.get('in_chans') or (input_size[0] if input_size else 3))
    if input_size is None and args.get('img_size'):
        input_size = (in_chans, args['img_size'], args['img_size'])
    loss = _get(args, 'loss', 'gsl')
    teacher = args.get('kd_model_name')
    return RunRecord(
        model=ModelRecord(
            architecture=str(args['model']), num_classes=args.get('num_classes'), in_chans=in_chans,
            input_size=None if input_size is None else tuple(int(s) for s in input_size),
            pretrained=bool(args.get('pretrained')), initial_checkpoint=args.get('initial_checkpoint') or None,
            pretrained_path=args.get('pretrained_path') or None, global_pool=args.get('gp') or None,
            kwargs=dict(_get(args, 'model_kwargs', {}))),
        data=DataRecord(
            dataset=_get(args, 'dataset', ''), root=args.get('data_dir') or args.get('data') or None,
            folder=_folder(args.get('data_dir') or args.get('data')),
            train_split=_get(args, 'train_split', 'train'), eval_split=_get(args, 'val_split', 'validation'),
            class_names=None if args.get('class_names') is None else [str(n) for n in args['class_names']],
            class_subset=args.get('class_subset') if args.get('class_subset') not in ('', None) else None,
            samples_per_class=args.get('samples_per_class') or None, seed=args.get('seed'),
            mean=None if args.get('mean') is None else [float(v) for v in args['mean']],
            std=None if args.get('std') is None else [float(v) for v in args['std']],
            crop_pct=args.get('crop_pct'), interpolation=_get(args, 'interpolation', ''),
            crop_mode=args.get('crop_mode') or None, class_map=_get(args, 'class_map', ''),
            input_img_mode=args.get('input_img_mode') or None, input_key=args.get('input_key') or None,
            target_key=args.get('target_key') or None),
        loss=LossRecord(
            kind=str(loss), group_type=args.get('gsl_type') if loss == 'gsl' else None,
            groups=args.get('gsl_groups') if loss == 'gsl' else None,
            grouping=args.get('gsl_grouping') if loss == 'gsl' else None,
            smoothing=float(_get(args, 'smoothing', 0.0)), mixup=float(_get(args, 'mixup', 0.0)),
            cutmix=float(_get(args, 'cutmix', 0.0)) or (1.0 if args.get('cutmix_minmax') else 0.0)),
        training=TrainingRecord(
            epochs=args.get('epochs'), batch_size=args.get('batch_size'), lr=args.get('lr'),
            optimizer=args.get('opt'), scheduler=args.get('sched'), workers=args.get('workers'),
            eval_metric=_get(args, 'eval_metric', 'top1'), command=command),
        distillation=None if not teacher else DistillationRecord(str(teacher), _get(args, 'kd_distill_type', 'logit')),
        version=version)
