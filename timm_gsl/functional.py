"""Group softmax loss with discriminative feature grouping: the pure tensor math.

Everything here works on plain tensors and imports nothing from timm. Equation numbers refer to the
supplementary material of Kobayashi, "Group Softmax Loss with Discriminative Feature Grouping"
(WACV 2021); ``SPEC.md`` of the project states the decisions the paper leaves open.

Shapes: ``features`` is B x D (the input of the final linear classifier), ``weight`` is C x D,
``bias`` is C, ``target`` is either B class indices (int64) or B x C soft targets whose rows sum
to one. A *group assignment* is a B x D int64 tensor giving, for every sample and feature, the
index (0 .. G-1) of the group the feature belongs to.

The B x D x C tensor of ingredient logits is never built: group logits come from scattering each
feature into its group's slot (B x G x D, mostly zeros) and one matmul with the weight.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    'group_softmax_loss_and_statistics',
    'LOSS_TYPES',
    'GROUPINGS',
    'discriminativity',
    'group_sizes',
    'sorted_assignment',
    'discriminative_assignment',
    'zero_aware_assignment',
    'random_assignment',
    'contiguous_assignment',
    'make_assignment',
    'group_logits',
    'group_cross_entropy',
    'group_softmax_loss',
    'GroupingStatistics',
    'grouping_statistics',
    'smooth_targets',
    'check_loss_type',
    'check_grouping',
    'check_groups',
]

LOSS_TYPES: Tuple[str, ...] = ('I', 'II')
GROUPINGS: Tuple[str, ...] = ('discriminative', 'random', 'contiguous', 'zero-aware')

Grouping = Union[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Argument checks (shared by the functional API, the nn.Module and the factories)
# ----------------------------------------------------------------------------------------------

def check_loss_type(loss_type: str) -> str:
    """Return ``loss_type`` normalised to 'I' or 'II', or raise ``ValueError``.

    Accepts 'I'/'II' in any case and the arabic aliases 1/2.
    """
    aliases = {'i': 'I', '1': 'I', 'ii': 'II', '2': 'II'}
    key = str(loss_type).strip().lower() if isinstance(loss_type, (str, int)) and not isinstance(
        loss_type, bool) else None
    if key not in aliases:
        raise ValueError(f"Unknown loss_type {loss_type!r}, expected one of {LOSS_TYPES}.")
    return aliases[key]


def check_grouping(grouping: Grouping) -> Grouping:
    """Return ``grouping`` if it is a known grouping name or a tensor, else raise ``ValueError``."""
    if isinstance(grouping, torch.Tensor):
        return grouping
    if not isinstance(grouping, str) or grouping not in GROUPINGS:
        raise ValueError(
            f"Unknown grouping {grouping!r}, expected one of {GROUPINGS} or an int64 group assignment tensor.")
    return grouping


def check_groups(groups: int, num_features: Optional[int] = None) -> int:
    """Return ``groups`` if it is an int in [1, num_features], else raise ``ValueError``."""
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise ValueError(f"groups must be an int, got {groups!r} of type {type(groups).__name__}.")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}.")
    if num_features is not None and groups > num_features:
        raise ValueError(
            f"groups={groups} is larger than the feature size D={num_features}; "
            f"expected 1 <= groups <= {num_features}.")
    return groups


def _should_check_values(tensor: torch.Tensor, check_values: Optional[bool]) -> bool:
    # Value checks (.any(), .all()) synchronise the device; by default only do them on the CPU,
    # where there is nothing to synchronise with, and not under torch.compile (a read breaks the graph).
    if check_values is None:
        return tensor.device.type == 'cpu' and not torch.compiler.is_compiling()
    return check_values


def _check_inputs(
        features: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        target: torch.Tensor,
        check_values: Optional[bool],
) -> None:
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ValueError(
            f"features must be a 2-D tensor (batch x feature size D), got "
            f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}.")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(
            f"weight must be a 2-D tensor (classes C x feature size D), got "
            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}.")
    batch, dim = features.shape
    num_classes = weight.shape[0]
    if weight.shape[1] != dim:
        raise ValueError(
            f"weight has feature size {weight.shape[1]} but features have {dim}; "
            f"expected weight of shape (C, {dim}).")
    if num_classes < 2:
        raise ValueError(f"weight has C={num_classes} classes; the group softmax loss needs C >= 2.")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (num_classes,)):
        raise ValueError(
            f"bias must be None or a tensor of shape ({num_classes},), got "
            f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}.")
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a tensor, got {type(target).__name__}.")
    if target.is_floating_point():
        if tuple(target.shape) != (batch, num_classes):
            raise ValueError(
                f"soft target must have shape (B, C) = ({batch}, {num_classes}), got {tuple(target.shape)}.")
        if _should_check_values(target, check_values):
            sums = target.detach().float().sum(1)
            bad = (sums - 1).abs() > 1e-3
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"soft target rows must sum to 1 (within 1e-3), row {row} sums to {float(sums[row]):.6g}.")
            if bool((target < 0).any()):
                row, col = (int(i) for i in (target < 0).nonzero()[0])
                raise ValueError(
                    f"soft target must be non-negative, got {float(target[row, col]):.6g} at row {row}, "
                    f"class {col}.")
    elif target.dtype == torch.int64:
        if tuple(target.shape) != (batch,):
            raise ValueError(
                f"class-index target must have shape (B,) = ({batch},), got {tuple(target.shape)}.")
        if _should_check_values(target, check_values) and target.numel():
            low, high = int(target.min()), int(target.max())
            if low < 0 or high >= num_classes:
                bad = low if low < 0 else high
                raise ValueError(f"target holds class index {bad}, expected values in [0, {num_classes - 1}].")
    else:
        raise ValueError(
            f"target must be int64 class indices of shape (B,) or floating soft targets of shape (B, C), "
            f"got dtype {target.dtype}.")


# ----------------------------------------------------------------------------------------------
# Discriminativity and groupings
# ----------------------------------------------------------------------------------------------

def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@torch.no_grad()
def discriminativity(features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample discriminativity of every feature element, (A.14).

    ``λ[n, j] = z[n, j, y] - mean_{c != y} z[n, j, c]`` with ``z[n, j, c] = x[n, j] W[c, j]``, computed as
    ``x[n, j] * (W[y, j] - (S[j] - W[y, j]) / (C - 1))`` where ``S`` is the column sum of ``W``, so it
    costs O(B·D) after one O(C·D) sum. For soft targets ``t`` (SPEC decision) the true-class weight
    becomes ``t @ W`` and the rest ``S - t @ W``; it reduces to the above for one-hot ``t``.

    Args:
        features: B x D classifier inputs.
        weight: C x D classifier weight.
        target: B class indices (int64) or B x C soft targets.

    Returns:
        B x D scores, computed without autograd in at least float32.
    """
    dtype = torch.promote_types(torch.promote_types(features.dtype, weight.dtype), torch.float32)
    x = features.detach().to(dtype)
    w = weight.detach().to(dtype)
    num_classes = w.shape[0]
    col_sum = w.sum(0)
    if target.is_floating_point():
        # Autocast would run this matmul in half precision and perturb the sort order.
        with _autocast_disabled(x.device.type):
            w_true = target.detach().to(dtype) @ w
    else:
        w_true = w.index_select(0, target)
    return x * (w_true - (col_sum - w_true) / (num_classes - 1))


def group_sizes(num_features: int, groups: int) -> torch.Tensor:
    """Sizes of the G groups of D features: equal when G divides D, else the first ``D mod G`` one larger."""
    base, extra = divmod(num_features, groups)
    return torch.tensor([base + 1] * extra + [base] * (groups - extra), dtype=torch.long)


def _block_of(rank: torch.Tensor, base: Union[int, torch.Tensor], extra: Union[int, torch.Tensor]) -> torch.Tensor:
    # The block of each rank when the ranks are cut into blocks of base + 1 (the first `extra` ones), then of
    # base: group_sizes' cut. base and extra are ints or tensors that broadcast with rank. Arithmetic only: no
    # data-dependent shape (torch.compile traces it in one graph) and no host-to-device copy.
    long_span = extra * (base + 1)
    short = base.clamp(min=1) if isinstance(base, torch.Tensor) else max(base, 1)
    return torch.where(rank < long_span, rank // (base + 1), extra + (rank - long_span) // short)


def _rank_to_group(num_features: int, groups: int, device: torch.device) -> torch.Tensor:
    return _block_of(torch.arange(num_features, device=device), *divmod(num_features, groups))


def sorted_assignment(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """Group assignment that sorts each row of ``scores`` ascending and cuts it into G blocks, (A.13).

    Group 0 takes the lowest-scoring block, group G-1 the highest. Ties keep feature-index order.

    Args:
        scores: B x D scores.
        groups: number of groups G.

    Returns:
        B x D int64 group indices.
    """
    order = torch.sort(scores, dim=1, stable=True).indices
    rank_group = _rank_to_group(scores.shape[1], groups, scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, rank_group)


def discriminative_assignment(
        features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, groups: int) -> torch.Tensor:
    """Discriminative feature grouping: :func:`sorted_assignment` of :func:`discriminativity`."""
    return sorted_assignment(discriminativity(features, weight, target), groups)


def zero_aware_assignment(
        features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, groups: int) -> torch.Tensor:
    """Discriminative grouping that deals the features of zero discriminativity evenly across groups.

    A feature whose discriminativity is exactly 0 (in practice: a classifier input that is exactly 0,
    as after a ReLU) contributes nothing to any logit, yet the ascending sort of
    :func:`discriminative_assignment` packs all of them into the middle groups, whose group logits are
    then little more than ``b / G``. Here the ``P`` nonzero features of a sample are sorted by
    discriminativity and cut into G blocks of sizes ``group_sizes(P, G)`` (group 0 the least
    discriminative, ties by feature index), and the zero features, in feature-index order, fill every
    group up to its size ``group_sizes(D, G)``. Group sizes are those of every other grouping; each group
    gets ``(D - P) / G`` zeros up to one. With no zero feature it is :func:`discriminative_assignment`.

    Args:
        features: B x D classifier inputs.
        weight: C x D classifier weight.
        target: B class indices or B x C soft targets.
        groups: number of groups G.

    Returns:
        B x D int64 group indices.
    """
    scores = discriminativity(features, weight, target)
    batch, dim = scores.shape
    device = scores.device
    is_zero = scores == 0
    nonzero = dim - is_zero.sum(1, keepdim=True)                       # P per sample, B x 1
    # Rank of each nonzero feature among the nonzero ones (zeros sorted past the end).
    key = scores.masked_fill(is_zero, float('inf'))
    order = torch.sort(key, dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(dim, device=device).expand(batch, dim))
    # Block of rank r when P features are cut into G blocks, the first P mod G one larger.
    base, extra = nonzero // groups, nonzero % groups
    nonzero_group = _block_of(rank, base, extra)
    # Zeros in feature-index order fill the room each group has left.
    ks = torch.arange(groups, device=device)
    dim_base, dim_extra = divmod(dim, groups)
    all_sizes = dim_base + (ks < dim_extra).long()                      # G: group_sizes(D, G), on the device
    nonzero_sizes = base + (ks < extra).long()                          # B x G
    room_end = torch.cumsum(all_sizes - nonzero_sizes, dim=1)           # B x G
    zero_rank = torch.cumsum(is_zero.long(), dim=1) - 1
    zero_group = torch.searchsorted(room_end.contiguous(), zero_rank.contiguous(), right=True)
    return torch.where(is_zero, zero_group.clamp(max=groups - 1), nonzero_group)


def random_assignment(
        batch: int,
        num_features: int,
        groups: int,
        device: Optional[torch.device] = None,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A fresh random partition per sample, with the group sizes of :func:`group_sizes`.

    Args:
        batch: number of samples B.
        num_features: feature size D.
        groups: number of groups G.
        device: device of the result (the generator's device when a generator is given).
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        B x D int64 group indices.
    """
    gen_device = generator.device if generator is not None else device
    scores = torch.rand(batch, num_features, generator=generator, device=gen_device)
    return sorted_assignment(scores, groups).to(device)


def contiguous_assignment(
        batch: int, num_features: int, groups: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Fixed blocks of consecutive feature indices, the same for every sample."""
    return _rank_to_group(num_features, groups, device or torch.device('cpu')).expand(batch, num_features)


def make_assignment(
        features: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        groups: int,
        grouping: Grouping = 'discriminative',
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Build (or check) the B x D group assignment named by ``grouping``.

    Args:
        features: B x D classifier inputs.
        weight: C x D classifier weight.
        target: class indices or soft targets (used by the discriminative groupings only).
        groups: number of groups G.
        grouping: 'discriminative', 'random', 'contiguous', 'zero-aware' (see
            :func:`zero_aware_assignment`), or an explicit int64 assignment of shape
            B x D or D (the same for every sample) with values in [0, G).
        generator: random generator for ``grouping='random'``.

    Returns:
        B x D int64 group indices.
    """
    batch, dim = features.shape
    if isinstance(grouping, torch.Tensor):
        assignment = grouping
        if assignment.dtype != torch.int64:
            raise ValueError(f"grouping tensor must be int64 group indices, got dtype {assignment.dtype}.")
        if assignment.ndim == 1:
            assignment = assignment.expand(batch, -1)
        if tuple(assignment.shape) != (batch, dim):
            raise ValueError(
                f"grouping tensor must have shape (B, D) = ({batch}, {dim}) or ({dim},), "
                f"got {tuple(grouping.shape)}.")
        if assignment.device.type == 'cpu' and assignment.numel():
            low, high = int(assignment.min()), int(assignment.max())
            if low < 0 or high >= groups:
                raise ValueError(f"grouping tensor holds group index {low if low < 0 else high}, "
                                 f"expected values in [0, {groups - 1}] for groups={groups}.")
        return assignment.to(features.device)
    grouping = check_grouping(grouping)
    if grouping == 'discriminative':
        return discriminative_assignment(features, weight, target, groups)
    if grouping == 'zero-aware':
        return zero_aware_assignment(features, weight, target, groups)
    if grouping == 'random':
        return random_assignment(batch, dim, groups, device=features.device, generator=generator)
    return contiguous_assignment(batch, dim, groups, device=features.device)


# ----------------------------------------------------------------------------------------------
# Group logits and the losses
# ----------------------------------------------------------------------------------------------

def group_logits(
        features: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        assignment: torch.Tensor,
        groups: int,
) -> torch.Tensor:
    """Group logits ``z̄ⁱ[n, c] = sum_{j in g_i} x[n, j] W[c, j] + b[c] / G``, (A.1) with the bias split.

    Summed over groups they give the whole logits exactly (up to rounding).

    Args:
        features: B x D classifier inputs.
        weight: C x D classifier weight.
        bias: C bias or None.
        assignment: B x D int64 group indices in [0, G).
        groups: number of groups G.

    Returns:
        B x G x C group logits (autograd flows to features, weight and bias).
    """
    batch, dim = features.shape
    # Each feature goes to its own group's row; the other G-1 rows hold zeros there.
    spread = features.new_zeros(batch, groups, dim).scatter(1, assignment.unsqueeze(1), features.unsqueeze(1))
    out = F.linear(spread, weight)
    if bias is not None:
        out = out + bias / groups
    return out


def smooth_targets(target: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Soft targets ``(1 - ε) one_hot(y) + ε / C`` from class indices (timm's label smoothing)."""
    soft = torch.full((target.shape[0], num_classes), smoothing / num_classes, device=target.device)
    return soft.scatter_(1, target.unsqueeze(1), 1.0 - smoothing + smoothing / num_classes)


def group_cross_entropy(
        group_logits: torch.Tensor,
        target: torch.Tensor,
        loss_type: str = 'II',
        label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-sample group softmax loss from B x G x C group logits, (A.2).

    Type-I: ``(1/G) sum_i CE(G z̄ⁱ, t)``; Type-II: ``sum_i CE(z̄ⁱ, t)``. The log-softmax runs in
    float32 (float64 stays float64) even under autocast, since Type-I scales logits by G.

    Args:
        group_logits: B x G x C.
        target: B class indices or B x C soft targets.
        loss_type: 'I' or 'II'.
        label_smoothing: ε for class-index targets (CE against ``(1-ε) one_hot + ε/C``).

    Returns:
        B per-sample losses.
    """
    loss_type = check_loss_type(loss_type)
    per_group = _per_group_cross_entropy(group_logits, target, loss_type, label_smoothing)
    return per_group.mean(1) if loss_type == 'I' else per_group.sum(1)


def _per_group_cross_entropy(
        group_logits: torch.Tensor, target: torch.Tensor, loss_type: str, label_smoothing: float) -> torch.Tensor:
    """B x G cross-entropies of the group logits as the loss type sees them (Type-I: scaled by G)."""
    num_groups = group_logits.shape[1]
    logits = group_logits.to(torch.promote_types(group_logits.dtype, torch.float32))
    if loss_type == 'I':
        logits = logits * num_groups
    log_prob = F.log_softmax(logits, dim=-1)
    if target.is_floating_point():
        per_group = -(log_prob * target.to(log_prob.dtype).unsqueeze(1)).sum(-1)
    else:
        index = target.view(-1, 1, 1).expand(-1, num_groups, 1)
        per_group = -log_prob.gather(2, index).squeeze(2)
        if label_smoothing:
            per_group = (1.0 - label_smoothing) * per_group - label_smoothing * log_prob.mean(-1)
    return per_group


def group_softmax_loss(
        features: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        target: torch.Tensor,
        groups: int,
        loss_type: str = 'II',
        grouping: Grouping = 'discriminative',
        generator: Optional[torch.Generator] = None,
        label_smoothing: float = 0.0,
        check_values: Optional[bool] = None,
) -> torch.Tensor:
    """Batch-mean group softmax loss of a linear classifier (SPEC.md, (A.2) with (A.13)-(A.14)).

    Args:
        features: B x D classifier inputs ``x``.
        weight: C x D classifier weight ``W``.
        bias: C classifier bias ``b`` or None; each group gets ``b / G``.
        target: B int64 class indices or B x C float soft targets (rows sum to one).
        groups: number of groups G, 1 <= G <= D.
        loss_type: 'I' (group logits scaled by G, losses averaged) or 'II' (losses summed).
        grouping: 'discriminative' (sort by λ, the paper's method), 'random' (a fresh equal-size
            partition per sample), 'contiguous' (fixed blocks of consecutive features), 'zero-aware'
            (discriminative, with zero-discriminativity features dealt evenly across groups), or an explicit
            int64 assignment tensor (B x D or D) with values in [0, G).
        generator: random generator for ``grouping='random'``.
        label_smoothing: ε, for class-index targets only. The discriminative grouping is unchanged by
            smoothing (λ scales by 1 - ε), so it is computed from the hard labels.
        check_values: check target values (range, row sums); default: only for CPU tensors, so a CUDA
            training step is not synchronised.

    Returns:
        Scalar loss. With G = 1 it equals ``F.cross_entropy`` of the whole logits.

    Examples:
        >>> x, W, b = torch.randn(8, 32), torch.randn(10, 32), torch.zeros(10)
        >>> y = torch.randint(0, 10, (8,))
        >>> loss = group_softmax_loss(x, W, b, y, groups=4, loss_type='II')
    """
    loss, _ = _loss_and_statistics(features, weight, bias, target, groups, loss_type, grouping, generator,
                                   label_smoothing, check_values, statistics=False)
    return loss


def group_softmax_loss_and_statistics(
        features: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        target: torch.Tensor,
        groups: int,
        loss_type: str = 'II',
        grouping: Grouping = 'discriminative',
        generator: Optional[torch.Generator] = None,
        label_smoothing: float = 0.0,
        check_values: Optional[bool] = None,
) -> Tuple[torch.Tensor, 'GroupingStatistics']:
    """:func:`group_softmax_loss` and the :class:`GroupingStatistics` of the same grouping, in one pass.

    The grouping and the group logits are computed once for both (for ``grouping='random'`` the statistics
    describe the very partition the loss used). Arguments as in :func:`group_softmax_loss`.

    Returns:
        ``(loss, statistics)``: the scalar loss (with autograd) and the batch's grouping statistics (detached).
    """
    return _loss_and_statistics(features, weight, bias, target, groups, loss_type, grouping, generator,
                                label_smoothing, check_values, statistics=True)


def _loss_and_statistics(features, weight, bias, target, groups, loss_type, grouping, generator, label_smoothing,
                         check_values, statistics: bool):
    _check_inputs(features, weight, bias, target, check_values)
    check_groups(groups, features.shape[1])
    loss_type = check_loss_type(loss_type)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
    if label_smoothing and target.is_floating_point():
        raise ValueError("label_smoothing applies to class-index targets; soft targets already carry it.")
    assignment = make_assignment(features, weight, target, groups, grouping, generator)
    logits = group_logits(features, weight, bias, assignment, groups)
    per_group = _per_group_cross_entropy(logits, target, loss_type, label_smoothing)
    loss = (per_group.mean(1) if loss_type == 'I' else per_group.sum(1)).mean()
    if not statistics:
        return loss, None
    return loss, _statistics(features.detach(), assignment, per_group.detach(), groups)


# ----------------------------------------------------------------------------------------------
# Grouping health
# ----------------------------------------------------------------------------------------------

class GroupingStatistics(NamedTuple):
    """How the features of a batch were grouped, batch means (see :func:`grouping_statistics`).

    Attributes:
        zero_fraction: fraction of classifier inputs that are exactly 0 (0-dim tensor).
        nonzero_per_group: G, mean number of nonzero features in each group (group 0: least discriminative).
        group_loss: G, mean cross-entropy of each group's logits, as the loss type sees them (Type-I: the
            group logits scaled by G); Type-II's loss is their sum, Type-I's their mean.
    """
    zero_fraction: torch.Tensor
    nonzero_per_group: torch.Tensor
    group_loss: torch.Tensor


@torch.no_grad()
def grouping_statistics(
        features: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        target: torch.Tensor,
        groups: int,
        loss_type: str = 'II',
        grouping: Grouping = 'discriminative',
        generator: Optional[torch.Generator] = None,
        label_smoothing: float = 0.0,
) -> GroupingStatistics:
    """Measure the grouping of a batch: zero inputs, nonzero features per group, loss per group.

    A group that holds mostly zero features has group logits close to ``b / G`` and a loss close to
    ``log C`` whatever the weights: these numbers show whether the grouping is degenerate. Computed without
    autograd; ``grouping='random'`` draws its own partition (statistically that of the loss).

    Args:
        features, weight, bias, target, groups, loss_type, grouping, generator, label_smoothing: as in
            :func:`group_softmax_loss`.

    Returns:
        A :class:`GroupingStatistics` of float32 tensors (means over the batch).
    """
    check_groups(groups, features.shape[1])
    assignment = make_assignment(features, weight, target, groups, grouping, generator)
    logits = group_logits(features, weight, bias, assignment, groups)
    per_group = _per_group_cross_entropy(logits, target, check_loss_type(loss_type), label_smoothing)
    return _statistics(features, assignment, per_group, groups)


def _statistics(features: torch.Tensor, assignment: torch.Tensor, per_group: torch.Tensor,
                groups: int) -> GroupingStatistics:
    nonzero = (features != 0).to(torch.float32)
    assignment = assignment.expand(features.shape[0], -1) if assignment.dim() == 1 else assignment
    counts = torch.zeros(features.shape[0], groups, device=features.device).scatter_add_(1, assignment, nonzero)
    return GroupingStatistics(
        zero_fraction=1.0 - nonzero.mean(),
        nonzero_per_group=counts.mean(0),
        group_loss=per_group.float().mean(0),
    )
