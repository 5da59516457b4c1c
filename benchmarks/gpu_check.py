"""One GPU check, ready for the first machine with a GPU: CUDA-only paths, training speed, loss cost.

Three parts, each timed against the plain softmax baseline run the same way, printed as a table and written
as JSON:

1. **CUDA-only paths**: ``train.py --device cuda --amp --amp-dtype float16`` (autocast with the gradient
   scaler) for a few steps on the embedded data, with ``--loss gsl``; and the SyncBatchNorm test of
   ``tests/test_distributed.py`` under torchrun with NCCL (it needs two GPUs: with fewer it is reported as
   skipped, not passed).
2. **Training steps**: a timm model (resnet50 at 224 px, batch 128, synthetic images) trained with
   :class:`timm.task.ClassificationTask` (``--loss ce``) and :class:`timm_gsl.GroupSoftmaxTask` (``--loss gsl``,
   G = 4, Type-II), under every combination of autocast dtype (float16 with a gradient scaler, bfloat16),
   channels_last and eager / ``torch.compile``: images per second, the GSL / CE ratio of step time (goal:
   <= 1.02), peak memory, whether every loss was finite.
3. **The loss alone**: forward + backward of the classifier's loss at B = 256, D = 2048 and C = 1,000 and
   21,843 (ImageNet-21k's classes): :func:`timm_gsl.group_softmax_loss` against ``F.linear`` +
   ``F.cross_entropy``.
4. **Our training loop against timm's**: is our ``train.py`` as fast as timm's? The same model, synthetic
   batches already on the device and bfloat16 autocast, trained by :func:`benchmarks.loops.timm_style_epoch`
   (timm's ``train_one_epoch`` per step, ``--loss ce``) and by our :func:`timm_gsl.engine.train_one_epoch` with
   ``--loss ce`` and ``--loss gsl``, in interleaved rounds; ratios to timm's loop in the same round with a
   bootstrap interval (:func:`benchmarks.loops.ratio_summary`).

The training configurations run last, the eager ones first; those not started within ``--budget-s`` seconds
(default 480) of the start are reported as skipped, so that the whole check ends within about 10 minutes.

``--device cpu --quick`` runs the same code at toy sizes (a tiny model, batch 4, a few steps, the
``aot_eager`` compile backend) in well under a minute, so the script is known to work before a GPU appears;
``tests/test_gpu_check.py`` runs it.

Usage::

    python -m benchmarks.gpu_check --output benchmarks/results/gpu_check.json        # on a GPU, < 10 min
    python -m benchmarks.gpu_check --device cpu --quick --output /tmp/gpu_check.json   # smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes of one check: the full one on a GPU, or the toy one of ``--quick``."""
    model: str
    img_size: int
    batch: int
    warmup: int
    steps: int
    loss_batch: int
    loss_dim: int
    loss_classes: Sequence[int]
    loss_repeats: int
    compile_backend: str
    loop_rounds: int


FULL = Sizes('resnet50', 224, 128, warmup=5, steps=20, loss_batch=256, loss_dim=2048,
             loss_classes=(1000, 21843), loss_repeats=20, compile_backend='inductor', loop_rounds=7)
QUICK = Sizes('test_resnet', 32, 4, warmup=1, steps=2, loss_batch=8, loss_dim=64, loss_classes=(10, 50),
              loss_repeats=2, compile_backend='aot_eager', loop_rounds=3)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == 'cuda' else None


# ----------------------------------------------------------------------------------------------
# 2. Training steps
# ----------------------------------------------------------------------------------------------

def _make_task(loss: str, sizes: Sizes, device: torch.device, channels_last: bool, compiled: bool):
    import timm
    from timm.task import ClassificationTask
    from timm_gsl import GroupSoftmaxTask

    torch.manual_seed(0)
    model = timm.create_model(sizes.model, num_classes=1000).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if loss == 'gsl':
        task = GroupSoftmaxTask(model, criterion_kwargs=dict(gsl_groups=4, gsl_type='II'), device=device,
                                verbose=False)
    else:
        task = ClassificationTask(model, criterion=nn.CrossEntropyLoss(), device=device, verbose=False)
    if compiled:
        # Dynamo does not guard on module hooks by default: a frame compiled for the previous configuration's
        # model of the same class would be reused without the grouped head's hooks. One model per process is
        # what train.py does; a reset gives each configuration that.
        torch._dynamo.reset()
        task.compile(backend=sizes.compile_backend)
    return task


def train_steps(loss: str, amp_dtype: str, channels_last: bool, compiled: bool, sizes: Sizes,
                device: torch.device) -> Dict[str, Any]:
    """Time ``sizes.steps`` training steps (after ``sizes.warmup``) of one configuration.

    Returns:
        ``step_s`` (median seconds per step), ``images_per_s``, ``peak_mib`` (CUDA only), ``finite``.
    """
    task = _make_task(loss, sizes, device, channels_last, compiled)
    task.train()
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.01, momentum=0.9)
    dtype = getattr(torch, amp_dtype)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == 'float16' else None
    generator = torch.Generator(device='cpu').manual_seed(0)
    images = torch.randn(sizes.batch, 3, sizes.img_size, sizes.img_size, generator=generator).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (sizes.batch,), generator=generator).to(device)
    times: List[float] = []
    finite = True
    _reset_peak(device)
    for step in range(sizes.warmup + sizes.steps):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            loss_value = task(images, labels)['loss']
        if scaler is not None:
            scaler.scale(loss_value).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss_value.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        finite = finite and bool(torch.isfinite(loss_value.detach()).item())
        _sync(device)
        if step >= sizes.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return dict(step_s=step_s, images_per_s=sizes.batch / step_s, peak_mib=_peak_mib(device), finite=finite)


def training_table(sizes: Sizes, device: torch.device, compile_modes: Sequence[bool],
                   deadline: Optional[float] = None) -> List[Dict[str, Any]]:
    """Every (autocast dtype, channels_last, compile) configuration with both losses, CE first; the eager ones
    first. A configuration not started by ``deadline`` (``time.time()``) is reported as skipped."""
    rows = []
    dtypes = ('float16', 'bfloat16')
    for compiled, amp_dtype, channels_last in itertools.product(compile_modes, dtypes, (False, True)):
        row: Dict[str, Any] = dict(amp_dtype=amp_dtype, channels_last=channels_last, compiled=compiled)
        for loss in ('ce', 'gsl'):
            if deadline is not None and time.time() > deadline:
                row[loss] = dict(skipped='time budget spent (--budget-s)')
                continue
            try:
                row[loss] = train_steps(loss, amp_dtype, channels_last, compiled, sizes, device)
            except Exception as e:  # a failing configuration is a result, not the end of the check
                row[loss] = dict(error=f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}')
        if 'step_s' in row['ce'] and 'step_s' in row['gsl']:
            row['gsl_over_ce'] = row['gsl']['step_s'] / row['ce']['step_s']
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# 3. The loss alone
# ----------------------------------------------------------------------------------------------

def _time_loss(fn: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], repeats: int,
               device: torch.device) -> float:
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        value = fn()
        torch.autograd.grad(value, inputs)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def loss_table(sizes: Sizes, device: torch.device) -> List[Dict[str, Any]]:
    """GSL (G = 4, Type-II) against the plain softmax head, forward + backward, at each class count."""
    from timm_gsl import group_softmax_loss

    rows = []
    for classes in sizes.loss_classes:
        generator = torch.Generator(device='cpu').manual_seed(0)
        x = torch.randn(sizes.loss_batch, sizes.loss_dim, generator=generator).to(device).requires_grad_()
        w = (0.01 * torch.randn(classes, sizes.loss_dim, generator=generator)).to(device).requires_grad_()
        b = torch.zeros(classes, device=device, requires_grad=True)
        y = torch.randint(0, classes, (sizes.loss_batch,), generator=generator).to(device)
        _reset_peak(device)
        plain_s = _time_loss(lambda: F.cross_entropy(F.linear(x, w, b), y), (x, w, b), sizes.loss_repeats, device)
        plain_mib = _peak_mib(device)
        _reset_peak(device)
        gsl_s = _time_loss(lambda: group_softmax_loss(x, w, b, y, 4, 'II', check_values=False), (x, w, b),
                           sizes.loss_repeats, device)
        rows.append(dict(batch=sizes.loss_batch, dim=sizes.loss_dim, classes=classes, plain_s=plain_s, gsl_s=gsl_s,
                         gsl_over_plain=gsl_s / plain_s, plain_peak_mib=plain_mib, gsl_peak_mib=_peak_mib(device)))
    return rows


# ----------------------------------------------------------------------------------------------
# 4. Our training loop against timm's
# ----------------------------------------------------------------------------------------------

def loop_table(sizes: Sizes, device: torch.device) -> Dict[str, Any]:
    """timm's loop (ce) against ours (ce, gsl): seconds per step and ratios to timm's, bfloat16 autocast."""
    import functools
    from benchmarks.loops import interleaved_rounds, ours_epoch, ratio_summary, timm_style_epoch

    generator = torch.Generator(device='cpu').manual_seed(0)
    batches = [(torch.randn(sizes.batch, 3, sizes.img_size, sizes.img_size, generator=generator).to(device),
                torch.randint(0, 1000, (sizes.batch,), generator=generator).to(device))
               for _ in range(sizes.steps)]
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    loops = {}
    for name, loss, epoch_fn in (('timm', 'ce', timm_style_epoch), ('ours-ce', 'ce', ours_epoch),
                                 ('ours-gsl', 'gsl', ours_epoch)):
        task = _make_task(loss, sizes, device, channels_last=False, compiled=False)
        optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.01, momentum=0.9)
        extra = dict(device=device) if epoch_fn is ours_epoch else {}
        loops[name] = functools.partial(epoch_fn, task, optimizer, batches, amp_autocast=autocast, **extra)
    times = interleaved_rounds(loops, sizes.loop_rounds, synchronize=lambda: _sync(device))
    summary = ratio_summary(times, 'timm')
    for row in summary.values():
        row['step_s'] = row.pop('median_s') / sizes.steps
    return dict(rounds=sizes.loop_rounds, steps=sizes.steps, amp_dtype='bfloat16', loops=summary)


# ----------------------------------------------------------------------------------------------
# 1. CUDA-only paths
# ----------------------------------------------------------------------------------------------

def _run(cmd: Sequence[str], timeout_s: float) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
    started = time.time()
    try:
        proc = subprocess.run(list(cmd), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(status='timeout', seconds=round(time.time() - started, 1), command=' '.join(cmd))
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return dict(status='passed' if proc.returncode == 0 else f'failed (exit {proc.returncode})',
                seconds=round(time.time() - started, 1), command=' '.join(cmd), tail=tail)


def cuda_paths(device: torch.device, quick: bool) -> Dict[str, Any]:
    """The float16 + gradient-scaler training run and the SyncBatchNorm test (or why they were skipped)."""
    out: Dict[str, Any] = {}
    if device.type != 'cuda':
        reason = 'needs CUDA (run with --device cuda on a GPU machine)'
        return dict(float16_grad_scaler=dict(status=f'skipped: {reason}'),
                    sync_bn_nccl=dict(status=f'skipped: {reason}'))
    with tempfile.TemporaryDirectory() as tmp:
        out['float16_grad_scaler'] = _run(
            [sys.executable, '-m', 'timm_gsl.train', '--device', 'cuda', '--amp', '--amp-dtype', 'float16',
             '--loss', 'gsl', '--epochs', '1', '--train-batches-per-epoch', '5', '--samples-per-class', '50',
             '--output', tmp, '--experiment', 'fp16'], timeout_s=300)
    if torch.cuda.device_count() < 2:
        out['sync_bn_nccl'] = dict(status=f'skipped: NCCL needs one GPU per process, found '
                                          f'{torch.cuda.device_count()}')
    else:
        out['sync_bn_nccl'] = _run([sys.executable, '-m', 'pytest', '-q', 'tests/test_distributed.py', '-k',
                                    'sync_bn'], timeout_s=300)
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def _fmt(value: Optional[float], spec: str) -> str:
    return '-' if value is None else format(value, spec)


def format_tables(result: Dict[str, Any]) -> str:
    """The three parts as plain-text tables."""
    lines = [f"GPU check on {result['device_name']} ({result['mode']})", '', '1. CUDA-only paths']
    for name, value in result['cuda_paths'].items():
        lines.append(f'  {name:22s} {value["status"]}')
    lines += ['', '2. Training steps (images/s; peak MiB)',
              f'  {"autocast":9s} {"ch_last":7s} {"compile":7s} {"ce img/s":>9s} {"gsl img/s":>9s} '
              f'{"gsl/ce":>7s} {"ce MiB":>8s} {"gsl MiB":>8s} finite']
    for row in result['training']:
        ce, gsl = row['ce'], row['gsl']
        finite = ('skipped' if 'skipped' in ce or 'skipped' in gsl else
                  'yes' if ce.get('finite') and gsl.get('finite') else 'NO')
        lines.append(f'  {row["amp_dtype"]:9s} {str(row["channels_last"]):7s} {str(row["compiled"]):7s} '
                     f'{_fmt(ce.get("images_per_s"), "9.1f")} {_fmt(gsl.get("images_per_s"), "9.1f")} '
                     f'{_fmt(row.get("gsl_over_ce"), "7.3f")} {_fmt(ce.get("peak_mib"), "8.0f")} '
                     f'{_fmt(gsl.get("peak_mib"), "8.0f")} {finite}')
        for loss in ('ce', 'gsl'):
            if 'error' in row[loss]:
                lines.append(f'    {loss} error: {row[loss]["error"]}')
            elif 'skipped' in row[loss]:
                lines.append(f'    {loss} skipped: {row[loss]["skipped"]}')
    lines += ['', '3. The loss alone (forward + backward, ms)',
              f'  {"B":>5s} {"D":>6s} {"C":>7s} {"plain":>8s} {"gsl":>8s} {"gsl/plain":>9s}']
    for row in result['loss']:
        lines.append(f'  {row["batch"]:5d} {row["dim"]:6d} {row["classes"]:7d} {1e3 * row["plain_s"]:8.2f} '
                     f'{1e3 * row["gsl_s"]:8.2f} {row["gsl_over_plain"]:9.2f}')
    loop = result['loop']
    lines += ['', f'4. Our training loop against timm\'s ({loop["amp_dtype"]} autocast, {loop["steps"]} steps x '
                  f'{loop["rounds"]} interleaved rounds; ratio to timm\'s loop in the same round)',
              f'  {"loop":9s} {"ms/step":>8s} {"ratio":>6s} {"95% CI":>13s}  verdict']
    for name, row in loop['loops'].items():
        interval = f'{row["ci_low"]:.3f}-{row["ci_high"]:.3f}' if 'ci_low' in row else ''
        lines.append(f'  {name:9s} {1e3 * row["step_s"]:8.2f} {row["ratio"]:6.3f} {interval:>13s}  '
                     f'{row.get("verdict", "baseline")}')
    lines.append(f'\nTotal: {result["seconds"]:.0f} s')
    return '\n'.join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cuda', help='cuda (default) or cpu')
    parser.add_argument('--quick', action='store_true', help='toy sizes: a smoke run of the same code paths')
    parser.add_argument('--no-compile', action='store_true', help='skip the torch.compile configurations')
    parser.add_argument('--output', default=None, metavar='FILE', help='write the results as JSON here')
    parser.add_argument('--budget-s', type=float, default=480, metavar='S',
                        help='seconds after which training configurations not yet started are skipped (reported as '
                             'such), so that the check ends in time; the eager ones run first (default: 480)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.budget_s < 0:
        parser.error(f'argument --budget-s: {args.budget_s:g} is invalid, expected seconds >= 0')
    if args.device not in ('cuda', 'cpu') and not args.device.startswith('cuda:'):
        parser.error(f"argument --device: {args.device!r} is invalid, expected 'cuda', 'cuda:N' or 'cpu'")
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('argument --device: CUDA is not available here; pass --device cpu --quick for a smoke run')
    sizes = QUICK if args.quick else FULL
    started = time.time()
    result: Dict[str, Any] = dict(
        mode='quick' if args.quick else 'full', sizes=dataclasses.asdict(sizes),
        device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu',
        versions=dict(torch=torch.__version__, python=platform.python_version(),
                      cuda=torch.version.cuda, timm=__import__('timm').__version__))
    result['cuda_paths'] = cuda_paths(device, args.quick)
    result['loss'] = loss_table(sizes, device)
    result['loop'] = loop_table(sizes, device)
    result['training'] = training_table(sizes, device, (False,) if args.no_compile else (False, True),
                                        deadline=started + args.budget_s)
    result['seconds'] = time.time() - started
    print(format_tables(result))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, 'w') as f:
            json.dump(result, f, indent=1)
        print(f'Wrote {args.output}')
    ran = [row for row in result['training'] if 'skipped' not in row['ce'] and 'skipped' not in row['gsl']]
    failed = [row for row in ran if 'error' in row['ce'] or 'error' in row['gsl']
              or not (row['ce'].get('finite') and row['gsl'].get('finite'))]
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
