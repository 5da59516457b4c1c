"""``'embedded/fashion-mnist'``: a small balanced subset of the real Fashion-MNIST shipped inside the package.

500 training images per class from Fashion-MNIST's training set and 100 validation images per class from its
test set, so that training and validation run with no download at all.
"""
from __future__ import annotations

import functools
import io
import json
from importlib import resources
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch.utils.data
from PIL import Image

__all__ = ['EMBEDDED_DATASET', 'EmbeddedFashionMNIST', 'create_embedded', 'embedded_dataset_info', 'is_embedded']

EMBEDDED_DATASET: str = 'embedded/fashion-mnist'

EMBEDDED_PREFIX = 'embedded/'
_EMBEDDED_FILES = ('datasets', 'fashion_mnist')
_EMBEDDED_ARRAYS = 'fashion_mnist_subset.npz'
_EMBEDDED_META = 'meta.json'
_TRAIN_SPLITS = ('train',)
_EVAL_SPLITS = ('validation', 'val', 'test')
_IMG_MODES = ('RGB', 'L')
# timm.data.create_dataset arguments that only matter for other dataset types; like timm does for
# folder datasets, the embedded dataset ignores them.
_IGNORED_TIMM_ARGS = frozenset({
    'search_split', 'download', 'batch_size', 'num_samples', 'repeats', 'trust_remote_code',
    'input_key', 'target_key', 'target_format', 'max_steps',
})


def is_embedded(name: str) -> bool:
    """Whether ``name`` names the dataset shipped with the package.

    Args:
        name: a dataset name as given to :func:`create_dataset` (case-insensitive).

    Returns:
        True for ``'embedded/fashion-mnist'``.
    """
    return isinstance(name, str) and name.strip().lower() == EMBEDDED_DATASET


@functools.lru_cache(maxsize=1)
def _embedded_meta() -> Dict[str, Any]:
    path = resources.files('timm_gsl').joinpath(*_EMBEDDED_FILES, _EMBEDDED_META)
    return json.loads(path.read_text(encoding='utf-8'))


@functools.lru_cache(maxsize=1)
def _embedded_arrays() -> Dict[str, np.ndarray]:
    path = resources.files('timm_gsl').joinpath(*_EMBEDDED_FILES, _EMBEDDED_ARRAYS)
    # Read through the Traversable so an installed zip/wheel works too, not only a folder on disk.
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    for array in arrays.values():
        array.setflags(write=False)  # shared by every dataset instance
    return arrays


def embedded_dataset_info() -> Dict[str, Any]:
    """Describe the embedded dataset without loading its images.

    Returns:
        A dict with ``name`` (``'embedded/fashion-mnist'``), ``num_classes``, ``class_names`` (in label
        order), ``num_train``, ``num_val``, ``image_size`` (``(height, width)``), ``licence``,
        ``train_per_class``, ``val_per_class`` and ``source`` (where the images come from).
    """
    meta = _embedded_meta()
    return {
        'name': EMBEDDED_DATASET,
        'num_classes': len(meta['class_names']),
        'class_names': list(meta['class_names']),
        'num_train': meta['num_train'],
        'num_val': meta['num_val'],
        'image_size': tuple(meta['image_size']),
        'licence': meta['licence'],
        'train_per_class': meta['train_per_class'],
        'val_per_class': meta['val_per_class'],
        'source': 'Fashion-MNIST (Zalando Research): training split from its 60k training set, '
                  'validation split from its 10k test set',
    }


class EmbeddedFashionMNIST(torch.utils.data.Dataset):
    """The Fashion-MNIST subset shipped with the package, as PIL images and int targets.

    Behaves like a timm ``ImageDataset``: ``transform`` and ``target_transform`` are plain attributes
    that ``timm.data.create_loader`` may set, and images come out in ``input_img_mode``.

    Args:
        split: 'train', or 'validation' / 'val' / 'test' (the same held-out images).
        transform: applied to the PIL image.
        target_transform: applied to the int target.
        input_img_mode: 'RGB' (3 identical channels, like any timm dataset) or 'L' (one channel).

    Attributes:
        targets: the label of every image, in dataset order.
        classes: class names in label order.
        class_to_idx: class name -> label.
        source_index: index of every image in the original Fashion-MNIST file it came from.
    """

    def __init__(
            self,
            split: str = 'train',
            transform: Optional[Callable] = None,
            target_transform: Optional[Callable] = None,
            input_img_mode: str = 'RGB',
    ):
        if split in _TRAIN_SPLITS:
            key = 'train'
        elif split in _EVAL_SPLITS:
            key = 'val'
        else:
            raise ValueError(f"Unknown split '{split}' for dataset '{EMBEDDED_DATASET}', expected one of "
                             f"{_TRAIN_SPLITS + _EVAL_SPLITS}.")
        if input_img_mode not in _IMG_MODES:
            raise ValueError(f"Unsupported input_img_mode '{input_img_mode}' for dataset '{EMBEDDED_DATASET}', "
                             f"expected one of {_IMG_MODES}.")
        arrays = _embedded_arrays()
        self.split = key
        self.images: np.ndarray = arrays[f'{key}_images']
        self.targets: List[int] = arrays[f'{key}_labels'].astype(np.int64).tolist()
        self.source_index: List[int] = arrays[f'{key}_source_index'].astype(np.int64).tolist()
        self.classes: List[str] = list(_embedded_meta()['class_names'])
        self.class_to_idx: Dict[str, int] = {name: i for i, name in enumerate(self.classes)}
        self.input_img_mode = input_img_mode
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, Any]:
        img = Image.fromarray(self.images[index])  # uint8 H x W -> mode 'L'
        if self.input_img_mode != 'L':
            img = img.convert(self.input_img_mode)
        target = self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        """A stable name for image ``index``: its split and index in the original Fashion-MNIST file.

        Args:
            index: dataset index.
            basename: return only the file part.
            absolute: accepted for timm compatibility; the images have no path on disk.

        Returns:
            e.g. ``'train/01234.png'``.
        """
        name = f'{self.source_index[index]:05d}.png'
        return name if basename else f'{self.split}/{name}'

    def filenames(self, basename: bool = False, absolute: bool = False) -> List[str]:
        """:meth:`filename` of every image, in dataset order."""
        return [self.filename(i, basename, absolute) for i in range(len(self))]


def create_embedded(split: str, **kwargs: Any) -> EmbeddedFashionMNIST:
    class_map = kwargs.pop('class_map', None)
    if class_map:
        raise ValueError(f"class_map={class_map!r} is not supported for '{EMBEDDED_DATASET}'; use class_subset "
                         f"with a file of class names instead.")
    if kwargs.pop('load_bytes', False):
        raise ValueError(f"load_bytes=True is not supported for '{EMBEDDED_DATASET}' (its images are arrays).")
    options = {k: kwargs.pop(k) for k in ('transform', 'target_transform', 'input_img_mode') if k in kwargs}
    if options.get('input_img_mode', 'RGB') is None:
        options['input_img_mode'] = 'RGB'
    unknown = sorted(k for k in kwargs if k not in _IGNORED_TIMM_ARGS)
    if unknown:
        raise ValueError(f"Unknown argument(s) {unknown} for dataset '{EMBEDDED_DATASET}'.")
    return EmbeddedFashionMNIST(split, **options)
