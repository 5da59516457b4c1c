"""Datasets: the embedded Fashion-MNIST default and the paper's data conditions for any timm dataset.

* :mod:`.embedded`: ``'embedded/fashion-mnist'``, a small balanced subset of the real Fashion-MNIST shipped
  inside the package, so that training and validation run with no download.
* :mod:`.conditions`: ``class_subset`` (K classes, relabelled 0..K-1) and ``samples_per_class`` (N training
  images per class) for any dataset whose labels can be read without decoding images.
* :mod:`.factory`: :func:`create_dataset`, every argument of :func:`timm.data.create_dataset` plus these, and
  :func:`create_eval_dataset`, a run's evaluation images from its run record;
* :mod:`.skipped`: timm's warning about an image it skips names the file.

Examples:
    >>> train = create_dataset(EMBEDDED_DATASET, split='train', is_training=True,
    ...                        class_subset=5, samples_per_class=20, seed=0)
    >>> val = create_dataset(EMBEDDED_DATASET, split='validation', class_subset=5, seed=0)
    >>> len(train), len(val), dataset_class_names(train) == dataset_class_names(val)
    (100, 500, True)
"""
from .conditions import ConditionedDataset, apply_data_conditions, dataset_class_names, dataset_targets
from .embedded import EMBEDDED_DATASET, EmbeddedFashionMNIST, embedded_dataset_info, is_embedded
from .factory import check_data_source, check_no_empty_class, create_dataset, create_eval_dataset

__all__ = [
    'EMBEDDED_DATASET', 'ConditionedDataset', 'EmbeddedFashionMNIST', 'apply_data_conditions',
    'check_data_source', 'check_no_empty_class', 'create_dataset', 'create_eval_dataset', 'dataset_class_names',
    'dataset_targets', 'embedded_dataset_info', 'is_embedded',
]
