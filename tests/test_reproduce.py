"""experiments/reproduce.py: the planner, skip-if-done, aggregation, report, and one real run."""
import json
import math
import os

import pytest

from timm_gsl.cli.train import parse_args

from experiments import reproduce

DESIGN = reproduce.StudyDesign()
RECIPE = reproduce.Recipe()


# ---------------------------------------------------------------------------------------------- planner

@pytest.mark.parametrize('samples, paper_epochs, paper_milestones', [
    (100, 240, (90, 180, 210)), (200, 240, (90, 180, 210)), (500, 180, (60, 120, 150)),
    (1000, 120, (30, 60, 90)), (6000, 120, (30, 60, 90))])
def test_schedule_follows_table_b1_scaled(samples, paper_epochs, paper_milestones):
    assert reproduce.schedule_for(samples, 1.0) == (paper_epochs, paper_milestones)
    # The default scale 2/15 keeps every epoch count of the table an integer: 240 -> 32, 90 -> 12, ...
    epochs, milestones = reproduce.schedule_for(samples, 2 / 15)
    assert epochs == paper_epochs * 2 // 15
    assert milestones == tuple(m * 2 // 15 for m in paper_milestones)


def test_schedule_gives_fewer_epochs_for_more_data():
    epochs = [reproduce.schedule_for(n, 2 / 15)[0] for n in (100, 200, 500, 1000)]
    assert epochs == [32, 32, 24, 16]


def test_schedule_drops_milestones_that_collapse_at_a_tiny_scale():
    epochs, milestones = reproduce.schedule_for(100, 1 / 60)  # 240 -> 4 epochs; 90, 180, 210 -> 2, 3, 4 (dropped)
    assert epochs == 4 and milestones == (2, 3)
    with pytest.raises(ValueError, match='epoch_scale'):
        reproduce.schedule_for(100, 0)


def test_plan_runs_every_loss_at_every_condition_once_per_seed():
    runs = reproduce.plan_runs(DESIGN, RECIPE)
    assert len({r.run_id for r in runs}) == len(runs)
    conditions = {(r.loss, r.classes, r.samples_per_class) for r in runs if r.grouping in ('', 'discriminative')
                  and r.groups in (1, 4)}
    expected = {(loss, k, 500) for loss in reproduce.LOSSES for k in (2, 4, 6, 10)}
    expected |= {(loss, 10, n) for loss in reproduce.LOSSES for n in (100, 200, 500, 1000)}
    assert conditions == expected
    # Classes study and samples study share 10 classes x 500: run once per loss and seed.
    shared = [r for r in runs if (r.classes, r.samples_per_class, r.loss, r.seed) == (10, 500, 'softmax', 0)]
    assert len(shared) == 1
    for r in runs:
        assert (r.epochs, r.milestones) == reproduce.schedule_for(r.samples_per_class, RECIPE.epoch_scale)
    assert sorted({r.seed for r in runs}) == [0, 1, 2]


def test_plan_ablation_is_type_ii_over_every_g_and_grouping():
    runs = reproduce.plan_runs(DESIGN, RECIPE)
    ablation = {(r.groups, r.grouping) for r in runs if (r.classes, r.samples_per_class) == (10, 100)
                and r.loss == 'Type-II'}
    assert ablation == {(g, grouping) for g in (2, 4, 8) for grouping in reproduce.GROUPINGS}
    other = [r for r in runs if r.loss != 'Type-II' or (r.classes, r.samples_per_class) != (10, 100)]
    assert all(r.groups in (1, 4) and r.grouping in ('', 'discriminative') for r in other)
    # 8 study conditions (one shared) x 3 losses + 8 new ablation conditions, x 3 seeds.
    assert len(runs) == (7 * 3 + 8) * 3


def test_plan_orders_runs_seed_major():
    seeds = [r.seed for r in reproduce.plan_runs(DESIGN, RECIPE)]
    assert seeds == sorted(seeds)


def test_train_argv_is_read_by_train_py_as_the_run_says(tmp_path):
    spec = reproduce.RunSpec('Type-I', 6, 200, 1, 32, (12, 24, 28), 8, 'random')
    args, explicit = parse_args(reproduce.train_argv(spec, RECIPE, '/data', str(tmp_path)))
    assert (args.dataset, args.data_dir, int(args.class_subset), args.samples_per_class, args.seed) == (
        'torch/fashion_mnist', '/data', 6, 200, 1)
    assert (args.loss, args.gsl_type, args.gsl_groups, args.gsl_grouping) == ('gsl', 'I', 8, 'random')
    assert (args.epochs, args.decay_milestones, args.decay_rate, args.sched) == (32, [12, 24, 28], 0.1, 'multistep')
    assert (args.opt, args.momentum, args.weight_decay, args.lr, args.lr_base) == ('sgd', 0.9, 1e-4, None, 0.1)
    assert (args.warmup_epochs, args.smoothing, args.color_jitter, args.reprob) == (0, 0., 0., 0.)
    assert (args.model, args.in_chans, args.img_size, args.batch_size) == ('resnet18', 1, 28, 64)
    assert args.experiment == spec.run_id and args.output == str(tmp_path)
    softmax = reproduce.RunSpec('softmax', 6, 200, 1, 32, (12, 24, 28), 1, '')
    args, _ = parse_args(reproduce.train_argv(softmax, RECIPE, '/data', str(tmp_path)))
    assert args.loss == 'ce' and args.gsl_type == 'auto'  # train.py refuses gsl flags with --loss ce


def test_run_spec_refuses_bad_values():
    with pytest.raises(ValueError, match="loss='focal'"):
        reproduce.RunSpec('focal', 2, 10, 0, 1, ())
    with pytest.raises(ValueError, match='classes=11'):
        reproduce.RunSpec('Type-II', 11, 10, 0, 1, ())
    with pytest.raises(ValueError, match='samples_per_class=6001'):
        reproduce.RunSpec('Type-II', 2, 6001, 0, 1, ())
    with pytest.raises(ValueError, match='softmax runs'):
        reproduce.RunSpec('softmax', 2, 10, 0, 1, (), 4, 'discriminative')


def test_estimate_counts_training_and_test_images():
    spec = reproduce.RunSpec('Type-II', 2, 100, 0, 8, (3,))
    recipe = reproduce.Recipe(evals_per_run=4)  # val interval 2: epochs 2, 4, 6, 8
    seconds = reproduce.estimate_seconds([spec], recipe, train_images_per_s=100., eval_images_per_s=1000.,
                                         overhead_s=5.)
    assert seconds == pytest.approx(200 * 8 / 100. + 4 * 2000 / 1000. + 5.)


# ---------------------------------------------------------------------------------------------- results

def _fake_record(spec, top1, wall_s=10.):
    return dict(run_id=spec.run_id, spec=dict(spec.__dict__, milestones=list(spec.milestones)), final_top1=top1,
                best_top1=top1 + 1., wall_s=wall_s, epochs=spec.epochs)


def _spec(loss, k, n, seed, groups=4, grouping='discriminative'):
    epochs, milestones = reproduce.schedule_for(n, RECIPE.epoch_scale)
    if loss == 'softmax':
        groups, grouping = 1, ''
    return reproduce.RunSpec(loss, k, n, seed, epochs, milestones, groups, grouping)


def test_pending_runs_skips_runs_with_a_json(tmp_path):
    runs = reproduce.plan_runs(DESIGN, RECIPE)
    for spec in runs[:5]:
        reproduce.write_json(reproduce.result_path(str(tmp_path), spec), _fake_record(spec, 90.))
    assert reproduce.pending_runs(runs, str(tmp_path)) == runs[5:]
    # No temporary file is left beside the JSONs.
    assert sorted(os.listdir(tmp_path / 'results')) == sorted(s.run_id + '.json' for s in runs[:5])


def test_aggregate_matches_a_hand_computation():
    records = [_fake_record(_spec('Type-II', 2, 500, s), top1) for s, top1 in enumerate((90., 88., 86.))]
    records += [_fake_record(_spec('softmax', 2, 500, 0), 80.)]
    cells = reproduce.aggregate(records)
    cell = cells[_spec('Type-II', 2, 500, 0).condition()]
    # errors 10, 12, 14: mean 12, sample variance ((-2)^2 + 0 + 2^2) / 2 = 4, std 2.
    assert (cell.mean, cell.std, cell.n, cell.wall_s) == (pytest.approx(12.), pytest.approx(2.), 3, 30.)
    single = cells[_spec('softmax', 2, 500, 0).condition()]
    assert (single.mean, single.std, single.n) == (pytest.approx(20.), None, 1)
    best = reproduce.aggregate(records, metric='best_top1')[_spec('Type-II', 2, 500, 0).condition()]
    assert best.mean == pytest.approx(11.)
    with pytest.raises(ValueError, match="metric='top5'"):
        reproduce.aggregate(records, metric='top5')


def test_table_puts_each_cell_in_its_row_and_column():
    records = [_fake_record(_spec('Type-II', 4, 500, s), top1) for s, top1 in enumerate((90., 88., 86.))]
    records += [_fake_record(_spec('softmax', 10, 100, s), top1) for s, top1 in enumerate((70., 71.))]
    records += [_fake_record(_spec('Type-II', 10, 100, 0, 8, 'random'), 75.)]
    text = reproduce.format_table(records, DESIGN, RECIPE)
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]]
            for line in text.split('## Differences')[0].splitlines() if line.startswith('| ') and not line.startswith('| loss')
            and not line.startswith('| G ')}
    classes_rows, samples_rows = text.split('## Samples')[0], text.split('## Samples')[1].split('## Grouping')[0]
    assert '| Type-II | not yet run | 12.00 ± 2.00 | not yet run | not yet run |' in classes_rows
    assert '| softmax | 29.50 ± 0.71 | not yet run | not yet run | not yet run |' in samples_rows
    assert rows['8'] == ['not yet run', '25.00 (n=1)', 'not yet run']
    assert '6 runs' in text
    # The paper's Table B.2 (SPEC.md) is quoted under each measured table.
    assert 'Type-II 13.0 / 15.6 / 19.1 / 24.1 at 100 / 200 / 500 / 1000 classes' in classes_rows
    assert 'softmax 49.3 / 40.3 / 30.2 / 23.5' in samples_rows


def test_paired_difference_matches_a_hand_computation():
    # Type-II errors 10, 12, 14 on seeds 0-2; softmax errors 11, 11, 20 on seeds 0, 1, 3 (seed 2 not run).
    records = [_fake_record(_spec('Type-II', 2, 500, s), top1) for s, top1 in enumerate((90., 88., 86.))]
    records += [_fake_record(_spec('softmax', 2, 500, s), top1) for s, top1 in ((0, 89.), (1, 89.), (3, 80.))]
    a, b = _spec('Type-II', 2, 500, 0).condition(), _spec('softmax', 2, 500, 0).condition()
    diff = reproduce.paired_difference(records, a, b)
    # Only seeds 0 and 1 pair: differences -1 and +1, mean 0, std sqrt(2), lower error on one seed.
    assert (diff.mean, diff.std, diff.n, diff.better) == (pytest.approx(0.), pytest.approx(math.sqrt(2.)), 2, 1)
    assert str(diff) == '+0.00 ± 1.41, better in 1/2'
    reverse = reproduce.paired_difference(records, b, a)
    assert (reverse.mean, reverse.better) == (pytest.approx(0.), 1)
    only_seed3 = [r for r in records if r['spec']['seed'] == 3]
    assert reproduce.paired_difference(only_seed3, a, b) is None
    with pytest.raises(ValueError, match="metric='top5'"):
        reproduce.paired_difference(records, a, b, metric='top5')


def test_table_reports_paired_differences_under_the_means():
    records = [_fake_record(_spec('Type-I', 10, 200, s), top1) for s, top1 in enumerate((80., 82.))]
    records += [_fake_record(_spec('softmax', 10, 200, s), top1) for s, top1 in enumerate((81., 81.))]
    records += [_fake_record(_spec('Type-II', 10, 100, 0, 2, g), top1)
                for g, top1 in (('discriminative', 70.), ('contiguous', 72.))]
    diffs = reproduce.format_table(records, DESIGN, RECIPE).split('## Differences')[1]
    by_samples = diffs.split('samples per class:')[1].split('Ablation')[0]
    # Type-I errors 20, 18 against 19, 19: differences +1, -1.
    assert ('| Type-I vs softmax | not yet run | +0.00 ± 1.41, better in 1/2 | not yet run | not yet run |'
            in by_samples)
    assert '| Type-II vs Type-I | not yet run | not yet run | not yet run | not yet run |' in by_samples
    assert '| 2 | not yet run | -2.00 (n=1), better in 1/1 |' in diffs.split('Ablation')[1]
    assert '| 2 | not yet run | not yet run | not yet run |' in diffs.split('Ablation')[2]  # no softmax run there
    records += [_fake_record(_spec('softmax', 10, 100, 0), 71.)]
    against_softmax = reproduce.format_table(records, DESIGN, RECIPE).split('against softmax on the same data')[1]
    assert '| 2 | +1.00 (n=1), better in 0/1 | not yet run | -1.00 (n=1), better in 1/1 |' in against_softmax


def test_fit_table_reports_last_training_and_test_softmax_losses():
    history = [dict(epoch=0, train_softmax_loss=0.9, eval_loss=None), dict(epoch=1, train_softmax_loss=0.5,
                                                                          eval_loss=0.8),
               dict(epoch=2, train_softmax_loss=0.3, eval_loss=None)]
    record = dict(_fake_record(_spec('Type-I', 6, 500, 0), 80.), history=history)
    # The last epoch's training loss, the last evaluation's test loss (epoch 1).
    assert reproduce.last_losses(record) == (0.3, 0.8)
    other = dict(_fake_record(_spec('Type-I', 6, 500, 1), 80.),
                 history=[dict(epoch=0, train_softmax_loss=0.5, eval_loss=0.6)])
    assert reproduce.last_losses(_fake_record(_spec('Type-I', 6, 500, 2), 80.)) is None  # no history
    fit = reproduce.format_table([record, other], DESIGN, RECIPE).split('## Fit')[1]
    assert '| Type-I | not yet run | not yet run | 0.400 / 0.700 | not yet run |' in fit


def test_plots_are_written_as_png(tmp_path):
    records = [_fake_record(_spec(loss, k, 500, s), 80. + k + s) for loss in reproduce.LOSSES
               for k in (2, 4) for s in (0, 1)]
    reproduce.write_report(str(tmp_path), DESIGN, RECIPE)  # no runs yet: still a table and empty plots
    assert 'not yet run' in (tmp_path / 'table.md').read_text()
    for r in records:
        reproduce.write_json(os.path.join(str(tmp_path), 'results', r['run_id'] + '.json'), r)
    loaded = reproduce.write_report(str(tmp_path), DESIGN, RECIPE)
    assert len(loaded) == len(records)
    for name in ('error_vs_classes.png', 'error_vs_samples.png'):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 1000
    assert sorted(os.listdir(tmp_path)) == ['error_vs_classes.png', 'error_vs_samples.png', 'results', 'table.md']
    with pytest.raises(ValueError, match="study='x'"):
        reproduce.plot_study(records, DESIGN, RECIPE, 'x', str(tmp_path / 'x.png'))


# ---------------------------------------------------------------------------------------------- real run

@pytest.mark.skipif(not os.path.isdir(reproduce.FASHION_MNIST_DIR), reason='Debian dataset-fashion-mnist absent')
def test_one_tiny_real_run_end_to_end(tmp_path):
    data_dir = reproduce.prepare_fashion_mnist(reproduce.FASHION_MNIST_DIR, str(tmp_path / 'cache'))
    raw = tmp_path / 'cache' / 'FashionMNIST' / 'raw'
    assert (raw / 'train-labels-idx1-ubyte').stat().st_size == 8 + 60000
    assert (raw / 't10k-images-idx3-ubyte').stat().st_size == 16 + 10000 * 28 * 28
    recipe = reproduce.Recipe(model='resnet10t', batch_size=8, evals_per_run=1)
    spec = reproduce.RunSpec('Type-II', 2, 8, 0, 1, (), 2, 'discriminative')
    out = str(tmp_path / 'study')
    record = reproduce.run_one(spec, recipe, out, data_dir, threads=1)
    with open(reproduce.result_path(out, spec)) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(record))
    assert saved['epochs'] == 1 and saved['train_images'] == 16 and saved['wall_s'] > 0
    assert 0. <= saved['final_top1'] <= 100. and saved['best_top1'] == saved['final_top1']
    # 2 classes of the test set: 2000 images, so top-1 is a multiple of 0.05.
    assert math.isclose(saved['final_top1'] * 20, round(saved['final_top1'] * 20), abs_tol=1e-6)
    assert saved['history'][0]['eval_top1'] == saved['final_top1']
    assert '--gsl-type' in saved['train_argv'] and 'II' in saved['train_argv']
    assert os.listdir(os.path.join(out, '.scratch')) == []  # checkpoints removed
    assert reproduce.pending_runs([spec], out) == []


def test_main_plan_counts_done_runs_and_report_only_trains_nothing(tmp_path, capsys):
    out = str(tmp_path)
    runs = reproduce.plan_runs(reproduce.QUICK_DESIGN, reproduce.QUICK_RECIPE)
    reproduce.write_json(reproduce.result_path(out, runs[0]), _fake_record(runs[0], 60.))
    assert reproduce.main(['--output', out, '--quick', '--plan']) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f'{len(runs)} runs planned, 1 done, {len(runs) - 1} to go')
    assert runs[0].run_id not in printed and runs[1].run_id in printed
    assert reproduce.main(['--output', out, '--quick', '--report-only']) == 0
    assert '40.00 (n=1)' in (tmp_path / 'table.md').read_text()
    assert sorted(os.listdir(tmp_path / 'results')) == [runs[0].run_id + '.json']
