"""The flags ``train.py`` and ``validate.py`` share, declared once.

Each function adds one family of flags to a parser: the dataset, the model and its input, the device and
the data loader. The names and defaults are timm's (``tests/test_mistakes.py`` and ``tests/test_train.py``
compare them with the flag lists of timm's own scripts); where timm's two scripts differ in a default
(``--model``, ``--batch-size``), the caller passes its own. The help texts are ours, one per flag.
"""
from __future__ import annotations

import argparse
from types import MappingProxyType
from typing import Callable, Mapping, Optional, Union

from timm.utils import ParseKwargs

__all__ = [
    'CHECKPOINT_FLAGS', 'DATA_FLAGS', 'DATA_SOURCE_FLAGS', 'NAFLEX_FLAGS', 'add_dataset_flags', 'add_device_flags',
    'add_loader_flags', 'add_model_flags', 'add_naflex_flags', 'class_subset_value', 'dataset_root', 'input_channels',
]

# Options that name the data; with none of them set, the commands use the embedded Fashion-MNIST subset.
DATA_FLAGS = ('data', 'data_dir', 'dataset')

# How the commands' messages name the keywords of timm_gsl.data's checks of a dataset root (check_data_source,
# check_no_empty_class; their ``names`` argument): keyword -> flag.
DATA_SOURCE_FLAGS: Mapping[str, str] = MappingProxyType({
    'name': '--dataset',
    'root': '--data-dir',
})

# How the commands' messages name the keywords of timm_gsl.engine.check_checkpoint_fits (its ``names``): the
# architecture the weights must fit is the model's, --model.
CHECKPOINT_FLAGS: Mapping[str, str] = MappingProxyType({'arch': '--model'})

# How the commands' messages name the keywords of timm_gsl.naflex (its ``names`` argument): keyword -> flag.
# The NaFlex flags are declared in add_naflex_flags; the others belong to the model, batch and augmentation.
NAFLEX_FLAGS: Mapping[str, str] = MappingProxyType({
    'naflex_loader': '--naflex-loader',
    'train_seq_lens': '--naflex-train-seq-lens',
    'max_seq_len': '--naflex-max-seq-len',
    'patch_sizes': '--naflex-patch-sizes',
    'patch_size_probs': '--naflex-patch-size-probs',
    'loss_scale': '--naflex-loss-scale',
    'patchify_channels_first': '--naflex-patchify-channels-first',
    'model_name': '--model',
    'model_kwargs': '--model-kwargs',
    'batch_size': '--batch-size',
    'aug_splits': '--aug-splits',
    'aug_repeats': '--aug-repeats',
    'cutmix': '--cutmix',
    'cutmix_minmax': '--cutmix-minmax',
    'mixup_mode': '--mixup-mode',
})


def class_subset_value(value: str) -> Union[int, str]:
    """``--class-subset`` as a type: a number of classes K (an int), or the path of a file of class names."""
    text = str(value).strip()
    if text.lstrip('+-').isdigit():
        return int(text)
    if not text:
        raise argparse.ArgumentTypeError("expected a number of classes K or a file of class names, got ''")
    return text


def dataset_root(args: argparse.Namespace) -> Optional[str]:
    """The dataset root, from ``--data-dir`` or the positional ``DIR`` (the same rule for every command).

    Raises:
        ValueError: both are given and name different folders.
    """
    if args.data and args.data_dir and args.data != args.data_dir:
        raise ValueError(f'DIR {args.data!r} and --data-dir {args.data_dir!r} name two dataset roots; pass one of '
                         f'them (DIR is the older form of --data-dir).')
    return args.data_dir or args.data


def input_channels(args: argparse.Namespace) -> int:
    """The model's input channels: ``--in-chans``, else the first of ``--input-size``, else 3 (timm's rule)."""
    if args.in_chans is not None:
        return args.in_chans
    return args.input_size[0] if args.input_size else 3


def _group(parser: argparse.ArgumentParser, title: Optional[str]):
    return parser.add_argument_group(title) if title else parser


def add_dataset_flags(parser: argparse.ArgumentParser, title: Optional[str] = 'Dataset parameters',
                      class_subset_type: Callable[[str], object] = str) -> None:
    """The dataset: where it is, which one, how its images and labels are read, which classes are kept.

    Args:
        parser: the parser to extend.
        title: the argument group's title in ``--help`` (None: no group).
        class_subset_type: how ``--class-subset`` is parsed (``str`` keeps what the user typed, as train.py
            records it; :func:`class_subset_value` turns a count into an int).
    """
    group = _group(parser, title)
    # The positional sits on the parser itself (timm keeps it out of the group too).
    parser.add_argument('data', nargs='?', metavar='DIR', const=None,
                        help='dataset root (the older positional form of --data-dir)')
    group.add_argument('--data-dir', metavar='DIR', help='dataset root folder')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset "<type>/<name>" as timm names it; empty: an image folder or tar under '
                            '--data-dir. With no data flag at all, the embedded Fashion-MNIST subset is used')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='let torch/ and tfds/ datasets download their files')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='file mapping class names to indices (default: "")')
    group.add_argument('--input-img-mode', default=None, type=str,
                       help='PIL mode images are converted to (default: None: L for one input channel, else RGB)')
    group.add_argument('--input-key', default=None, type=str, help='image column of a Hugging Face dataset')
    group.add_argument('--target-key', default=None, type=str, help='label column of a Hugging Face dataset')
    group.add_argument('--dataset-trust-remote-code', action='store_true', default=False,
                       help='allow a Hugging Face dataset to run its own loading code')
    group.add_argument('--class-subset', default=None, type=class_subset_type, metavar='K|FILE',
                       help='use K classes drawn with --seed, or the classes named in FILE (one per line); kept '
                            'classes are relabelled 0..K-1 (default: all classes)')


def add_model_flags(parser: argparse.ArgumentParser, model_default: str, batch_size_default: int,
                    title: Optional[str] = 'Model parameters', model_aliases: tuple = ()) -> argparse._ActionsContainer:
    """The model, its input and how it is compiled.

    Args:
        parser: the parser to extend.
        model_default: ``--model``'s default (timm: resnet50 for training, dpn92 for validation).
        batch_size_default: ``-b/--batch-size``'s default (timm: 128 for training, 256 for validation).
        title: the argument group's title in ``--help`` (None: no group).
        model_aliases: more option strings of ``--model`` (validate.py's ``-m``).

    Returns:
        The mutually exclusive group of ``--torchscript`` and ``--torchcompile``, for more ways to compile.
    """
    group = _group(parser, title)
    group.add_argument('--model', *model_aliases, default=model_default, type=str, metavar='MODEL',
                       help=f'timm model name, hf-hub:ORG/NAME or local-dir:PATH (default: "{model_default}")')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='start from the model\'s pretrained weights')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of classes of the classifier (default: None, from the data or the model)')
    group.add_argument('--gp', default=None, type=str, metavar='POOL',
                       help='global pooling type (fast, avg, max, avgmax, avgmaxc); default: the model\'s')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='square input size (default: None, the model\'s)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N',
                       help='input channels (default: None, the model\'s, usually 3)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                       help='input shape as channels height width, e.g. 3 224 224 (default: the model\'s)')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N',
                       help='centre-crop fraction of the evaluation transform')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                       help='per-channel mean used to normalise images (default: the model\'s)')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                       help='per-channel standard deviation used to normalise images (default: the model\'s)')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                       help='resize interpolation of the evaluation transform (default: the model\'s)')
    group.add_argument('-b', '--batch-size', type=int, default=batch_size_default, metavar='N',
                       help=f'batch size per process (default: {batch_size_default})')
    group.add_argument('--channels-last', action='store_true', default=False,
                       help='use the channels-last memory layout')
    group.add_argument('--fuser', default='', type=str, help="TorchScript fuser: '', 'te', 'old' or 'nvfuser'")
    group.add_argument('--fast-norm', default=False, action='store_true', help='use timm\'s experimental fast norm')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='extra key=value arguments for timm.create_model')
    group.add_argument('--torchcompile-mode', type=str, default=None,
                       help='torch.compile mode (default: None, torch\'s default)')
    compiling = group.add_mutually_exclusive_group()
    compiling.add_argument('--torchscript', action='store_true', default=False,
                           help='torch.jit.script the model (train.py: not with --loss gsl)')
    compiling.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                           help='torch.compile the model with this backend (default backend: inductor)')
    return compiling


def add_device_flags(parser: argparse.ArgumentParser, title: Optional[str] = 'Device parameters') -> None:
    """The device and the numeric precision."""
    group = _group(parser, title)
    group.add_argument('--device', default='cuda', type=str,
                       help='device to run on (default: cuda; falls back to cpu with a notice when CUDA is absent)')
    group.add_argument('--amp', action='store_true', default=False, help='mixed precision with torch.autocast')
    group.add_argument('--amp-dtype', default='float16', type=str,
                       help='autocast dtype: float16 (training on CUDA adds a gradient scaler) or bfloat16 '
                            '(default: float16)')
    group.add_argument('--model-dtype', default=None, type=str,
                       help='dtype of the model weights and inputs, e.g. bfloat16 (default: None, float32)')


def add_loader_flags(parser: argparse.ArgumentParser, title: Optional[str] = 'Data loader parameters') -> None:
    """The data loader's processes and memory, and the seed of everything random."""
    group = _group(parser, title)
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                       help='data-loading worker processes (default: 4)')
    group.add_argument('--pin-mem', action='store_true', default=False,
                       help='pin host memory in the data loader (faster copies to the GPU)')
    group.add_argument('--no-prefetcher', action='store_true', default=False,
                       help='normalise on the loader workers instead of timm\'s device prefetcher')
    group.add_argument('--seed', type=int, default=42, metavar='S',
                       help='random seed; also draws --class-subset classes and --samples-per-class images '
                            '(default: 42)')


def add_naflex_flags(parser: argparse.ArgumentParser, training: bool, title: Optional[str] = None) -> None:
    """timm's NaFlex variable-resolution loader (NaFlexViT models); training adds the sequence-length schedule.

    Args:
        parser: the parser to extend.
        training: add the training-only flags too.
        title: the argument group's title in ``--help`` (None: no group).
    """
    group = _group(parser, title)
    group.add_argument('--naflex-loader', action='store_true', default=False,
                       help='NaFlex variable-resolution loader, for NaFlexViT models')
    if training:
        group.add_argument('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024],
                           help='NaFlex training sequence lengths, one drawn per batch (needs --naflex-loader)')
    group.add_argument('--naflex-max-seq-len', type=int, default=576,
                       help='NaFlex evaluation sequence length (needs --naflex-loader; default: 576)')
    if training:
        group.add_argument('--naflex-patch-sizes', type=int, nargs='+', default=None,
                           help='NaFlex patch sizes to draw from (needs --naflex-loader)')
        group.add_argument('--naflex-patch-size-probs', type=float, nargs='+', default=None,
                           help='weights of --naflex-patch-sizes (needs --naflex-loader; default: uniform)')
        group.add_argument('--naflex-loss-scale', default='linear', type=str, choices=('none', 'sqrt', 'linear'),
                           help='scale each batch\'s loss by its size relative to --batch-size (needs '
                                '--naflex-loader; default: linear)')
        group.add_argument('--naflex-patchify-channels-first', action='store_true', default=False,
                           help='patchify channels-first (needs --naflex-loader)')
