"""Speed of train.py's training loop against a minimal loop built from timm's library pieces.

Three loops run the same model architecture (same initial weights), the same batches (drawn once
from train.py's own loader and replayed from memory, so data loading is not timed), the same
optimiser and the same number of steps, interleaved in one process:

* ``timm``: a minimal loop written here: ``model(input)``, timm's label-smoothing / soft-target
  cross-entropy, ``backward``, ``optimizer.step``, ``lr_scheduler.step_update``;
* ``ours-ce``: :func:`timm_gsl.engine.train_one_epoch` with ``--loss ce``;
* ``ours-gsl``: the same with ``--loss gsl`` (the group softmax loss), with the grouping statistics train.py
  logs, measured from the loss's own grouping (one pass);
* ``gsl-nostats``: ``--loss gsl`` without the grouping statistics;
* ``gsl-2pass``: ``--loss gsl`` with the statistics measured by a second grouping and group-logit pass (how
  train.py measured them before the one-pass loss).

It prints the median seconds per step of each and the ratios to ``timm`` (target: ~1.00 for ce,
a few percent above for gsl). Timings on a shared machine are noisy: compare the ratios.

Usage:
    python -m benchmarks.bench_train [--model resnet10t] [--batch-size 64] [--steps 10] [--repeats 5]
"""
import argparse
import statistics
import time

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from timm_gsl.cli.train import EMBEDDED_RECIPE, apply_embedded_recipe, build_run, check_args, parse_args
from timm_gsl.engine import TrainingState, train_one_epoch
from timm_gsl.functional import group_softmax_loss


def _build(loss: str, cli: argparse.Namespace):
    argv = ['--model', cli.model, '-b', str(cli.batch_size), '--train-batches-per-epoch', str(cli.steps),
            '--loss', loss, '--epochs', '1000', '--warmup-epochs', '0', '--seed', '0', '--device', 'cpu']
    args, explicit = parse_args(argv)
    apply_embedded_recipe(args, explicit)
    check_args(args)
    return build_run(args)


def _two_passes(criterion):
    """Make ``criterion`` measure its statistics by a second grouping and group-logit pass (without autograd)."""
    def forward(output, target):
        loss = group_softmax_loss(output.features, output.weight, output.bias, target, criterion.groups,
                                  loss_type=criterion.loss_type, grouping=criterion.grouping,
                                  label_smoothing=criterion._smoothing_for(target))
        criterion.last_statistics = criterion.statistics(output, target)
        return loss
    criterion.forward = forward


def _timm_loop(model, optimizer, loss_fn, batches, lr_scheduler, epoch):
    """The minimal training loop: what any timm training script does per step."""
    model.train()
    num_updates = epoch * len(batches)
    for input, target in batches:
        output = model(input)
        loss = loss_fn(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        num_updates += 1
        lr_scheduler.step_update(num_updates=num_updates)
        loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default=EMBEDDED_RECIPE['model'], help='default: the no-data-flags recipe\'s')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--steps', type=int, default=10, help='steps per timed epoch')
    parser.add_argument('--repeats', type=int, default=5, help='timed epochs per loop (after one warm-up)')
    cli = parser.parse_args()
    torch.manual_seed(0)

    runs = {'ours-ce': _build('ce', cli), 'ours-gsl': _build('gsl', cli), 'gsl-nostats': _build('gsl', cli),
            'gsl-2pass': _build('gsl', cli)}
    runs['gsl-nostats'].task.grouping_statistics = False
    runs['gsl-nostats'].task.criterion.keep_statistics = False
    _two_passes(runs['gsl-2pass'].task.criterion)
    reference = runs['ours-ce']
    # The same batches for every loop, drawn once from train.py's loader.
    batches = [(x.clone(), y.clone()) for x, y in reference.loader_train]
    args = reference.config  # the flags with what the run derived (num_classes, lr)

    model = create_model(args.model, in_chans=args.in_chans, num_classes=args.num_classes)
    model.load_state_dict(reference.task.get_trainable_module().state_dict())
    for run in runs.values():
        run.task.get_trainable_module().load_state_dict(model.state_dict())
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    loss_fn = SoftTargetCrossEntropy() if batches[0][1].is_floating_point() else LabelSmoothingCrossEntropy(
        args.smoothing)
    timm_scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=len(batches))

    loops = {'timm': lambda epoch: _timm_loop(model, optimizer, loss_fn, batches, timm_scheduler, epoch)}
    for name, run in runs.items():
        state = TrainingState(optimizer=run.optimizer, device=run.device, lr_scheduler=run.lr_scheduler,
                              log_interval=10 ** 9)
        loops[name] = (lambda r, s: lambda epoch: train_one_epoch(epoch, r.task, batches, s))(run, state)

    times = {name: [] for name in loops}
    names = list(loops)
    for epoch in range(cli.repeats + 1):
        # Rotate the order each round so that no loop always runs first (or right after another).
        for name in names[epoch % len(names):] + names[:epoch % len(names)]:
            start = time.perf_counter()
            loops[name](epoch)
            if epoch:  # the first pass warms up allocators and caches
                times[name].append((time.perf_counter() - start) / len(batches))

    base = statistics.median(times['timm'])
    print(f'model {args.model}, input {tuple(batches[0][0].shape[1:])}, batch {cli.batch_size}, '
          f'{len(batches)} steps x {cli.repeats} repeats, torch threads {torch.get_num_threads()}')
    for name, values in times.items():
        median = statistics.median(values)
        print(f'{name:>9}: {median * 1000:8.1f} ms/step  ({cli.batch_size / median:7.1f} img/s)  '
              f'ratio to timm {median / base:5.3f}')


if __name__ == '__main__':
    main()
