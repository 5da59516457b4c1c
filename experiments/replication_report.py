"""The replication's report, computed from the run JSONs and the saved logits (see ``experiments/replication.py``).

Everything here is recomputed from what the runs saved: the error from the test logits, the calibration
(NLL and ECE at T = 1, at T = G and at the temperature fitted on the run's calibration images) from the test
and calibration logits. Written as a separate module so that a report can be rebuilt by a newer checkout over
runs trained at the pinned commit.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from experiments.overfit_study import PairedStats, _ci, _p, _table, paired_stats

__all__ = ['BOOTSTRAP_RESAMPLES', 'RunMetrics', 'bootstrap_interval', 'format_report', 'run_metrics', 'sign_test']

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
ARMS = ('softmax', 'Type-II')


@dataclasses.dataclass(frozen=True)
class RunMetrics:
    """What one run's saved logits say.

    Args:
        seed, loss: the run.
        error: test top-1 error (%) from the logits.
        wrong: per test image, 1 where the prediction is wrong (for the bootstrap).
        temperature: fitted on the calibration images.
        nll, ece: test NLL and ECE (%) keyed by 'T=1', 'T=G' (Type-II only) and 'fitted'.
    """
    seed: int
    loss: str
    error: float
    wrong: np.ndarray
    temperature: float
    nll: Dict[str, float]
    ece: Dict[str, float]


def run_metrics(record: Dict[str, Any], results_dir: str) -> RunMetrics:
    """Error and calibration of one run, from its logits file (named in its JSON)."""
    from safetensors.torch import load_file

    from timm_gsl.calibration import calibration_metrics, fit_temperature

    tensors = load_file(os.path.join(results_dir, record['logits_file']))
    logits, target = tensors['test_logits'], tensors['test_target']
    wrong = (logits.argmax(1) != target).numpy().astype(np.int8)
    temperature = fit_temperature(tensors['calib_logits'], tensors['calib_target'])
    temperatures = {'T=1': 1.0, 'fitted': temperature}
    if record.get('groups'):
        temperatures['T=G'] = float(record['groups'])
    measured = {k: calibration_metrics(logits, target, t) for k, t in temperatures.items()}
    return RunMetrics(seed=int(record['seed']), loss=record['loss'], error=100.0 * float(wrong.mean()), wrong=wrong,
                      temperature=temperature, nll={k: v['nll'] for k, v in measured.items()},
                      ece={k: v['ece'] for k, v in measured.items()})


def sign_test(differences: Sequence[float]) -> Tuple[int, int, float]:
    """Exact two-sided sign test of ``differences`` against a median of 0 (zeros dropped).

    Returns:
        (negatives, non-zero differences, p-value): ``p = min(1, 2 * P[X <= min(neg, pos)])`` for
        ``X ~ Binomial(n, 1/2)``.
    """
    negative = sum(d < 0 for d in differences)
    n = sum(d != 0 for d in differences)
    if n == 0:
        return 0, 0, 1.0
    k = min(negative, n - negative)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return negative, n, min(1.0, 2 * tail)


def bootstrap_interval(wrong_treatment: Sequence[np.ndarray], wrong_baseline: Sequence[np.ndarray],
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       confidence: float = 0.95) -> Tuple[float, float]:
    """Percentile interval of the mean paired error difference (points), resampling seeds and test images.

    Each resample draws the seeds with replacement, and within each drawn seed the test images with
    replacement (the same images for both arms: the pairing is kept). A per-image difference is -1, 0 or +1
    (treatment wrong minus baseline wrong), so resampling N images is drawing the counts of those three values
    from a multinomial with the seed's observed shares: the same distribution, computed in O(1) per seed.

    Args:
        wrong_treatment, wrong_baseline: per seed, the 0/1 vector of wrong predictions over the same images.
        resamples, seed, confidence: of the bootstrap.

    Returns:
        (low, high) in percentage points.
    """
    if len(wrong_treatment) != len(wrong_baseline) or not wrong_treatment:
        raise ValueError('expected one pair of 0/1 vectors per seed, and at least one seed.')
    rng = np.random.default_rng(seed)
    shares, sizes = [], []
    for t, b in zip(wrong_treatment, wrong_baseline):
        d = np.asarray(t, dtype=np.int64) - np.asarray(b, dtype=np.int64)
        shares.append([np.mean(d == -1), np.mean(d == 0), np.mean(d == 1)])
        sizes.append(len(d))
    k = len(shares)
    means = np.empty(resamples)
    for r in range(resamples):
        drawn = rng.integers(0, k, size=k)
        total = 0.0
        for s in drawn:
            counts = rng.multinomial(sizes[s], shares[s])
            total += (counts[2] - counts[0]) / sizes[s]
        means[r] = 100.0 * total / k
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _pairs(metrics: Sequence[RunMetrics], seeds: Sequence[int]) -> List[Tuple[RunMetrics, RunMetrics]]:
    """(Type-II, softmax) per seed where both runs are present, in seed order."""
    by = {(m.loss, m.seed): m for m in metrics}
    return [(by[('Type-II', s)], by[('softmax', s)]) for s in seeds if ('Type-II', s) in by and ('softmax', s) in by]


def _study_errors(study: Sequence[Dict[str, Any]], design: Any) -> Dict[Tuple[str, int], float]:
    """(loss, seed) -> final test error (%) of the over-fitting study's runs of the same comparison."""
    wanted = {spec.run_id: spec for seed in design.original for spec in (design.softmax(seed), design.type_ii(seed))}
    return {(wanted[r['run_id']].loss, int(r['seed'])): 100.0 - float(r['test_top1'])
            for r in study if r.get('run_id') in wanted and r.get('test_top1') is not None}


def _stats_line(name: str, s: PairedStats, sign: Tuple[int, int, float], extra: str = '') -> str:
    neg, n, p = sign
    return (f'| {name} | {s.n} | {s.mean:+.2f} | {_ci(s)} | {s.wins}/{s.n} | {_p(s.p)} | {neg}/{n}, p {_p(p)} |'
            f'{extra}')


def _verdict_error(s: Optional[PairedStats], planned: int) -> str:
    if s is None or s.n < planned:
        return f'pending ({0 if s is None else s.n} of {planned} seeds)'
    if s.ci_high is not None and s.ci_high < 0:
        return 'replicated (Type-II lower error, interval below zero)'
    if s.ci_low is not None and s.ci_low > 0:
        return 'opposite (Type-II higher error, interval above zero)'
    return 'not replicated (no difference shown)'


def _verdict_calibration(s: Optional[PairedStats], planned: int, metric: str) -> str:
    if s is None or s.n < planned:
        return f'pending ({0 if s is None else s.n} of {planned} seeds)'
    if s.ci_low is not None and s.ci_low > 0:
        return f'worse: calibrated Type-II has a higher test {metric} than calibrated softmax (interval above zero)'
    if s.mean <= 0:
        return f'at least as well calibrated: calibrated Type-II\'s test {metric} is not above calibrated softmax\'s'
    return f'no difference shown (calibrated Type-II\'s {metric} higher on average, interval includes zero)'


def format_report(design: Any, records: Sequence[Dict[str, Any]], study: Sequence[Dict[str, Any]],
                  results_dir: str) -> str:
    """The replication's report in Markdown.

    Args:
        design: the :class:`experiments.replication.ReplicationDesign`.
        records: the replication's run JSONs.
        study: the over-fitting study's run JSONs (for the pooled seeds).
        results_dir: where the logits files are.
    """
    metrics = [run_metrics(r, results_dir) for r in records if r.get('logits_file')]
    seeds = list(design.seeds)
    pairs = _pairs(metrics, seeds)
    planned = len(seeds)
    lines = ['# Replication of the primary comparison, with logits', '',
             f'{len(records)} of {2 * planned} runs present (seeds {", ".join(map(str, seeds))}; '
             f'{len(pairs)} complete pairs). Every figure below is recomputed from the saved logits.', '']

    lines += ['## 1. Test error: Type-II minus softmax (percentage points), paired by seed', '']
    rows = [(m.seed, m.loss, f'{m.error:.2f}', f'{m.temperature:.3f}') for m in sorted(
        metrics, key=lambda m: (m.seed, ARMS.index(m.loss)))]
    lines += _table(['seed', 'loss', 'test error (%)', 'fitted T'], rows) + ['']
    header = ('| seeds | n | mean | 95 % t-interval | wins | t-test p | sign test (Type-II lower / non-zero) |')
    new = None
    if pairs:
        diffs = [t.error - b.error for t, b in pairs]
        new = paired_stats([t.error for t, _ in pairs], [b.error for _, b in pairs])
        low, high = bootstrap_interval([t.wrong for t, _ in pairs], [b.wrong for _, b in pairs])
        lines += [header, '|---|---|---|---|---|---|---|',
                  _stats_line(f'new ({", ".join(str(t.seed) for t, _ in pairs)})', new, sign_test(diffs))]
        original = _study_errors(study, design)
        pooled_t = [original[('Type-II', s)] for s in design.original if ('Type-II', s) in original
                    and ('softmax', s) in original]
        pooled_b = [original[('softmax', s)] for s in design.original if ('Type-II', s) in original
                    and ('softmax', s) in original]
        if pooled_t:
            all_t, all_b = pooled_t + [t.error for t, _ in pairs], pooled_b + [b.error for _, b in pairs]
            pooled = paired_stats(all_t, all_b)
            lines.append(_stats_line(f'pooled with the study\'s {len(pooled_t)}', pooled,
                                     sign_test([t - b for t, b in zip(all_t, all_b)])))
        lines += ['', f'Paired bootstrap over seeds and test images (new seeds, {BOOTSTRAP_RESAMPLES:,} resamples, '
                      f'seed {BOOTSTRAP_SEED}): 95 % interval [{low:+.2f}, {high:+.2f}] points.', '']
    lines += [f'**Verdict (pre-registered: the 5 new seeds\' t-interval): {_verdict_error(new, planned)}.**', '']

    lines += ['## 2. Calibration on the test images', '',
              'NLL (nats) and ECE (%, top-label, 15 equal-width bins) of the final models at T = 1, at T = G '
              '(Type-II only) and at the temperature fitted on each run\'s calibration images (100 per class from '
              'the training pool, never trained on). Means over the seeds present.', '']
    table = []
    for arm in ARMS:
        runs = [m for m in metrics if m.loss == arm]
        if not runs:
            continue
        for key, label in (('T=1', 'T = 1'), ('T=G', f'T = G = {design.groups}'), ('fitted', 'fitted T')):
            values = [(m.nll[key], m.ece[key]) for m in runs if key in m.nll]
            if values:
                table.append((arm, label, len(values), f'{np.mean([v[0] for v in values]):.3f}',
                              f'{np.mean([v[1] for v in values]):.2f}'))
    lines += _table(['arm', 'temperature', 'runs', 'test NLL', 'test ECE (%)'], table) + ['']
    calibrated = {}
    for metric in ('nll', 'ece'):
        if pairs:
            calibrated[metric] = paired_stats([getattr(t, metric)['fitted'] for t, _ in pairs],
                                              [getattr(b, metric)['fitted'] for _, b in pairs])
    if calibrated:
        lines += ['Calibrated Type-II minus calibrated softmax, paired by seed:', '',
                  '| metric | n | mean | 95 % t-interval | Type-II lower |', '|---|---|---|---|---|']
        for metric, s in calibrated.items():
            fmt = '+.4f' if metric == 'nll' else '+.2f'
            lines.append(f'| test {metric.upper()} | {s.n} | {s.mean:{fmt}} | {_ci(s, fmt)} | {s.wins}/{s.n} |')
        lines.append('')
    lines += [f'**Verdict (pre-registered: calibrated NLL): '
              f'{_verdict_calibration(calibrated.get("nll"), planned, "NLL")}.**',
              f'Secondary (ECE): {_verdict_calibration(calibrated.get("ece"), planned, "ECE")}.', '']

    lines += ['## 3. Runs', '']
    rows = [(r['run_id'], r.get('git_commit', '')[:7], f'{r["wall_s"]:.0f}', f'{r["test_top1"]:.2f}',
             f'{r.get("test_top1_from_logits", float("nan")):.2f}', r.get('finished', '')) for r in records]
    lines += _table(['run', 'commit', 'wall (s)', 'test top-1 (summary.csv)', 'test top-1 (logits)', 'finished'],
                    rows) + ['']
    return '\n'.join(lines)
