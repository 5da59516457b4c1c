"""``create_dataset``: the embedded dataset or any timm dataset, under the paper's data conditions.

Also :func:`create_eval_dataset`, the one place a run's evaluation images are read again from its run record,
and the cheap checks of a dataset root that run before any dataset is scanned. Their messages name the dataset
and its root by keyword (``name``, ``root``), or through ``names`` (:mod:`timm_gsl.naming`; the command lines
pass their flags, ``--dataset`` and ``--data-dir``).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import torch.utils.data

from ..naming import Names, option_name
from ..record import DataRecord
from .conditions import apply_data_conditions, check_samples_per_class, check_seed, parse_class_subset
from .embedded import EMBEDDED_DATASET, EMBEDDED_PREFIX, create_embedded, is_embedded
from .skipped import name_skipped_files

__all__ = ['DOWNLOADING_PREFIXES', 'check_data_source', 'check_no_empty_class', 'create_dataset', 'create_eval_dataset',
           'reads_local_folder']

# Dataset names timm resolves through a reader that fetches (or streams) its data itself; the others read
# an image folder or tar under the dataset root, which must exist already.
DOWNLOADING_PREFIXES = ('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')


def create_dataset(
        name: str,
        root: Optional[str] = None,
        split: str = 'validation',
        is_training: bool = False,
        *,
        class_subset: Optional[Union[int, str]] = None,
        samples_per_class: Optional[int] = None,
        seed: int = 42,
        holdout_per_class: int = 0,
        part: str = 'train',
        **timm_kwargs: Any,
) -> torch.utils.data.Dataset:
    """Create the embedded dataset or any timm dataset, under the paper's data conditions.

    Args:
        name: ``'embedded/fashion-mnist'`` or any name :func:`timm.data.create_dataset` accepts
            ('' for an image folder under ``root``, 'torch/cifar10', 'hfds/...', ...).
        root: dataset root (unused by the embedded dataset).
        split: split name. Embedded: 'train', or 'validation' / 'val' / 'test' (the same images).
        is_training: training mode; ``samples_per_class`` only applies when True.
        class_subset: keep K classes drawn with ``seed`` (an int, or a string of digits), or the classes
            named in a file (one per line); kept classes are relabelled 0..K-1 in their original order.
        samples_per_class: keep N training images per class, drawn with ``seed`` (training only).
        seed: seed of the class and image draws; also passed to timm (iterable datasets shuffle with it).
        holdout_per_class, part: training only: M images per class set aside for calibration, and whether to
            return the images to train on (``part='train'``, never the set-aside ones) or the set-aside ones
            (``'holdout'``); see :func:`apply_data_conditions`.
        **timm_kwargs: any other argument of :func:`timm.data.create_dataset` (class_map, download,
            batch_size, num_samples, input_img_mode, input_key, target_key, trust_remote_code, repeats,
            transform, ...). The embedded dataset honours ``transform``, ``target_transform`` and
            ``input_img_mode`` ('RGB' or 'L') and ignores the ones that only concern other types.

    Returns:
        A dataset with a settable ``transform`` (as ``timm.data.create_loader`` expects).

    Raises:
        ValueError: unknown embedded dataset or split, or a data condition out of range (see
            :func:`apply_data_conditions`).
    """
    # Fail on bad conditions before a possibly slow dataset scan.
    class_subset = parse_class_subset(class_subset)
    check_samples_per_class(samples_per_class)
    check_seed(seed)
    if is_embedded(name):
        dataset = create_embedded(split, **timm_kwargs)
    elif isinstance(name, str) and name.strip().lower().startswith(EMBEDDED_PREFIX):
        raise ValueError(f"Unknown embedded dataset '{name}', expected '{EMBEDDED_DATASET}'.")
    else:
        from timm.data import create_dataset as timm_create_dataset
        dataset = name_skipped_files(timm_create_dataset(name, root=root, split=split, is_training=is_training,
                                                         seed=seed, **timm_kwargs))
    return apply_data_conditions(
        dataset, class_subset=class_subset, samples_per_class=samples_per_class if is_training else None, seed=seed,
        holdout_per_class=holdout_per_class if is_training else 0, part=part if is_training else 'train')


def create_eval_dataset(data: DataRecord, split: Optional[str] = None, **timm_kwargs: Any) -> torch.utils.data.Dataset:
    """A run's evaluation images read again from its record: its dataset, split and class subset drawn with its seed.

    Args:
        data: the data section of a run record (an empty ``dataset`` and no ``root``: the embedded dataset).
        split: the split to read (default: the recorded ``eval_split``).
        **timm_kwargs: other :func:`create_dataset` arguments (``download``, ``num_samples``, ``class_subset`` to
            read other classes, ...); they win over the record.

    Returns:
        The dataset (evaluation mode: ``samples_per_class`` does not apply).
    """
    options = dict(class_subset=data.class_subset, seed=42 if data.seed is None else data.seed,
                   class_map=data.class_map or '', input_img_mode=data.input_img_mode, input_key=data.input_key,
                   target_key=data.target_key)
    options.update(timm_kwargs)
    name = data.dataset if (data.dataset or data.root) else EMBEDDED_DATASET
    return create_dataset(name, root=data.root, split=split or data.eval_split, is_training=False, **options)


def reads_local_folder(name: str) -> bool:
    """Whether dataset ``name`` is read from an image folder or tar under the dataset root ('' or 'folder/...')."""
    name = (name or '').lower()
    return not name.startswith(DOWNLOADING_PREFIXES) and not is_embedded(name)


def check_data_source(name: str, root: Optional[str], splits: Sequence[str], flag: Optional[str] = None,
                      require_root: bool = True, *, names: Names = None) -> None:
    """Refuse a dataset root that does not exist, or an image folder with an empty class.

    Cheap: it looks at the folder, not at the images, so it runs before any dataset is scanned.

    Args:
        name: the dataset name (``--dataset``).
        root: the dataset root (``--data-dir`` or the positional ``DIR``), or None.
        splits: the splits that will be read (checked for empty classes in a plain image folder).
        flag: how the user named ``root``, for the message about a root that does not exist (None: as
            ``names`` names ``root``).
        require_root: refuse a local-folder dataset without a root (train.py); validate.py lets timm say.
        names: keyword -> how the messages name it (the command lines pass their flags); default: the keyword
            (``name``, ``root``).

    Raises:
        ValueError: naming the option (``flag``, ``name`` or ``root``), the path and what is expected.
    """
    if not reads_local_folder(name):
        return
    root_name = option_name('root', names)
    if not root:
        if require_root:
            raise ValueError(f"{option_name('name', names)} {name!r} reads images from a local folder or tar, but no "
                             f"{root_name} was given; expected {root_name} PATH (or no data flag at all for the "
                             f"embedded set).")
        return
    if flag is None:
        flag = root_name
    if not os.path.exists(root):
        under = ' and '.join(f'{s}/' for s in splits)
        raise ValueError(f"{flag} {root!r}: no such file or folder; expected an existing image folder (one "
                         f"sub-folder per class, optionally under {under}) or a tar file.")
    if require_root and os.path.isdir(root) and (name or '').lower() in ('', 'folder'):
        for split in splits:
            check_no_empty_class(_split_folder(root, split), split, names=names)


def _split_folder(root: str, split: str) -> str:
    try:  # the folder timm's create_dataset reads for this split (the split name or a synonym of it)
        from timm.data.dataset_factory import _search_split
    except ImportError:
        return os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
    return _search_split(root, split)


def check_no_empty_class(folder: str, split: str, *, names: Names = None) -> None:
    """Refuse an image folder with a class sub-folder that holds no images.

    timm's folder reader derives the classes from the images it finds, so an empty class folder
    would silently vanish and shift every later class index.

    Args:
        folder: the split's folder, whose sub-folders are the classes.
        split: the split's name, for the message.
        names: keyword -> how the message names it (the command lines pass their flags); default: the keyword
            (``root``, the dataset root).

    Raises:
        ValueError: naming the dataset root, the class folder, the split and what is expected.
    """
    from timm.data import get_img_extensions
    extensions = tuple(get_img_extensions(as_set=True))
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith('.'):
            continue
        has_image = any(f.lower().endswith(extensions) for _, _, files in os.walk(entry.path) for f in files)
        if not has_image:
            raise ValueError(f"{option_name('root', names)}: class folder {entry.path!r} of split {split!r} holds no "
                             f"images (extensions {sorted(extensions)}); expected at least one image per class, or "
                             f"remove the folder.")
