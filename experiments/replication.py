#!/usr/bin/env python3
"""Replication of the over-fitting study's primary comparison, with every final model's logits saved.

The over-fitting study (``experiments/overfit_study.py``) found Type-II's test error 0.48 points below
softmax's at 10 classes x 100 images (seeds 0-4), with a test cross-entropy 2.7 times softmax's, but kept no
logits: no later question about those models can be answered without training them again. This script
trains the same comparison on five new seeds and keeps, for every final model, its logits on the test images
and on held-out calibration images, so that calibration (and anything else) can be recomputed at will.

Pre-registered design (written 2026-12-07, before the first run; do not change it after seeing results):

* Runs: recipe A of the study (ResNet-18 at 28x28, 240 epochs, lr_base 0.1, multistep at 90/180/210,
  random-resized crop 0.8-1 and flip, no smoothing; the study's exact train.py command), 10 classes x 100
  training images per class, softmax (``--loss ce``) against Type-II (G = 4, discriminative grouping), seeds
  5, 6, 7, 8, 9 (seed-major order: softmax s5, Type-II s5, softmax s6, ...).
* Test images: every Fashion-MNIST test image (10,000). Calibration images: 100 per class (1,000) from the
  Fashion-MNIST training pool, the last 100 of each class's seeded permutation
  (``apply_data_conditions(..., holdout_per_class=100, part='holdout')``): never trained on (the training
  images are the first 100 of the same permutation) and never reported on.
* Saved per run: ``results/replication/results/<run_id>.json`` (the study's record: settings, train.py
  command, per-epoch history, final metrics, git commit, wall time) and ``<run_id>.logits.safetensors`` beside
  it: ``test_logits`` (10,000 x 10), ``test_target``, ``calib_logits`` (1,000 x 10), ``calib_target``,
  ``calib_index`` (indices into the training split), and for Type-II ``test_group_logits`` and
  ``calib_group_logits`` (N x 4 x 10, the four group logits under the discriminative grouping of the true
  label, summing to the logits up to rounding). The final model is the last epoch's (``last.pth.tar``).
* Question 1 (error): Type-II minus softmax test top-1 error, paired by seed, on the 5 new seeds: mean, SD,
  95 % t-interval, wins k/5, paired t-test p; an exact two-sided sign test; a 95 % paired bootstrap interval
  over seeds and test images (10,000 resamples: seeds drawn with replacement, and within each drawn seed the
  test images drawn with replacement, the same images for both arms). The same t-interval, wins and sign test
  on all 10 seeds pooled (seeds 0-4 from the study, which kept no logits, so no bootstrap over their images).
  Verdict: "replicated" if the 5-seed t-interval lies below zero, "opposite" if above, "not replicated (no
  difference shown)" otherwise.
* Question 2 (calibration): test NLL and ECE (top-label, 15 equal-width bins) of both arms at T = 1, at T = G
  = 4 (Type-II only) and at the temperature fitted on that run's calibration images
  (``timm_gsl.calibration.fit_temperature``). Primary calibration comparison: calibrated Type-II minus
  calibrated softmax test NLL, paired by seed, 5 new seeds, 95 % t-interval. Verdict: "at least as well
  calibrated" if the mean difference is <= 0, and "worse" when the interval lies above zero (otherwise "no
  difference shown" with the sign of the mean). ECE is reported the same way, as a secondary.

Commands (resumable: a run whose JSON exists is skipped; one sitting per output folder at a time)::

    python -m experiments.replication --output results/replication --plan
    python -m experiments.replication --output results/replication --threads 2
    python -m experiments.replication --output results/replication --report-only
    python -m experiments.replication --output /tmp/replication-quick --quick   # smoke run, a minute or two
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from experiments.overfit_study import (
    Recipe,
    RunSpec,
    _number,
    git_state,
    make_record,
    print_plan,
    run_sitting,
    throughputs,
    train_argv,
)
from experiments.reproduce import (
    FASHION_MNIST_DIR,
    REPO_ROOT,
    load_results,
    train_in_subprocess,
    write_json,
)

__all__ = ['QUICK_DESIGN', 'ReplicationDesign', 'extract_logits', 'get_args_parser', 'logits_path', 'main', 'plan_runs',
           'result_path', 'run_one']

REPORT_FILE = 'report.md'
LOGITS_SUFFIX = '.logits.safetensors'
EVAL_BATCH = 500


@dataclasses.dataclass(frozen=True)
class ReplicationDesign:
    """The pre-registered replication (module docstring); defaults are the real one.

    Args:
        recipe: the study's recipe A.
        classes, samples_per_class: training data condition.
        seeds: the new seeds.
        groups, grouping: the Type-II arm.
        calib_per_class: calibration images per class, held out of the training pool.
        original: the study's seeds of the same comparison (pooled in question 1).
    """
    recipe: Recipe = Recipe()
    classes: int = 10
    samples_per_class: int = 100
    seeds: Tuple[int, ...] = (5, 6, 7, 8, 9)
    groups: int = 4
    grouping: str = 'discriminative'
    calib_per_class: int = 100
    original: Tuple[int, ...] = (0, 1, 2, 3, 4)

    def softmax(self, seed: int) -> RunSpec:
        """The softmax run of ``seed``."""
        return RunSpec(self.recipe, 'softmax', self.classes, self.samples_per_class, seed)

    def type_ii(self, seed: int) -> RunSpec:
        """The Type-II run of ``seed``."""
        return RunSpec(self.recipe, 'Type-II', self.classes, self.samples_per_class, seed, self.groups,
                       self.grouping)


# 3 classes x 64 images: three batches of 64 an epoch (timm drops a last partial training batch).
QUICK_DESIGN = ReplicationDesign(recipe=Recipe(epochs=2, val_interval=1), classes=3, samples_per_class=64,
                                 seeds=(5,), calib_per_class=8, original=())


def plan_runs(design: ReplicationDesign) -> List[RunSpec]:
    """Every run, seed-major (softmax then Type-II of each seed)."""
    return [spec for seed in design.seeds for spec in (design.softmax(seed), design.type_ii(seed))]


def result_path(output: str, spec: RunSpec) -> str:
    """Where the JSON of a run lives."""
    return os.path.join(output, 'results', spec.run_id + '.json')


def logits_path(output: str, spec: RunSpec) -> str:
    """Where the logits of a run's final model live (beside its JSON)."""
    return os.path.join(output, 'results', spec.run_id + LOGITS_SUFFIX)


# ----------------------------------------------------------------------------------------------
# Logits of the final model
# ----------------------------------------------------------------------------------------------

def _eval_dataset(data_dir: str, spec: RunSpec, split: str, holdout: int = 0):
    """The evaluation images of a run: the test split, or the calibration hold-out of the training split."""
    from timm.data import create_transform

    from timm_gsl.data import apply_data_conditions
    from timm_gsl.data.factory import create_dataset

    transform = create_transform(input_size=(1, 28, 28), is_training=False, interpolation='bilinear',
                                 mean=(0.286,), std=(0.353,), crop_pct=1.0)
    if split == 'validation':
        return create_dataset('torch/fashion_mnist', root=data_dir, split='validation', class_subset=spec.classes,
                              seed=spec.seed, transform=transform)
    base = create_dataset('torch/fashion_mnist', root=data_dir, split='train', transform=transform)
    return apply_data_conditions(base, class_subset=spec.classes, samples_per_class=spec.samples_per_class,
                                 seed=spec.seed, holdout_per_class=holdout, part='holdout')


def extract_logits(run_dir: str, spec: RunSpec, data_dir: str, calib_per_class: int, path: str) -> Dict[str, Any]:
    """Compute the final model's logits (and Type-II's group logits) and save them as safetensors.

    Args:
        run_dir: train.py's output folder of the run (holds ``last.pth.tar``).
        spec: the run.
        data_dir: the prepared Fashion-MNIST root.
        calib_per_class: calibration images per class (held out of the training pool).
        path: the safetensors file to write.

    Returns:
        A summary for the run's JSON: test and calibration top-1 recomputed from the logits, image counts,
        and the largest gap between the group logits' sum and the logits.
    """
    import timm
    import torch
    from safetensors.torch import save_file

    from timm_gsl.engine.atomic import atomic_path
    from timm_gsl.engine.checkpoint_io import read_checkpoint
    from timm_gsl.functional import group_logits, make_assignment

    checkpoint = read_checkpoint(os.path.join(run_dir, 'last.pth.tar'), 'last.pth.tar')
    model = timm.create_model(spec.recipe.model, num_classes=spec.classes, in_chans=1)
    model.load_state_dict(checkpoint['state_dict'])
    model.eval()
    classifier = model.get_classifier()
    tensors: Dict[str, torch.Tensor] = {}
    summary: Dict[str, Any] = dict(final_epoch=int(checkpoint.get('epoch', -1)))
    worst_sum_gap = 0.0
    for name, split in (('test', 'validation'), ('calib', 'train')):
        dataset = _eval_dataset(data_dir, spec, split, calib_per_class)
        loader = torch.utils.data.DataLoader(dataset, batch_size=EVAL_BATCH, shuffle=False, num_workers=0)
        logits, targets, groups = [], [], []
        with torch.no_grad():
            for images, target in loader:
                features = model.forward_head(model.forward_features(images), pre_logits=True)
                out = classifier(features)
                logits.append(out)
                targets.append(target)
                if spec.groups:
                    assignment = make_assignment(features, classifier.weight, target, spec.groups, spec.grouping)
                    g = group_logits(features, classifier.weight, classifier.bias, assignment, spec.groups)
                    worst_sum_gap = max(worst_sum_gap, float((g.sum(1) - out).abs().max()))
                    groups.append(g)
        tensors[f'{name}_logits'] = torch.cat(logits).float().contiguous()
        tensors[f'{name}_target'] = torch.cat(targets).long().contiguous()
        if groups:
            tensors[f'{name}_group_logits'] = torch.cat(groups).float().contiguous()
        if name == 'calib':
            tensors['calib_index'] = torch.tensor(dataset.indices, dtype=torch.int64)
        correct = (tensors[f'{name}_logits'].argmax(1) == tensors[f'{name}_target']).double().mean()
        summary[f'{name}_images'] = len(dataset)
        summary[f'{name}_top1_from_logits'] = round(float(correct) * 100, 4)
    if spec.groups:
        summary['group_logits_sum_max_abs_gap'] = worst_sum_gap
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=dict(run_id=spec.run_id))
    return summary


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

def run_one(spec: RunSpec, design: ReplicationDesign, output: str, data_dir: str,
            threads: Optional[int] = None) -> Dict[str, Any]:
    """Train one run with train.py in a fresh interpreter, save its final model's logits, then its JSON.

    The logits file is written first and the JSON last, so a JSON present means the run is complete.

    Raises:
        RuntimeError: train.py failed (the message ends with its log's tail).
    """
    commit, dirty = git_state()
    extracted: Dict[str, Any] = {}

    def inspect(run_dir: str) -> None:
        if threads:
            import torch
            torch.set_num_threads(threads)
        extracted.update(extract_logits(run_dir, spec, data_dir, design.calib_per_class, logits_path(output, spec)))

    history, wall_s, argv = train_in_subprocess(spec.run_id, lambda work: train_argv(spec, data_dir, work), output,
                                                threads, inspect)
    if not extracted:
        raise RuntimeError(f'{spec.run_id}: train.py wrote no evaluation, so no logits were saved.')
    record = make_record(spec, history, wall_s, argv, commit, dirty, ('replication',))
    record.update(study='replication', logits_file=os.path.basename(logits_path(output, spec)),
                  calib_per_class=design.calib_per_class, calib_source='training-pool hold-out', **extracted)
    write_json(result_path(output, spec), record)
    return record


def get_args_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m experiments.replication``."""
    parser = argparse.ArgumentParser(prog='python -m experiments.replication', description=__doc__.split('\n\n')[0])
    parser.add_argument('--output', required=True, metavar='DIR',
                        help='replication folder: results/*.json and *.logits.safetensors, report.md')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--plan', action='store_true', help='list the pending runs and their time; train nothing')
    mode.add_argument('--report-only', action='store_true', help='rebuild report.md; train nothing')
    parser.add_argument('--max-runs', type=_number(int, 0), default=None, metavar='N', help='stop after N new runs')
    parser.add_argument('--seeds', nargs='+', type=_number(int, 0), default=None, metavar='S',
                        help='only the runs of these seeds (to split the runs between sittings with their own '
                             '--output folders)')
    parser.add_argument('--threads', type=_number(int, 1), default=None, metavar='N',
                        help='OMP/MKL threads of each run (default: inherited)')
    parser.add_argument('--quick', action='store_true', help='tiny smoke design (3 classes x 64 images, 2 epochs)')
    parser.add_argument('--study-results', default=os.path.join(REPO_ROOT, 'results', 'overfit', 'results'),
                        metavar='DIR',
                        help='the over-fitting study\'s run JSONs, for the pooled seeds (default: %(default)s)')
    parser.add_argument('--fashion-mnist-dir', default=FASHION_MNIST_DIR, metavar='DIR',
                        help='the Debian IDX files (default: %(default)s)')
    parser.add_argument('--data-cache', default=os.path.join(tempfile.gettempdir(), 'timm-gsl-fashion-mnist'),
                        metavar='DIR', help='where the unpacked IDX files are kept (default: %(default)s)')
    return parser


def write_report(output: str, design: ReplicationDesign, study_results: str) -> int:
    """Rebuild ``output/report.md`` from the run JSONs and logits present; returns the number of runs."""
    from experiments.replication_report import format_report  # torch is only needed from here on
    records = load_results(output)
    # load_results reads FOLDER/results: the study's JSONs are in its results/ folder.
    study = load_results(os.path.dirname(os.path.abspath(study_results))) if os.path.isdir(study_results) else []
    text = format_report(design, records, study, os.path.join(output, 'results'))
    from timm_gsl.engine.atomic import write_text_atomic
    write_text_atomic(os.path.join(output, REPORT_FILE), text)
    return len(records)


def _train(design: ReplicationDesign, todo: Sequence[RunSpec], output: str, data_dir: str,
           threads: Optional[int]) -> int:
    """Train ``todo`` one after the other; returns the number that failed."""
    failed = 0
    for i, spec in enumerate(todo, 1):
        try:
            record = run_one(spec, design, output, data_dir, threads)
        except RuntimeError as e:
            failed += 1
            print(f'[{i}/{len(todo)}] FAILED {e}', file=sys.stderr, flush=True)
            continue
        print(f'[{i}/{len(todo)}] {spec.run_id}: test top-1 {record["test_top1"]:.2f} (from logits '
              f'{record["test_top1_from_logits"]:.2f}), {record["wall_s"]:.0f} s', flush=True)
    return failed


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Plan, run what is pending, and rebuild the report.

    Returns:
        0; 1 when a run failed (it has no JSON and reruns next time) or another sitting holds the folder.
        Bad arguments exit with status 2 before any work.
    """
    parser = get_args_parser()
    args = parser.parse_args(argv)
    design = QUICK_DESIGN if args.quick else ReplicationDesign()
    training = not (args.plan or args.report_only)
    if training and not os.path.isdir(args.fashion_mnist_dir):
        parser.error(f'argument --fashion-mnist-dir: {args.fashion_mnist_dir!r} is not a folder, expected the '
                     'folder of the Fashion-MNIST IDX files (*-ubyte.gz)')
    runs = plan_runs(design)
    if args.seeds is not None:
        bad = sorted(set(args.seeds) - set(design.seeds))
        if bad:
            parser.error(f"argument --seeds: '{bad[0]}' is not a seed of the replication, expected some of "
                         f"{list(design.seeds)}")
        runs = [spec for spec in runs if spec.seed in args.seeds]
    todo = [spec for spec in runs if not os.path.exists(result_path(args.output, spec))]
    rates = throughputs(load_results(args.output) or load_results(os.path.dirname(os.path.abspath(
        args.study_results))))
    print_plan(runs, todo, rates, args.plan)
    if args.plan:
        return 0
    failed = 0
    if training:
        failed = run_sitting(parser, args, lambda data_dir: _train(
            design, todo[:args.max_runs] if args.max_runs is not None else todo, args.output, data_dir, args.threads))
        if failed is None:
            return 1
    try:
        count = write_report(args.output, design, args.study_results)
        print(f'Report: {os.path.join(args.output, REPORT_FILE)} ({count} runs).')
    except ImportError:
        print('No report module in this checkout; rebuild it with --report-only from a newer one.')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
