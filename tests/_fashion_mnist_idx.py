"""Tiny synthetic Fashion-MNIST IDX files, laid out as Debian's ``dataset-fashion-mnist`` ships them.

Lets the studies' end-to-end tests run on any machine: the four ``*-ubyte.gz`` files in the format
torchvision reads (big-endian int32 header, then uint8 pixels or labels), with a class-dependent
brightness so that a model can learn something.
"""
import gzip
import os
import struct

import numpy as np


def _write(path: str, header: bytes, payload: np.ndarray) -> None:
    with gzip.open(path, 'wb') as f:
        f.write(header + payload.astype(np.uint8).tobytes())


def write_fashion_mnist_idx(folder: str, train_per_class: int = 20, test_per_class: int = 10,
                            classes: int = 10, seed: int = 0) -> str:
    """Write ``train-*`` and ``t10k-*`` images and labels (28x28) into ``folder``; returns ``folder``."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, per_class in (('train', train_per_class), ('t10k', test_per_class)):
        labels = np.repeat(np.arange(classes), per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 64, size=(len(labels), 28, 28)) + (labels * 19)[:, None, None]
        _write(os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz'),
               struct.pack('>iiii', 2051, len(labels), 28, 28), images)
        _write(os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz'), struct.pack('>ii', 2049, len(labels)), labels)
    return folder
