"""Tests of ``timm_gsl.functional``: the group softmax loss against a slow, literal reference.

The reference below builds the B x D x C ingredient tensor, scores features with an explicit loop
over the other classes, sorts and cuts each sample by hand and evaluates Type-I / Type-II exactly as
SPEC.md writes them. The library never builds that tensor, so agreement to 1e-9 in float64 (values
and gradients) pins down the fast path.
"""
from __future__ import annotations

import itertools
import math
from typing import List, Optional, Sequence, Union

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from timm_gsl import functional as gsl
from timm_gsl.functional import (
    contiguous_assignment,
    discriminativity,
    group_cross_entropy,
    group_logits,
    group_softmax_loss,
    make_assignment,
    random_assignment,
)

from _assertions import TOL, assert_same_value_and_grads, assert_value_error_says


# ----------------------------------------------------------------------------------------------
# The slow reference
# ----------------------------------------------------------------------------------------------

def ref_ingredients(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """z[n, j, c] = x[n, j] * W[c, j], the B x D x C tensor the library must never build."""
    return x[:, :, None] * w.t()[None, :, :]


def ref_discriminativity(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(A.14), with the SPEC's soft-target extension, by an explicit loop over the classes."""
    batch, dim, num_classes = z.shape
    z = z.detach()
    scores = torch.zeros(batch, dim, dtype=z.dtype)
    for n in range(batch):
        if target.is_floating_point():
            true_part = sum(target[n, c] * z[n, :, c] for c in range(num_classes))
            rest = sum((1 - target[n, c]) * z[n, :, c] for c in range(num_classes))
        else:
            y = int(target[n])
            true_part = z[n, :, y]
            rest = sum(z[n, :, c] for c in range(num_classes) if c != y)
        scores[n] = true_part - rest / (num_classes - 1)
    return scores


def ref_sizes(dim: int, groups: int) -> List[int]:
    """Group sizes: equal when G divides D, else the first D mod G groups hold one more."""
    sizes = [dim // groups] * groups
    for i in range(dim % groups):
        sizes[i] += 1
    return sizes


def ref_sorted_groups(scores: Sequence[float], groups: int) -> List[List[int]]:
    """Sort ascending (ties by feature index), cut into blocks: group 0 holds the lowest scores."""
    order = sorted(range(len(scores)), key=lambda j: (scores[j], j))
    out, start = [], 0
    for size in ref_sizes(len(scores), groups):
        out.append(order[start:start + size])
        start += size
    return out


def ref_groups(
        z: torch.Tensor, target: torch.Tensor, groups: int, grouping: Union[str, torch.Tensor],
) -> List[List[List[int]]]:
    """For every sample, the list of G feature-index lists."""
    batch, dim, _ = z.shape
    if isinstance(grouping, torch.Tensor):
        rows = grouping.expand(batch, dim) if grouping.ndim == 1 else grouping
        return [[[j for j in range(dim) if int(rows[n, j]) == i] for i in range(groups)] for n in range(batch)]
    if grouping == 'contiguous':
        blocks, start = [], 0
        for size in ref_sizes(dim, groups):
            blocks.append(list(range(start, start + size)))
            start += size
        return [blocks for _ in range(batch)]
    if grouping == 'zero-aware':
        return ref_zero_aware_groups(ref_discriminativity(z, target), groups)
    assert grouping == 'discriminative'
    scores = ref_discriminativity(z, target)
    for n in range(batch):
        # Exact zeros (zero features) tie exactly in both computations and go by index; other ties would
        # depend on rounding.
        gaps = scores[n][scores[n] != 0].sort().values.diff()
        assert bool((gaps > 1e-9).all()), 'reference inputs must be tie-free'
    return [ref_sorted_groups(scores[n].tolist(), groups) for n in range(batch)]


def ref_zero_aware_groups(scores: torch.Tensor, groups: int) -> List[List[List[int]]]:
    """Zero-aware grouping by hand: nonzero scores sorted and cut into G near-equal blocks, then the
    zero-score features, in index order, fill each group up to its size of ``ref_sizes(D, G)``."""
    batch, dim = scores.shape
    out = []
    for n in range(batch):
        row = scores[n].tolist()
        nonzero = [j for j in range(dim) if row[j] != 0]
        zeros = [j for j in range(dim) if row[j] == 0]
        blocks = ref_sorted_groups([row[j] for j in nonzero], groups)   # positions within `nonzero`
        sample = [[nonzero[p] for p in block] for block in blocks]
        start = 0
        for members, size in zip(sample, ref_sizes(dim, groups)):
            room = size - len(members)
            members.extend(zeros[start:start + room])
            start += room
        assert start == len(zeros)
        out.append([sorted(m) for m in sample])
    return out


def ref_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    top = logits.max()
    return logits - top - torch.log(torch.exp(logits - top).sum())


def ref_cross_entropy(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """CE(logits, t) = -sum_c t_c log softmax(logits)_c for one sample."""
    return -(t * ref_log_softmax(logits)).sum()


def one_hot_rows(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.eye(num_classes, dtype=torch.float64)[target]


def ref_loss(
        x: torch.Tensor,
        w: torch.Tensor,
        b: Optional[torch.Tensor],
        target: torch.Tensor,
        groups: int,
        loss_type: str,
        grouping: Union[str, torch.Tensor] = 'discriminative',
) -> torch.Tensor:
    """Batch mean of Type-I ``(1/G) sum_i CE(G z̄ⁱ, t)`` or Type-II ``sum_i CE(z̄ⁱ, t)``."""
    z = ref_ingredients(x, w)
    batch, _, num_classes = z.shape
    soft = target if target.is_floating_point() else one_hot_rows(target, num_classes)
    per_sample = []
    for n, sample_groups in enumerate(ref_groups(z, target, groups, grouping)):
        total = 0.
        for members in sample_groups:
            logit = z[n, members, :].sum(0)
            if b is not None:
                logit = logit + b / groups
            if loss_type == 'I':
                total = total + ref_cross_entropy(groups * logit, soft[n]) / groups
            else:
                total = total + ref_cross_entropy(logit, soft[n])
        per_sample.append(total)
    return torch.stack(per_sample).mean()


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def make_inputs(batch: int, dim: int, num_classes: int, seed: int, scale: float = 1.0, with_bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, dim, generator=gen, dtype=torch.float64) * scale).requires_grad_()
    w = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(num_classes, generator=gen, dtype=torch.float64).requires_grad_() if with_bias else None
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    return x, w, b, y, gen


def make_target(kind: str, y: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    if kind == 'hard':
        return y
    if kind == 'mixup':
        # A convex mix of two one-hots, as Mixup/CutMix produce.
        other = (y + 1 + torch.randint(0, num_classes - 1, y.shape, generator=gen)) % num_classes
        lam = torch.rand(y.shape[0], 1, generator=gen, dtype=torch.float64)
        return lam * one_hot_rows(y, num_classes) + (1 - lam) * one_hot_rows(other, num_classes)
    if kind == 'smoothed':
        return smoothed(y, num_classes, 0.1)
    raise AssertionError(kind)


def smoothed(y: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    return (1 - eps) * one_hot_rows(y, num_classes) + eps / num_classes


def params(x, w, b):
    return [p for p in (x, w, b) if p is not None]


# ----------------------------------------------------------------------------------------------
# 1. Exactness against the reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('loss_type', ['I', 'II'])
@pytest.mark.parametrize('groups', [1, 2, 3, 4, 8])
@pytest.mark.parametrize('dim', [24, 23], ids=['D_divisible', 'D_uneven'])
@pytest.mark.parametrize('with_bias', [True, False], ids=['bias', 'no_bias'])
@pytest.mark.parametrize('target_kind', ['hard', 'mixup', 'smoothed'])
@pytest.mark.parametrize('grouping', ['discriminative', 'contiguous'])
def test_loss_and_gradients_match_literal_reference(loss_type, groups, dim, with_bias, target_kind, grouping):
    x, w, b, y, gen = make_inputs(4, dim, 6, seed=groups * 100 + dim)
    target = make_target(target_kind, y, 6, gen)
    loss = group_softmax_loss(x, w, b, target, groups, loss_type=loss_type, grouping=grouping)
    expected = ref_loss(x, w, b, target, groups, loss_type, grouping)
    assert_same_value_and_grads(loss, expected, params(x, w, b))


@pytest.mark.parametrize('loss_type', ['I', 'II'])
@pytest.mark.parametrize('groups', [2, 3, 8])
@pytest.mark.parametrize('dim', [24, 23], ids=['D_divisible', 'D_uneven'])
@pytest.mark.parametrize('target_kind', ['hard', 'mixup'])
def test_random_grouping_is_the_seeded_assignment_through_the_explicit_path(loss_type, groups, dim, target_kind):
    x, w, b, y, gen = make_inputs(5, dim, 6, seed=7 + groups)
    target = make_target(target_kind, y, 6, gen)
    loss = group_softmax_loss(x, w, b, target, groups, loss_type=loss_type, grouping='random',
                              generator=torch.Generator().manual_seed(11))
    assignment = random_assignment(5, dim, groups, generator=torch.Generator().manual_seed(11))
    assert assignment.dtype == torch.int64
    explicit = group_softmax_loss(x, w, b, target, groups, loss_type=loss_type, grouping=assignment)
    expected = ref_loss(x, w, b, target, groups, loss_type, assignment)
    torch.testing.assert_close(loss, explicit, rtol=0, atol=0)
    assert_same_value_and_grads(loss, expected, params(x, w, b))


@pytest.mark.parametrize('groups', [2, 3, 8])
@pytest.mark.parametrize('dim', [24, 23])
def test_random_grouping_draws_a_fresh_partition_of_the_right_sizes_per_sample(groups, dim):
    gen = torch.Generator().manual_seed(0)
    first = random_assignment(6, dim, groups, generator=gen)
    second = random_assignment(6, dim, groups, generator=gen)
    sizes = torch.tensor(ref_sizes(dim, groups))
    for assignment in (first, second):
        for row in assignment:
            assert torch.equal(torch.bincount(row, minlength=groups), sizes)
    # Distinct rows within a batch and a new draw per call (collision odds < 1e-6 at these sizes).
    assert len({tuple(r.tolist()) for r in torch.cat([first, second])}) == 12


def test_contiguous_grouping_is_fixed_blocks_with_larger_groups_first():
    assignment = contiguous_assignment(2, 10, 4)
    assert assignment.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 3, 3]] * 2


@pytest.mark.parametrize('target_kind', ['hard', 'mixup', 'smoothed'])
def test_discriminativity_equals_explicit_loop_over_other_classes(target_kind):
    x, w, _, y, gen = make_inputs(5, 12, 7, seed=3)
    target = make_target(target_kind, y, 7, gen)
    got = discriminativity(x, w, target)
    assert not got.requires_grad
    torch.testing.assert_close(got, ref_discriminativity(ref_ingredients(x, w), target), **TOL)


@pytest.mark.parametrize('groups', [2, 3, 4])
@pytest.mark.parametrize('dim', [12, 11])
def test_discriminative_assignment_is_the_sorted_split(groups, dim):
    x, w, _, y, _ = make_inputs(5, dim, 7, seed=groups)
    assignment = make_assignment(x, w, y, groups, 'discriminative')
    expected = ref_groups(ref_ingredients(x, w), y, groups, 'discriminative')
    for n in range(5):
        got = [sorted(j for j in range(dim) if int(assignment[n, j]) == i) for i in range(groups)]
        assert got == [sorted(members) for members in expected[n]]


def test_sorted_assignment_breaks_ties_by_feature_index():
    scores = torch.tensor([[1., 0., 1., 0., 1., 0.]])
    assert gsl.sorted_assignment(scores, 2).tolist() == [[1, 0, 1, 0, 1, 0]]
    assert gsl.sorted_assignment(scores, 3).tolist() == [[1, 0, 2, 0, 2, 1]]


@pytest.mark.parametrize('loss_type', ['I', 'II'])
@pytest.mark.parametrize('groups', [2, 3])
def test_label_smoothing_equals_passing_smoothed_soft_targets(loss_type, groups):
    x, w, b, y, _ = make_inputs(6, 15, 5, seed=21)
    eps = 0.2
    soft = smoothed(y, 5, eps)
    loss = group_softmax_loss(x, w, b, y, groups, loss_type=loss_type, label_smoothing=eps)
    via_soft = group_softmax_loss(x, w, b, soft, groups, loss_type=loss_type)
    expected = ref_loss(x, w, b, soft, groups, loss_type)
    assert_same_value_and_grads(loss, via_soft, params(x, w, b))
    assert_same_value_and_grads(loss, expected, params(x, w, b))


def test_label_smoothing_keeps_the_discriminative_grouping():
    x, w, _, y, _ = make_inputs(8, 20, 6, seed=5)
    eps = 0.3
    soft = smoothed(y, 6, eps)
    # λ of the smoothed target is (1 - ε) times λ of the hard one, so the sort is the same.
    torch.testing.assert_close(discriminativity(x, w, soft), (1 - eps) * discriminativity(x, w, y), **TOL)
    for groups in (2, 3, 4, 7):
        assert torch.equal(make_assignment(x, w, soft, groups), make_assignment(x, w, y, groups))


def test_group_logits_sum_to_the_whole_logits():
    x, w, b, y, _ = make_inputs(4, 13, 5, seed=2)
    assignment = make_assignment(x, w, y, 3)
    logits = group_logits(x, w, b, assignment, 3)
    assert logits.shape == (4, 3, 5)
    torch.testing.assert_close(logits.sum(1), F.linear(x, w, b), **TOL)


# ----------------------------------------------------------------------------------------------
# 2. Properties
# ----------------------------------------------------------------------------------------------

shapes = st.tuples(
    st.integers(1, 4),  # batch
    st.integers(2, 12),  # feature size D
    st.integers(2, 6),  # classes C
)


def draw_target(kind: str, y: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    if kind == 'dirichlet':
        return _dirichlet(y.shape[0], num_classes, gen)
    return make_target(kind, y, num_classes, gen)


def _dirichlet(batch: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform draws from the probability simplex: soft targets with no structure at all."""
    e = -torch.log(torch.rand(batch, num_classes, generator=gen, dtype=torch.float64))
    return e / e.sum(1, keepdim=True)


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    groups_frac=st.floats(0, 1),
    seed=st.integers(0, 2 ** 31 - 1),
    log_scale=st.floats(-3, 2),
    with_bias=st.booleans(),
    target_kind=st.sampled_from(['hard', 'mixup', 'smoothed', 'dirichlet']),
    grouping=st.sampled_from(['discriminative', 'contiguous', 'random']),
)
def test_softmax_loss_bounds_type_one_bounds_type_two(
        shape, groups_frac, seed, log_scale, with_bias, target_kind, grouping):
    batch, dim, num_classes = shape
    groups = 1 + int(groups_frac * (dim - 1))
    x, w, b, y, gen = make_inputs(batch, dim, num_classes, seed, scale=10 ** log_scale, with_bias=with_bias)
    target = draw_target(target_kind, y, num_classes, gen)
    assignment = make_assignment(x, w, target, groups, grouping, generator=gen)
    logits = group_logits(x, w, b, assignment, groups)
    soft = target if target.is_floating_point() else one_hot_rows(target, num_classes)
    softmax = -(soft * F.log_softmax(F.linear(x, w, b), -1)).sum(-1)
    type_one = group_cross_entropy(logits, target, 'I')
    type_two = group_cross_entropy(logits, target, 'II')
    slack = 1e-9 * (1 + type_two.abs())
    assert bool((softmax <= type_one + slack).all()), (softmax, type_one)
    assert bool((type_one <= type_two + slack).all()), (type_one, type_two)


@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 2 ** 31 - 1),
    log_scale=st.floats(-3, 2),
    with_bias=st.booleans(),
    target_kind=st.sampled_from(['hard', 'mixup', 'dirichlet']),
    loss_type=st.sampled_from(['I', 'II']),
    grouping=st.sampled_from(['discriminative', 'contiguous', 'random']),
)
def test_one_group_is_plain_cross_entropy(shape, seed, log_scale, with_bias, target_kind, loss_type, grouping):
    batch, dim, num_classes = shape
    x, w, b, y, gen = make_inputs(batch, dim, num_classes, seed, scale=10 ** log_scale, with_bias=with_bias)
    target = draw_target(target_kind, y, num_classes, gen)
    loss = group_softmax_loss(x, w, b, target, 1, loss_type=loss_type, grouping=grouping, generator=gen)
    expected = F.cross_entropy(F.linear(x, w, b), target)
    assert_same_value_and_grads(loss, expected, params(x, w, b))


def relaxed_objective(scores: torch.Tensor, groups_of_features: Sequence[Sequence[int]]) -> float:
    """(A.20): sum_i sp(sum_{j in g_i} λ_j) with sp(u) = log(1 + exp(-u))."""
    return sum(math.log1p(math.exp(-float(scores[list(g)].sum()))) for g in groups_of_features)


def all_equal_partitions(dim: int, groups: int):
    labels = [i for i in range(groups) for _ in range(dim // groups)]
    for assignment in set(itertools.permutations(labels)):
        yield [[j for j in range(dim) if assignment[j] == i] for i in range(groups)]


@settings(max_examples=40, deadline=None)
@given(
    groups=st.sampled_from([2, 3]),
    num_classes=st.integers(2, 5),
    seed=st.integers(0, 2 ** 31 - 1),
    log_scale=st.floats(-2, 1),
)
def test_sorted_grouping_maximises_relaxed_objective_over_all_equal_partitions(groups, num_classes, seed, log_scale):
    dim = 6
    x, w, _, y, _ = make_inputs(1, dim, num_classes, seed, scale=10 ** log_scale)
    scores = ref_discriminativity(ref_ingredients(x, w), y)[0]
    assignment = make_assignment(x, w, y, groups)[0]
    chosen = relaxed_objective(scores, [[j for j in range(dim) if int(assignment[j]) == i] for i in range(groups)])
    best = max(relaxed_objective(scores, p) for p in all_equal_partitions(dim, groups))
    assert chosen >= best - 1e-12 * (1 + abs(best))


@settings(max_examples=30, deadline=None)
@given(
    shape=shapes,
    groups_frac=st.floats(0, 1),
    seed=st.integers(0, 2 ** 31 - 1),
    target_kind=st.sampled_from(['hard', 'mixup', 'smoothed']),
    loss_type=st.sampled_from(['I', 'II']),
)
def test_permuting_feature_dimensions_leaves_the_loss_unchanged(shape, groups_frac, seed, target_kind, loss_type):
    batch, dim, num_classes = shape
    groups = 1 + int(groups_frac * (dim - 1))
    x, w, b, y, gen = make_inputs(batch, dim, num_classes, seed)
    target = draw_target(target_kind, y, num_classes, gen)
    perm = torch.randperm(dim, generator=gen)
    loss = group_softmax_loss(x, w, b, target, groups, loss_type=loss_type)
    permuted = group_softmax_loss(x[:, perm], w[:, perm], b, target, groups, loss_type=loss_type)
    torch.testing.assert_close(permuted, loss, **TOL)


# ----------------------------------------------------------------------------------------------
# 3. Numerics under autocast
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('loss_type', ['I', 'II'])
@pytest.mark.parametrize('target_kind', ['hard', 'mixup'])
def test_bfloat16_autocast_with_huge_logits_gives_finite_loss_and_gradients(loss_type, target_kind):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 64, generator=gen) * 1250.).requires_grad_()  # logits of magnitude ~1e4
    w = torch.randn(10, 64, generator=gen).requires_grad_()
    b = torch.randn(10, generator=gen).requires_grad_()
    y = torch.randint(0, 10, (8,), generator=gen)
    target = make_target(target_kind, y, 10, gen)
    target = target.float() if target.is_floating_point() else target
    assert float(F.linear(x, w, b).detach().abs().max()) > 1e4
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = group_softmax_loss(x, w, b, target, 16, loss_type=loss_type)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    for g in torch.autograd.grad(loss, (x, w, b)):
        assert bool(torch.isfinite(g).all())


@pytest.mark.parametrize('loss_type', ['I', 'II'])
def test_group_cross_entropy_runs_in_float32_under_autocast(loss_type):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 16, 10, generator=gen) * 1e4).bfloat16()
    y = torch.randint(0, 10, (4,), generator=gen)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = group_cross_entropy(logits, y, loss_type)
    expected = group_cross_entropy(logits.float(), y, loss_type)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_discriminativity_of_soft_targets_stays_float32_under_autocast():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(8, 64, generator=gen), torch.randn(10, 64, generator=gen)
    t = _dirichlet(8, 10, gen).float()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = discriminativity(x, w, t)
    torch.testing.assert_close(got, discriminativity(x, w, t), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 4. Bad input
# ----------------------------------------------------------------------------------------------

B, D, C = 4, 8, 5


def good_args():
    gen = torch.Generator().manual_seed(0)
    return dict(
        features=torch.randn(B, D, generator=gen),
        weight=torch.randn(C, D, generator=gen),
        bias=torch.randn(C, generator=gen),
        target=torch.tensor([0, 1, 2, 4]),
        groups=2,
    )


def soft(rows):
    return torch.tensor(rows, dtype=torch.float32)


BAD_INPUTS = [
    # (case id, changed arguments, pieces the message must hold: name, value, what is allowed)
    ('groups_zero', dict(groups=0), ['groups', '0', '>= 1']),
    ('groups_negative', dict(groups=-2), ['groups', '-2', '>= 1']),
    ('groups_above_D', dict(groups=9), ['groups', '9', f'<= {D}']),
    ('groups_float', dict(groups=2.0), ['groups', '2.0', 'int']),
    ('groups_bool', dict(groups=True), ['groups', 'True', 'int']),
    ('groups_str', dict(groups='4'), ['groups', "'4'", 'int']),
    ('unknown_loss_type', dict(loss_type='III'), ['loss_type', "'III'", "('I', 'II')"]),
    ('unknown_grouping', dict(grouping='sorted'), ['grouping', "'sorted'", "'discriminative'"]),
    ('one_class', dict(weight=torch.randn(1, D), bias=torch.randn(1), target=torch.zeros(B, dtype=torch.long)),
     ['weight', 'C=1', 'C >= 2']),
    ('target_negative', dict(target=torch.tensor([0, -1, 2, 3])), ['target', '-1', f'[0, {C - 1}]']),
    ('target_too_large', dict(target=torch.tensor([0, 1, C, 3])), ['target', f'{C}', f'[0, {C - 1}]']),
    ('target_int32', dict(target=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), ['target', 'int32', 'int64']),
    ('target_bool', dict(target=torch.tensor([True, False, True, False])), ['target', 'bool', 'int64']),
    ('target_column', dict(target=torch.tensor([[0], [1], [2], [3]])), ['target', f'({B}, 1)', f'({B},)']),
    ('target_wrong_batch', dict(target=torch.tensor([0, 1, 2])), ['target', '(3,)', f'({B},)']),
    ('soft_target_wrong_shape', dict(target=torch.full((B, C + 1), 1 / (C + 1))),
     ['target', f'({B}, {C + 1})', f'({B}, {C})']),
    ('soft_rows_do_not_sum_to_one', dict(target=soft([[1, 0, 0, 0, 0]] * 3 + [[0.5, 0, 0, 0, 0]])),
     ['target', '0.5', 'sum to 1']),
    ('soft_target_negative', dict(target=soft([[1, 0, 0, 0, 0]] * 3 + [[1.5, -0.5, 0, 0, 0]])),
     ['target', '-0.5', 'non-negative']),
    ('weight_feature_size_mismatch', dict(weight=torch.randn(C, D + 1)), ['weight', f'{D + 1}', f'(C, {D})']),
    ('features_not_2d', dict(features=torch.randn(B, D, 1)), ['features', f'({B}, {D}, 1)', '2-D']),
    ('bias_wrong_shape', dict(bias=torch.randn(C + 1)), ['bias', f'({C + 1},)', f'({C},)']),
    ('assignment_wrong_shape', dict(grouping=torch.zeros(B, D + 1, dtype=torch.long)),
     ['grouping', f'({B}, {D + 1})', f'({B}, {D})']),
    ('assignment_wrong_dtype', dict(grouping=torch.zeros(B, D, dtype=torch.int32)), ['grouping', 'int32', 'int64']),
    ('assignment_above_range', dict(grouping=torch.full((B, D), 2, dtype=torch.long)),
     ['grouping', '2', '[0, 1]']),
    ('assignment_negative', dict(grouping=torch.full((D,), -1, dtype=torch.long)), ['grouping', '-1', '[0, 1]']),
    ('label_smoothing_one', dict(label_smoothing=1.0), ['label_smoothing', '1.0', '[0, 1)']),
    ('label_smoothing_on_soft_targets', dict(label_smoothing=0.1, target=torch.full((B, C), 1 / C)),
     ['label_smoothing', 'soft targets', 'class-index']),
]


@pytest.mark.parametrize('changes, pieces', [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_argument_value_and_allowed(changes, pieces):
    assert_value_error_says(lambda: group_softmax_loss(**dict(good_args(), **changes)), pieces)


def test_good_arguments_of_the_bad_input_table_pass():
    assert torch.isfinite(group_softmax_loss(**good_args()))


def test_value_checks_default_to_cpu_tensors_only():
    cpu, meta = torch.zeros(2), torch.zeros(2, device='meta')
    assert gsl._should_check_values(cpu, None) is True
    assert gsl._should_check_values(meta, None) is False
    assert gsl._should_check_values(meta, True) is True
    assert gsl._should_check_values(cpu, False) is False


@pytest.mark.parametrize('target_kind', ['hard', 'soft'])
def test_non_cpu_tensors_skip_value_checks_unless_asked(target_kind):
    # Meta tensors have no values: reading one raises, so passing means no value was read
    # (on CUDA, reading would synchronise the device every step).
    x, w, b = torch.empty(B, D, device='meta'), torch.empty(C, D, device='meta'), torch.empty(C, device='meta')
    target = (torch.empty(B, dtype=torch.long, device='meta') if target_kind == 'hard'
              else torch.empty(B, C, device='meta'))
    loss = group_softmax_loss(x, w, b, target, 2)
    assert loss.device.type == 'meta' and loss.shape == ()
    with pytest.raises((RuntimeError, NotImplementedError)):
        group_softmax_loss(x, w, b, target, 2, check_values=True)


def test_check_values_false_skips_value_checks_on_cpu():
    args = good_args()
    args['target'] = soft([[0.5, 0, 0, 0, 0]] * B)  # rows sum to 0.5
    assert torch.isfinite(group_softmax_loss(**args, check_values=False))
    with pytest.raises(ValueError, match='sum to 1'):
        group_softmax_loss(**args)


# ----------------------------------------------------------------------------------------------
# Zero-aware grouping and grouping statistics
# ----------------------------------------------------------------------------------------------

def make_relu_inputs(batch: int, dim: int, num_classes: int, seed: int, zero_prob: float):
    """Like :func:`make_inputs`, with about ``zero_prob`` of the features exactly zero (as after a ReLU)."""
    x, w, b, y, gen = make_inputs(batch, dim, num_classes, seed)
    keep = torch.rand(batch, dim, generator=gen) >= zero_prob
    x = (x.detach().abs() * keep).requires_grad_()
    return x, w, b, y, gen


def assignment_from_groups(sample_groups: List[List[List[int]]], dim: int) -> torch.Tensor:
    out = torch.full((len(sample_groups), dim), -1, dtype=torch.int64)
    for n, groups in enumerate(sample_groups):
        for i, members in enumerate(groups):
            out[n, members] = i
    assert bool((out >= 0).all())
    return out


@pytest.mark.parametrize('loss_type', ['I', 'II'])
@pytest.mark.parametrize('groups', [1, 2, 3, 4, 8])
@pytest.mark.parametrize('zero_prob', [0.0, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize('dim', [24, 23], ids=['D_divisible', 'D_uneven'])
def test_zero_aware_loss_and_gradients_match_literal_reference(loss_type, groups, zero_prob, dim):
    x, w, b, y, _ = make_relu_inputs(6, dim, 5, seed=groups * 100 + dim, zero_prob=zero_prob)
    loss = group_softmax_loss(x, w, b, y, groups, loss_type, grouping='zero-aware')
    expected = ref_loss(x, w, b, y, groups, loss_type, grouping='zero-aware')
    assert_same_value_and_grads(loss, expected, params(x, w, b))


@pytest.mark.parametrize('target_kind', ['hard', 'mixup'])
@pytest.mark.parametrize('groups', [2, 3, 4, 7])
@pytest.mark.parametrize('seed', range(4))
def test_zero_aware_assignment_is_the_literal_one(target_kind, groups, seed):
    x, w, _, y, gen = make_relu_inputs(9, 31, 6, seed=seed, zero_prob=[0.1, 0.5, 0.8, 0.97][seed])
    target = make_target(target_kind, y, 6, gen)
    got = gsl.zero_aware_assignment(x, w, target, groups)
    want = assignment_from_groups(ref_zero_aware_groups(ref_discriminativity(ref_ingredients(x, w), target), groups), 31)
    assert torch.equal(got, want)


@pytest.mark.parametrize('groups', [2, 4, 8])
def test_zero_aware_deals_zeros_evenly_and_keeps_group_sizes(groups):
    x, w, _, y, _ = make_relu_inputs(16, 64, 10, seed=groups, zero_prob=0.5)
    assignment = gsl.zero_aware_assignment(x, w, y, groups)
    sizes = torch.stack([torch.bincount(row, minlength=groups) for row in assignment])
    assert torch.equal(sizes, gsl.group_sizes(64, groups).expand(16, groups))
    zero = (x.detach() == 0)
    for n in range(16):
        zeros_per_group = torch.bincount(assignment[n][zero[n]], minlength=groups)
        nonzero_per_group = torch.bincount(assignment[n][~zero[n]], minlength=groups)
        assert int(zeros_per_group.max() - zeros_per_group.min()) <= 1
        assert int(nonzero_per_group.max() - nonzero_per_group.min()) <= 1
    if groups == 2:
        return  # with two groups the zeros straddle the cut in the middle: even either way
    # The plain discriminative sort packs the zeros together instead (into the middle groups).
    plain = gsl.discriminative_assignment(x, w, y, groups)
    packed = [torch.bincount(plain[n][zero[n]], minlength=groups) for n in range(16)]
    assert all(int(c.max() - c.min()) > 1 for c in packed)


def test_zero_aware_without_zeros_is_the_discriminative_grouping():
    x, w, _, y, _ = make_inputs(12, 40, 7, seed=3)
    assert torch.equal(gsl.zero_aware_assignment(x, w, y, 4), gsl.discriminative_assignment(x, w, y, 4))


@pytest.mark.parametrize('loss_type', ['I', 'II'])
@pytest.mark.parametrize('grouping', ['discriminative', 'zero-aware', 'contiguous'])
@pytest.mark.parametrize('target_kind', ['hard', 'mixup'])
def test_grouping_statistics_match_a_count_by_hand(loss_type, grouping, target_kind):
    groups, dim, num_classes = 4, 24, 5
    x, w, b, y, gen = make_relu_inputs(7, dim, num_classes, seed=11, zero_prob=0.4)
    target = make_target(target_kind, y, num_classes, gen)
    stats = gsl.grouping_statistics(x, w, b, target, groups, loss_type, grouping)
    z = ref_ingredients(x.detach(), w.detach())
    soft = target if target.is_floating_point() else one_hot_rows(target, num_classes)
    sample_groups = ref_groups(z, target, groups, grouping)
    counts = torch.zeros(groups, dtype=torch.float64)
    losses = torch.zeros(groups, dtype=torch.float64)
    for n, members_of in enumerate(sample_groups):
        for i, members in enumerate(members_of):
            counts[i] += sum(float(x[n, j].detach()) != 0 for j in members)
            logit = z[n, members, :].sum(0) + b.detach() / groups
            losses[i] += ref_cross_entropy(groups * logit if loss_type == 'I' else logit, soft[n])
    batch = x.shape[0]
    assert float(stats.zero_fraction) == pytest.approx(float((x == 0).double().mean()), abs=1e-6)
    torch.testing.assert_close(stats.nonzero_per_group.double(), counts / batch, rtol=0, atol=1e-5)
    torch.testing.assert_close(stats.group_loss.double(), losses / batch, rtol=1e-5, atol=1e-5)
    # The loss is the sum (Type-II) or the mean (Type-I) of the per-group losses.
    loss = group_softmax_loss(x, w, b, target, groups, loss_type, grouping)
    total = stats.group_loss.sum() if loss_type == 'II' else stats.group_loss.mean()
    assert float(loss.detach()) == pytest.approx(float(total), rel=1e-5)


@pytest.mark.parametrize('loss_type', ['I', 'II'])
@pytest.mark.parametrize('grouping', ['discriminative', 'zero-aware', 'contiguous', 'random'])
@pytest.mark.parametrize('target_kind', ['hard', 'mixup', 'smoothed'])
def test_loss_and_statistics_in_one_pass_equal_the_two_separate_calls(loss_type, grouping, target_kind):
    groups, dim, num_classes = 4, 23, 5
    x, w, b, y, gen = make_relu_inputs(9, dim, num_classes, seed=5, zero_prob=0.3)
    target = make_target(target_kind if target_kind != 'smoothed' else 'hard', y, num_classes, gen)
    smoothing = 0.1 if target_kind == 'smoothed' else 0.0
    options = dict(loss_type=loss_type, grouping=grouping, label_smoothing=smoothing)
    loss, stats = gsl.group_softmax_loss_and_statistics(
        x, w, b, target, groups, generator=torch.Generator().manual_seed(3), **options)
    # The same random partition: the same generator state for each call.
    alone = group_softmax_loss(x, w, b, target, groups, generator=torch.Generator().manual_seed(3), **options)
    reference = gsl.grouping_statistics(x, w, b, target, groups, generator=torch.Generator().manual_seed(3),
                                        **options)
    assert_same_value_and_grads(loss, alone, params(x, w, b))
    for got, want in zip(stats, reference):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert not got.requires_grad
