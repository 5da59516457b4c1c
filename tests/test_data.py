"""Tests for timm_gsl/data/: the embedded Fashion-MNIST subset and the class / sample data conditions."""
import gzip
import os
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from timm.data import create_loader

from timm_gsl.cli.flags import DATA_SOURCE_FLAGS
from timm_gsl.data import (
    EMBEDDED_DATASET,
    ConditionedDataset,
    EmbeddedFashionMNIST,
    apply_data_conditions,
    check_data_source,
    create_dataset,
    dataset_class_names,
    dataset_targets,
    embedded_dataset_info,
    is_embedded,
)

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                   'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
needs_source = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                                  reason=f'original Fashion-MNIST not installed in {FASHION_MNIST_DIR}')


# ----------------------------------------------------------------------------------------------- helpers

def _read_original(images_file, labels_file):
    """Independent IDX reader: 16-byte header for images, 8-byte header for labels."""
    with gzip.open(os.path.join(FASHION_MNIST_DIR, images_file), 'rb') as f:
        images = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(-1, 28, 28)
    with gzip.open(os.path.join(FASHION_MNIST_DIR, labels_file), 'rb') as f:
        labels = np.frombuffer(f.read()[8:], dtype=np.uint8)
    return images, labels


class ListDataset(torch.utils.data.Dataset):
    """Map-style dataset with torchvision-style ``targets`` / ``classes``; item = (index, target)."""

    def __init__(self, targets, classes=None):
        self.targets = list(targets)
        self.classes = classes
        self.transform = None
        self.target_transform = None

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img, target = index, self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def _slow_reference(base, chosen):
    """Walk the base dataset item by item; keep images of the chosen classes, relabelled by rank."""
    rank = {c: r for r, c in enumerate(sorted(chosen))}
    kept = []
    for i in range(len(base)):
        img, target = base[i]
        if target in rank:
            kept.append((_key(img), rank[target]))
    return kept


def _key(img):
    return np.asarray(img).tobytes() if isinstance(img, Image.Image) else img


def _items(dataset):
    return [(_key(img), target) for img, target in (dataset[i] for i in range(len(dataset)))]


# (class name, number of train images, number of val images); each image is a solid colour that
# encodes its class and index, so a decoded pixel tells which file it is.
FOLDER_CLASSES = [('ant', 3, 2), ('bee', 4, 2), ('cat', 5, 2), ('dog', 6, 2), ('eel', 3, 2)]


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('folder')
    for split_dir, column in (('train', 1), ('validation', 2)):
        for c, spec in enumerate(FOLDER_CLASSES):
            os.makedirs(root / split_dir / spec[0])
            for k in range(spec[column]):
                Image.new('RGB', (4, 4), (c * 40, k * 10, 7)).save(root / split_dir / spec[0] / f'{k}.png')
    return str(root)


def _folder_class_of(img):
    return int(np.asarray(img)[0, 0, 0]) // 40


# ------------------------------------------------------------------------------------- embedded dataset

def test_is_embedded_recognises_only_the_shipped_name():
    assert is_embedded(EMBEDDED_DATASET)
    assert is_embedded('Embedded/Fashion-MNIST')
    assert not is_embedded('torch/fashion_mnist')
    assert not is_embedded('')
    assert not is_embedded('embedded/cifar10')


def test_embedded_info_describes_the_shipped_files():
    info = embedded_dataset_info()
    assert info['name'] == EMBEDDED_DATASET
    assert info['num_classes'] == 10 and info['class_names'] == FASHION_CLASSES
    assert (info['num_train'], info['num_val']) == (5000, 1000)
    assert info['image_size'] == (28, 28)
    assert 'MIT' in info['licence'] and 'Zalando' in info['licence']


def test_embedded_splits_have_stated_counts_and_are_balanced():
    info = embedded_dataset_info()
    train = create_dataset(EMBEDDED_DATASET, split='train', is_training=True)
    val = create_dataset(EMBEDDED_DATASET, split='validation')
    assert len(train) == info['num_train'] and len(val) == info['num_val']
    assert Counter(dataset_targets(train)) == {c: info['train_per_class'] for c in range(10)}
    assert Counter(dataset_targets(val)) == {c: info['val_per_class'] for c in range(10)}
    assert dataset_class_names(train) == dataset_class_names(val) == FASHION_CLASSES
    # no image is repeated within a split
    assert len(set(train.source_index)) == len(train) and len(set(val.source_index)) == len(val)


def test_embedded_images_are_pil_rgb_28x28_with_int_targets():
    dataset = create_dataset(EMBEDDED_DATASET, split='train')
    for i in (0, 1, 2499, 4999):
        img, target = dataset[i]
        assert isinstance(img, Image.Image) and img.mode == 'RGB' and img.size == (28, 28)
        assert type(target) is int and 0 <= target < 10
        pixels = np.asarray(img)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
        np.testing.assert_array_equal(pixels[..., 0], dataset.images[i])
    gray, _ = create_dataset(EMBEDDED_DATASET, split='train', input_img_mode='L')[0]
    assert gray.mode == 'L'


@needs_source
@pytest.mark.parametrize('split,files', [
    ('train', ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz')),
    ('validation', ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')),
])
def test_embedded_images_are_real_fashion_mnist(split, files):
    images, labels = _read_original(*files)
    dataset = EmbeddedFashionMNIST(split)
    # every label matches the original, and a spread of images matches pixel for pixel
    np.testing.assert_array_equal(labels[dataset.source_index], dataset.targets)
    for i in range(0, len(dataset), len(dataset) // 25):
        img, target = dataset[i]
        np.testing.assert_array_equal(np.asarray(img)[..., 0], images[dataset.source_index[i]])
        assert target == labels[dataset.source_index[i]]


@needs_source
@pytest.mark.slow
def test_make_embedded_dataset_rebuilds_the_shipped_files_byte_for_byte(tmp_path):
    from tools import make_embedded_dataset as tool
    tool.main(['--source', FASHION_MNIST_DIR, '--out', str(tmp_path)])
    shipped = os.path.join(REPO, 'timm_gsl', 'datasets', 'fashion_mnist')
    for name in ('fashion_mnist_subset.npz', 'meta.json'):
        with open(tmp_path / name, 'rb') as a, open(os.path.join(shipped, name), 'rb') as b:
            assert a.read() == b.read(), name
    assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]


def test_embedded_eval_split_aliases_are_the_same_images():
    reference = EmbeddedFashionMNIST('validation')
    for split in ('val', 'test'):
        other = create_dataset(EMBEDDED_DATASET, split=split)
        assert other.source_index == reference.source_index and other.targets == reference.targets


@pytest.mark.parametrize('split', ['training', 'eval', 'TRAIN', ''])
def test_embedded_unknown_split_raises_naming_it_and_the_allowed_ones(split):
    with pytest.raises(ValueError, match=rf"split '{split}'.*'train'.*'validation'.*'val'.*'test'"):
        create_dataset(EMBEDDED_DATASET, split=split)


def test_embedded_honours_transform_and_target_transform_attributes():
    dataset = create_dataset(EMBEDDED_DATASET, split='validation')
    img, target = dataset[7]
    dataset.transform = lambda im: np.asarray(im).sum()
    dataset.target_transform = lambda t: t + 100
    assert dataset[7] == (np.asarray(img).sum(), target + 100)
    built = create_dataset(EMBEDDED_DATASET, split='validation', transform=lambda im: im.size)
    assert built[0][0] == (28, 28)


def test_embedded_rejects_options_it_cannot_honour():
    with pytest.raises(ValueError, match="class_map"):
        create_dataset(EMBEDDED_DATASET, split='train', class_map='classes.txt')
    with pytest.raises(ValueError, match="input_img_mode 'CMYK'"):
        create_dataset(EMBEDDED_DATASET, split='train', input_img_mode='CMYK')
    with pytest.raises(ValueError, match="bogus"):
        create_dataset(EMBEDDED_DATASET, split='train', bogus=1)
    with pytest.raises(ValueError, match="Unknown embedded dataset 'embedded/mnist'"):
        create_dataset('embedded/mnist', split='train')
    # arguments that only concern other dataset types are ignored, as timm ignores them for folders
    assert len(create_dataset(EMBEDDED_DATASET, split='train', download=True, batch_size=64, class_map='')) == 5000


@pytest.mark.parametrize('num_workers', [0, 2])
def test_timm_create_loader_batches_the_embedded_dataset(num_workers):
    dataset = create_dataset(EMBEDDED_DATASET, split='train', is_training=True, class_subset=4,
                             samples_per_class=8, seed=3)
    loader = create_loader(dataset, input_size=(3, 28, 28), batch_size=16, is_training=True,
                           use_prefetcher=False, num_workers=num_workers, device=torch.device('cpu'))
    seen = Counter()
    for x, y in loader:
        assert x.shape[1:] == (3, 28, 28) and x.dtype == torch.float32
        seen.update(y.tolist())
    assert seen == {c: 8 for c in range(4)}  # relabelled 0..3 even inside worker processes
    val = create_dataset(EMBEDDED_DATASET, split='validation')
    loader = create_loader(val, input_size=(3, 28, 28), batch_size=100, is_training=False,
                           use_prefetcher=False, num_workers=num_workers, device=torch.device('cpu'))
    x, y = next(iter(loader))
    assert x.shape == (100, 3, 28, 28) and y.tolist() == val.targets[:100]


# ------------------------------------------------------------------------------------------ class subset

@pytest.mark.parametrize('seed', [0, 1, 42])
def test_class_subset_is_deterministic_and_identical_across_splits(seed):
    train = create_dataset(EMBEDDED_DATASET, split='train', is_training=True, class_subset=4, seed=seed)
    train_again = create_dataset(EMBEDDED_DATASET, split='train', is_training=True, class_subset=4, seed=seed)
    val = create_dataset(EMBEDDED_DATASET, split='validation', class_subset=4, seed=seed)
    assert train.indices == train_again.indices
    names = dataset_class_names(train)
    assert names == dataset_class_names(val) and len(names) == 4
    assert [FASHION_CLASSES.index(n) for n in names] == sorted(FASHION_CLASSES.index(n) for n in names)
    assert set(train.label_map) == set(val.label_map)


def test_class_subset_depends_on_the_seed():
    chosen = {tuple(dataset_class_names(create_dataset(EMBEDDED_DATASET, class_subset=3, seed=s)))
              for s in range(8)}
    assert len(chosen) > 1


@pytest.mark.parametrize('split,k,seed', [('validation', 3, 0), ('validation', 7, 5), ('train', 2, 11)])
def test_class_subset_keeps_and_relabels_like_the_slow_reference(split, k, seed):
    base = EmbeddedFashionMNIST(split)
    subset = create_dataset(EMBEDDED_DATASET, split=split, class_subset=k, seed=seed)
    chosen = [FASHION_CLASSES.index(n) for n in dataset_class_names(subset)]
    assert len(chosen) == k
    assert _items(subset) == _slow_reference(base, chosen)
    assert dataset_targets(subset) == [t for _, t in _slow_reference(base, chosen)]


def test_class_subset_from_a_file_selects_those_classes_in_original_order(tmp_path):
    path = tmp_path / 'classes.txt'
    path.write_text('Sneaker\nTrouser\n\nBag\n', encoding='utf-8')
    subset = create_dataset(EMBEDDED_DATASET, split='validation', class_subset=str(path))
    assert dataset_class_names(subset) == ['Trouser', 'Sneaker', 'Bag']
    assert _items(subset) == _slow_reference(EmbeddedFashionMNIST('validation'), [1, 7, 8])


def test_class_subset_digit_string_means_a_number_of_classes():
    assert dataset_class_names(create_dataset(EMBEDDED_DATASET, class_subset='5', seed=2)) == \
        dataset_class_names(create_dataset(EMBEDDED_DATASET, class_subset=5, seed=2))


def test_relabelling_happens_before_an_assigned_target_transform():
    subset = create_dataset(EMBEDDED_DATASET, split='validation', class_subset=3, seed=0)
    plain = [subset[i][1] for i in range(0, len(subset), 37)]
    subset.target_transform = lambda t: 10 * t
    assert [subset[i][1] for i in range(0, len(subset), 37)] == [10 * t for t in plain]
    assert all(t in (0, 1, 2) for t in plain)
    subset.transform = lambda im: 'decoded'
    assert subset[0][0] == 'decoded' and subset.base.transform is subset.transform


# ------------------------------------------------------------------------------------- samples per class

def test_samples_per_class_keeps_n_training_images_of_each_class():
    train = create_dataset(EMBEDDED_DATASET, split='train', is_training=True, samples_per_class=13, seed=1)
    assert Counter(dataset_targets(train)) == {c: 13 for c in range(10)}
    assert train.indices == sorted(set(train.indices))
    base = EmbeddedFashionMNIST('train')
    assert all(base.targets[i] == t for i, t in zip(train.indices, train.targets))
    assert dataset_class_names(train) == FASHION_CLASSES


def test_samples_per_class_is_deterministic_nested_and_independent_of_other_classes():
    def pick(n, seed, k=None):
        d = create_dataset(EMBEDDED_DATASET, split='train', is_training=True, samples_per_class=n, seed=seed,
                           class_subset=k)
        return set(d.indices)
    assert pick(10, 0) == pick(10, 0)
    assert pick(10, 0) != pick(10, 1)
    assert pick(5, 0) < pick(20, 0)  # a smaller N keeps a subset of a larger N's images
    with_subset = pick(10, 7, k=4)  # each class's draw does not depend on which other classes are kept
    assert with_subset < pick(10, 7)


def test_samples_per_class_leaves_the_validation_split_untouched():
    val = create_dataset(EMBEDDED_DATASET, split='validation', samples_per_class=5)
    assert isinstance(val, EmbeddedFashionMNIST) and len(val) == 1000
    val_k = create_dataset(EMBEDDED_DATASET, split='validation', samples_per_class=5, class_subset=3, seed=0)
    assert len(val_k) == 300


def _holdout(n=None, m=30, seed=3, k=None, part='holdout'):
    return create_dataset(EMBEDDED_DATASET, split='train', is_training=True, samples_per_class=n, seed=seed,
                          class_subset=k, holdout_per_class=m, part=part)


def test_calibration_holdout_is_the_end_of_each_classs_draw_and_never_a_training_image():
    base = EmbeddedFashionMNIST('train')
    holdout, train = _holdout(n=40), _holdout(n=40, part='train')
    assert Counter(dataset_targets(holdout)) == {c: 30 for c in range(10)}
    assert not set(holdout.indices) & set(train.indices)
    # The slow reference: class c's seeded permutation of its images, the first N train, the last M are held out.
    for c in range(10):
        members = [i for i, t in enumerate(base.targets) if t == c]
        drawn = [members[j] for j in np.random.default_rng((3, c)).permutation(len(members))]
        assert {i for i in holdout.indices if base.targets[i] == c} == set(drawn[-30:])
        assert {i for i in train.indices if base.targets[i] == c} == set(drawn[:40])


def test_a_holdout_leaves_the_samples_per_class_draw_as_it_was():
    plain = create_dataset(EMBEDDED_DATASET, split='train', is_training=True, samples_per_class=40, seed=3)
    assert _holdout(n=40, part='train').indices == plain.indices


def test_a_holdout_without_samples_per_class_leaves_the_training_set():
    train, holdout = _holdout(part='train', k=4), _holdout(k=4)
    assert len(train) == 4 * 470 and len(holdout) == 4 * 30 and not set(train.indices) & set(holdout.indices)
    assert Counter(dataset_targets(holdout)) == {c: 30 for c in range(4)}  # relabelled like the training set


@pytest.mark.parametrize('kwargs, match', [
    (dict(n=480, m=30), r'holdout_per_class=30 is out of range: class .* has 500 images, which must hold the 30 '
                        r'held out plus 480'),
    (dict(m=-1), r'holdout_per_class=-1 is invalid'),
    (dict(m=0), r"part='holdout' needs holdout_per_class >= 1"),
    (dict(part='test'), r"part='test' is unknown"),
])
def test_impossible_holdouts_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _holdout(**kwargs)


def test_no_condition_returns_the_base_dataset_unwrapped():
    assert isinstance(create_dataset(EMBEDDED_DATASET, split='train', is_training=True), EmbeddedFashionMNIST)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_conditions_on_any_labelled_dataset_match_their_definition(data):
    num_classes = data.draw(st.integers(2, 8))
    targets = data.draw(st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=80))
    names = [f'c{i}' for i in range(num_classes)]
    dataset = ListDataset(targets, classes=names)
    k = data.draw(st.one_of(st.none(), st.integers(2, num_classes)))
    n = data.draw(st.one_of(st.none(), st.integers(1, 5)))
    seed = data.draw(st.integers(0, 2 ** 31))
    if k is None and n is None:
        assert apply_data_conditions(dataset, k, n, seed) is dataset
        return
    if k is None:
        kept = list(range(num_classes))
    else:
        # the classes drawn depend only on (seed, class list): read them off a one-image-per-class dataset
        one_each = apply_data_conditions(ListDataset(range(num_classes), classes=names), k, None, seed)
        kept = [names.index(c) for c in one_each.classes]
        assert len(kept) == k and kept == sorted(kept)
    counts = Counter(targets)
    smallest = min(counts[c] for c in kept)
    if smallest == 0 or (n is not None and n > smallest):
        with pytest.raises(ValueError, match='no images' if smallest == 0 else 'samples_per_class'):
            apply_data_conditions(dataset, class_subset=k, samples_per_class=n, seed=seed)
        return
    out = apply_data_conditions(dataset, class_subset=k, samples_per_class=n, seed=seed)
    assert out.classes == ([names[c] for c in kept] if k is not None else names)
    rank = {c: (r if k is not None else c) for r, c in enumerate(kept)}
    # reference: walk the dataset and keep what the definition says
    expected_pool = [(i, rank[t]) for i, t in enumerate(targets) if t in rank]
    got = [out[i] for i in range(len(out))]
    if n is None:
        assert got == expected_pool
    else:
        assert [i for i, _ in got] == sorted(i for i, _ in got)
        assert set(got) <= set(expected_pool)
        assert Counter(t for _, t in got) == {rank[c]: n for c in kept}
    assert out.targets == [t for _, t in got]


# ------------------------------------------------------------------------------ timm / torchvision folders

def test_conditions_on_a_timm_image_folder(image_folder, tmp_path):
    train = create_dataset('', root=image_folder, split='train', is_training=True, class_subset=3,
                           samples_per_class=2, seed=4)
    val = create_dataset('', root=image_folder, split='validation', class_subset=3, samples_per_class=2, seed=4)
    names = dataset_class_names(train)
    assert names == dataset_class_names(val) and len(names) == 3
    all_names = [c[0] for c in FOLDER_CLASSES]
    chosen = [all_names.index(n) for n in names]
    assert chosen == sorted(chosen)
    assert Counter(dataset_targets(train)) == {0: 2, 1: 2, 2: 2}
    assert Counter(dataset_targets(val)) == {0: 2, 1: 2, 2: 2}  # the full validation classes
    for dataset in (train, val):
        for i in range(len(dataset)):
            img, target = dataset[i]  # decoded from the PNG file
            assert chosen[target] == _folder_class_of(img)
    # timm's loader assigns the transform through the wrapper onto the ImageDataset
    loader = create_loader(train, input_size=(3, 8, 8), batch_size=6, use_prefetcher=False,
                           device=torch.device('cpu'))
    x, y = next(iter(loader))
    assert x.shape == (6, 3, 8, 8) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    assert train.base.transform is train.transform


def test_class_subset_on_an_image_folder_matches_the_slow_reference(image_folder):
    base = create_dataset('', root=image_folder, split='train')
    for seed in (0, 1):
        subset = create_dataset('', root=image_folder, split='train', class_subset=2, seed=seed)
        chosen = [dataset_class_names(base).index(n) for n in dataset_class_names(subset)]
        assert _items(subset) == _slow_reference(base, chosen)


def test_class_name_file_on_an_image_folder(image_folder, tmp_path):
    path = tmp_path / 'names.txt'
    path.write_text('eel\nbee\n', encoding='utf-8')
    subset = create_dataset('', root=image_folder, split='train', class_subset=str(path))
    assert dataset_class_names(subset) == ['bee', 'eel']
    assert [_folder_class_of(subset[i][0]) for i in range(len(subset))] == [1] * 4 + [4] * 3
    assert dataset_targets(subset) == [0] * 4 + [1] * 3


def test_conditions_on_a_torchvision_image_folder(image_folder):
    subset = create_dataset('torch/image_folder', root=image_folder, split='train', is_training=True,
                            class_subset=2, samples_per_class=3, seed=9)
    assert len(dataset_class_names(subset)) == 2
    for i in range(len(subset)):
        img, target = subset[i]
        assert dataset_class_names(subset)[target] == FOLDER_CLASSES[_folder_class_of(img)][0]
    assert Counter(dataset_targets(subset)) == {0: 3, 1: 3}


def test_conditions_on_a_timm_tar_dataset(image_folder, tmp_path):
    import tarfile
    path = tmp_path / 'train.tar'
    with tarfile.open(path, 'w') as tf:
        tf.add(os.path.join(image_folder, 'train'), arcname='.')
    subset = create_dataset('', root=str(path), split='train', is_training=True, class_subset=2,
                            samples_per_class=3, seed=5)
    assert len(dataset_class_names(subset)) == 2
    assert Counter(dataset_targets(subset)) == {0: 3, 1: 3}
    for i in range(len(subset)):
        img, target = subset[i]
        assert dataset_class_names(subset)[target] == FOLDER_CLASSES[_folder_class_of(img)][0]


@needs_source
def test_torchvision_fashion_mnist_gets_the_same_classes_as_the_embedded_subset(tmp_path):
    raw = tmp_path / 'FashionMNIST' / 'raw'
    os.makedirs(raw)
    for name in os.listdir(FASHION_MNIST_DIR):
        with gzip.open(os.path.join(FASHION_MNIST_DIR, name), 'rb') as src, open(raw / name[:-3], 'wb') as dst:
            dst.write(src.read())
    full = create_dataset('torch/fashion_mnist', root=str(tmp_path), split='validation', class_subset=3, seed=8)
    embedded = create_dataset(EMBEDDED_DATASET, split='validation', class_subset=3, seed=8)
    assert dataset_class_names(full) == dataset_class_names(embedded)
    assert Counter(dataset_targets(full)) == {0: 1000, 1: 1000, 2: 1000}  # targets read from a tensor
    img, target = full[len(full) - 1]
    assert img.mode == 'L' and target == full.targets[-1]


# ----------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize('k', [0, 1, -3])
def test_class_subset_below_two_raises(k):
    with pytest.raises(ValueError, match=rf'class_subset={k} is out of range.*>= 2'):
        create_dataset(EMBEDDED_DATASET, class_subset=k)


def test_class_subset_above_the_number_of_classes_raises():
    with pytest.raises(ValueError, match=r'class_subset=11 is out of range.*\[2, 10\]'):
        create_dataset(EMBEDDED_DATASET, class_subset=11)


@pytest.mark.parametrize('value', [True, 2.5, 'no/such/file.txt'])
def test_class_subset_of_the_wrong_kind_raises(value):
    with pytest.raises(ValueError, match='class_subset='):
        create_dataset(EMBEDDED_DATASET, class_subset=value)


@pytest.mark.parametrize('seed', [-1, 1.0, None])
def test_a_bad_seed_raises(seed):
    with pytest.raises(ValueError, match=rf'seed={seed!r} is invalid.*>= 0'):
        create_dataset(EMBEDDED_DATASET, class_subset=3, seed=seed)


def test_class_name_file_errors(tmp_path):
    unknown = tmp_path / 'unknown.txt'
    unknown.write_text('Trouser\nSocks\n', encoding='utf-8')
    with pytest.raises(ValueError, match=r"unknown classes \['Socks'\].*valid names include.*'T-shirt/top'"):
        create_dataset(EMBEDDED_DATASET, class_subset=str(unknown))
    single = tmp_path / 'single.txt'
    single.write_text('Trouser\n', encoding='utf-8')
    with pytest.raises(ValueError, match='names 1 class'):
        create_dataset(EMBEDDED_DATASET, class_subset=str(single))
    twice = tmp_path / 'twice.txt'
    twice.write_text('Bag\nBag\nCoat\n', encoding='utf-8')
    with pytest.raises(ValueError, match=r"more than once: \['Bag'\]"):
        create_dataset(EMBEDDED_DATASET, class_subset=str(twice))
    nameless = ListDataset([0, 1, 0, 1])  # labels but no class names
    with pytest.raises(ValueError, match='does not record class names'):
        apply_data_conditions(nameless, class_subset=str(twice))


@pytest.mark.parametrize('n', [0, -1, True, 1.5])
def test_samples_per_class_below_one_raises(n):
    with pytest.raises(ValueError, match=r'samples_per_class=.*>= 1'):
        create_dataset(EMBEDDED_DATASET, split='train', is_training=True, samples_per_class=n)


def test_samples_per_class_above_the_smallest_class_names_it(image_folder):
    with pytest.raises(ValueError, match=r"samples_per_class=501 .*class 0 \('T-shirt/top'\) has only 500 "
                                         r"images.*\[1, 500\]"):
        create_dataset(EMBEDDED_DATASET, split='train', is_training=True, samples_per_class=501)
    with pytest.raises(ValueError, match=r"samples_per_class=4 .*class 0 \('ant'\) has only 3 images"):
        create_dataset('', root=image_folder, split='train', is_training=True, samples_per_class=4)


def test_an_empty_class_raises(image_folder, tmp_path):
    class_map = tmp_path / 'map.txt'  # timm class map adding a class with no images
    class_map.write_text('ant\nbee\ncat\ndog\neel\nfox\n', encoding='utf-8')
    with pytest.raises(ValueError, match=r"Class 5 \('fox'\) has no images.*samples_per_class=1 needs images of every class"):
        create_dataset('', root=image_folder, split='train', is_training=True, samples_per_class=1,
                       class_map=str(class_map))
    names = tmp_path / 'names.txt'
    names.write_text('fox\nant\n', encoding='utf-8')
    with pytest.raises(ValueError, match=r"Class 5 \('fox'\) has no images"):
        create_dataset('', root=image_folder, split='train', class_subset=str(names), class_map=str(class_map))


def test_data_source_checks_name_the_keywords_and_through_names_the_flags(tmp_path):
    def message(*args, **kwargs):
        with pytest.raises(ValueError) as info:
            check_data_source(*args, **kwargs)
        return str(info.value)

    assert message('', None, ('train',)).startswith("name '' reads images from a local folder or tar, but no root "
                                                     "was given; expected root PATH")
    assert message('', None, ('train',), names=DATA_SOURCE_FLAGS).startswith(  # train.py's words
        "--dataset '' reads images from a local folder or tar, but no --data-dir was given; expected --data-dir PATH")
    missing = str(tmp_path / 'nowhere')
    assert message('', missing, ('train',)).startswith(f'root {missing!r}: no such file or folder')
    assert message('', missing, ('train',), names=DATA_SOURCE_FLAGS).startswith(f'--data-dir {missing!r}: no such')
    # ``flag`` (how the user named the root: train.py's DIR) still wins for that message.
    assert message('', missing, ('train',), 'DIR', names=DATA_SOURCE_FLAGS).startswith(f'DIR {missing!r}: no such')
    os.makedirs(tmp_path / 'root' / 'train' / 'empty')
    root = str(tmp_path / 'root')
    assert message('', root, ('train',)).startswith('root: class folder ')
    assert message('', root, ('train',), 'DIR', names=DATA_SOURCE_FLAGS).startswith('--data-dir: class folder ')


def test_datasets_whose_labels_need_decoding_are_rejected():
    class Opaque(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return i, i % 2

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    for dataset in (Opaque(), Stream()):
        with pytest.raises(ValueError, match='not supported for this dataset type'):
            apply_data_conditions(dataset, class_subset=2)
        with pytest.raises(ValueError, match='not supported for this dataset type'):
            dataset_targets(dataset)
    multi_label = ListDataset([[0, 1], [1]], classes=['a', 'b'])
    with pytest.raises(ValueError, match='non-integer label'):
        apply_data_conditions(multi_label, samples_per_class=1)


def test_dataset_targets_and_names_of_plain_and_subset_datasets():
    base = ListDataset([2, 0, 1, 2], classes=['x', 'y', 'z'])
    assert dataset_targets(base) == [2, 0, 1, 2] and dataset_class_names(base) == ['x', 'y', 'z']
    sub = torch.utils.data.Subset(base, [3, 1])
    assert dataset_targets(sub) == [2, 0] and dataset_class_names(sub) == ['x', 'y', 'z']
    assert dataset_class_names(ListDataset([0, 1])) is None
    view = ConditionedDataset(base, [0, 3], [1, 1], {2: 1}, ['y', 'x'])
    assert dataset_targets(view) == [1, 1] and dataset_class_names(view) == ['y', 'x']
    with pytest.raises(ValueError, match='same length'):
        ConditionedDataset(base, [0, 1], [0])
    with pytest.raises(ValueError, match='base=Subset has no transform'):
        apply_data_conditions(sub, class_subset=2)


def test_a_runs_evaluation_images_are_read_again_from_its_record():
    from timm_gsl.data import create_eval_dataset
    from timm_gsl.record import DataRecord
    record = DataRecord(dataset=EMBEDDED_DATASET, class_subset=4, seed=5, samples_per_class=3)
    again = create_eval_dataset(record)
    expected = create_dataset(EMBEDDED_DATASET, split='validation', class_subset=4, seed=5)
    assert dataset_class_names(again) == dataset_class_names(expected) and len(again) == len(expected)
    assert list(dataset_targets(again)) == list(dataset_targets(expected))
    # No dataset and no root: the embedded dataset; keyword arguments win over the record.
    other = create_eval_dataset(DataRecord(), class_subset=2, seed=1)
    assert dataset_class_names(other) == dataset_class_names(
        create_dataset(EMBEDDED_DATASET, split='validation', class_subset=2, seed=1))
