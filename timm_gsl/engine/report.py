"""What a run reports: ``summary.csv`` read back, the learning-curve plot, the final summary lines."""
from __future__ import annotations

import csv
from typing import Dict, List, Optional, Sequence


from .atomic import atomic_path

__all__ = ['format_summary', 'plot_learning_curves', 'read_summary']


def read_summary(path: str) -> List[Dict[str, Optional[float]]]:
    """The rows of a run's ``summary.csv`` as floats (empty cells, e.g. epochs without evaluation: None)."""
    with open(path, newline='') as f:
        return [{k: (float(v) if v not in ('', None) else None) for k, v in row.items()} for row in csv.DictReader(f)]

def plot_learning_curves(history: Sequence[Dict[str, float]], path: str, title: str = '',
                         train_targets: str = '') -> str:
    """Draw loss and top-1 per epoch into a PNG (matplotlib's Agg backend), written atomically.

    Args:
        history: one dict per epoch with ``epoch`` and any of ``train_loss``, ``train_softmax_loss``,
            ``train_clean_loss``, ``train_clean_top1``, ``eval_loss``, ``eval_top1`` (missing keys are skipped).
        path: the PNG to write.
        title: figure title.
        train_targets: how the training batches' targets differ from the labels, e.g. 'smoothed targets' or
            'mixed targets'; named in the legend of the losses computed on them ('' when they are the labels).

    Returns:
        ``path``.
    """
    import matplotlib
    matplotlib.use('Agg', force=False)
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    figure = Figure(figsize=(10, 4), dpi=100)
    loss_axes, top1_axes = figure.subplots(1, 2)
    on_targets = f', {train_targets}' if train_targets else ''
    curves = (
        (loss_axes, 'train_loss', f'train loss (augmented batches{on_targets})'),
        (loss_axes, 'train_softmax_loss', f'train softmax loss (same batches{on_targets})'),
        (loss_axes, 'train_clean_loss', 'clean train softmax loss (no augmentation, eval mode)'),
        (loss_axes, 'eval_loss', 'validation loss'),
        (top1_axes, 'train_clean_top1', 'clean train top-1'),
        (top1_axes, 'eval_top1', 'validation top-1'),
    )
    for axes, key, label in curves:
        points = [(row['epoch'], row[key]) for row in history if row.get(key) is not None]
        if points:
            epochs, values = zip(*points)
            axes.plot(epochs, values, marker='o', label=label)
    loss_axes.set_xlabel('epoch')
    loss_axes.set_ylabel('loss')
    if loss_axes.lines and all(min(line.get_ydata()) > 0 for line in loss_axes.lines):
        # Over-fitting shows as a clean training loss falling by decades while the validation loss rises.
        loss_axes.set_yscale('log')
        loss_axes.set_ylabel('loss (log scale)')
    top1_axes.set_xlabel('epoch')
    top1_axes.set_ylabel('top-1 (%)')
    for axes in (loss_axes, top1_axes):
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize='small')
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format='png')
    return path


def format_summary(
        best_metric: Optional[float],
        best_epoch: Optional[int],
        eval_metric: str,
        output_dir: Optional[str],
        last_metrics: Optional[Dict[str, float]] = None,
        elapsed_s: Optional[float] = None,
        clean_train_metrics: Optional[Dict[str, float]] = None,
) -> str:
    """The closing lines of a run: timm's ``*** Best metric`` line, then ours: the best metric by name, the
    last epoch's metrics, where outputs are.

    Args:
        best_metric: best value of ``eval_metric`` (None if never evaluated).
        best_epoch: its epoch.
        eval_metric: the metric's name.
        output_dir: the run's folder, or None.
        last_metrics: the last evaluation's metrics.
        elapsed_s: wall time of the run.
        clean_train_metrics: the last measurement on the un-augmented training images in eval mode.

    Returns:
        A multi-line string.
    """
    lines = []
    if best_metric is not None:
        # Exactly timm's train.py line (scripts parse it), then ours, which names the metric.
        lines += [f'*** Best metric: {best_metric} (epoch {best_epoch})',
                  f'Best {eval_metric}: {best_metric:.3f} (epoch {best_epoch})']
    else:
        lines.append('No evaluation was run.')
    if last_metrics:
        lines.append('Last evaluation: ' + ', '.join(f'{k} {v:.4g}' for k, v in last_metrics.items()))
    if clean_train_metrics:
        lines.append('Clean training set (no augmentation, eval mode): '
                     + ', '.join(f'{k} {v:.4g}' for k, v in clean_train_metrics.items()))
    if elapsed_s is not None:
        lines.append(f'Wall time: {elapsed_s:.1f}s')
    if output_dir:
        lines.append(f'Outputs in {output_dir} (args.yaml, summary.csv, last.pth.tar, model_best.pth.tar, '
                     f'learning_curves.png)')
    return '\n'.join(lines)

