"""Time and memory of the group softmax loss against a literal reference and a plain classifier.

Every variant computes a scalar loss from B x D features, a C x D weight, a C bias and B class
labels, then the gradients of that loss with respect to all three (one forward+backward step of a
linear classifier's loss). The variants:

* ``plain``: ``F.linear`` + ``F.cross_entropy``, the ordinary softmax loss (the yardstick).
* ``ours``: :func:`timm_gsl.functional.group_softmax_loss` of this checkout (discriminative grouping).
* ``literal``: the method written out literally and vectorised: the B x D x C ingredient logits by
  broadcasting, discriminativity from them, a sort, a gather and a group sum; no Python loops.
* ``masked``: the whole logits once plus G-1 masked matmuls, last group = whole - the others.
* ``embedding_bag``: ``F.embedding_bag`` over features bucketed by (group, sample), which does
  exactly B·D·C multiply-adds in the forward pass and in the weight gradient.

``masked`` and ``embedding_bag`` are the alternative formulations of the group logits that were
tried; they share ``ours``' grouping and cross-entropy and differ only in the group logits. All
variants are functions ``(features, weight, bias, target, groups, loss_type) -> scalar loss``.

Each (batch size, G, variant) runs in its own subprocess. It first records the peak resident
memory of one step (``resource.getrusage`` maxrss after the step minus maxrss after imports and
inputs), then times ``--repeats`` rounds in which the variant and ``plain`` run back to back, in
alternating order. "ratio vs plain" is the median of the per-round ratios, so the load of other jobs
on a shared machine largely cancels; "speed-up vs literal" is the literal's ratio over the variant's.

Usage::

    python -m benchmarks.bench_loss                 # B in {64, 256}, G in {2, 4, 8}, D=2048, C=1000
    python -m benchmarks.bench_loss --quick         # smoke run: B=32, G=4, 3 rounds
    python -m benchmarks.bench_loss --sizes 64 --groups 4 --variants plain,ours,literal
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from timm_gsl.functional import (
    check_loss_type,
    group_cross_entropy,
    group_logits,
    group_sizes,
    group_softmax_loss,
    make_assignment,
)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, str], torch.Tensor]

# The literal reference holds the B x D x C ingredients, their sorted copy and, in the backward,
# gradients and product temporaries of that size: its peak was about 3 such float32 tensors at B=64
# (1.5 GiB); the estimate that decides whether to skip it assumes 4.
LITERAL_COPIES = 4
MEMORY_MARGIN_BYTES = 1 << 30


# ----------------------------------------------------------------------------------------------
# The variants
# ----------------------------------------------------------------------------------------------

def plain_loss(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
               groups: int, loss_type: str) -> torch.Tensor:
    """Ordinary softmax cross-entropy of a linear classifier (``groups`` and ``loss_type`` unused)."""
    return F.cross_entropy(F.linear(x, weight, bias), target)


def ours_loss(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
              groups: int, loss_type: str) -> torch.Tensor:
    """The library's group softmax loss with discriminative grouping."""
    return group_softmax_loss(x, weight, bias, target, groups, loss_type=loss_type, check_values=False)


def _literal_group_cross_entropy(logits: torch.Tensor, target: torch.Tensor, loss_type: str) -> torch.Tensor:
    groups = logits.shape[1]
    if loss_type == 'I':
        logits = logits * groups
    index = target.view(-1, 1, 1).expand(-1, groups, 1)
    per_group = -F.log_softmax(logits, dim=-1).gather(2, index).squeeze(2)
    return (per_group.mean(1) if loss_type == 'I' else per_group.sum(1)).mean()


def literal_loss(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                 groups: int, loss_type: str) -> torch.Tensor:
    """The method as written in SPEC.md, through the full B x D x C ingredient tensor."""
    batch, dim = x.shape
    num_classes = weight.shape[0]
    ingredients = x[:, :, None] * weight.t()[None]  # z[n, j, c]
    z = ingredients.detach()
    z_true = z.gather(2, target.view(-1, 1, 1).expand(batch, dim, 1)).squeeze(2)
    score = z_true - (z.sum(2) - z_true) / (num_classes - 1)
    order = torch.sort(score, dim=1, stable=True).indices
    ranked = ingredients.gather(1, order[:, :, None].expand(batch, dim, num_classes))
    rank_group = torch.repeat_interleave(torch.arange(groups), group_sizes(dim, groups)).to(x.device)
    logits = x.new_zeros(batch, groups, num_classes).index_add(1, rank_group, ranked) + bias / groups
    return _literal_group_cross_entropy(logits, target, loss_type)


def _masked_group_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         assignment: torch.Tensor, groups: int) -> torch.Tensor:
    whole = F.linear(x, weight, bias)
    if groups == 1:
        return whole.unsqueeze(1)
    masks = assignment.unsqueeze(1) == torch.arange(groups - 1, device=x.device).view(1, -1, 1)
    first = F.linear(x.unsqueeze(1) * masks, weight, bias / groups)
    last = whole - first.sum(1)  # the last group keeps b - (G-1) b/G = b/G
    return torch.cat([first, last.unsqueeze(1)], 1)


def masked_loss(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                groups: int, loss_type: str) -> torch.Tensor:
    """Whole logits plus G-1 masked matmuls; the last group is the remainder."""
    assignment = make_assignment(x, weight, target, groups)
    logits = _masked_group_logits(x, weight, bias, assignment, groups)
    return group_cross_entropy(logits, target, loss_type).mean()


# Weight columns are split into this many blocks so that the table each embedding_bag call reads
# fits a core's L2 cache; 4 was among the fastest of 1, 2, 4, 8 in (noisy) single-thread runs at
# D=2048, C=1000.
EMBEDDING_PARTS = 4


def _column_blocks(matrix: torch.Tensor, parts: int) -> List[torch.Tensor]:
    # Contiguous column blocks of a 2-D tensor, each usable as an embedding table.
    return [block.contiguous() for block in matrix.tensor_split(parts, dim=1)]


class _EmbeddingBagGroupLogits(torch.autograd.Function):
    """Group logits (group-major, G·B x C) through ``F.embedding_bag`` in both products with W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, assignment: torch.Tensor, groups: int) -> torch.Tensor:
        batch, dim = x.shape
        onehot = assignment.unsqueeze(0) == torch.arange(groups, device=x.device).view(-1, 1, 1)  # G x B x D
        bag_feature = torch.nonzero_static(onehot.view(groups * batch, dim), size=batch * dim)
        bag, feature = bag_feature[:, 0], bag_feature[:, 1]
        counts = onehot.sum(2).view(-1)
        offsets = torch.cumsum(counts, 0) - counts
        values = x.reshape(-1)[(bag % batch) * dim + feature]
        out = torch.cat([
            F.embedding_bag(feature, table, offsets, mode='sum', per_sample_weights=values)
            for table in _column_blocks(weight.t(), EMBEDDING_PARTS)], 1)
        ctx.save_for_backward(x, weight, assignment)
        ctx.groups = groups
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, assignment = ctx.saved_tensors
        groups = ctx.groups
        batch, dim = x.shape
        # Row of grad (group-major) that each (feature, sample) pair contributes to: a D x B bag list.
        rows = (assignment * batch + torch.arange(batch, device=x.device).view(-1, 1)).t()
        grad_weight_t = torch.cat([
            F.embedding_bag(rows, table, mode='sum', per_sample_weights=x.t())
            for table in _column_blocks(grad, EMBEDDING_PARTS)], 1)
        grad_x = (grad @ weight).view(groups, batch, dim).gather(0, assignment.unsqueeze(0)).squeeze(0)
        return grad_x, grad_weight_t.t(), None, None


def embedding_bag_loss(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                       groups: int, loss_type: str) -> torch.Tensor:
    """Group logits by embedding_bag (B·D·C multiply-adds per product with W, except grad wrt x)."""
    assignment = make_assignment(x, weight, target, groups)
    flat = _EmbeddingBagGroupLogits.apply(x, weight, assignment, groups)
    logits = flat.view(groups, x.shape[0], -1).transpose(0, 1) + bias / groups
    return group_cross_entropy(logits, target, loss_type).mean()


VARIANTS: Dict[str, LossFn] = {
    'plain': plain_loss,
    'ours': ours_loss,
    'literal': literal_loss,
    'masked': masked_loss,
    'embedding_bag': embedding_bag_loss,
}


# ----------------------------------------------------------------------------------------------
# One subprocess: memory, then interleaved timing against plain
# ----------------------------------------------------------------------------------------------

def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _inputs(batch: int, dim: int, num_classes: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(num_classes, dim, generator=gen, dtype=dtype) * 0.01).requires_grad_()
    bias = (torch.randn(num_classes, generator=gen, dtype=dtype) * 0.01).requires_grad_()
    target = torch.randint(0, num_classes, (batch,), generator=gen)
    return x, weight, bias, target


def _step(fn: LossFn, inputs, groups: int, loss_type: str):
    x, weight, bias, target = inputs
    loss = fn(x, weight, bias, target, groups, loss_type)
    return (loss,) + torch.autograd.grad(loss, (x, weight, bias))


def _timed(fn: LossFn, inputs, groups: int, loss_type: str) -> float:
    start = time.perf_counter()
    _step(fn, inputs, groups, loss_type)
    return (time.perf_counter() - start) * 1e3


def run_worker(args: argparse.Namespace) -> Dict[str, object]:
    """Measure one variant at one size: peak memory of a step, then rounds against ``plain``."""
    torch.set_num_threads(args.threads)
    inputs = _inputs(args.batch, args.dim, args.classes, torch.float32, args.seed)
    fn, plain = VARIANTS[args.variant], VARIANTS['plain']
    before = _maxrss_mib()
    _step(fn, inputs, args.groups, args.loss_type)
    peak = _maxrss_mib() - before
    _step(plain, inputs, args.groups, args.loss_type)
    times, plain_times, ratios = [], [], []
    for round_index in range(args.repeats):
        if round_index % 2:
            base = _timed(plain, inputs, args.groups, args.loss_type)
            mine = _timed(fn, inputs, args.groups, args.loss_type)
        else:
            mine = _timed(fn, inputs, args.groups, args.loss_type)
            base = _timed(plain, inputs, args.groups, args.loss_type)
        times.append(mine)
        plain_times.append(base)
        ratios.append(mine / base)
    return {
        'batch': args.batch, 'groups': args.groups, 'variant': args.variant, 'peak_mib': peak,
        'ms': statistics.median(times), 'plain_ms': statistics.median(plain_times),
        'ratio': statistics.median(ratios), 'repeats': args.repeats, 'threads': torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------

def _available_bytes() -> Optional[int]:
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def literal_bytes(batch: int, dim: int, num_classes: int) -> int:
    """Rough peak memory of the literal reference (float32): a few B x D x C tensors."""
    return LITERAL_COPIES * batch * dim * num_classes * 4


def check_agreement(loss_type: str, variants: Sequence[str]) -> float:
    """Largest relative difference of loss and gradients between the variants and the literal, in float64.

    Args:
        loss_type: 'I' or 'II'.
        variants: names from :data:`VARIANTS` (``plain`` is skipped: it is a different loss).

    Returns:
        The largest relative difference found (max abs difference over max abs value).
    """
    worst = 0.0
    for batch, dim, num_classes, groups in ((8, 64, 10, 4), (5, 13, 7, 3), (6, 32, 5, 1)):
        inputs = _inputs(batch, dim, num_classes, torch.float64, seed=1)
        reference = _step(literal_loss, inputs, groups, loss_type)
        for name in variants:
            if name in ('plain', 'literal'):
                continue
            for got, want in zip(_step(VARIANTS[name], inputs, groups, loss_type), reference):
                got, want = got.detach(), want.detach()
                worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-300)))
    return worst


def _spawn(args: argparse.Namespace, batch: int, groups: int, variant: str, repeats: int) -> Dict[str, object]:
    command = [
        sys.executable, os.path.abspath(__file__), '--worker', '--variant', variant, '--batch', str(batch),
        '--groups', str(groups), '--dim', str(args.dim), '--classes', str(args.classes),
        '--repeats', str(repeats), '--threads', str(args.threads), '--loss-type', args.loss_type,
        '--seed', str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ['no output'])[-1]
        return {'batch': batch, 'groups': groups, 'variant': variant,
                'skipped': f'failed (exit code {done.returncode}: {tail})'}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _format_row(row: Dict[str, object], literal_ratio: Optional[float]) -> str:
    groups = '-' if row['variant'] == 'plain' else str(row['groups'])
    head = f"{row['batch']:>5} {groups:>3}  {row['variant']:<14}"
    if 'skipped' in row:
        return f"{head} {row['skipped']}"
    speedup = f"{literal_ratio / row['ratio']:10.1f}x" if literal_ratio else f"{'n/a':>11}"
    return f"{head} {row['ms']:10.2f} {row['peak_mib']:10.1f} {row['ratio']:13.2f}x {speedup}"


def run_driver(args: argparse.Namespace) -> List[Dict[str, object]]:
    """Run every (batch, G, variant) in its own subprocess, print the table and the verdicts."""
    torch.set_num_threads(args.threads)
    variants = args.variants
    print(f"bench_loss: D={args.dim} C={args.classes} loss_type={args.loss_type} "
          f"torch={torch.__version__} threads={torch.get_num_threads()} (torch.set_num_threads) "
          f"repeats={args.repeats} literal_repeats={args.literal_repeats}")
    print("time: forward+backward (grads wrt features, weight, bias), median over rounds, float32, CPU")
    print("peak MiB: ru_maxrss after one step minus ru_maxrss after imports and inputs, per subprocess")
    if args.check:
        print(f"agreement with literal (float64, small sizes, loss and 3 gradients): "
              f"max relative difference {check_agreement(args.loss_type, variants):.2e}")
    print(f"{'B':>5} {'G':>3}  {'variant':<14} {'median ms':>10} {'peak MiB':>10} {'ratio vs plain':>14} "
          f"{'vs literal':>11}")
    rows: List[Dict[str, object]] = []
    for batch in args.sizes:
        if 'plain' in variants:
            row = _spawn(args, batch, args.groups_list[0], 'plain', args.repeats)
            rows.append(row)
            print(_format_row(row, None), flush=True)
        for groups in args.groups_list:
            literal_ratio = None
            for variant in [v for v in variants if v != 'plain']:
                if variant == 'literal':
                    need, have = literal_bytes(batch, args.dim, args.classes), _available_bytes()
                    if have is not None and need + MEMORY_MARGIN_BYTES > have:
                        row = {'batch': batch, 'groups': groups, 'variant': variant,
                               'skipped': f'skipped (needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available)'}
                    else:
                        row = _spawn(args, batch, groups, variant, args.literal_repeats)
                else:
                    row = _spawn(args, batch, groups, variant, args.repeats)
                if variant == 'literal' and 'ratio' in row:
                    literal_ratio = row['ratio']
                rows.append(row)
            for row in rows[-(len(variants) - ('plain' in variants)):]:
                print(_format_row(row, literal_ratio), flush=True)
    _print_verdicts(rows)
    return rows


def _print_verdicts(rows: List[Dict[str, object]]) -> None:
    measured = {(r['batch'], r['groups'], r['variant']): r for r in rows if 'ratio' in r}
    ours = sorted(key for key in measured if key[2] == 'ours')
    for batch, groups, _ in ours:
        literal = measured.get((batch, groups, 'literal'))
        if literal is None:
            print(f"target (a) B={batch} G={groups}: >= 50x faster than literal: not measured")
            continue
        speedup = literal['ratio'] / measured[(batch, groups, 'ours')]['ratio']
        print(f"target (a) B={batch} G={groups}: >= 50x faster than literal: "
              f"{'met' if speedup >= 50 else 'NOT met'} ({speedup:.1f}x)")
    for batch, groups, _ in ours:
        if groups == 4:
            ratio = measured[(batch, groups, 'ours')]['ratio']
            print(f"target (b) B={batch} G=4: <= 2x plain: {'met' if ratio <= 2 else 'NOT met'} ({ratio:.2f}x)")


def run_breakdown(args: argparse.Namespace) -> None:
    """Time the parts of ``ours`` (grouping, group logits, cross-entropy) against ``plain``, in this process."""
    torch.set_num_threads(args.threads)
    print("breakdown of ours: median ratio vs plain over interleaved rounds (float32, forward+backward "
          "where there is a backward; the grouping has none)")
    for batch in args.sizes:
        for groups in args.groups_list:
            x, weight, bias, target = inputs = _inputs(batch, args.dim, args.classes, torch.float32, args.seed)
            assignment = make_assignment(x, weight, target, groups)
            logits = group_logits(x, weight, bias, assignment, groups)
            grad_logits = torch.randn_like(logits)
            detached = logits.detach().requires_grad_()

            def logits_step() -> None:
                out = group_logits(x, weight, bias, assignment, groups)
                torch.autograd.grad(out, (x, weight, bias), grad_logits)

            def cross_entropy_step() -> None:
                torch.autograd.grad(group_cross_entropy(detached, target, args.loss_type).mean(), detached)

            parts = {
                'ours (whole step)': lambda: _step(ours_loss, inputs, groups, args.loss_type),
                'grouping (make_assignment)': lambda: make_assignment(x, weight, target, groups),
                'group_logits fwd+bwd': logits_step,
                'group_cross_entropy fwd+bwd': cross_entropy_step,
            }
            plain = lambda: _step(plain_loss, inputs, groups, args.loss_type)  # noqa: E731
            ratios: Dict[str, List[float]] = {name: [] for name in parts}
            plain()
            for part in parts.values():
                part()
            for _ in range(args.repeats):
                for name, part in parts.items():
                    start = time.perf_counter()
                    plain()
                    middle = time.perf_counter()
                    part()
                    ratios[name].append((time.perf_counter() - middle) / (middle - start))
            summary = ', '.join(f"{name} {statistics.median(r):.2f}x" for name, r in ratios.items())
            print(f"  B={batch} G={groups}: {summary}", flush=True)


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(',') if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _variant_list(text: str) -> List[str]:
    names = [v.strip() for v in text.split(',') if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown or text!r}, expected some of {tuple(VARIANTS)}")
    return names


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', type=_int_list, default=[64, 256], help='batch sizes B, comma-separated')
    parser.add_argument('--groups', dest='groups_list', type=_int_list, default=[2, 4, 8],
                        help='numbers of groups G, comma-separated')
    parser.add_argument('--dim', type=_positive_int, default=2048, help='feature size D')
    parser.add_argument('--classes', type=_positive_int, default=1000, help='number of classes C')
    parser.add_argument('--variants', type=_variant_list, default=list(VARIANTS), help='variants, comma-separated')
    parser.add_argument('--repeats', type=_positive_int, default=11, help='timed rounds per variant')
    parser.add_argument('--literal-repeats', type=_positive_int, default=3, help='timed rounds of the (slow) literal variant')
    parser.add_argument('--threads', type=_positive_int, default=1,
                        help='torch.set_num_threads; 1 keeps ratios stable on a machine shared with other jobs')
    parser.add_argument('--loss-type', default='II', help="'I' or 'II'")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--quick', action='store_true', help='smoke run: B=32, G=4, 3 rounds, 1 literal round')
    parser.add_argument('--breakdown', action='store_true',
                        help="also time the parts of 'ours' (grouping, group logits, cross-entropy) against plain")
    parser.add_argument('--no-check', dest='check', action='store_false',
                        help='skip the float64 agreement check against the literal reference')
    # Internal: one measurement in this process (used by the driver's subprocesses).
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--variant', default='ours', help=argparse.SUPPRESS)
    parser.add_argument('--batch', type=int, default=64, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    args.loss_type = check_loss_type(args.loss_type)
    if args.worker:
        args.groups = args.groups_list[0]
        print(json.dumps(run_worker(args)))
        return
    if args.quick:
        args.sizes, args.groups_list, args.repeats, args.literal_repeats = [32], [4], 3, 1
    run_driver(args)
    if args.breakdown:
        run_breakdown(args)


if __name__ == '__main__':
    main()
