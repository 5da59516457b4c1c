#!/usr/bin/env python3
"""Build the Fashion-MNIST subset shipped in ``timm_gsl/datasets/fashion_mnist/``.

The subset is balanced and drawn deterministically from the original IDX files (Debian's
``dataset-fashion-mnist`` package installs them in ``/usr/share/datasets/fashion-mnist/``):
``--train-per-class`` images of every class from the 60k training set and ``--val-per-class``
from the 10k test set. For each class the images are the first ones of a seeded permutation of
that class's indices, stored in ascending order of their index in the original file, together
with that index so anyone can check them against the source.

The output is byte-for-byte reproducible: the ``.npz`` archive is written with fixed zip
timestamps, the JSON with sorted keys.

Examples:
    python -m tools.make_embedded_dataset                      # rebuild the shipped files
    python -m tools.make_embedded_dataset --out /tmp/fm --train-per-class 50
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import struct
import sys
import zipfile
from typing import Dict, List, Tuple

import numpy as np

from timm_gsl.engine.atomic import atomic_path

# The ten Fashion-MNIST labels, in label order (as in the dataset's own README and torchvision).
CLASS_NAMES: List[str] = [
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
    'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
]
SOURCE_FILES: Dict[str, Tuple[str, str]] = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'val': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
ARRAYS_FILE = 'fashion_mnist_subset.npz'
META_FILE = 'meta.json'
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date zip can store; fixed so the archive is reproducible
_IDX_DTYPE_UBYTE = 0x08


def read_idx(path: str) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes.

    Args:
        path: an ``*-idx1-ubyte[.gz]`` (labels) or ``*-idx3-ubyte[.gz]`` (images) file.

    Returns:
        A uint8 array of the shape recorded in the file header.
    """
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype != _IDX_DTYPE_UBYTE:
        raise ValueError(f"'{path}' is not an unsigned-byte IDX file (header {data[:4].hex()}).")
    shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"'{path}' holds {array.size} bytes of data, its header promises shape {shape}.")
    return array.reshape(shape)


def balanced_indices(labels: np.ndarray, per_class: int, num_classes: int, seed: int) -> np.ndarray:
    """Pick ``per_class`` indices of every class with a seeded permutation per class.

    Args:
        labels: the label of every image of the source split.
        per_class: how many images to keep of each class.
        num_classes: number of classes; every one must have at least ``per_class`` images.
        seed: seed of the permutations (class ``c`` uses the generator seeded with ``(seed, c)``).

    Returns:
        The chosen indices into the source split, ascending.
    """
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f'per_class={per_class} but class {c} has only {len(members)} images.')
        rng = np.random.default_rng((seed, c))
        chosen.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(chosen))


def _write_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
    # np.savez_compressed stamps the current time into the zip; write the same format with a fixed date.
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + '.npy', date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buffer.getvalue(), compresslevel=9)


def _replace_atomically(write, path: str) -> None:
    with atomic_path(path) as tmp:
        write(tmp)
        os.chmod(tmp, 0o644)


def build(source: str, out: str, train_per_class: int, val_per_class: int, seed: int) -> Dict[str, str]:
    """Build the subset files from the original IDX files.

    Args:
        source: folder with the four original ``*-ubyte.gz`` files.
        out: folder to write ``fashion_mnist_subset.npz`` and ``meta.json`` into (created if missing).
        train_per_class: images per class taken from the training set.
        val_per_class: images per class taken from the test set (our validation split).
        seed: seed of the per-class permutations.

    Returns:
        The SHA-256 of each written file, by file name.
    """
    for name, value in (('train_per_class', train_per_class), ('val_per_class', val_per_class)):
        if value < 1:
            raise ValueError(f'{name}={value} is invalid, expected an integer >= 1.')
    arrays = {}
    for split, (images_file, labels_file) in SOURCE_FILES.items():
        images = read_idx(os.path.join(source, images_file))
        labels = read_idx(os.path.join(source, labels_file))
        per_class = train_per_class if split == 'train' else val_per_class
        index = balanced_indices(labels, per_class, len(CLASS_NAMES), seed)
        arrays[f'{split}_images'] = images[index]
        arrays[f'{split}_labels'] = labels[index]
        arrays[f'{split}_source_index'] = index.astype(np.int32)
    meta = {
        'name': 'fashion-mnist',
        'class_names': CLASS_NAMES,
        'image_size': [28, 28],
        'num_train': len(arrays['train_labels']),
        'num_val': len(arrays['val_labels']),
        'train_per_class': train_per_class,
        'val_per_class': val_per_class,
        'seed': seed,
        'train_source': SOURCE_FILES['train'][0],
        'val_source': SOURCE_FILES['val'][0],
        'licence': 'MIT, Copyright (c) 2017 Zalando SE (see LICENSE)',
    }
    os.makedirs(out, exist_ok=True)
    arrays_path, meta_path = os.path.join(out, ARRAYS_FILE), os.path.join(out, META_FILE)

    def write_meta(tmp):
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write('\n')

    _replace_atomically(lambda tmp: _write_npz(tmp, arrays), arrays_path)
    _replace_atomically(write_meta, meta_path)
    digests = {}
    for path in (arrays_path, meta_path):
        with open(path, 'rb') as f:
            digests[os.path.basename(path)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--source', default='/usr/share/datasets/fashion-mnist',
                        help='folder with the original Fashion-MNIST *-ubyte.gz files')
    parser.add_argument('--out', default=os.path.join(here, '..', 'timm_gsl', 'datasets', 'fashion_mnist'),
                        help='output folder (default: the package copy)')
    parser.add_argument('--train-per-class', type=int, default=500)
    parser.add_argument('--val-per-class', type=int, default=100)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    digests = build(args.source, os.path.normpath(args.out), args.train_per_class, args.val_per_class, args.seed)
    for name, digest in digests.items():
        size = os.path.getsize(os.path.join(args.out, name))
        print(f'{name}: {size} bytes, sha256 {digest}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
