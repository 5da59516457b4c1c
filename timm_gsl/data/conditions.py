"""The data conditions of the paper's small-data experiments, for any dataset whose labels can be read.

``class_subset`` keeps K classes (or the classes named in a file) and relabels them 0..K-1;
``samples_per_class`` keeps N training images of every class. Labels are read without decoding images.
"""
from __future__ import annotations

import numbers
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch.utils.data

from .embedded import EmbeddedFashionMNIST

__all__ = ['ConditionedDataset', 'apply_data_conditions', 'dataset_class_names', 'dataset_targets',
           'relabel_to_class_names']


class _Relabel:
    """Map an original label to its new label, then apply the user's target transform (picklable)."""

    def __init__(self, label_map: Dict[int, int], target_transform: Optional[Callable] = None):
        self.label_map = label_map
        self.target_transform = target_transform

    def __call__(self, target):
        target = self.label_map[int(target)]
        return target if self.target_transform is None else self.target_transform(target)


def _check_applies_transforms(base: Any) -> None:
    if not (hasattr(base, 'transform') and hasattr(base, 'target_transform')):
        # e.g. torch.utils.data.Subset: a transform assigned to the view would silently go nowhere.
        raise ValueError(f'base={type(base).__name__} has no transform / target_transform attributes; '
                         f'the data conditions need a dataset that applies them itself.')


class ConditionedDataset(torch.utils.data.Dataset):
    """A view of a map-style dataset that keeps some of its images and optionally relabels them.

    Images are only decoded when indexed. Assigning ``transform`` sets the base dataset's transform;
    assigning ``target_transform`` sets the base dataset's target transform to "relabel, then apply
    it", so the relabelling always happens first.

    Args:
        base: the dataset to view; must have settable ``transform`` and ``target_transform``.
        indices: indices into ``base`` to keep, in the order to present them.
        targets: the (new) label of each kept image.
        label_map: original label -> new label, or None to keep labels.
        class_names: names of the new labels in label order, or None if unknown.

    Attributes:
        base, indices, targets, classes (same as ``class_names``), label_map.
    """

    def __init__(
            self,
            base: torch.utils.data.Dataset,
            indices: Sequence[int],
            targets: Sequence[int],
            label_map: Optional[Dict[int, int]] = None,
            class_names: Optional[Sequence[str]] = None,
    ):
        if len(indices) != len(targets):
            raise ValueError(f'indices and targets must have the same length, got {len(indices)} and {len(targets)}.')
        _check_applies_transforms(base)
        self.base = base
        self.indices: List[int] = [int(i) for i in indices]
        self.targets: List[int] = [int(t) for t in targets]
        self.label_map = None if label_map is None else {int(k): int(v) for k, v in label_map.items()}
        self.classes: Optional[List[str]] = None if class_names is None else list(class_names)
        self._target_transform = None
        self.target_transform = getattr(base, 'target_transform', None)  # wraps it with the relabelling

    @property
    def transform(self) -> Optional[Callable]:
        return self.base.transform

    @transform.setter
    def transform(self, value: Optional[Callable]) -> None:
        self.base.transform = value

    @property
    def target_transform(self) -> Optional[Callable]:
        return self._target_transform

    @target_transform.setter
    def target_transform(self, value: Optional[Callable]) -> None:
        self._target_transform = value
        self.base.target_transform = value if self.label_map is None else _Relabel(self.label_map, value)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[self.indices[index]]

    def filename(self, index: int, basename: bool = False, absolute: bool = False):
        """The base dataset's file name of image ``index`` (see ``ImageDataset.filename``)."""
        return self.base.filename(self.indices[index], basename, absolute)

    def filenames(self, basename: bool = False, absolute: bool = False) -> List:
        """:meth:`filename` of every image, in dataset order."""
        return [self.filename(i, basename, absolute) for i in range(len(self))]


def _check_int_label(value: Any, dataset: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f'{type(dataset).__name__} has a non-integer label {value!r}; class_subset and '
                         f'samples_per_class need single-label integer targets.')
    return int(value)


def _raw_targets(dataset: Any) -> Optional[List[Any]]:
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return None
    if isinstance(dataset, (ConditionedDataset, EmbeddedFashionMNIST)):
        return list(dataset.targets)
    if isinstance(dataset, torch.utils.data.Subset):
        base = _raw_targets(dataset.dataset)
        return None if base is None else [base[i] for i in dataset.indices]
    reader = getattr(dataset, 'reader', None)
    if reader is not None:  # timm ImageDataset
        if getattr(reader, 'targets', None) is not None:  # ReaderImageInTar
            return list(reader.targets)
        samples = getattr(reader, 'samples', None)  # ReaderImageFolder, ReaderImageTar: (file, target) pairs
        if samples is not None and all(isinstance(s, (tuple, list)) and len(s) == 2 for s in samples):
            return [s[1] for s in samples]
        if hasattr(reader, 'iter_targets'):  # ReaderHfds: reads the label column only
            return list(reader.iter_targets())
        return None
    targets = getattr(dataset, 'targets', None)  # torchvision datasets
    if targets is None:
        return None
    return targets.tolist() if hasattr(targets, 'tolist') else list(targets)


def dataset_targets(dataset: Any) -> List[int]:
    """The label of every image of a map-style dataset, read without decoding any image.

    Supports the embedded dataset, :class:`ConditionedDataset`, timm ``ImageDataset`` over a folder,
    tar or Hugging Face dataset, torchvision datasets with ``targets`` and ``torch.utils.data.Subset``
    of those.

    Args:
        dataset: the dataset.

    Returns:
        The integer label of each image, in dataset order.

    Raises:
        ValueError: the labels cannot be read without decoding (iterable or unknown dataset types) or
            are not single integers.
    """
    targets = _raw_targets(dataset)
    if targets is None:
        raise ValueError(
            f'Cannot read the labels of a {type(dataset).__name__} without decoding its images, so '
            f'class_subset and samples_per_class are not supported for this dataset type. Supported: the '
            f'embedded dataset, timm folder/tar/hfds datasets and torchvision datasets with a .targets list.')
    return [_check_int_label(t, dataset) for t in targets]


def _names_from_index(class_to_idx: Any) -> Optional[List[str]]:
    if not isinstance(class_to_idx, dict) or not class_to_idx:
        return None
    by_index = {}
    for name, index in class_to_idx.items():
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or int(index) in by_index:
            return None
        by_index[int(index)] = str(name)
    if sorted(by_index) != list(range(len(by_index))):
        return None  # a class map with gaps: no name for some labels
    return [by_index[i] for i in range(len(by_index))]


def dataset_class_names(dataset: Any) -> Optional[List[str]]:
    """The class names of a dataset in label order, after any relabelling.

    Args:
        dataset: the embedded dataset, a :class:`ConditionedDataset`, a timm ``ImageDataset`` or a
            torchvision dataset.

    Returns:
        ``names[label]`` for every label, or None when the dataset does not record them.
    """
    if isinstance(dataset, (ConditionedDataset, EmbeddedFashionMNIST)):
        return None if dataset.classes is None else list(dataset.classes)
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_class_names(dataset.dataset)
    reader = getattr(dataset, 'reader', None)
    if reader is not None:
        for attr in ('class_to_idx', 'class_name_to_idx'):
            names = _names_from_index(getattr(reader, attr, None))
            if names is not None:
                return names
        return None
    classes = getattr(dataset, 'classes', None)
    if isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes):
        return list(classes)
    return _names_from_index(getattr(dataset, 'class_to_idx', None))


def relabel_to_class_names(dataset: Any, class_names: Sequence[str], drop_others: bool = False) -> Any:
    """The dataset with each image labelled by the position of its class's name in ``class_names``.

    What a model trained on ``class_names`` (in its label order) is scored against when the dataset numbers its
    own classes differently (an image folder numbers its class folders in name order, so a folder holding some
    of the classes gives them other labels). Labels are read without decoding images; an iterable dataset is
    relabelled as its images are read (it cannot drop classes).

    Args:
        dataset: a dataset that records its class names (:func:`dataset_class_names`).
        class_names: the names of the wanted labels, in label order.
        drop_others: leave out the images of classes not in ``class_names`` instead of refusing them.

    Returns:
        ``dataset`` itself when its class names are ``class_names``, else a :class:`ConditionedDataset` over it
        (or, iterable, ``dataset`` with a relabelling target transform).

    Raises:
        ValueError: the dataset records no class names, has classes not in ``class_names`` (unless
            ``drop_others``), or none that are.
    """
    names, wanted = dataset_class_names(dataset), list(class_names)
    if names is None:
        raise ValueError(f'{type(dataset).__name__} records no class names; expected a dataset that does.')
    if names == wanted:
        return dataset
    index = {name: i for i, name in enumerate(wanted)}
    label_map = {label: index[name] for label, name in enumerate(names) if name in index}
    others = [name for name in names if name not in index]
    if (others and not drop_others) or not label_map:
        raise ValueError(f'{type(dataset).__name__} has classes {others[:5]} ({len(others)} of {len(names)}) not '
                         f'among class_names; expected {"at least one" if drop_others else "only"} classes named '
                         f'in {wanted[:5]} ({len(wanted)} names).')
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if others:
            raise ValueError(f'{type(dataset).__name__} is iterable: its classes {others[:5]} cannot be left out; '
                             f'expected only classes named in {wanted[:5]} ({len(wanted)} names).')
        dataset.target_transform = _Relabel(label_map, getattr(dataset, 'target_transform', None))
        return dataset
    targets = dataset_targets(dataset)
    kept = [i for i, target in enumerate(targets) if target in label_map]
    return ConditionedDataset(dataset, kept, [label_map[targets[i]] for i in kept], label_map, wanted)


def check_samples_per_class(samples_per_class: Any) -> None:
    if samples_per_class is None:
        return
    if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, numbers.Integral) \
            or samples_per_class < 1:
        raise ValueError(f'samples_per_class={samples_per_class!r} is invalid, expected None or an integer >= 1.')


def check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f'seed={seed!r} is invalid, expected an integer >= 0.')


def parse_class_subset(class_subset: Any) -> Union[None, int, str]:
    """Validate ``class_subset``: None, an int K, or a path to a class-name file (a digit string names K)."""
    if class_subset is None:
        return None
    if isinstance(class_subset, (str, os.PathLike)):
        path = os.fspath(class_subset)
        if os.path.isfile(path):
            return path
        if isinstance(class_subset, str) and class_subset.strip().isdigit():
            class_subset = int(class_subset.strip())  # '10' from a command line
        else:
            raise ValueError(f"class_subset='{path}' is neither an integer number of classes nor an "
                             f"existing file of class names (one per line).")
    if isinstance(class_subset, bool) or not isinstance(class_subset, numbers.Integral):
        raise ValueError(f'class_subset={class_subset!r} is invalid, expected None, an integer >= 2 or the path '
                         f'of a file of class names.')
    if class_subset < 2:
        raise ValueError(f'class_subset={class_subset} is out of range, expected an integer >= 2 (a '
                         f'classifier needs at least two classes).')
    return int(class_subset)


def _read_class_names(path: str) -> List[str]:
    with open(path, encoding='utf-8') as f:
        names = [line.strip() for line in f]
    return [n for n in names if n]


def _select_classes(class_subset: Union[int, str], num_classes: int, names: Optional[List[str]],
                    seed: int) -> List[int]:
    """Original labels of the chosen classes, ascending."""
    if isinstance(class_subset, int):
        if class_subset > num_classes:
            raise ValueError(f'class_subset={class_subset} is out of range, expected an integer in '
                             f'[2, {num_classes}] (the dataset has {num_classes} classes).')
        # One seeded permutation of all labels: the choice depends only on (seed, number of classes),
        # so the train and validation splits of a dataset get the same classes.
        return sorted(int(c) for c in np.random.default_rng(seed).permutation(num_classes)[:class_subset])
    if names is None:
        raise ValueError(f"class_subset='{class_subset}' is a file of class names, but this dataset does not "
                         f"record class names; pass an integer number of classes instead.")
    wanted = _read_class_names(class_subset)
    index = {name: i for i, name in enumerate(names)}
    unknown = [n for n in wanted if n not in index]
    if unknown:
        raise ValueError(f"class_subset='{class_subset}' names unknown classes {unknown[:5]}; valid names "
                         f"include {names[:5]} ({len(names)} classes in all).")
    duplicated = sorted({n for n in wanted if wanted.count(n) > 1})
    if duplicated:
        raise ValueError(f"class_subset='{class_subset}' lists classes more than once: {duplicated[:5]}.")
    if len(wanted) < 2:
        raise ValueError(f"class_subset='{class_subset}' names {len(wanted)} class(es), expected between 2 "
                         f"and {num_classes} class names, one per line.")
    return sorted(index[n] for n in wanted)


def _class_label(c: int, names: Optional[List[str]]) -> str:
    return f"{c} ('{names[c]}')" if names is not None and c < len(names) else str(c)


def apply_data_conditions(
        dataset: torch.utils.data.Dataset,
        class_subset: Optional[Union[int, str]] = None,
        samples_per_class: Optional[int] = None,
        seed: int = 42,
        holdout_per_class: int = 0,
        part: str = 'train',
) -> torch.utils.data.Dataset:
    """Keep K classes and/or N images per class of a dataset, without decoding images.

    ``class_subset=K`` keeps K classes drawn with ``seed`` from the dataset's classes (the same K for
    every split with the same seed and class list), or the classes named in a file (one name per line).
    The kept classes are relabelled 0..K-1 in ascending order of their original label.
    ``samples_per_class=N`` keeps N images of every (kept) class, drawn with ``seed``; class ``c``'s
    draw depends only on ``(seed, c)`` and a smaller N keeps a subset of a larger N's images. Kept
    images stay in dataset order.

    ``holdout_per_class=M`` sets M images of every kept class aside (for a temperature fitted after
    training): the last M of the class's seeded permutation. ``part='train'`` never includes them (with N
    given, the N training images are the same as without a hold-out); ``part='holdout'`` returns them.

    Args:
        dataset: a map-style dataset :func:`dataset_targets` can read.
        class_subset: None, an int K in [2, number of classes], or a path to a file of class names.
            A string of digits that is not an existing file is read as K.
        samples_per_class: None, or N in [1, images of the smallest kept class].
        seed: seed of both draws.
        holdout_per_class: M >= 0 images per kept class set aside (see above).
        part: 'train' (the kept images) or 'holdout' (the M set-aside images per class).

    Returns:
        ``dataset`` itself when both conditions are None, else a :class:`ConditionedDataset` over it.

    Raises:
        ValueError: an argument is out of range, a kept class has no images, class names are needed
            but unknown, or the labels cannot be read without decoding images.
    """
    class_subset = parse_class_subset(class_subset)
    check_samples_per_class(samples_per_class)
    check_seed(seed)
    if isinstance(holdout_per_class, bool) or not isinstance(holdout_per_class, int) or holdout_per_class < 0:
        raise ValueError(f'holdout_per_class={holdout_per_class!r} is invalid, expected an integer >= 0.')
    if part not in ('train', 'holdout'):
        raise ValueError(f"part={part!r} is unknown, expected 'train' or 'holdout'.")
    if part == 'holdout' and holdout_per_class == 0:
        raise ValueError("part='holdout' needs holdout_per_class >= 1.")
    if class_subset is None and samples_per_class is None and holdout_per_class == 0:
        return dataset
    targets = np.asarray(dataset_targets(dataset), dtype=np.int64)
    _check_applies_transforms(dataset)
    names = dataset_class_names(dataset)
    if len(targets) == 0:
        raise ValueError(f'{type(dataset).__name__} is empty; class_subset and samples_per_class need images.')
    if names is not None:
        num_classes = len(names)
    else:
        num_classes = int(targets.max()) + 1
    bad = targets[(targets < 0) | (targets >= num_classes)]
    if len(bad):
        raise ValueError(f'{type(dataset).__name__} has label {int(bad[0])} outside [0, {num_classes - 1}]; '
                         f'class_subset and samples_per_class need labels in that range.')

    if class_subset is None:
        classes = list(range(num_classes))
    else:
        classes = _select_classes(class_subset, num_classes, names, seed)
    members = {c: np.flatnonzero(targets == c) for c in classes}
    empty = [c for c in classes if len(members[c]) == 0]
    if empty:
        fix = ('choose a class_subset without it' if class_subset is not None else
               f'samples_per_class={samples_per_class} needs images of every class; use class_subset to leave it out')
        raise ValueError(f'Class {_class_label(empty[0], names)} has no images in this {type(dataset).__name__} '
                         f'({len(empty)} empty class(es) among the kept ones): {fix}.')
    smallest = min(classes, key=lambda c: len(members[c]))
    available = len(members[smallest]) - holdout_per_class
    if holdout_per_class and available < (samples_per_class or 1):
        raise ValueError(
            f'holdout_per_class={holdout_per_class} is out of range: class {_class_label(smallest, names)} has '
            f'{len(members[smallest])} images, which must hold the {holdout_per_class} held out plus '
            f'{samples_per_class or "at least 1"} to train on.')
    if samples_per_class is not None and samples_per_class > available:
        raise ValueError(
            f'samples_per_class={samples_per_class} is out of range: class {_class_label(smallest, names)} '
            f'has only {len(members[smallest])} images; expected an integer in [1, {len(members[smallest])}].')
    if samples_per_class is not None or holdout_per_class:
        drawn = {c: np.random.default_rng((seed, c)).permutation(m) for c, m in members.items()}
        if part == 'holdout':
            members = {c: p[len(p) - holdout_per_class:] for c, p in drawn.items()}
        else:
            members = {c: p[:samples_per_class if samples_per_class is not None else len(p) - holdout_per_class]
                       for c, p in drawn.items()}

    indices = np.sort(np.concatenate([members[c] for c in classes]))
    if class_subset is None:
        label_map, class_names = None, names
    else:
        label_map = {c: new for new, c in enumerate(classes)}
        class_names = None if names is None else [names[c] for c in classes]
    new_targets = [label_map[int(t)] if label_map else int(t) for t in targets[indices]]
    return ConditionedDataset(dataset, indices.tolist(), new_targets, label_map, class_names)
