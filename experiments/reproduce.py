#!/usr/bin/env python3
"""Rerun the two studies of Table B.2 (number of classes, samples per class) on Fashion-MNIST.

The paper's studies use ImageNet subsets; this script reruns their design at a scale two CPU cores
can finish in a few hours: the real Fashion-MNIST (60k training / 10k test images, Debian's
``dataset-fashion-mnist``), a ResNet-18 at 28x28, and this project's own ``train.py`` for every run.

* Classes study: K classes (``--classes``, default 2 4 6 10) with N = ``--class-study-samples``
  training images each, softmax vs Type-I vs Type-II at G = 4.
* Samples study: all 10 classes with N images each (``--samples``, default 100 200 500 1000).
* Grouping ablation: Type-II at one condition (``--ablation-classes`` x ``--ablation-samples``),
  every G of ``--ablation-groups`` with every grouping (discriminative, random, contiguous).

Every loss gets the same recipe. The schedule follows Table B.1 scaled by ``--epoch-scale``: the paper
trains its 100 and 200 samples-per-class subsets 240 epochs, 500 samples per class 180, full classes
120, with the learning rate divided by 10 at fixed fractions; the row is picked by samples per class.

Each run writes one JSON under ``OUTPUT/results/`` (its settings, top-1 per evaluated epoch, final and
best top-1, wall time); a run whose JSON exists is skipped, so the study can be finished over several
sittings. After the runs, ``OUTPUT/table.md`` (mean ± std of top-1 error over seeds) and the plots
``error_vs_classes.png`` and ``error_vs_samples.png`` are rebuilt from every JSON present.

Examples:
    python -m experiments.reproduce --output results --plan     # list the runs and the time estimate
    python -m experiments.reproduce --output results            # the full study (resumable)
    python -m experiments.reproduce --output results/quick --quick   # a smoke run of a few minutes
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
                       't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
FASHION_MNIST_TEST_PER_CLASS = 1000

# Loss name in the tables -> train.py flags.
LOSSES: Dict[str, Tuple[str, ...]] = {
    'softmax': ('--loss', 'ce'),
    'Type-I': ('--loss', 'gsl', '--gsl-type', 'I'),
    'Type-II': ('--loss', 'gsl', '--gsl-type', 'II'),
}
GROUPINGS: Tuple[str, ...] = ('discriminative', 'random', 'contiguous')

# Table B.1's three schedules of the ImageNet subsets, (epochs, lr milestones), by samples per class:
# 100 and 200 per class, 500 per class, all (about 1,281) per class.
PAPER_SCHEDULES: Tuple[Tuple[int, int, Tuple[int, ...]], ...] = (
    (200, 240, (90, 180, 210)),
    (500, 180, (60, 120, 150)),
    (math.inf, 120, (30, 60, 90)),
)

# Table B.2 of the paper (top-1 error %, ImageNet subsets), quoted under the measured tables.
PAPER_TABLE_B2: Dict[str, Dict[str, Dict[str, float]]] = {
    'classes': {'softmax': {'100': 15.4, '200': 18.1, '500': 20.2, '1000': 23.5},
                'Type-I': {'100': 14.6, '200': 16.3, '500': 19.0, '1000': 23.3},
                'Type-II': {'100': 13.0, '200': 15.6, '500': 19.1, '1000': 24.1}},
    'samples': {'softmax': {'100': 49.3, '200': 40.3, '500': 30.2, 'all': 23.5},
                'Type-I': {'100': 47.6, '200': 38.0, '500': 28.8, 'all': 23.3},
                'Type-II': {'100': 46.8, '200': 38.0, '500': 29.3, 'all': 24.1}},
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What every run shares: model, input, optimiser, augmentation, schedule scale.

    Args:
        model: timm architecture.
        batch_size: training batch size; the learning rate is ``lr_base`` scaled linearly from batch 256.
        lr_base: learning rate at batch 256 (the paper's 0.1).
        epoch_scale: the paper's epochs and milestones are multiplied by this and rounded.
        weight_decay, momentum: SGD settings (the paper's).
    """
    model: str = 'resnet18'
    batch_size: int = 64
    lr_base: float = 0.1
    epoch_scale: float = 2 / 15
    weight_decay: float = 1e-4
    momentum: float = 0.9
    evals_per_run: int = 4

    def __post_init__(self) -> None:
        for name in ('batch_size', 'evals_per_run'):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f'{name}={getattr(self, name)!r} is invalid, expected an integer >= 1.')
        for name in ('lr_base', 'epoch_scale'):
            if not getattr(self, name) > 0:
                raise ValueError(f'{name}={getattr(self, name)!r} is invalid, expected a number > 0.')


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run: a loss at a data condition with one seed.

    Args:
        loss: a key of :data:`LOSSES`.
        classes: number of Fashion-MNIST classes K (drawn with the seed).
        samples_per_class: training images per class N (drawn with the seed).
        seed: seed of the class draw, the image draw and training.
        epochs: training epochs.
        milestones: epochs at which the learning rate is divided by 10.
        groups: G of the group softmax loss (1 for softmax, where it does not apply).
        grouping: feature grouping of the group softmax loss ('' for softmax).
    """
    loss: str
    classes: int
    samples_per_class: int
    seed: int
    epochs: int
    milestones: Tuple[int, ...]
    groups: int = 4
    grouping: str = 'discriminative'

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f'loss={self.loss!r} is unknown, expected one of {tuple(LOSSES)}.')
        if not 2 <= self.classes <= 10:
            raise ValueError(f'classes={self.classes!r} is invalid, expected an integer in [2, 10].')
        if not 1 <= self.samples_per_class <= 6000:
            raise ValueError(f'samples_per_class={self.samples_per_class!r} is invalid, expected an integer '
                             f'in [1, 6000] (Fashion-MNIST has 6000 training images per class).')
        if self.grouping not in GROUPINGS + ('',):
            raise ValueError(f'grouping={self.grouping!r} is unknown, expected one of {GROUPINGS}.')
        if self.loss == 'softmax' and (self.groups, self.grouping) != (1, ''):
            raise ValueError(f'softmax runs take groups=1 and grouping=\'\', got {self.groups!r} and '
                             f'{self.grouping!r}.')

    @property
    def run_id(self) -> str:
        """File-name-safe identifier of the run, unique over every field that changes its result."""
        loss = self.loss.lower().replace('-', '')
        group = '' if self.loss == 'softmax' else f'-g{self.groups}-{self.grouping}'
        return f'{loss}{group}-k{self.classes}-n{self.samples_per_class}-e{self.epochs}-s{self.seed}'

    @property
    def train_images(self) -> int:
        """Training images per epoch."""
        return self.classes * self.samples_per_class

    def condition(self) -> Tuple[Any, ...]:
        """The run without its seed: runs of one condition are averaged together."""
        return (self.loss, self.classes, self.samples_per_class, self.groups, self.grouping, self.epochs)


def schedule_for(samples_per_class: int, epoch_scale: float) -> Tuple[int, Tuple[int, ...]]:
    """Epochs and learning-rate milestones for a samples-per-class condition: Table B.1, scaled.

    Args:
        samples_per_class: training images per class.
        epoch_scale: multiplies the paper's epochs and milestones (rounded, at least 1 epoch).

    Returns:
        ``(epochs, milestones)``; milestones are strictly increasing and below ``epochs``.
    """
    if not epoch_scale > 0:
        raise ValueError(f'epoch_scale={epoch_scale!r} is invalid, expected a number > 0.')
    for up_to, epochs, milestones in PAPER_SCHEDULES:
        if samples_per_class <= up_to:
            break
    scaled_epochs = max(1, round(epochs * epoch_scale))
    scaled = []
    for m in milestones:
        m = round(m * epoch_scale)
        if 0 < m < scaled_epochs and (not scaled or m > scaled[-1]):
            scaled.append(m)
    return scaled_epochs, tuple(scaled)


@dataclasses.dataclass(frozen=True)
class StudyDesign:
    """Which conditions the study runs.

    Args:
        classes: K of the classes study.
        class_study_samples: N of the classes study.
        samples: N of the samples study.
        samples_study_classes: K of the samples study.
        ablation_classes, ablation_samples: the condition of the grouping ablation (Type-II).
        ablation_groups: the G values of the ablation; every grouping is run at each.
        seeds: seeds of every condition.
    """
    classes: Tuple[int, ...] = (2, 4, 6, 10)
    class_study_samples: int = 500
    samples: Tuple[int, ...] = (100, 200, 500, 1000)
    samples_study_classes: int = 10
    ablation_classes: int = 10
    ablation_samples: int = 100
    ablation_groups: Tuple[int, ...] = (2, 4, 8)
    seeds: Tuple[int, ...] = (0, 1, 2)


QUICK_DESIGN = StudyDesign(classes=(2, 4), class_study_samples=50, samples=(20, 50), samples_study_classes=4,
                           ablation_classes=4, ablation_samples=20, ablation_groups=(2, 8), seeds=(0,))
QUICK_RECIPE = Recipe(epoch_scale=1 / 30, batch_size=32, evals_per_run=2)


def _loss_spec(loss: str, classes: int, samples: int, seed: int, recipe: Recipe, groups: int = 4,
               grouping: str = 'discriminative') -> RunSpec:
    epochs, milestones = schedule_for(samples, recipe.epoch_scale)
    if loss == 'softmax':
        groups, grouping = 1, ''
    return RunSpec(loss, classes, samples, seed, epochs, milestones, groups, grouping)


def plan_runs(design: StudyDesign, recipe: Recipe) -> List[RunSpec]:
    """Every run of the study, each once (a condition shared by two studies is run once).

    Args:
        design: the conditions.
        recipe: the shared recipe (it sets the epochs of each condition).

    Returns:
        The runs, in the order they should be trained: seed-major, so that a study stopped early has
        every condition at the first seeds.
    """
    conditions: List[Tuple[str, int, int, int, str]] = []
    for k in design.classes:
        conditions += [(loss, k, design.class_study_samples, 4, 'discriminative') for loss in LOSSES]
    for n in design.samples:
        conditions += [(loss, design.samples_study_classes, n, 4, 'discriminative') for loss in LOSSES]
    for g in design.ablation_groups:
        conditions += [('Type-II', design.ablation_classes, design.ablation_samples, g, grouping)
                       for grouping in GROUPINGS]
    runs: List[RunSpec] = []
    for seed in design.seeds:
        for loss, k, n, g, grouping in conditions:
            spec = _loss_spec(loss, k, n, seed, recipe, g, grouping)
            if spec not in runs:
                runs.append(spec)
    return runs


def estimate_seconds(runs: Iterable[RunSpec], recipe: Recipe, train_images_per_s: float = 550.,
                     eval_images_per_s: float = 1600., overhead_s: float = 8.) -> float:
    """Rough wall time of ``runs``: images trained and evaluated over throughput, plus start-up per run.

    Args:
        runs: the runs.
        recipe: the recipe (evaluations per run).
        train_images_per_s, eval_images_per_s: measured throughputs of the model on this machine.
        overhead_s: per-run start-up (interpreter, imports, dataset).

    Returns:
        Seconds.
    """
    total = 0.
    for run in runs:
        evals = len(evaluation_epochs(run.epochs, recipe.evals_per_run))
        total += run.train_images * run.epochs / train_images_per_s
        total += evals * run.classes * FASHION_MNIST_TEST_PER_CLASS / eval_images_per_s + overhead_s
    return total


def evaluation_epochs(epochs: int, evals_per_run: int) -> List[int]:
    """The 1-based epochs after which train.py evaluates with ``--val-interval`` set for ``evals_per_run``."""
    interval = max(1, epochs // evals_per_run)
    return sorted({e for e in range(interval, epochs + 1, interval)} | {epochs})


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def prepare_fashion_mnist(source: str, cache: str) -> str:
    """Lay the Debian IDX files out as torchvision's ``FashionMNIST`` expects them (``cache/FashionMNIST/raw``).

    Args:
        source: folder of the four ``*-ubyte.gz`` files.
        cache: folder to write into (created); files already there are kept.

    Returns:
        ``cache``: the ``--data-dir`` for ``--dataset torch/fashion_mnist``.
    """
    raw = os.path.join(cache, 'FashionMNIST', 'raw')
    os.makedirs(raw, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        target = os.path.join(raw, name)
        if os.path.exists(target):
            continue
        packed = os.path.join(source, name + '.gz')
        if not os.path.exists(packed):
            raise ValueError(f'--fashion-mnist-dir {source!r} has no {name}.gz; expected the four IDX files of '
                             f'Debian\'s dataset-fashion-mnist ({", ".join(f + ".gz" for f in FASHION_MNIST_FILES)}).')
        with gzip.open(packed, 'rb') as f:
            data = f.read()
        _write_atomic(target, data)
    return cache


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

def train_argv(spec: RunSpec, recipe: Recipe, data_dir: str, work_dir: str) -> List[str]:
    """The train.py command line of a run.

    Args:
        spec: the run.
        recipe: the shared recipe.
        data_dir: from :func:`prepare_fashion_mnist`.
        work_dir: train.py's ``--output`` (its checkpoints go to ``work_dir/<run_id>``).

    Returns:
        The arguments (without the program name).
    """
    interval = max(1, spec.epochs // recipe.evals_per_run)
    argv = [
        '--dataset', 'torch/fashion_mnist', '--data-dir', data_dir, '--train-split', 'train',
        '--val-split', 'validation', '--class-subset', str(spec.classes),
        '--samples-per-class', str(spec.samples_per_class), '--seed', str(spec.seed),
        '--model', recipe.model, '--in-chans', '1', '--img-size', '28', '--mean', '0.286', '--std', '0.353',
        '--crop-pct', '1.0', '--interpolation', 'bilinear', '--train-interpolation', 'bilinear',
        # The ResNet recipe's crop and flip, scaled to 28x28 images: a mild random-resized crop.
        '--scale', '0.8', '1.0', '--hflip', '0.5', '--color-jitter', '0', '--reprob', '0', '--smoothing', '0',
        '--opt', 'sgd', '--momentum', str(recipe.momentum), '--weight-decay', str(recipe.weight_decay),
        '--lr-base', str(recipe.lr_base), '--lr-base-size', '256', '--lr-base-scale', 'linear',
        '-b', str(recipe.batch_size), '-vb', '500',
        '--sched', 'multistep', '--decay-rate', '0.1', '--warmup-epochs', '0', '--epochs', str(spec.epochs),
        '--val-interval', str(interval), '-j', '0', '--device', 'cpu', '--checkpoint-hist', '1',
        '--log-interval', '1000', '--output', work_dir, '--experiment', spec.run_id,
    ]
    if spec.milestones:
        argv += ['--decay-milestones', *map(str, spec.milestones)]
    else:
        # No decay inside a very short run: a milestone past the end.
        argv += ['--decay-milestones', str(spec.epochs + 1)]
    argv += list(LOSSES[spec.loss])
    if spec.loss != 'softmax':
        argv += ['--gsl-groups', str(spec.groups), '--gsl-grouping', spec.grouping]
    return argv


def result_path(output: str, spec: RunSpec) -> str:
    """Where the JSON of a run lives."""
    return os.path.join(output, 'results', spec.run_id + '.json')


def pending_runs(runs: Sequence[RunSpec], output: str) -> List[RunSpec]:
    """The runs whose JSON is not under ``output/results`` yet (JSONs are written whole, so one present is done)."""
    return [spec for spec in runs if not os.path.exists(result_path(output, spec))]


_TRAIN_SNIPPET = 'import sys\nfrom timm_gsl.cli.train import main\nmain(sys.argv[1:])\n'


def train_in_subprocess(run_id: str, argv_for: Callable[[str], List[str]], output: str,
                        threads: Optional[int] = None,
                        inspect: Optional[Callable[[str], None]] = None,
                        ) -> Tuple[List[Dict[str, Optional[float]]], float, List[str]]:
    """Run this checkout's train.py in a fresh interpreter, in a scratch folder removed afterwards.

    Args:
        run_id: train.py's ``--experiment`` (its outputs go to ``<scratch>/<run_id>``).
        argv_for: the train.py arguments, given the scratch folder to pass as ``--output``.
        output: the study's folder; the scratch folder is made under ``output/.scratch``.
        threads: OMP/MKL threads of the run (default: inherited).
        inspect: called with the run's output folder (checkpoints included) after train.py succeeded and
            before the folder is removed, e.g. to compute logits of the final model.

    Returns:
        (the run's summary.csv rows, wall seconds, the arguments with the scratch folder written '<scratch>').

    Raises:
        RuntimeError: train.py failed or wrote no evaluation; the message ends with the tail of its log.
    """
    scratch = os.path.join(output, '.scratch')
    os.makedirs(scratch, exist_ok=True)
    work = tempfile.mkdtemp(prefix=run_id + '-', dir=scratch)
    argv = argv_for(work)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get('PYTHONPATH')])))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started = time.time()
    try:
        proc = subprocess.run([sys.executable, '-c', _TRAIN_SNIPPET, *argv], env=env, cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall_s = time.time() - started
        if proc.returncode != 0:
            raise RuntimeError(f'train.py failed for {run_id} (exit {proc.returncode}):\n' + proc.stdout[-3000:])
        from timm_gsl.engine import read_summary  # the package's own reader of summary.csv
        history = read_summary(os.path.join(work, run_id, 'summary.csv'))
        if inspect is not None and any(row.get('eval_top1') is not None for row in history):
            inspect(os.path.join(work, run_id))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not any(row.get('eval_top1') is not None for row in history):
        raise RuntimeError(f'train.py wrote no evaluation for {run_id}:\n' + proc.stdout[-3000:])
    return history, wall_s, [a if a != work else '<scratch>' for a in argv]


def run_one(spec: RunSpec, recipe: Recipe, output: str, data_dir: str, threads: Optional[int] = None) -> Dict[str, Any]:
    """Train one run with train.py in a fresh interpreter and write its JSON.

    The run's train.py outputs (checkpoints) go to ``output/.scratch``, removed afterwards; its per-epoch
    summary is kept in the JSON.

    Args:
        spec: the run.
        recipe: the shared recipe.
        output: the study's folder (the JSON goes to ``output/results``).
        data_dir: from :func:`prepare_fashion_mnist`.
        threads: torch threads of the run (default: torch's).

    Returns:
        The run's record (what the JSON holds).

    Raises:
        RuntimeError: train.py failed; the message ends with the tail of its log.
    """
    history, wall_s, argv = train_in_subprocess(
        spec.run_id, lambda work: train_argv(spec, recipe, data_dir, work), output, threads)
    evaluated = [row for row in history if row.get('eval_top1') is not None]
    record = dict(
        run_id=spec.run_id, spec=dataclasses.asdict(spec), recipe=dataclasses.asdict(recipe),
        final_top1=evaluated[-1]['eval_top1'], best_top1=max(row['eval_top1'] for row in evaluated),
        epochs=len(history), train_images=spec.train_images, wall_s=round(wall_s, 2),
        train_argv=['train.py', *argv], history=history,
        versions=_versions(), host=dict(machine=platform.machine(), cpus=os.cpu_count()),
        finished=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    )
    write_json(result_path(output, spec), record)
    return record


def _versions() -> Dict[str, str]:
    import timm
    import torch
    return dict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__)


def _write_atomic(path: str, data: bytes) -> None:
    """The package's atomic writer, imported when first used (it loads torch, which this process avoids)."""
    from timm_gsl.engine.atomic import write_bytes_atomic
    write_bytes_atomic(path, data)


def write_json(path: str, record: Dict[str, Any]) -> None:
    """Write ``record`` as indented JSON, to a temporary name renamed into place."""
    _write_atomic(path, (json.dumps(record, indent=1, sort_keys=True) + '\n').encode())


def load_results(output: str) -> List[Dict[str, Any]]:
    """Every run JSON under ``output/results``, in file-name order."""
    folder = os.path.join(output, 'results')
    if not os.path.isdir(folder):
        return []
    records = []
    for name in sorted(os.listdir(folder)):
        if name.endswith('.json') and not name.startswith('.'):
            with open(os.path.join(folder, name)) as f:
                records.append(json.load(f))
    return records


# ----------------------------------------------------------------------------------------------
# Aggregation, table, plots
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Cell:
    """Top-1 error (%) of one condition over its seeds.

    Args:
        mean: mean error.
        std: sample standard deviation (n - 1 in the denominator); None with one seed.
        n: number of seeds.
        wall_s: summed wall time of its runs.
    """
    mean: float
    std: Optional[float]
    n: int
    wall_s: float

    def __str__(self) -> str:
        if self.std is None:
            return f'{self.mean:.2f} (n=1)'
        return f'{self.mean:.2f} ± {self.std:.2f}'


def _check_metric(metric: str) -> None:
    if metric not in ('final_top1', 'best_top1'):
        raise ValueError(f"metric={metric!r} is unknown, expected 'final_top1' or 'best_top1'.")


def _mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(records: Sequence[Dict[str, Any]], metric: str = 'final_top1') -> Dict[Tuple[Any, ...], Cell]:
    """Mean ± std of the top-1 error of every condition (the runs that differ only by seed).

    Args:
        records: run records (as :func:`load_results` returns).
        metric: 'final_top1' (last epoch) or 'best_top1'.

    Returns:
        ``{RunSpec.condition(): Cell}``.
    """
    _check_metric(metric)
    groups: Dict[Tuple[Any, ...], List[Dict[str, Any]]] = {}
    for record in records:
        spec = _spec_of(record)
        groups.setdefault(spec.condition(), []).append(record)
    cells = {}
    for condition, members in groups.items():
        mean, std = _mean_std([100. - r[metric] for r in members])
        cells[condition] = Cell(mean, std, len(members), sum(r['wall_s'] for r in members))
    return cells


@dataclasses.dataclass(frozen=True)
class Difference:
    """Top-1 error of one condition minus another's, paired by seed (same classes, images and init seed).

    Args:
        mean: mean of the per-seed differences (percentage points; negative: the first condition is better).
        std: their sample standard deviation; None with one seed.
        n: number of seeds both conditions have.
        better: seeds where the first condition has the lower error.
    """
    mean: float
    std: Optional[float]
    n: int
    better: int

    def __str__(self) -> str:
        spread = ' (n=1)' if self.std is None else f' ± {self.std:.2f}'
        return f'{self.mean:+.2f}{spread}, better in {self.better}/{self.n}'


def paired_difference(records: Sequence[Dict[str, Any]], condition: Tuple[Any, ...], baseline: Tuple[Any, ...],
                      metric: str = 'final_top1') -> Optional[Difference]:
    """Error of ``condition`` minus error of ``baseline`` over the seeds both have run.

    Pairing by seed removes what the seed shares between the two runs (the drawn classes and images, the
    initial weights), which an unpaired comparison of two means leaves in.

    Args:
        records: run records.
        condition, baseline: :meth:`RunSpec.condition` tuples.
        metric: 'final_top1' or 'best_top1'.

    Returns:
        The difference, or None when no seed has both runs.
    """
    _check_metric(metric)
    errors: Dict[Tuple[Any, ...], Dict[int, float]] = {condition: {}, baseline: {}}
    for record in records:
        spec = _spec_of(record)
        if spec.condition() in errors:
            errors[spec.condition()][spec.seed] = 100. - record[metric]
    seeds = sorted(set(errors[condition]) & set(errors[baseline]))
    if not seeds:
        return None
    diffs = [errors[condition][s] - errors[baseline][s] for s in seeds]
    mean, std = _mean_std(diffs)
    return Difference(mean, std, len(diffs), sum(d < 0 for d in diffs))


def last_losses(record: Dict[str, Any]) -> Optional[Tuple[float, float]]:
    """(training softmax loss of the last epoch, test loss of the last evaluation) of a run, if recorded.

    The training value is the plain softmax cross-entropy of the training batches (augmented, train-mode
    batch norm) whatever loss was optimised, so the two losses are comparable: a small gap between them
    means the run is limited by how well it fits the training images, not by over-fitting them.
    """
    history = record.get('history') or []
    train = [row.get('train_softmax_loss') for row in history if row.get('train_softmax_loss') is not None]
    test = [row.get('eval_loss') for row in history if row.get('eval_loss') is not None]
    if not train or not test:
        return None
    return float(train[-1]), float(test[-1])


def _spec_of(record: Dict[str, Any]) -> RunSpec:
    fields = dict(record['spec'])
    fields['milestones'] = tuple(fields['milestones'])
    return RunSpec(**fields)


def _study_columns(design: StudyDesign, study: str) -> List[Tuple[int, int, int]]:
    """(column value, classes, samples per class) of every column of the 'classes' or 'samples' study."""
    if study == 'classes':
        return [(k, k, design.class_study_samples) for k in design.classes]
    return [(n, design.samples_study_classes, n) for n in design.samples]


def _study_series(cells: Dict[Tuple[Any, ...], Cell], design: StudyDesign, recipe: Recipe, study: str
                  ) -> Tuple[List[int], Dict[str, List[Optional[Cell]]]]:
    columns = _study_columns(design, study)
    series = {loss: [cells.get(_loss_spec(loss, k, n, 0, recipe).condition()) for _, k, n in columns]
              for loss in LOSSES}
    return [x for x, _, _ in columns], series


def _markdown_table(corner: str, header: Sequence[Any], rows: Iterable[Tuple[Any, Sequence[Any]]]) -> List[str]:
    """Lines of a Markdown table; a cell that is None (or empty) reads "not yet run"."""
    lines = [f'| {corner} | ' + ' | '.join(str(h) for h in header) + ' |', '|---|' + '---|' * len(header)]
    for label, cells in rows:
        lines.append(f'| {label} | ' + ' | '.join(str(c) if c else 'not yet run' for c in cells) + ' |')
    return lines


def format_table(records: Sequence[Dict[str, Any]], design: StudyDesign, recipe: Recipe) -> str:
    """The Markdown report of the runs present: both studies and the ablation, mean ± std of top-1 error.

    Args:
        records: run records.
        design, recipe: the study (they say which conditions belong to which table).

    Returns:
        Markdown text; a condition with no run yet shows "not yet run".
    """
    cells = aggregate(records)
    studies = (('classes', 'classes', f'Number of classes ({design.class_study_samples} training images per class)'),
               ('samples', 'per class', f'Samples per class ({design.samples_study_classes} classes)'))

    def condition(loss: str, k: int, n: int, g: int = 4, grouping: str = 'discriminative') -> Tuple[Any, ...]:
        return _loss_spec(loss, k, n, 0, recipe, g, grouping).condition()

    def ablation(g: int, grouping: str) -> Tuple[Any, ...]:
        return condition('Type-II', design.ablation_classes, design.ablation_samples, g, grouping)

    lines = ['# Fashion-MNIST rerun of Table B.2: top-1 error (%), mean ± std over seeds', '',
             f'Model {recipe.model} at 28x28, batch {recipe.batch_size}, SGD lr {recipe.lr_base} x batch/256, '
             f'epochs = Table B.1 x {recipe.epoch_scale:.4g}; G = 4, discriminative grouping unless stated. '
             f'Error of the last epoch on the Fashion-MNIST test images of the kept classes.', '']
    for study, unit, title in studies:
        xs, series = _study_series(cells, design, recipe, study)
        lines += [f'## {title}', '', *_markdown_table('loss', [f'{x} {unit}' for x in xs], series.items())]
        paper = PAPER_TABLE_B2[study]
        columns = list(paper['softmax'])
        lines += ['', 'The paper (Table B.2, ImageNet subsets, top-1 error %): '
                  + '; '.join(f'{loss} ' + ' / '.join(f'{paper[loss][c]:.1f}' for c in columns) for loss in paper)
                  + f' at {" / ".join(columns)} {unit}.', '']
    lines += [f'## Grouping ablation (Type-II, {design.ablation_classes} classes, {design.ablation_samples} '
              f'per class)', '',
              *_markdown_table('G', GROUPINGS, ((g, [cells.get(ablation(g, grouping)) for grouping in GROUPINGS])
                                                for g in design.ablation_groups))]
    lines += ['', '## Differences, paired by seed', '',
              'Error minus the baseline\'s error on the same seed (same classes, images and initial weights), in '
              'percentage points: mean ± std over seeds; negative means lower error than the baseline; "better in '
              'k/n" counts the seeds where it is lower.', '']
    for study, unit, _ in studies:
        columns = _study_columns(design, study)
        rows = ((f'{loss} vs {baseline}', [paired_difference(records, condition(loss, k, n), condition(baseline, k, n))
                                           for _, k, n in columns])
                for loss, baseline in (('Type-I', 'softmax'), ('Type-II', 'softmax'), ('Type-II', 'Type-I')))
        lines += [f'Between losses, {"number of classes" if study == "classes" else "samples per class"}:', '',
                  *_markdown_table('loss vs baseline', [f'{x} {unit}' for x, _, _ in columns], rows), '']
    lines += ['Ablation, against discriminative grouping at the same G:', '',
              *_markdown_table('G', GROUPINGS[1:], (
                  (g, [paired_difference(records, ablation(g, grouping), ablation(g, GROUPINGS[0]))
                       for grouping in GROUPINGS[1:]]) for g in design.ablation_groups))]
    softmax = condition('softmax', design.ablation_classes, design.ablation_samples)
    lines += ['', f'Ablation, against softmax on the same data ({design.ablation_classes} classes, '
              f'{design.ablation_samples} per class):', '',
              *_markdown_table('G', GROUPINGS, (
                  (g, [paired_difference(records, ablation(g, grouping), softmax) for grouping in GROUPINGS])
                  for g in design.ablation_groups))]
    lines += ['', '## Fit: training against test loss', '',
              'Last-epoch softmax cross-entropy on the training batches / last test loss, mean over seeds. '
              'Whatever loss a run optimised, both numbers are the plain softmax loss of its classifier; a '
              'regulariser is expected to help where the test loss is well above the training loss, and to cost '
              'accuracy where the two are close (the run under-fits).', '']
    fits: Dict[Tuple[Any, ...], List[Tuple[float, float]]] = {}
    for record in records:
        pair = last_losses(record)
        if pair is not None:
            fits.setdefault(_spec_of(record).condition(), []).append(pair)

    def fit(pairs: Optional[List[Tuple[float, float]]]) -> Optional[str]:
        if not pairs:
            return None
        return f'{sum(p[0] for p in pairs) / len(pairs):.3f} / {sum(p[1] for p in pairs) / len(pairs):.3f}'

    for study, unit, _ in studies:
        columns = _study_columns(design, study)
        rows = ((loss, [fit(fits.get(condition(loss, k, n))) for _, k, n in columns]) for loss in LOSSES)
        lines += [f'{"Number of classes" if study == "classes" else "Samples per class"}:', '',
                  *_markdown_table('loss', [f'{x} {unit}' for x, _, _ in columns], rows), '']
    wall = sum(r['wall_s'] for r in records)
    lines += [f'{len(records)} runs, {wall / 3600:.2f} h of wall time in all.', '']
    return '\n'.join(lines)


def plot_study(records: Sequence[Dict[str, Any]], design: StudyDesign, recipe: Recipe, study: str,
               path: str) -> None:
    """Plot top-1 error against classes or samples per class, one line per loss (error bars: std).

    Args:
        records: run records.
        design, recipe: the study.
        study: 'classes' or 'samples'.
        path: PNG file, written to a temporary name and renamed.
    """
    if study not in ('classes', 'samples'):
        raise ValueError(f"study={study!r} is unknown, expected 'classes' or 'samples'.")
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    xs, series = _study_series(aggregate(records), design, recipe, study)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for loss, row in series.items():
        points = [(x, c) for x, c in zip(xs, row) if c is not None]
        if points:
            ax.errorbar([x for x, _ in points], [c.mean for _, c in points],
                        yerr=[c.std or 0. for _, c in points], marker='o', capsize=3, label=loss)
    if study == 'classes':
        ax.set_xlabel(f'classes ({design.class_study_samples} training images each)')
    else:
        ax.set_xlabel(f'training images per class ({design.samples_study_classes} classes)')
        ax.set_xscale('log')
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_ylabel('top-1 error (%)')
    ax.set_title(f'Fashion-MNIST, {recipe.model}')
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    try:
        from timm_gsl.engine.atomic import atomic_path
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format='png')
    finally:
        plt.close(fig)


def write_report(output: str, design: StudyDesign, recipe: Recipe) -> List[Dict[str, Any]]:
    """Rebuild ``table.md`` and both plots under ``output`` from every run JSON present.

    Returns:
        The records the report was built from.
    """
    records = load_results(output)
    _write_atomic(os.path.join(output, 'table.md'), format_table(records, design, recipe).encode())
    plot_study(records, design, recipe, 'classes', os.path.join(output, 'error_vs_classes.png'))
    plot_study(records, design, recipe, 'samples', os.path.join(output, 'error_vs_samples.png'))
    return records


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    """The parser of ``experiments/reproduce.py``."""
    d, r = StudyDesign(), Recipe()
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--output', required=True, metavar='DIR',
                        help='study folder: results/*.json, table.md and the plots go here')
    parser.add_argument('--quick', action='store_true',
                        help='a smoke run of a few minutes (tiny conditions, one seed, few epochs)')
    parser.add_argument('--plan', action='store_true',
                        help='list the pending runs and the time estimate; train nothing')
    parser.add_argument('--report-only', action='store_true', help='rebuild table and plots from the JSONs present')
    parser.add_argument('--max-runs', type=int, default=None, metavar='N', help='stop after N new runs')
    parser.add_argument('--fashion-mnist-dir', default=FASHION_MNIST_DIR, metavar='DIR',
                        help=f'the Debian IDX files (default: {FASHION_MNIST_DIR})')
    parser.add_argument('--data-cache', default=os.path.join(tempfile.gettempdir(), 'timm-gsl-fashion-mnist'),
                        metavar='DIR', help='where the unpacked IDX files are kept (default: %(default)s)')
    parser.add_argument('--classes', type=int, nargs='+', default=list(d.classes))
    parser.add_argument('--class-study-samples', type=int, default=d.class_study_samples)
    parser.add_argument('--samples', type=int, nargs='+', default=list(d.samples))
    parser.add_argument('--samples-study-classes', type=int, default=d.samples_study_classes)
    parser.add_argument('--ablation-classes', type=int, default=d.ablation_classes)
    parser.add_argument('--ablation-samples', type=int, default=d.ablation_samples)
    parser.add_argument('--ablation-groups', type=int, nargs='+', default=list(d.ablation_groups))
    parser.add_argument('--seeds', type=int, nargs='+', default=list(d.seeds))
    parser.add_argument('--model', default=r.model)
    parser.add_argument('-b', '--batch-size', type=int, default=r.batch_size)
    parser.add_argument('--epoch-scale', type=float, default=r.epoch_scale,
                        help='multiplies Table B.1\'s epochs and milestones (default: 2/15: 240 -> 32 epochs)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads per run (default: torch\'s)')
    parser.add_argument('--train-images-per-s', type=float, default=550.,
                        help='training throughput assumed by the estimate (default: 550)')
    return parser


def _design_and_recipe(args: argparse.Namespace) -> Tuple[StudyDesign, Recipe]:
    if args.quick:
        return QUICK_DESIGN, dataclasses.replace(QUICK_RECIPE, model=args.model)
    design = StudyDesign(tuple(args.classes), args.class_study_samples, tuple(args.samples),
                         args.samples_study_classes, args.ablation_classes, args.ablation_samples,
                         tuple(args.ablation_groups), tuple(args.seeds))
    return design, Recipe(model=args.model, batch_size=args.batch_size, epoch_scale=args.epoch_scale)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Plan, run what is pending, and rebuild the report.

    Returns:
        0, or 1 when a run failed (the others still run; the failed one has no JSON and reruns next time).
    """
    args = get_args_parser().parse_args(argv)
    design, recipe = _design_and_recipe(args)
    runs = plan_runs(design, recipe)
    todo = pending_runs(runs, args.output)
    estimate = estimate_seconds(todo, recipe, args.train_images_per_s)
    print(f'{len(runs)} runs planned, {len(runs) - len(todo)} done, {len(todo)} to go: about '
          f'{estimate / 3600:.2f} h at {args.train_images_per_s:g} training images/s.', flush=True)
    if args.plan:
        for spec in todo:
            print(f'  {spec.run_id}: {spec.train_images} images x {spec.epochs} epochs, '
                  f'milestones {list(spec.milestones)}')
        return 0
    failed = 0
    if not args.report_only:
        if args.max_runs is not None:
            todo = todo[:args.max_runs]
        data_dir = prepare_fashion_mnist(args.fashion_mnist_dir, args.data_cache)
        # A sitting killed mid-run leaves that run's checkpoints behind; one sitting per folder at a time.
        shutil.rmtree(os.path.join(args.output, '.scratch'), ignore_errors=True)
        for i, spec in enumerate(todo, 1):
            try:
                record = run_one(spec, recipe, args.output, data_dir, args.threads)
            except RuntimeError as e:
                failed += 1
                print(f'[{i}/{len(todo)}] FAILED {e}', file=sys.stderr, flush=True)
                continue
            print(f'[{i}/{len(todo)}] {spec.run_id}: top-1 {record["final_top1"]:.2f} '
                  f'(best {record["best_top1"]:.2f}), {record["wall_s"]:.0f} s', flush=True)
            write_report(args.output, design, recipe)
    records = write_report(args.output, design, recipe)
    print(f'Report: {os.path.join(args.output, "table.md")} ({len(records)} runs).')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
