#!/usr/bin/env python3
"""Over-fitting study: does the group softmax loss help where plain softmax over-fits?

``experiments/reproduce.py`` ran too few SGD steps for any run to over-fit, so it could not judge a
regulariser. This study trains long enough that softmax over-fits 1,000 Fashion-MNIST images, checks
that with a gate, and runs a comparison fixed in advance (pre-registered below; do not change it after
seeing results). Every run is this checkout's ``train.py`` (ResNet-18 at 28x28, SGD momentum 0.9,
weight decay 1e-4, batch 64, learning rate ``lr_base`` x 64/256) in a fresh interpreter.

Recipes:

* A (the paper's Table B.1, unscaled): multistep schedule, lr_base 0.1, 240 epochs, learning rate / 10 at
  epochs 90, 180, 210 (the same fractions of ``--epochs``); random-resized crop (scale 0.8-1), flip 0.5.
* B (an independent second recipe): cosine schedule, 5 warm-up epochs from 1e-4, lr_base 0.4 (0.1 at
  batch 64), min lr 0, same epochs as A; translation-dominated augmentation: half of the images up-scaled
  by area x1-1.3, then a random 28-px crop (shifts of up to ~2 px, a slight zoom), no flip.

Test set (every kept class's Fashion-MNIST test images) and clean training set (no augmentation, eval
mode) are measured every ``--val-interval`` epochs (20) and after the last.

Pre-registered design (K classes x N training images per class; G = 4 groups):

* PRIMARY: Type-II, discriminative grouping, vs softmax; 10 x 100; recipe A; seeds 0-4. Metric: the
  final epoch's test top-1 error. Reported: the paired-by-seed difference (Type-II minus softmax, in
  percentage points): mean, SD, 95% two-sided t-interval, wins k/n (seeds where Type-II's error is
  lower) and the paired t-test p-value.
* SECONDARY (seeds 0-2 each; Holm-Bonferroni over the family, raw and adjusted p):
  S1 Type-I (discriminative) vs softmax, 10 x 100, A; S2 Type-II with random grouping vs softmax,
  10 x 100, A; S3 Type-II vs softmax, 4 x 100, A; S4 Type-II vs softmax, 10 x 500, recipe A with a
  schedule that must pass the gate too (``--s4-epochs``, default ``--epochs``); S5 Type-II vs softmax,
  10 x 100, recipe B. A softmax run serves every comparison of its (classes, images, recipe, seed).
* EXPLORATORY (not in the Holm family): Type-II with 'zero-aware' grouping vs softmax, 10 x 100, A,
  seeds 0-2.
* GATE: every softmax run at 10 x 100 under a recipe, and S4's softmax runs at 10 x 500, must end with
  clean-train top-1 >= 99.5 and clean-train loss <= 0.05, and its test loss must rise after its
  minimum (the lowest evaluated test loss is not the last one, and the last is above it). If any softmax
  run of a gate fails, the comparisons under that recipe (and training-set size) do not count.

Runs go in this order, so that a study stopped early has the most important ones: primary (seed-major:
softmax s0, Type-II s0, softmax s1, ...), S1, S2, S5, S3, exploratory, S4. ``--only`` restricts the runs
to some comparisons (or to the gate's softmax runs).

Each run writes ``OUTPUT/results/<run_id>.json`` (settings, git commit, train.py command line, the whole
per-epoch history, final metrics, wall time); a run whose JSON exists is skipped, so the study can be
finished over several sittings (one sitting per folder at a time). After every run ``OUTPUT/report.md``
and ``OUTPUT/loss_curves.png`` (one panel per comparison) are rebuilt from the JSONs present.

Examples:
    python -m experiments.overfit_study --output results/overfit --plan     # pending runs, hours
    python -m experiments.overfit_study --output results/overfit --threads 2
    python -m experiments.overfit_study --output results/overfit --only primary gate --max-runs 4
    python -m experiments.overfit_study --output results/overfit --report-only
    python -m experiments.overfit_study --output /tmp/overfit-quick --quick  # smoke run, about a minute
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import io
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from experiments.reproduce import (
    FASHION_MNIST_DIR,
    LOSSES,
    REPO_ROOT,
    _mean_std,
    _versions,
    _write_atomic,
    load_results,
    prepare_fashion_mnist,
    train_in_subprocess,
    write_json,
)

__all__ = [
    'Comparison', 'Curve', 'GateCondition', 'GateResult', 'PairedStats', 'Recipe', 'RunSpec', 'StudyDesign',
    'QUICK_DESIGN', 'build_design', 'estimate_seconds', 'format_report', 'gate_check', 'gate_conditions',
    'get_args_parser', 'git_state', 'holm_adjust', 'main', 'make_record', 'mean_curve', 'paired_stats',
    'loss_curves', 'plan_runs', 'plot_loss_curves', 'print_plan', 'result_path', 'run_one', 'run_sitting',
    'summarize_history', 'throughputs', 'train_argv', 'write_report',
]

STUDY_GROUPINGS: Tuple[str, ...] = ('discriminative', 'random', 'contiguous', 'zero-aware')
RECIPE_NAMES: Tuple[str, ...] = ('A', 'B')
DEFAULT_LR_BASE: Dict[str, float] = {'A': 0.1, 'B': 0.4}
PAPER_EPOCHS = 240
PAPER_MILESTONES: Tuple[int, ...] = (90, 180, 210)
GATE_CLEAN_TOP1 = 99.5
GATE_CLEAN_LOSS = 0.05
FALLBACK_IMAGES_PER_S = 230.  # resnet18 at 28x28 on this project's 2-core machine, evaluation included
ONLY_NAMES: Tuple[str, ...] = ('primary', 'S1', 'S2', 'S3', 'S4', 'S5', 'exploratory', 'gate')
REPORT_FILE = 'report.md'
PLOT_FILE = 'loss_curves.png'


# ----------------------------------------------------------------------------------------------
# Design
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a run trains: schedule, augmentation, learning rate, evaluation cadence.

    Args:
        name: 'A' (multistep, Table B.1) or 'B' (cosine, translation-dominated augmentation).
        epochs: training epochs.
        lr_base: learning rate at batch 256 (scaled linearly to ``batch_size``).
        val_interval: test and clean-train evaluation every this many epochs, and after the last.
        model, batch_size, weight_decay, momentum: shared by every run of the study.
    """
    name: str = 'A'
    epochs: int = PAPER_EPOCHS
    lr_base: float = 0.1
    val_interval: int = 20
    model: str = 'resnet18'
    batch_size: int = 64
    weight_decay: float = 1e-4
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.name not in RECIPE_NAMES:
            raise ValueError(f'name={self.name!r} is unknown, expected one of {RECIPE_NAMES}.')
        for field in ('epochs', 'val_interval', 'batch_size'):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f'{field}={value!r} is invalid, expected an integer >= 1.')
        if not self.lr_base > 0:
            raise ValueError(f'lr_base={self.lr_base!r} is invalid, expected a number > 0.')

    @property
    def milestones(self) -> Tuple[int, ...]:
        """Recipe A's learning-rate milestones: 90/240, 180/240, 210/240 of the epochs, rounded (B: none)."""
        if self.name != 'A':
            return ()
        kept: List[int] = []
        for m in PAPER_MILESTONES:
            epoch = int(math.floor(m * self.epochs / PAPER_EPOCHS + 0.5))
            if 0 < epoch < self.epochs and (not kept or epoch > kept[-1]):
                kept.append(epoch)
        return tuple(kept)

    @property
    def lr(self) -> float:
        """The learning rate train.py uses: ``lr_base`` x batch / 256."""
        return self.lr_base * self.batch_size / 256

    @property
    def tag(self) -> str:
        """File-name-safe identifier of everything in the recipe that changes a run's result.

        The evaluation interval is part of it: every evaluation draws a data-loader seed from torch's
        global generator, so it shifts the random numbers of the training that follows.
        """
        tag = f'{self.name}-e{self.epochs}-lr{self.lr_base:g}-v{self.val_interval}'
        if (self.model, self.batch_size, self.weight_decay, self.momentum) != ('resnet18', 64, 1e-4, 0.9):
            tag += f'-{self.model}-b{self.batch_size}-wd{self.weight_decay:g}-m{self.momentum:g}'
        return tag

    @property
    def label(self) -> str:
        """Human-readable name, e.g. 'A (240 epochs, lr_base 0.1)'."""
        return f'{self.name} ({self.epochs} epochs, lr_base {self.lr_base:g})'

    def schedule_argv(self) -> List[str]:
        """train.py's schedule flags."""
        if self.name == 'A':
            # No decay inside a very short run: a milestone past the end.
            milestones = self.milestones or (self.epochs + 1,)
            return ['--sched', 'multistep', '--decay-rate', '0.1', '--warmup-epochs', '0',
                    '--epochs', str(self.epochs), '--decay-milestones', *map(str, milestones)]
        return ['--sched', 'cosine', '--warmup-epochs', '5', '--warmup-lr', '1e-4', '--min-lr', '0',
                '--epochs', str(self.epochs)]

    def augmentation_argv(self) -> List[str]:
        """train.py's augmentation flags."""
        if self.name == 'A':
            return ['--scale', '0.8', '1.0', '--hflip', '0.5', '--color-jitter', '0', '--reprob', '0',
                    '--smoothing', '0']
        return ['--train-crop-mode', 'rkrr', '--scale', '1.0', '1.3', '--ratio', '1.0', '1.0', '--hflip', '0',
                '--color-jitter', '0', '--reprob', '0', '--smoothing', '0']

    def settings(self) -> Dict[str, Any]:
        """Every setting, for the run JSONs."""
        return dict(dataclasses.asdict(self), tag=self.tag, lr=self.lr, milestones=list(self.milestones),
                    schedule_argv=self.schedule_argv(), augmentation_argv=self.augmentation_argv())


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run.

    Args:
        recipe: how it trains.
        loss: a key of ``LOSSES`` ('softmax', 'Type-I', 'Type-II').
        classes: Fashion-MNIST classes K (drawn with the seed).
        samples_per_class: training images per class N (drawn with the seed).
        seed: seed of the class draw, the image draw and training.
        groups, grouping: G and feature grouping of the group softmax loss (None for softmax).
    """
    recipe: Recipe
    loss: str
    classes: int
    samples_per_class: int
    seed: int
    groups: Optional[int] = None
    grouping: Optional[str] = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f'loss={self.loss!r} is unknown, expected one of {tuple(LOSSES)}.')
        if not 2 <= self.classes <= 10:
            raise ValueError(f'classes={self.classes!r} is invalid, expected an integer in [2, 10].')
        if not 1 <= self.samples_per_class <= 6000:
            raise ValueError(f'samples_per_class={self.samples_per_class!r} is invalid, expected an integer '
                             f'in [1, 6000].')
        if self.loss == 'softmax':
            if (self.groups, self.grouping) != (None, None):
                raise ValueError(f'softmax runs take groups=None and grouping=None, got {self.groups!r} and '
                                 f'{self.grouping!r}.')
        else:
            if not isinstance(self.groups, int) or self.groups < 1:
                raise ValueError(f'groups={self.groups!r} is invalid, expected an integer >= 1.')
            if self.grouping not in STUDY_GROUPINGS:
                raise ValueError(f'grouping={self.grouping!r} is unknown, expected one of {STUDY_GROUPINGS}.')

    @property
    def gsl_type(self) -> Optional[str]:
        """'I', 'II', or None for softmax."""
        return {'Type-I': 'I', 'Type-II': 'II'}.get(self.loss)

    @property
    def run_id(self) -> str:
        """File-name-safe identifier, unique over every field that changes the run's result."""
        loss = self.loss.lower().replace('-', '')
        group = '' if self.loss == 'softmax' else f'-g{self.groups}-{self.grouping}'
        return f'{self.recipe.tag}-{loss}{group}-k{self.classes}-n{self.samples_per_class}-s{self.seed}'

    @property
    def train_images(self) -> int:
        """Training images per epoch."""
        return self.classes * self.samples_per_class

    @property
    def label(self) -> str:
        """Human-readable condition (no seed), e.g. 'Type-II G4 discriminative, 10x100, recipe A (...)'."""
        loss = self.loss if self.loss == 'softmax' else f'{self.loss} G{self.groups} {self.grouping}'
        return f'{loss}, {self.classes}x{self.samples_per_class}, recipe {self.recipe.label}'

    def condition(self) -> Tuple[Any, ...]:
        """The run without its seed."""
        return (self.recipe, self.loss, self.groups, self.grouping, self.classes, self.samples_per_class)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A treatment loss against softmax at one data condition and recipe, paired by seed.

    Args:
        name: 'primary', 'S1'..'S5' or 'exploratory'.
        family: 'primary', 'secondary' or 'exploratory'.
        title: one-line description.
        recipe, classes, samples_per_class, seeds: shared by both arms.
        loss, groups, grouping: the treatment arm (the baseline is softmax).
    """
    name: str
    family: str
    title: str
    recipe: Recipe
    loss: str
    grouping: str
    classes: int
    samples_per_class: int
    seeds: Tuple[int, ...]
    groups: int = 4

    def treatment(self, seed: int) -> RunSpec:
        """The treatment run of ``seed``."""
        return RunSpec(self.recipe, self.loss, self.classes, self.samples_per_class, seed, self.groups, self.grouping)

    def baseline(self, seed: int) -> RunSpec:
        """The softmax run of ``seed``."""
        return RunSpec(self.recipe, 'softmax', self.classes, self.samples_per_class, seed)


@dataclasses.dataclass(frozen=True)
class StudyDesign:
    """The pre-registered study (see the module docstring); defaults are the real study.

    Args:
        recipe_a, recipe_b: the two recipes.
        recipe_s4: S4's recipe (A, with a schedule that passes the gate at 10 x 500).
        classes, samples_per_class: the primary data condition (10 x 100); the gate trains softmax at
            ``classes`` classes.
        s3_classes: classes of S3.
        s4_samples_per_class: images per class of S4.
        primary_seeds, secondary_seeds: seeds of the primary, and of every other comparison.
        groups: G of every GSL run.
    """
    recipe_a: Recipe = Recipe('A', PAPER_EPOCHS, DEFAULT_LR_BASE['A'])
    recipe_b: Recipe = Recipe('B', PAPER_EPOCHS, DEFAULT_LR_BASE['B'])
    recipe_s4: Recipe = Recipe('A', PAPER_EPOCHS, DEFAULT_LR_BASE['A'])
    classes: int = 10
    samples_per_class: int = 100
    s3_classes: int = 4
    s4_samples_per_class: int = 500
    primary_seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)
    secondary_seeds: Tuple[int, ...] = (0, 1, 2)
    groups: int = 4

    def __post_init__(self) -> None:
        if self.recipe_a.name != 'A' or self.recipe_s4.name != 'A' or self.recipe_b.name != 'B':
            raise ValueError('recipe_a and recipe_s4 must be recipe A, recipe_b recipe B.')

    def comparisons(self) -> Tuple[Comparison, ...]:
        """Every comparison, in run order: primary, S1, S2, S5, S3, exploratory, S4."""
        k, n, a, seeds = self.classes, self.samples_per_class, self.recipe_a, self.secondary_seeds

        def make(name: str, family: str, title: str, recipe: Recipe, loss: str, grouping: str, classes: int,
                 samples: int, run_seeds: Tuple[int, ...]) -> Comparison:
            return Comparison(name, family, title, recipe, loss, grouping, classes, samples, run_seeds, self.groups)

        return (
            make('primary', 'primary', f'Type-II (discriminative) vs softmax, {k}x{n}, recipe A', a, 'Type-II',
                 'discriminative', k, n, self.primary_seeds),
            make('S1', 'secondary', f'Type-I (discriminative) vs softmax, {k}x{n}, recipe A', a, 'Type-I',
                 'discriminative', k, n, seeds),
            make('S2', 'secondary', f'Type-II random grouping vs softmax, {k}x{n}, recipe A', a, 'Type-II',
                 'random', k, n, seeds),
            make('S5', 'secondary', f'Type-II vs softmax, {k}x{n}, recipe B', self.recipe_b, 'Type-II',
                 'discriminative', k, n, seeds),
            make('S3', 'secondary', f'Type-II vs softmax, {self.s3_classes}x{n}, recipe A', a, 'Type-II',
                 'discriminative', self.s3_classes, n, seeds),
            make('exploratory', 'exploratory', f'Type-II zero-aware grouping vs softmax, {k}x{n}, recipe A', a,
                 'Type-II', 'zero-aware', k, n, seeds),
            make('S4', 'secondary', f'Type-II vs softmax, {k}x{self.s4_samples_per_class}, recipe '
                 f'{self.recipe_s4.label}', self.recipe_s4, 'Type-II', 'discriminative', k,
                 self.s4_samples_per_class, seeds),
        )

    def comparison(self, name: str) -> Comparison:
        """The comparison called ``name``."""
        for c in self.comparisons():
            if c.name == name:
                return c
        raise KeyError(name)


QUICK_DESIGN = StudyDesign(
    recipe_a=Recipe('A', 2, DEFAULT_LR_BASE['A'], val_interval=1, batch_size=16),
    recipe_b=Recipe('B', 2, DEFAULT_LR_BASE['B'], val_interval=1, batch_size=16),
    recipe_s4=Recipe('A', 2, DEFAULT_LR_BASE['A'], val_interval=1, batch_size=16),
    classes=3, samples_per_class=16, s3_classes=2, s4_samples_per_class=24, primary_seeds=(0,),
    secondary_seeds=(0,))


def build_design(quick: bool = False, epochs: Optional[int] = None, lr_base: Optional[float] = None,
                 epochs_b: Optional[int] = None, lr_base_b: Optional[float] = None,
                 s4_epochs: Optional[int] = None, val_interval: Optional[int] = None) -> StudyDesign:
    """The study's design with the command line's overrides (None: keep the default).

    Args:
        quick: start from :data:`QUICK_DESIGN` (tiny) instead of the real study.
        epochs, lr_base: recipe A's (and, unless given their own, B's epochs and S4's epochs).
        epochs_b, lr_base_b: recipe B's.
        s4_epochs: S4's recipe A epochs (default: ``epochs``).
        val_interval: every recipe's evaluation interval.
    """
    base = QUICK_DESIGN if quick else StudyDesign()
    a = dataclasses.replace(base.recipe_a, **_given(epochs=epochs, lr_base=lr_base, val_interval=val_interval))
    b = dataclasses.replace(base.recipe_b, **_given(epochs=epochs_b if epochs_b is not None else epochs,
                                                    lr_base=lr_base_b, val_interval=val_interval))
    s4 = dataclasses.replace(a, **_given(epochs=s4_epochs))
    return dataclasses.replace(base, recipe_a=a, recipe_b=b, recipe_s4=s4)


def _given(**values: Any) -> Dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class GateCondition:
    """The softmax runs that must over-fit before the comparisons under a recipe count.

    Args:
        recipe, classes, samples_per_class: the softmax condition checked.
        seeds: the seeds of it the study trains.
        comparisons: names of the comparisons that count only if it passes.
    """
    recipe: Recipe
    classes: int
    samples_per_class: int
    seeds: Tuple[int, ...]
    comparisons: Tuple[str, ...]

    def runs(self) -> List[RunSpec]:
        """The softmax runs checked."""
        return [RunSpec(self.recipe, 'softmax', self.classes, self.samples_per_class, s) for s in self.seeds]

    @property
    def label(self) -> str:
        """e.g. 'recipe A (240 epochs, lr_base 0.1), 10x100'."""
        return f'recipe {self.recipe.label}, {self.classes}x{self.samples_per_class}'


def gate_conditions(design: StudyDesign) -> List[GateCondition]:
    """The gates of ``design``: softmax at ``design.classes`` classes under every (recipe, images per class).

    A comparison at fewer classes (S3) depends on the gate of its recipe at the same images per class.
    """
    keys: List[Tuple[Recipe, int]] = []
    for c in design.comparisons():
        if (c.recipe, c.samples_per_class) not in keys:
            keys.append((c.recipe, c.samples_per_class))
    gates = []
    for recipe, samples in keys:
        members = [c for c in design.comparisons() if (c.recipe, c.samples_per_class) == (recipe, samples)]
        seeds = sorted({s for c in members if c.classes == design.classes for s in c.seeds})
        seeds = seeds or sorted({s for c in members for s in c.seeds})
        gates.append(GateCondition(recipe, design.classes, samples, tuple(seeds), tuple(c.name for c in members)))
    return gates


def plan_runs(design: StudyDesign, only: Optional[Sequence[str]] = None) -> List[RunSpec]:
    """Every run of the study, each once, in the order they should be trained.

    Args:
        design: the study.
        only: restrict to the runs of these comparisons (names of :data:`ONLY_NAMES`; 'gate': the gates'
            softmax runs); None or empty: every run.

    Returns:
        Comparison by comparison in :meth:`StudyDesign.comparisons` order, seed-major, softmax before the
        treatment; a run shared by comparisons comes where it is first needed among those selected.
    """
    unknown = sorted(set(only or ()) - set(ONLY_NAMES))
    if unknown:
        raise ValueError(f'only={unknown!r} is unknown, expected names from {ONLY_NAMES}.')
    gated = {spec for gate in gate_conditions(design) for spec in gate.runs()} if only and 'gate' in only else set()
    runs: List[RunSpec] = []
    for c in design.comparisons():
        for seed in c.seeds:
            for spec in (c.baseline(seed), c.treatment(seed)):
                if (not only or c.name in only or spec in gated) and spec not in runs:
                    runs.append(spec)
    return runs


def memberships(design: StudyDesign, spec: RunSpec) -> List[str]:
    """Names of the comparisons (and 'gate') that use ``spec``."""
    names = [c.name for c in design.comparisons() if spec in [r for s in c.seeds for r in (c.baseline(s),
                                                                                          c.treatment(s))]]
    if any(spec in gate.runs() for gate in gate_conditions(design)):
        names.append('gate')
    return names


# ----------------------------------------------------------------------------------------------
# Time estimate
# ----------------------------------------------------------------------------------------------

def throughputs(records: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Median training images x epochs / wall second of the records: per recipe name and training-set size
    ('A/5000'), per recipe name ('A'), and over all ('*').

    Evaluation and start-up are in the wall time, so the rate is what a whole run achieves; it depends on the
    training-set size (the test set is evaluated at the same interval whatever the size), hence the first key.
    """
    rates: Dict[str, List[float]] = {}
    for r in records:
        try:
            images = r['classes'] * r['samples_per_class']
            rate = images * r['epochs'] / r['wall_s']
            name = r['recipe']['name']
        except (KeyError, TypeError, ZeroDivisionError):
            continue
        for key in (f'{name}/{images}', name, '*'):
            rates.setdefault(key, []).append(rate)
    return {name: statistics.median(values) for name, values in rates.items()}


def estimate_seconds(spec: RunSpec, rates: Dict[str, float], fallback: float = FALLBACK_IMAGES_PER_S) -> float:
    """Wall seconds of ``spec``: its training images x epochs over the rate of its recipe.

    Args:
        spec: the run.
        rates: from :func:`throughputs`; the rate of the recipe at this training-set size, else the recipe's,
            else the overall one ('*'), else ``fallback``.
        fallback: images per second when nothing was measured.
    """
    name = spec.recipe.name
    rate = rates.get(f'{name}/{spec.train_images}', rates.get(name, rates.get('*', fallback)))
    return spec.train_images * spec.recipe.epochs / rate


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

def train_argv(spec: RunSpec, data_dir: str, work_dir: str) -> List[str]:
    """The train.py command line of a run (without the program name).

    Args:
        spec: the run.
        data_dir: from :func:`experiments.reproduce.prepare_fashion_mnist`.
        work_dir: train.py's ``--output`` (the run writes into ``work_dir/<run_id>``).
    """
    r = spec.recipe
    argv = [
        '--dataset', 'torch/fashion_mnist', '--data-dir', data_dir, '--train-split', 'train',
        '--val-split', 'validation', '--class-subset', str(spec.classes),
        '--samples-per-class', str(spec.samples_per_class), '--seed', str(spec.seed),
        '--model', r.model, '--in-chans', '1', '--img-size', '28', '--mean', '0.286', '--std', '0.353',
        '--crop-pct', '1.0', '--interpolation', 'bilinear', '--train-interpolation', 'bilinear',
        *r.augmentation_argv(),
        '--opt', 'sgd', '--momentum', str(r.momentum), '--weight-decay', str(r.weight_decay),
        '--lr-base', str(r.lr_base), '--lr-base-size', '256', '--lr-base-scale', 'linear',
        '-b', str(r.batch_size), '-vb', '500', *r.schedule_argv(),
        '--val-interval', str(r.val_interval), '--train-eval-interval', str(r.val_interval),
        '-j', '0', '--device', 'cpu', '--checkpoint-hist', '1', '--log-interval', '1000',
        '--output', work_dir, '--experiment', spec.run_id,
        *LOSSES[spec.loss],
    ]
    if spec.loss != 'softmax':
        argv += ['--gsl-groups', str(spec.groups), '--gsl-grouping', str(spec.grouping)]
    return argv


def result_path(output: str, spec: RunSpec) -> str:
    """Where the JSON of a run lives."""
    return os.path.join(output, 'results', spec.run_id + '.json')


def git_state(root: str = REPO_ROOT) -> Tuple[Optional[str], Optional[bool]]:
    """(``git rev-parse HEAD``, whether tracked files differ from it) of ``root``; (None, None) without git."""
    try:
        commit = subprocess.run(['git', '-C', root, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no'],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(status.strip())


def _last(history: Sequence[Dict[str, Any]], key: str) -> Optional[float]:
    """The last non-None value of ``key`` in ``history``."""
    for row in reversed(history):
        if row.get(key) is not None:
            return float(row[key])
    return None


def summarize_history(history: Sequence[Dict[str, Any]], groups: Optional[int]) -> Dict[str, Any]:
    """The final metrics of a run from its summary.csv rows.

    Args:
        history: one dict per epoch (``timm_gsl.engine.read_summary``).
        groups: G of a GSL run (None for softmax: no grouping statistics).

    Returns:
        ``test_top1``, ``test_loss`` (last evaluation), ``best_test_top1``, ``clean_train_top1``,
        ``clean_train_loss`` (last measured), ``zero_feature_fraction``, ``group_nonzero``, ``group_loss``
        (last epoch that has them; None for softmax or when train.py did not write them).
    """
    evaluated = [row for row in history if row.get('eval_top1') is not None]
    out: Dict[str, Any] = dict(
        test_top1=_last(history, 'eval_top1'), test_loss=_last(history, 'eval_loss'),
        best_test_top1=max(float(row['eval_top1']) for row in evaluated) if evaluated else None,
        clean_train_top1=_last(history, 'train_clean_top1'), clean_train_loss=_last(history, 'train_clean_loss'),
        zero_feature_fraction=None, group_nonzero=None, group_loss=None)
    if groups:
        out['zero_feature_fraction'] = _last(history, 'train_gsl_zero_frac')
        for field, prefix in (('group_nonzero', 'train_gsl_nonzero_g'), ('group_loss', 'train_gsl_loss_g')):
            values = [_last(history, f'{prefix}{i}') for i in range(1, groups + 1)]
            out[field] = None if any(v is None for v in values) else values
    return out


def make_record(spec: RunSpec, history: List[Dict[str, Any]], wall_s: float, argv: Sequence[str],
                git_commit: Optional[str], git_dirty: Optional[bool], comparisons: Sequence[str] = (),
                versions: Optional[Dict[str, str]] = None, host: Optional[Dict[str, Any]] = None,
                finished: Optional[str] = None) -> Dict[str, Any]:
    """The JSON record of a finished run.

    Args:
        spec: the run.
        history: its summary.csv rows.
        wall_s: wall time of train.py.
        argv: train.py's arguments as recorded (scratch path already replaced).
        git_commit, git_dirty: from :func:`git_state`.
        comparisons: names of the comparisons (and 'gate') that use the run.
        versions, host, finished: environment; filled in from this process when None.
    """
    return dict(
        run_id=spec.run_id, comparisons=list(comparisons), recipe=spec.recipe.settings(), seed=spec.seed,
        loss=spec.loss, gsl_type=spec.gsl_type, grouping=spec.grouping, groups=spec.groups, classes=spec.classes,
        samples_per_class=spec.samples_per_class, epochs=spec.recipe.epochs, epochs_recorded=len(history),
        **summarize_history(history, spec.groups),
        wall_s=round(wall_s, 2), git_commit=git_commit, git_dirty=git_dirty,
        train_argv=['train.py', *argv], history=history,
        versions=versions if versions is not None else _versions(),
        host=host if host is not None else dict(machine=platform.machine(), cpus=os.cpu_count(),
                                                node=platform.node()),
        finished=finished or time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    )


def run_one(spec: RunSpec, output: str, data_dir: str, threads: Optional[int] = None,
            comparisons: Sequence[str] = ()) -> Dict[str, Any]:
    """Train one run with train.py in a fresh interpreter and write its JSON.

    Checkpoints go to ``output/.scratch`` and are removed afterwards; the per-epoch summary is kept.

    Args:
        spec: the run.
        output: the study folder (the JSON goes to ``output/results``).
        data_dir: from :func:`experiments.reproduce.prepare_fashion_mnist`.
        threads: OMP/MKL threads of the run (default: inherited).
        comparisons: recorded in the JSON (see :func:`memberships`).

    Returns:
        The record written.

    Raises:
        RuntimeError: train.py failed or wrote no evaluation; the message ends with its log's tail.
    """
    commit, dirty = git_state()
    history, wall_s, argv = train_in_subprocess(spec.run_id, lambda work: train_argv(spec, data_dir, work), output,
                                                threads)
    record = make_record(spec, history, wall_s, argv, commit, dirty, comparisons)
    write_json(result_path(output, spec), record)
    return record


# ----------------------------------------------------------------------------------------------
# Statistics and the gate
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PairedStats:
    """Treatment minus baseline, paired by seed (percentage points of error when fed errors).

    Args:
        n: pairs.
        mean: mean difference.
        sd: sample standard deviation of the differences (None for n < 2).
        ci_low, ci_high: two-sided t-interval of the mean at the requested confidence (None for n < 2).
        wins: pairs where the treatment's value is lower.
        p: two-sided paired t-test p-value (None for n < 2; 0 or 1 when every difference is equal).
    """
    n: int
    mean: float
    sd: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    wins: int
    p: Optional[float]


def paired_stats(treatment: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> PairedStats:
    """Paired difference statistics of ``treatment - baseline`` (same order: one pair per seed).

    Raises:
        ValueError: the lists are empty or of different lengths, or ``confidence`` is not in (0, 1).
    """
    if len(treatment) != len(baseline) or not treatment:
        raise ValueError(f'expected two lists of the same non-zero length, got {len(treatment)} and '
                         f'{len(baseline)} values.')
    if not 0 < confidence < 1:
        raise ValueError(f'confidence={confidence!r} is invalid, expected a number in (0, 1).')
    diffs = [float(t) - float(b) for t, b in zip(treatment, baseline)]
    n, (mean, sd) = len(diffs), _mean_std(diffs)
    wins = sum(d < 0 for d in diffs)
    if sd is None:
        return PairedStats(n, mean, None, None, None, wins, None)
    from scipy import stats  # imported here: only the statistics need scipy
    se = sd / math.sqrt(n)
    if se == 0:
        return PairedStats(n, mean, 0., mean, mean, wins, 1. if mean == 0 else 0.)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(mean / se), n - 1))
    return PairedStats(n, mean, sd, mean - half, mean + half, wins, p)


def holm_adjust(pvalues: Sequence[float]) -> List[float]:
    """Holm-Bonferroni adjusted p-values, in the order given.

    Sorted ascending, the i-th smallest (0-based) is multiplied by m - i, made non-decreasing along the
    sorted order, and capped at 1.
    """
    for p in pvalues:
        if not 0 <= p <= 1:
            raise ValueError(f'p-value {p!r} is invalid, expected a number in [0, 1].')
    m = len(pvalues)
    adjusted = [0.] * m
    running = 0.
    for rank, i in enumerate(sorted(range(m), key=lambda j: pvalues[j])):
        running = max(running, min(1., (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclasses.dataclass(frozen=True)
class GateResult:
    """The over-fitting check of one softmax run.

    Args:
        clean_top1, clean_loss: last measured clean-train top-1 and loss (None: not measured).
        min_test_loss, min_test_loss_epoch: lowest evaluated test loss and its epoch (1-based).
        final_test_loss: last evaluated test loss.
        fits_top1: ``clean_top1 >= top1_min``.
        fits_loss: ``clean_loss <= loss_max``.
        test_loss_rises: the minimum is not the last evaluation and the last is above it.
    """
    clean_top1: Optional[float]
    clean_loss: Optional[float]
    min_test_loss: Optional[float]
    min_test_loss_epoch: Optional[int]
    final_test_loss: Optional[float]
    fits_top1: bool
    fits_loss: bool
    test_loss_rises: bool

    @property
    def passed(self) -> bool:
        """All three criteria hold."""
        return self.fits_top1 and self.fits_loss and self.test_loss_rises


def gate_check(history: Sequence[Dict[str, Any]], top1_min: float = GATE_CLEAN_TOP1,
               loss_max: float = GATE_CLEAN_LOSS) -> GateResult:
    """Check that a softmax run over-fits: it fits its training images and its test loss rises.

    Args:
        history: one dict per epoch (row i is after epoch i + 1).
        top1_min: least last clean-train top-1 (%).
        loss_max: largest last clean-train loss.
    """
    clean_top1, clean_loss = _last(history, 'train_clean_top1'), _last(history, 'train_clean_loss')
    evals = [(i + 1, float(row['eval_loss'])) for i, row in enumerate(history) if row.get('eval_loss') is not None]
    min_epoch = min_loss = final = None
    rises = False
    if evals:
        min_epoch, min_loss = min(evals, key=lambda e: e[1])  # the first of equal minima
        final = evals[-1][1]
        rises = min_epoch != evals[-1][0] and final > min_loss
    return GateResult(clean_top1, clean_loss, min_loss, min_epoch, final,
                      clean_top1 is not None and clean_top1 >= top1_min,
                      clean_loss is not None and clean_loss <= loss_max, rises)


def gate_verdict(gate: GateCondition, by_id: Dict[str, Dict[str, Any]]) -> str:
    """'pass' (every run present passes), 'fail' (a run present fails) or 'pending'."""
    results = [gate_check(by_id[s.run_id].get('history') or []) for s in gate.runs() if s.run_id in by_id]
    if any(not r.passed for r in results):
        return 'fail'
    return 'pass' if len(results) == len(gate.seeds) else 'pending'


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def _error(record: Dict[str, Any]) -> Optional[float]:
    return None if record.get('test_top1') is None else 100. - float(record['test_top1'])


def _paired_records(comparison: Comparison, by_id: Dict[str, Dict[str, Any]]
                    ) -> List[Tuple[int, Optional[Dict[str, Any]], Optional[Dict[str, Any]]]]:
    """(seed, treatment record, softmax record) per seed of ``comparison``; None where not run yet."""
    return [(seed, by_id.get(comparison.treatment(seed).run_id), by_id.get(comparison.baseline(seed).run_id))
            for seed in comparison.seeds]


def paired_errors(comparison: Comparison, by_id: Dict[str, Dict[str, Any]]
                  ) -> List[Tuple[int, Optional[float], Optional[float]]]:
    """(seed, treatment error, softmax error) per seed of ``comparison``; None where not run yet."""
    return [(seed, _error(t) if t else None, _error(b) if b else None)
            for seed, t, b in _paired_records(comparison, by_id)]


def comparison_stats(comparison: Comparison, by_id: Dict[str, Dict[str, Any]]) -> Optional[PairedStats]:
    """Paired statistics of the seeds with both runs present (None if there are none)."""
    pairs = [(t, b) for _, t, b in paired_errors(comparison, by_id) if t is not None and b is not None]
    if not pairs:
        return None
    return paired_stats([t for t, _ in pairs], [b for _, b in pairs])


def arm_stats(comparison: Comparison, reference: Comparison, by_id: Dict[str, Dict[str, Any]]
              ) -> Optional[PairedStats]:
    """Paired statistics of ``comparison``'s treatment error minus ``reference``'s treatment error.

    Pairs the two treatment arms by seed (the seeds both have run; None if none), e.g. zero-aware against
    discriminative Type-II on the same data and recipe. Their softmax arms are the same runs, so this equals
    the difference of the two comparisons' paired differences.
    """
    errors = {seed: t for seed, t, _ in paired_errors(reference, by_id) if t is not None}
    pairs = [(t, errors[seed]) for seed, t, _ in paired_errors(comparison, by_id)
             if t is not None and seed in errors]
    if not pairs:
        return None
    return paired_stats([t for t, _ in pairs], [r for _, r in pairs])


def paired_values(comparison: Comparison, by_id: Dict[str, Dict[str, Any]], key: str
                  ) -> List[Tuple[int, float, float]]:
    """(seed, treatment value, softmax value) of ``key`` for the seeds where both runs have it."""
    return [(seed, float(t[key]), float(b[key])) for seed, t, b in _paired_records(comparison, by_id)
            if t and b and t.get(key) is not None and b.get(key) is not None]


def comparison_verdict(stats: Optional[PairedStats], seeds: int, gate: str, p: Optional[float] = None,
                       alpha: float = 0.05) -> str:
    """The plain-words outcome of one pre-registered comparison of errors (treatment minus softmax).

    Args:
        stats: its paired statistics (None: no pair yet).
        seeds: the seeds it was planned with; fewer pairs give 'pending'.
        gate: its gate's verdict ('pass', 'fail' or 'pending').
        p: the p-value that decides (the Holm-adjusted one for a secondary); None: the raw paired t-test's,
            which is below ``alpha`` exactly when the (1 - alpha) t-interval excludes zero.
        alpha: the significance level.

    Returns:
        'does not count (gate failed)', 'pending (...)', 'lower error', 'higher error' or
        'no difference shown'.
    """
    if gate == 'fail':
        return 'does not count (gate failed)'
    n = 0 if stats is None else stats.n
    if n < seeds:
        return f'pending ({n} of {seeds} seeds)'
    if gate != 'pass':
        return 'pending (gate)'
    p = stats.p if p is None else p
    if p is None or p >= alpha:
        return 'no difference shown'
    return 'lower error' if stats.mean < 0 else 'higher error'


def _num(value: Optional[float], fmt: str = '.2f') -> str:
    return 'not yet run' if value is None else format(value, fmt)


def _opt(value: Optional[float], fmt: str = '.2f', missing: str = 'n/a') -> str:
    return missing if value is None else format(value, fmt)


def _measured(value: Optional[float], fmt: str = '.2f') -> str:
    return _opt(value, fmt, 'not measured')


def _p(value: Optional[float]) -> str:
    return 'n/a' if value is None else (f'{value:.3g}' if value >= 1e-4 else f'{value:.1e}')


def _ci(s: PairedStats, fmt: str = '+.2f') -> str:
    return 'n/a' if s.ci_low is None else f'[{s.ci_low:{fmt}}, {s.ci_high:{fmt}}]'


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> List[str]:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return lines


def _gate_of(comparison: Comparison, gates: Sequence[GateCondition]) -> GateCondition:
    return next(g for g in gates if comparison.name in g.comparisons)


def _gate_cell(verdict: str) -> str:
    return '**fail: does not count**' if verdict == 'fail' else verdict


def _stats_cells(s: Optional[PairedStats]) -> List[str]:
    if s is None:
        return ['0', 'not yet run', '', '', '', '']
    return [str(s.n), f'{s.mean:+.2f}', _opt(s.sd), _ci(s), f'{s.wins}/{s.n}', _p(s.p)]


def _mean_lists(lists: Sequence[Sequence[float]]) -> List[float]:
    return [sum(values) / len(values) for values in zip(*lists)]


def _mean_of(records: Sequence[Dict[str, Any]], key: str) -> Optional[float]:
    values = [float(r[key]) for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _fmt_list(values: Optional[Sequence[float]], fmt: str) -> str:
    return 'not measured' if values is None else '[' + ', '.join(format(v, fmt) for v in values) + ']'


def format_report(design: StudyDesign, records: Sequence[Dict[str, Any]]) -> str:
    """The Markdown report of the runs present (see the module docstring for what it shows).

    Args:
        design: the study (which runs make up which comparison).
        records: run records (as :func:`experiments.reproduce.load_results` returns); records of runs
            outside ``design`` count only in the wall time.
    """
    by_id = {r['run_id']: r for r in records}
    gates = gate_conditions(design)
    verdicts = {g: gate_verdict(g, by_id) for g in gates}
    comparisons = design.comparisons()
    planned = plan_runs(design)
    a = design.recipe_a
    lines = [
        '# Over-fitting study: group softmax loss vs softmax on Fashion-MNIST', '',
        f'{len([s for s in planned if s.run_id in by_id])} of {len(planned)} planned runs present. '
        f'{a.model} at 28x28, batch {a.batch_size}, SGD momentum {a.momentum:g}, weight decay '
        f'{a.weight_decay:g}, G = {design.groups}. Errors are the final epoch\'s test top-1 error (%); '
        'differences are treatment minus softmax on the same seed, in percentage points (negative: the '
        'treatment is better). The design was fixed before the runs (module docstring of '
        '`experiments/overfit_study.py`).', '',
        '## 1. Gate: does softmax over-fit?', '',
        f'Pass: last clean-train top-1 >= {GATE_CLEAN_TOP1:g}, last clean-train loss <= {GATE_CLEAN_LOSS:g}, '
        'and the test loss rises after its minimum.', '']
    for g in gates:
        verdict = verdicts[g]
        if verdict == 'fail':
            lines.append(f'- **GATE FAILED ({g.label}): comparisons under recipe {g.recipe.label} do not count** '
                         f'({", ".join(g.comparisons)}).')
        elif verdict == 'pass':
            lines.append(f'- Gate passed ({g.label}): all {len(g.seeds)} softmax runs over-fit; '
                         f'{", ".join(g.comparisons)} count.')
        else:
            present = sum(s.run_id in by_id for s in g.runs())
            lines.append(f'- Gate pending ({g.label}): {present} of {len(g.seeds)} softmax runs present, none '
                         f'failing so far; {", ".join(g.comparisons)} count only once it passes.')
    rows = []
    for g in gates:
        for spec in g.runs():
            record = by_id.get(spec.run_id)
            if record is None:
                rows.append([g.label, spec.seed, 'not yet run', '', '', '', '', ''])
                continue
            r = gate_check(record.get('history') or [])
            rows.append([g.label, spec.seed, _measured(r.clean_top1), _measured(r.clean_loss, '.4f'),
                         'not measured' if r.min_test_loss is None else
                         f'{r.min_test_loss:.4f} (epoch {r.min_test_loss_epoch})',
                         _measured(r.final_test_loss, '.4f'), 'yes' if r.test_loss_rises else 'no',
                         '**pass**' if r.passed else '**FAIL**'])
    lines += ['', *_table(['condition (softmax)', 'seed', 'clean-train top-1', 'clean-train loss',
                           'min test loss (epoch)', 'final test loss', 'test loss rises', 'gate'], rows), '']

    primary = comparisons[0]
    lines += ['## 2. Primary (pre-registered)', '', f'{primary.title}, seeds {_seeds(primary.seeds)}. '
              f'Gate: {_gate_cell(verdicts[_gate_of(primary, gates)])}.', '']
    errors = paired_errors(primary, by_id)
    rows: List[List[Any]] = [[seed, _num(b), _num(t), _num(t - b, '+.2f') if t is not None and b is not None else '']
                             for seed, t, b in errors]
    pairs = [(t, b) for _, t, b in errors if t is not None and b is not None]
    if pairs:
        rows.append([f'mean of {len(pairs)} paired', f'{sum(b for _, b in pairs) / len(pairs):.2f}',
                     f'{sum(t for t, _ in pairs) / len(pairs):.2f}',
                     f'{sum(t - b for t, b in pairs) / len(pairs):+.2f}'])
    lines += _table(['seed', 'softmax error', f'{primary.loss} error', 'difference'], rows)
    s = comparison_stats(primary, by_id)
    lines += ['']
    if s is None:
        lines += ['Difference: not yet run.', '']
    else:
        lines += [f'Difference ({primary.loss} minus softmax): mean {s.mean:+.2f} pp, SD {_opt(s.sd)}, 95% CI '
                  f'{_ci(s)}, wins {s.wins}/{s.n}, paired t-test p = {_p(s.p)} (n = {s.n} of '
                  f'{len(primary.seeds)} seeds).', '']
    outcome = comparison_verdict(s, len(primary.seeds), verdicts[_gate_of(primary, gates)])
    rule = 'Verdict (the pre-registered rule: the 95% interval excludes zero)'
    if outcome.startswith(('pending', 'does not')):
        lines += [f'Verdict: {outcome}.', '']
    elif outcome == 'no difference shown':
        lines += [f'{rule}: **{outcome}**.', '']
    else:
        lines += [f'{rule}: **{primary.loss} {outcome} than softmax**.', '']
    losses = paired_values(primary, by_id, 'test_loss')
    if losses:
        ls = paired_stats([t for _, t, _ in losses], [b for _, _, b in losses])
        lines += [f'Not pre-registered, descriptive: the final test loss (cross-entropy of the full logits), '
                  f'softmax {sum(b for _, _, b in losses) / len(losses):.3f}, {primary.loss} '
                  f'{sum(t for _, t, _ in losses) / len(losses):.3f}; difference mean {ls.mean:+.3f}, 95% CI '
                  f'{_ci(ls, "+.3f")}, {primary.loss} lower on {ls.wins}/{ls.n} seeds.', '']

    secondary = sorted([c for c in comparisons if c.family == 'secondary'], key=lambda c: c.name)
    stats = {c.name: comparison_stats(c, by_id) for c in secondary}
    family = [c.name for c in secondary if stats[c.name] is not None and stats[c.name].n >= 2]
    holm = dict(zip(family, holm_adjust([stats[name].p for name in family])))
    header = ['comparison', 'description', 'n', 'mean diff', 'SD', '95% CI', 'wins', 'p (raw)']
    outcomes = {c.name: comparison_verdict(stats[c.name], len(c.seeds), verdicts[_gate_of(c, gates)],
                                           holm.get(c.name)) for c in secondary}
    complete = all(not o.startswith('pending') for o in outcomes.values())
    lines += ['## 3. Secondary (pre-registered; Holm-Bonferroni)', '',
              f'Holm over the {len(family)} secondaries with at least 2 paired seeds. Verdict: the treatment\'s '
              'error against softmax where the Holm-adjusted p is below 0.05, else "no difference shown"; '
              + ('final (every secondary is complete).' if complete else
                 'interim until every secondary is complete (adding comparisons can only raise an adjusted p).'),
              '',
              *_table(header + ['p (Holm)', 'gate', 'verdict'],
                      ([c.name, c.title, *_stats_cells(stats[c.name]), _p(holm.get(c.name)),
                        _gate_cell(verdicts[_gate_of(c, gates)]), outcomes[c.name]] for c in secondary)), '']
    exploratory = [c for c in comparisons if c.family == 'exploratory']
    lines += ['## 4. Exploratory (not pre-registered as a test; not in the Holm family)', '',
              *_table(header + ['gate'], ([c.name, c.title, *_stats_cells(comparison_stats(c, by_id)),
                                          _gate_cell(verdicts[_gate_of(c, gates)])] for c in exploratory)),
              '']
    for c in exploratory:
        reference = next((r for r in comparisons if r.family != 'exploratory' and r.grouping == 'discriminative'
                          and (r.recipe, r.loss, r.classes, r.samples_per_class) ==
                          (c.recipe, c.loss, c.classes, c.samples_per_class)), None)
        arms = arm_stats(c, reference, by_id) if reference is not None else None
        if arms is not None:
            lines += [f'Descriptive, not a test: {c.loss} {c.grouping} minus {reference.loss} '
                      f'{reference.grouping} grouping (the {reference.name} comparison\'s runs; same data, recipe '
                      f'and seeds): mean {arms.mean:+.2f} pp, SD {_opt(arms.sd)}, 95% CI {_ci(arms)}, '
                      f'{c.grouping} lower on {arms.wins}/{arms.n} seeds.', '']

    conditions: Dict[Tuple[Any, ...], List[RunSpec]] = {}
    for spec in planned:
        conditions.setdefault(spec.condition(), []).append(spec)
    present = {cond: [by_id[s.run_id] for s in specs if s.run_id in by_id] for cond, specs in conditions.items()}
    rows = []
    for cond, specs in conditions.items():
        if specs[0].loss == 'softmax':
            continue
        runs = present[cond]
        if not runs:
            rows.append([specs[0].label, 0, 'not yet run', '', ''])
            continue
        nonzero = [r['group_nonzero'] for r in runs if r.get('group_nonzero')]
        losses = [r['group_loss'] for r in runs if r.get('group_loss')]
        rows.append([specs[0].label, len(runs), _measured(_mean_of(runs, 'zero_feature_fraction'), '.3f'),
                     _fmt_list(_mean_lists(nonzero) if nonzero else None, '.1f'),
                     _fmt_list(_mean_lists(losses) if losses else None, '.3f')])
    lines += ['## 5. Grouping health (last epoch, mean over seeds)', '',
              'Zero fraction: share of exactly-zero classifier inputs; per group (1 = least discriminative): '
              'mean number of nonzero features and mean cross-entropy.', '',
              *_table(['condition', 'n', 'zero fraction', 'nonzero per group', 'loss per group'], rows), '']

    rows = []
    for cond, specs in conditions.items():
        runs = present[cond]
        if not runs:
            rows.append([specs[0].label, 0, 'not yet run', '', '', '', ''])
            continue
        gaps = [float(r['best_test_top1']) - float(r['test_top1']) for r in runs
                if r.get('best_test_top1') is not None and r.get('test_top1') is not None]
        min_losses = [gate_check(r.get('history') or []).min_test_loss for r in runs]
        min_losses = [v for v in min_losses if v is not None]
        rows.append([specs[0].label, len(runs), _measured(_mean_of(runs, 'clean_train_loss'), '.4f'),
                     _measured(_mean_of(runs, 'clean_train_top1')), _measured(_mean_of(runs, 'test_loss'), '.4f'),
                     _measured(sum(min_losses) / len(min_losses) if min_losses else None, '.4f'),
                     _measured(sum(gaps) / len(gaps) if gaps else None)])
    lines += ['## 6. Fit (mean over seeds)', '',
              *_table(['condition', 'n', 'clean-train loss', 'clean-train top-1', 'final test loss',
                       'min test loss', 'best - final test top-1'], rows), '']
    wall = sum(float(r.get('wall_s') or 0.) for r in records)
    lines += ['## 7. Wall time', '', f'{len(records)} runs in the folder, {wall / 3600:.2f} h of wall time in all.',
              '']
    return '\n'.join(lines)


def _seeds(seeds: Sequence[int]) -> str:
    return ', '.join(map(str, seeds))


def mean_curve(histories: Sequence[Sequence[Dict[str, Any]]], key: str) -> List[Tuple[int, float]]:
    """(epoch, mean of ``key`` over the histories measuring it at that epoch); epochs are 1-based rows."""
    sums: Dict[int, List[float]] = {}
    for history in histories:
        for i, row in enumerate(history):
            if row.get(key) is not None:
                sums.setdefault(i + 1, []).append(float(row[key]))
    return [(epoch, sum(v) / len(v)) for epoch, v in sorted(sums.items())]


@dataclasses.dataclass(frozen=True)
class Curve:
    """One line of the loss-curve figure: an arm's mean loss per epoch over the seeds present.

    Args:
        arm: 'softmax' or the comparison's treatment loss ('Type-I', 'Type-II').
        what: 'test loss' or 'clean-train loss'.
        runs: how many runs the mean is over.
        points: (epoch, mean loss), positive losses only (the axis is logarithmic).
    """
    arm: str
    what: str
    runs: int
    points: Tuple[Tuple[int, float], ...]


CURVE_KEYS = (('eval_loss', 'test loss'), ('train_clean_loss', 'clean-train loss'))


def loss_curves(comparison: Comparison, records: Sequence[Dict[str, Any]]) -> List[Curve]:
    """The curves of one comparison's panel: per arm (softmax first), test then clean-train loss.

    An arm with no finished run, or a loss it never measured, gives no curve.
    """
    by_id = {r['run_id']: r for r in records}
    curves = []
    for arm, spec_of in (('softmax', comparison.baseline), (comparison.loss, comparison.treatment)):
        specs = [spec_of(seed) for seed in comparison.seeds]
        histories = [by_id[s.run_id].get('history') or [] for s in specs if s.run_id in by_id]
        for key, what in CURVE_KEYS:
            points = tuple((e, v) for e, v in mean_curve(histories, key) if v > 0)
            if points:
                curves.append(Curve(arm, what, len(histories), points))
    return curves


def plot_loss_curves(design: StudyDesign, records: Sequence[Dict[str, Any]], path: str) -> None:
    """Clean-train and test loss per epoch, softmax vs treatment, one panel per comparison.

    Each line is the mean over the seeds present (n in the legend); panels share the logarithmic y-axis so
    the conditions can be compared. Written with matplotlib's Agg backend to a temporary name and renamed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    comparisons = design.comparisons()
    columns = 2
    rows = -(-len(comparisons) // columns)
    figure = Figure(figsize=(11, 3.3 * rows), dpi=90)
    FigureCanvasAgg(figure)
    grid = figure.subplots(rows, columns, sharey=True, squeeze=False)
    panels = [axes for row in grid for axes in row]
    colors = {'softmax': 'tab:blue'}
    styles = {'test loss': '-', 'clean-train loss': '--'}
    for axes, comparison in zip(panels, comparisons):
        curves = loss_curves(comparison, records)
        for curve in curves:
            axes.plot([e for e, _ in curve.points], [v for _, v in curve.points], styles[curve.what],
                      color=colors.get(curve.arm, 'tab:red'), marker='.', markersize=3,
                      label=f'{curve.arm}: {curve.what} (n={curve.runs})')
        if curves:
            axes.set_yscale('log')
            axes.legend(fontsize='x-small')
        else:
            axes.text(0.5, 0.5, 'not yet run', ha='center', va='center', transform=axes.transAxes)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel('epoch', fontsize='small')
        axes.set_ylabel('cross-entropy', fontsize='small')
        axes.set_title(f'{comparison.name}: {comparison.title}', fontsize='small')
        axes.grid(True, alpha=0.3, which='both')
    for axes in panels[len(comparisons):]:
        axes.set_visible(False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png')
    _write_atomic(path, buffer.getvalue())


def write_report(output: str, design: StudyDesign) -> List[Dict[str, Any]]:
    """Rebuild ``report.md`` and ``loss_curves.png`` under ``output`` from every JSON present.

    Returns:
        The records the report was built from.
    """
    records = load_results(output)
    _write_atomic(os.path.join(output, REPORT_FILE), format_report(design, records).encode())
    plot_loss_curves(design, records, os.path.join(output, PLOT_FILE))
    return records


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _number(kind: Callable[[str], Any], minimum: float, strict: bool = False) -> Callable[[str], Any]:
    """argparse type: ``kind`` at least ``minimum`` (above it when ``strict``), with a one-line error."""
    allowed = f'{"an integer" if kind is int else "a number"} {">" if strict else ">="} {minimum:g}'

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not (value > minimum if strict else value >= minimum):
            raise argparse.ArgumentTypeError(f'invalid value {text!r}, expected {allowed}')
        return value
    return parse


def get_args_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m experiments.overfit_study``."""
    d = StudyDesign()
    parser = argparse.ArgumentParser(prog='python -m experiments.overfit_study',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--output', required=True, metavar='DIR',
                        help='study folder: results/*.json, report.md and loss_curves.png go here')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--plan', action='store_true', help='list the pending runs and their time; train nothing')
    mode.add_argument('--report-only', action='store_true', help='rebuild report.md and the plot; train nothing')
    parser.add_argument('--max-runs', type=_number(int, 0), default=None, metavar='N', help='stop after N new runs')
    parser.add_argument('--only', nargs='+', choices=ONLY_NAMES, default=None, metavar='NAME',
                        help=f'only the runs of these comparisons ({", ".join(ONLY_NAMES)}; gate: the gates\' '
                             'softmax runs)')
    parser.add_argument('--seeds', nargs='+', type=_number(int, 0), default=None, metavar='S',
                        help='only the runs of these seeds (e.g. to split the pending runs between two sittings, '
                             'each with its own --output folder)')
    parser.add_argument('--threads', type=_number(int, 1), default=None, metavar='N',
                        help='OMP/MKL threads of each run (default: inherited)')
    parser.add_argument('--quick', action='store_true',
                        help='tiny smoke design (3 classes x 16 images, 2 epochs, one seed)')
    parser.add_argument('--epochs', type=_number(int, 1), default=None, metavar='E',
                        help=f'epochs of recipe A, and of B and S4 unless given (default: {d.recipe_a.epochs})')
    parser.add_argument('--lr-base', type=_number(float, 0, strict=True), default=None, metavar='X',
                        help=f'recipe A\'s learning rate at batch 256 (default: {d.recipe_a.lr_base:g})')
    parser.add_argument('--epochs-b', type=_number(int, 1), default=None, metavar='E',
                        help='epochs of recipe B (default: --epochs)')
    parser.add_argument('--lr-base-b', type=_number(float, 0, strict=True), default=None, metavar='X',
                        help=f'recipe B\'s learning rate at batch 256 (default: {d.recipe_b.lr_base:g})')
    parser.add_argument('--s4-epochs', type=_number(int, 1), default=None, metavar='E',
                        help='epochs of S4 (recipe A at 10 x 500; default: --epochs)')
    parser.add_argument('--val-interval', type=_number(int, 1), default=None, metavar='V',
                        help=f'evaluate test and clean training set every V epochs and after the last '
                             f'(default: {d.recipe_a.val_interval})')
    parser.add_argument('--fashion-mnist-dir', default=FASHION_MNIST_DIR, metavar='DIR',
                        help='the Debian IDX files (default: %(default)s)')
    parser.add_argument('--data-cache', default=os.path.join(tempfile.gettempdir(), 'timm-gsl-fashion-mnist'),
                        metavar='DIR', help='where the unpacked IDX files are kept (default: %(default)s)')
    return parser


def _lock(output: str) -> Optional[Any]:
    """Hold ``output/.lock`` for this sitting; None when another sitting holds it."""
    os.makedirs(output, exist_ok=True)
    handle = open(os.path.join(output, '.lock'), 'w')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def print_plan(runs: Sequence[RunSpec], todo: Sequence[RunSpec], rates: Dict[str, float], listing: bool) -> None:
    """Print how many runs are planned, done and to go with the hours left (and each pending run when ``listing``).

    Args:
        runs: the selected runs.
        todo: those without a JSON yet.
        rates: from :func:`throughputs`.
        listing: also list every pending run with its estimate.
    """
    seconds = [estimate_seconds(spec, rates) for spec in todo]
    source = ', '.join(f'recipe {k}: {v:.0f}' for k, v in sorted(rates.items()) if k != '*' and '/' not in k)
    source = f'measured {source}' if source else f'{FALLBACK_IMAGES_PER_S:g} (assumed)'
    print(f'{len(runs)} runs planned, {len(runs) - len(todo)} done, {len(todo)} to go: about '
          f'{sum(seconds) / 3600:.2f} h at {source} training images/s.', flush=True)
    if listing:
        for spec, s in zip(todo, seconds):
            print(f'  {spec.run_id}: {spec.train_images} images x {spec.recipe.epochs} epochs, ~{s:.0f} s '
                  f'({s / 3600:.2f} h)')
        print(f'Total: {sum(seconds) / 3600:.2f} h for {len(todo)} runs.')


def run_sitting(parser: argparse.ArgumentParser, args: argparse.Namespace,
                train: Callable[[str], int]) -> Optional[int]:
    """One sitting of a study in ``args.output``: prepare the data, hold the folder's lock, run ``train(data_dir)``.

    Args:
        parser: for a one-line error about ``--fashion-mnist-dir``.
        args: with ``output``, ``fashion_mnist_dir`` and ``data_cache``.
        train: trains the pending runs given the data folder; returns how many failed.

    Returns:
        What ``train`` returned, or None (with a message) when another sitting holds the folder.
    """
    try:
        data_dir = prepare_fashion_mnist(args.fashion_mnist_dir, args.data_cache)
    except ValueError as e:
        parser.error(str(e))
    lock = _lock(args.output)
    if lock is None:
        print(f'Another sitting is running in {args.output} (it holds {args.output}/.lock); one at a time.',
              file=sys.stderr)
        return None
    try:
        # A sitting killed mid-run leaves that run's checkpoints behind; the lock says no other sitting is here.
        shutil.rmtree(os.path.join(args.output, '.scratch'), ignore_errors=True)
        return train(data_dir)
    finally:
        lock.close()


def _train(design: StudyDesign, todo: Sequence[RunSpec], output: str, data_dir: str,
           threads: Optional[int]) -> int:
    """Train ``todo`` one after the other, rebuilding the report after each; returns the number that failed."""
    failed = 0
    for i, spec in enumerate(todo, 1):
        try:
            record = run_one(spec, output, data_dir, threads, memberships(design, spec))
        except RuntimeError as e:
            failed += 1
            print(f'[{i}/{len(todo)}] FAILED {e}', file=sys.stderr, flush=True)
            continue
        print(f'[{i}/{len(todo)}] {spec.run_id}: test top-1 {record["test_top1"]:.2f}, clean-train top-1 '
              f'{_measured(record["clean_train_top1"])}, {record["wall_s"]:.0f} s', flush=True)
        write_report(output, design)
    return failed


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Plan, run what is pending, and rebuild the report.

    Returns:
        0; 1 when a run failed (the others still run; the failed one has no JSON and reruns next time) or
        another sitting holds the folder. Bad arguments exit with status 2 before any work.
    """
    parser = get_args_parser()
    args = parser.parse_args(argv)
    design = build_design(args.quick, args.epochs, args.lr_base, args.epochs_b, args.lr_base_b, args.s4_epochs,
                          args.val_interval)
    training = not (args.plan or args.report_only)
    if training and not os.path.isdir(args.fashion_mnist_dir):
        parser.error(f'argument --fashion-mnist-dir: {args.fashion_mnist_dir!r} is not a folder, expected the '
                     'folder of the Fashion-MNIST IDX files (*-ubyte.gz)')
    runs = plan_runs(design, args.only)
    if args.seeds is not None:
        known = sorted({spec.seed for spec in runs})
        bad = sorted(set(args.seeds) - set(known))
        if bad:
            parser.error(f"argument --seeds: '{bad[0]}' is not a seed of the selected runs, expected some of "
                         f"{known}")
        runs = [spec for spec in runs if spec.seed in args.seeds]
    todo = [spec for spec in runs if not os.path.exists(result_path(args.output, spec))]
    rates = throughputs(load_results(args.output))
    print_plan(runs, todo, rates, args.plan)
    if args.plan:
        return 0
    failed = 0
    if training:
        failed = run_sitting(parser, args, lambda data_dir: _train(
            design, todo[:args.max_runs] if args.max_runs is not None else todo, args.output, data_dir, args.threads))
        if failed is None:
            return 1
    records = write_report(args.output, design)
    print(f'Report: {os.path.join(args.output, REPORT_FILE)} ({len(records)} runs).')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
