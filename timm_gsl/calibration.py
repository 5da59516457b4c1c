"""Calibration of a classifier's probabilities: NLL, expected calibration error, temperature scaling.

Pure tensor math on logits and integer labels (no timm import), used by the evaluations of train.py and
validate.py, by the temperature fitted after training and folded into published checkpoints, and by the
replication study, which recomputes everything from saved logits.

* ``negative_log_likelihood``: the mean cross-entropy of ``softmax(logits / T)`` at the true labels.
* ``expected_calibration_error``: top-label ECE with equal-width confidence bins (Guo et al., "On
  Calibration of Modern Neural Networks", ICML 2017): the images are binned by their top softmax
  probability into ``(k/M, (k+1)/M]``; ECE is the image-weighted mean over bins of
  ``|accuracy(bin) - mean confidence(bin)|``. Returned in percent, like timm's top-1.
* ``fit_temperature``: the single ``T > 0`` that minimises the NLL of ``logits / T``. The NLL is convex
  in ``1 / T``, hence unimodal in ``log T``; a golden-section search on ``log T`` in float64 over a fixed
  bracket finds it deterministically (same logits, same T, on any machine that computes the same NLL).

Dividing a linear classifier's weight and bias by ``T`` gives ``logits / T`` exactly (up to rounding), and the
argmax is unchanged: calibration by temperature never changes a prediction.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    'DEFAULT_ECE_BINS', 'TEMPERATURE_BOUNDS', 'CalibrationFit', 'CalibrationMeter', 'calibrate_cross_fitted',
    'calibrate_held_out', 'calibration_metrics', 'check_logits_and_target',
    'expected_calibration_error', 'fit_temperature', 'negative_log_likelihood',
]

DEFAULT_ECE_BINS = 15
# The search bracket of fit_temperature. Below 1/50 a model that gets every calibration image right would
# be pushed towards infinitely sharp probabilities; above 50 its probabilities are uniform to within 2 %.
TEMPERATURE_BOUNDS: Tuple[float, float] = (0.02, 50.0)
_GOLDEN_STEPS = 80  # the bracket of log T (width ~7.8) shrinks by 0.618 per step: ~1e-16 after 80


def check_logits_and_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``logits`` is N x C (N >= 1, C >= 2) and ``target`` N class indices in [0, C)."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f'logits must be an N x C tensor with N >= 1 and C >= 2, got {shape}.')
    if not isinstance(target, torch.Tensor) or target.ndim != 1 or target.shape[0] != logits.shape[0]:
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f'target must be a tensor of {logits.shape[0]} class indices (one per row of logits), '
                         f'got {shape}.')
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f'target must hold integer class indices, got dtype {target.dtype}.')
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= logits.shape[1]:
        raise ValueError(f'target holds class {low if low < 0 else high}, expected class indices in '
                         f'[0, {logits.shape[1] - 1}] for {logits.shape[1]} logits per image.')


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f'temperature={temperature!r} is invalid, expected a finite number > 0.')
    return float(temperature)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits.detach().to(torch.float64) / temperature


def negative_log_likelihood(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under ``softmax(logits / temperature)``.

    Args:
        logits: N x C logits.
        target: N class indices.
        temperature: T > 0 dividing the logits.

    Returns:
        The mean NLL in nats (computed in float64).
    """
    check_logits_and_target(logits, target)
    temperature = _check_temperature(temperature)
    return float(F.cross_entropy(_scaled(logits, temperature), target.long()))


def expected_calibration_error(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
                               bins: int = DEFAULT_ECE_BINS) -> float:
    """Top-label expected calibration error of ``softmax(logits / temperature)``, in percent.

    Each image falls in the bin ``(k/bins, (k+1)/bins]`` of its top probability (its confidence); the ECE is
    ``sum_k |B_k| / N * |accuracy(B_k) - mean confidence(B_k)|``, as in Guo et al. (2017), with 15 bins by
    default. The prediction is the argmax of the logits (ties go to the lowest class, as ``torch.argmax``).

    Args:
        logits: N x C logits.
        target: N class indices.
        temperature: T > 0 dividing the logits.
        bins: number of equal-width confidence bins (>= 1).

    Returns:
        ECE in percent (0-100).
    """
    check_logits_and_target(logits, target)
    temperature = _check_temperature(temperature)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f'bins={bins!r} is invalid, expected an integer >= 1.')
    return float(_ece_from_gaps(_bin_gaps(_scaled(logits, temperature), target.long(), bins), logits.shape[0]))


def _bin_gaps(logits: torch.Tensor, target: torch.Tensor, bins: int) -> torch.Tensor:
    """Per confidence bin, the sum over its images of (correct - confidence), in float64 on the logits' device."""
    probs = torch.softmax(logits, dim=1)
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == target.to(prediction.device)).to(torch.float64)
    # Bin k holds confidences in (k/bins, (k+1)/bins]: ceil(conf * bins) - 1, clamped for rounding at 0 and 1.
    index = (torch.ceil(confidence * bins) - 1).clamp_(0, bins - 1).long()
    return torch.zeros(bins, dtype=torch.float64, device=logits.device).index_add_(0, index, correct - confidence)


def _ece_from_gaps(gaps: torch.Tensor, count: Any) -> torch.Tensor:
    # |sum over bin of (correct - confidence)| / N == |B_k| / N * |acc(B_k) - conf(B_k)|
    return gaps.abs().sum() / max(count, 1) * 100.0


def fit_temperature(logits: torch.Tensor, target: torch.Tensor,
                    bounds: Tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature ``T`` in ``bounds`` that minimises :func:`negative_log_likelihood` of ``logits / T``.

    A golden-section search on ``log T`` in float64 with a fixed number of steps: deterministic, and exact to
    far below the precision anyone reports. The NLL is convex in ``1 / T``, so it has one minimum on the
    bracket (which may be an end of it: an optimum outside the bracket returns the nearer bound).

    Args:
        logits: N x C logits of images the model was not trained on.
        target: N class indices.
        bounds: (lowest, highest) temperature searched, both > 0.

    Returns:
        The fitted temperature.
    """
    check_logits_and_target(logits, target)
    low, high = (_check_temperature(b) for b in bounds)
    if not low < high:
        raise ValueError(f'bounds={bounds!r} is invalid, expected (low, high) with 0 < low < high.')
    z = logits.detach().to(torch.float64)
    y = target.long().to(z.device)

    def nll_at(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll_at(c), nll_at(d)
    for _ in range(_GOLDEN_STEPS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll_at(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll_at(d)
    best = min((fc, c), (fd, d), (nll_at(math.log(low)), math.log(low)), (nll_at(math.log(high)), math.log(high)))
    return math.exp(best[1])


def calibration_metrics(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
                        bins: int = DEFAULT_ECE_BINS) -> Dict[str, float]:
    """``{'nll': ..., 'ece': ...}`` of ``softmax(logits / temperature)`` (ECE in percent)."""
    return dict(nll=negative_log_likelihood(logits, target, temperature),
                ece=expected_calibration_error(logits, target, temperature, bins))


class CalibrationMeter:
    """Running NLL and ECE over batches, accumulated on the logits' device (no host read until :meth:`compute`).

    Args:
        bins: ECE confidence bins.

    Examples:
        >>> meter = CalibrationMeter()
        >>> for logits, target in batches:
        ...     meter.update(logits, target)
        >>> meter.compute()  # {'nll': ..., 'ece': ...}; compute(distributed=True) sums over processes first
    """

    def __init__(self, device: Optional[torch.device] = None, bins: int = DEFAULT_ECE_BINS):
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f'bins={bins!r} is invalid, expected an integer >= 1.')
        self.bins = bins
        device = torch.device(device or 'cpu')
        self._dtype = torch.float32 if device.type == 'mps' else torch.float64  # MPS has no float64
        self.sums = torch.zeros(2 + bins, dtype=self._dtype, device=device)  # [images, NLL sum, bin gaps...]

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of N x C logits and N class indices (an empty batch adds nothing)."""
        if logits.shape[0] == 0:
            return
        z = logits.detach().to(torch.float64 if self._dtype == torch.float64 else torch.float32)
        y = target.detach().long().to(z.device)
        count = torch.full((1,), z.shape[0], dtype=z.dtype, device=z.device)
        batch = torch.cat([count, F.cross_entropy(z, y, reduction='sum').reshape(1), _bin_gaps(z, y, self.bins)])
        self.sums += batch.to(self.sums)

    def compute(self, distributed: bool = False) -> Dict[str, float]:
        """``{'nll': mean NLL, 'ece': ECE in percent}`` so far (summed over processes when ``distributed``).

        With no image (on every process) both are NaN: never a figure computed over zero images.
        """
        sums = self.sums.clone()
        if distributed:
            import torch.distributed as dist
            dist.all_reduce(sums)
        values = sums.cpu().to(torch.float64)
        images = float(values[0])
        if images == 0:
            return dict(nll=float('nan'), ece=float('nan'))
        return dict(nll=float(values[1] / images), ece=float(_ece_from_gaps(values[2:], images)))


@dataclasses.dataclass(frozen=True)
class CalibrationFit:
    """A temperature fitted on held-out images, and what it did to the probabilities.

    Args:
        temperature: the fitted T (divide the logits by it).
        images: how many images it was fitted on.
        source: where those images came from, in words a reader understands (e.g. 'training-pool hold-out').
        nll_before, ece_before: NLL and ECE (percent) at T = 1 on the images the figures are reported on.
        nll_after, ece_after: the same at the fitted T.
        reported_on: which images the four figures are measured on (never the fitting images, except when
            ``source`` says the figures are cross-fitted).
        reported_images: how many.
        weights: which weights of the checkpoint it was fitted for: 'model' or 'ema' (``state_dict_ema``).
    """
    temperature: float
    images: int
    source: str
    nll_before: float
    ece_before: float
    nll_after: float
    ece_after: float
    reported_on: str
    reported_images: int
    weights: str = 'model'

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (the ``calibration`` object of checkpoints and ``config.json``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[Dict[str, Any]]) -> Optional['CalibrationFit']:
        """The inverse of :meth:`to_dict`; None for None. Unknown keys are refused in one line."""
        if data is None:
            return None
        if not isinstance(data, dict):
            raise ValueError(f'calibration must be a dict, got {type(data).__name__}.')
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data) - {'weights'})
        if unknown or missing:
            raise ValueError(f'calibration record has unknown keys {unknown} / lacks {missing}; expected '
                             f'{sorted(names)}.')
        fit = cls(**data)
        _check_temperature(fit.temperature)
        if fit.weights not in ('model', 'ema'):
            raise ValueError(f"calibration weights={fit.weights!r} is unknown, expected 'model' or 'ema'.")
        return fit


def calibrate_held_out(fit_logits: torch.Tensor, fit_target: torch.Tensor, report_logits: torch.Tensor,
                       report_target: torch.Tensor, source: str, reported_on: str,
                       weights: str = 'model') -> CalibrationFit:
    """Fit T on held-out images and measure NLL/ECE before and after on other images.

    Args:
        fit_logits, fit_target: the images T is fitted on (never trained on).
        report_logits, report_target: the images the figures are measured on (not the fitting images).
        source: where the fitting images come from, for the record (e.g. 'training-pool hold-out').
        reported_on: what the report images are (e.g. 'validation split').
        weights: 'model' or 'ema', see :class:`CalibrationFit`.
    """
    temperature = fit_temperature(fit_logits, fit_target)
    before = calibration_metrics(report_logits, report_target)
    after = calibration_metrics(report_logits, report_target, temperature)
    return CalibrationFit(temperature=temperature, images=int(fit_logits.shape[0]), source=source,
                          nll_before=before['nll'], ece_before=before['ece'], nll_after=after['nll'],
                          ece_after=after['ece'], reported_on=reported_on,
                          reported_images=int(report_logits.shape[0]), weights=weights)


def calibrate_cross_fitted(logits: torch.Tensor, target: torch.Tensor, source: str, seed: int = 0,
                           weights: str = 'model') -> CalibrationFit:
    """Fit T on all of a set of images, with figures that never score an image with a T fitted on it.

    The images are split in two halves by a permutation drawn with ``seed``; each half is scaled by the
    temperature fitted on the other half, and NLL/ECE "after" are measured on those cross-fitted logits
    (an honest estimate of what a fitted T does to new images). The temperature returned, the one to publish,
    is fitted on all the images.

    Args:
        logits, target: the images (at least 2).
        source: their description for the record, e.g. 'validation split, 2-fold cross-fitted'.
        seed: seed of the split.
        weights: 'model' or 'ema', see :class:`CalibrationFit`.
    """
    check_logits_and_target(logits, target)
    n = logits.shape[0]
    if n < 2:
        raise ValueError(f'cross-fitting needs at least 2 images, got {n}.')
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    halves = (order[: n // 2], order[n // 2:])
    scaled = torch.empty(logits.shape, dtype=torch.float64)
    z = logits.detach().to(torch.float64).cpu()
    y = target.detach().long().cpu()
    for fit_half, score_half in (halves, halves[::-1]):
        scaled[score_half] = z[score_half] / fit_temperature(z[fit_half], y[fit_half])
    before = calibration_metrics(z, y)
    after = calibration_metrics(scaled, y)
    return CalibrationFit(temperature=fit_temperature(z, y), images=n, source=source, nll_before=before['nll'],
                          ece_before=before['ece'], nll_after=after['nll'], ece_after=after['ece'],
                          reported_on=f'{source} (each half scored with the temperature of the other half)',
                          reported_images=n, weights=weights)
