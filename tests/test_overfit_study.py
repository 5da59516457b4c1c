"""experiments/overfit_study.py: design, plan, train.py command lines, statistics, gate, report, CLI."""
import math
import os
import subprocess
import sys

import pytest

from _fashion_mnist_idx import write_fashion_mnist_idx
from experiments import overfit_study as study

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DESIGN = study.StudyDesign()
A, B = DESIGN.recipe_a, DESIGN.recipe_b


# ---------------------------------------------------------------------------------------------- design and plan

def test_run_ids_are_unique_over_the_whole_plan():
    for design in (DESIGN, study.QUICK_DESIGN, study.build_design(s4_epochs=360, epochs_b=300)):
        runs = study.plan_runs(design)
        assert len({r.run_id for r in runs}) == len(runs) == len(set(runs))
    assert len(study.plan_runs(DESIGN)) == 37
    assert study.plan_runs(DESIGN)[1].run_id == 'A-e240-lr0.1-v20-typeii-g4-discriminative-k10-n100-s0'


def test_run_id_changes_with_everything_that_changes_the_result():
    base = study.RunSpec(A, 'Type-II', 10, 100, 0, 4, 'discriminative')
    variants = [base, study.RunSpec(A, 'Type-I', 10, 100, 0, 4, 'discriminative'),
                study.RunSpec(A, 'Type-II', 10, 100, 0, 4, 'random'), study.RunSpec(A, 'Type-II', 10, 100, 0, 8,
                                                                                      'discriminative'),
                study.RunSpec(A, 'softmax', 10, 100, 0), study.RunSpec(A, 'Type-II', 4, 100, 0, 4, 'discriminative'),
                study.RunSpec(A, 'Type-II', 10, 500, 0, 4, 'discriminative'),
                study.RunSpec(A, 'Type-II', 10, 100, 1, 4, 'discriminative')]
    for change in (dict(name='B'), dict(epochs=300), dict(lr_base=0.2), dict(val_interval=10),
                   dict(model='resnet10t'), dict(batch_size=32), dict(weight_decay=5e-4), dict(momentum=0.8)):
        recipe = study.Recipe(**{**dict(name='A', epochs=240, lr_base=0.1), **change})
        variants.append(study.RunSpec(recipe, 'Type-II', 10, 100, 0, 4, 'discriminative'))
    assert len({v.run_id for v in variants}) == len(variants)


def test_plan_order_primary_first_seed_major_then_s1_s2_s5_s3_exploratory_s4():
    runs = study.plan_runs(DESIGN)
    primary = [(r.loss, r.seed) for r in runs[:10]]
    assert primary == [(loss, s) for s in range(5) for loss in ('softmax', 'Type-II')]
    assert all((r.recipe, r.classes, r.samples_per_class, r.grouping) in ((A, 10, 100, None),
                                                                         (A, 10, 100, 'discriminative'))
               for r in runs[:10])
    # S1 and S2 reuse the primary's softmax runs: only their treatments are new.
    assert [(r.loss, r.grouping, r.seed) for r in runs[10:16]] == (
        [('Type-I', 'discriminative', s) for s in range(3)] + [('Type-II', 'random', s) for s in range(3)])
    s5 = runs[16:22]
    assert all(r.recipe == B for r in s5) and [r.loss for r in s5] == ['softmax', 'Type-II'] * 3
    s3 = runs[22:28]
    assert all(r.classes == 4 for r in s3) and [r.seed for r in s3] == [0, 0, 1, 1, 2, 2]
    assert [r.grouping for r in runs[28:31]] == ['zero-aware'] * 3
    assert all(r.samples_per_class == 500 for r in runs[31:]) and len(runs) == 37


def test_only_restricts_to_named_comparisons_and_the_gate():
    s1 = study.plan_runs(DESIGN, ['S1'])
    assert [(r.loss, r.seed) for r in s1] == [('softmax', 0), ('Type-I', 0), ('softmax', 1), ('Type-I', 1),
                                              ('softmax', 2), ('Type-I', 2)]
    gate = study.plan_runs(DESIGN, ['gate'])
    assert all(r.loss == 'softmax' and r.classes == 10 for r in gate)
    assert sorted((r.recipe.name, r.samples_per_class, r.seed) for r in gate) == sorted(
        [('A', 100, s) for s in range(5)] + [('B', 100, s) for s in range(3)] + [('A', 500, s) for s in range(3)])
    full = study.plan_runs(DESIGN)
    both = study.plan_runs(DESIGN, ['S4', 'primary'])
    assert both == [r for r in full if r in set(both)]  # plan order kept
    with pytest.raises(ValueError, match='S9'):
        study.plan_runs(DESIGN, ['S9'])


def test_gate_conditions_and_memberships():
    gates = study.gate_conditions(DESIGN)
    assert [(g.recipe.name, g.classes, g.samples_per_class, g.seeds, g.comparisons) for g in gates] == [
        ('A', 10, 100, (0, 1, 2, 3, 4), ('primary', 'S1', 'S2', 'S3', 'exploratory')),
        ('B', 10, 100, (0, 1, 2), ('S5',)),
        ('A', 10, 500, (0, 1, 2), ('S4',))]
    softmax = study.RunSpec(A, 'softmax', 10, 100, 1)
    assert study.memberships(DESIGN, softmax) == ['primary', 'S1', 'S2', 'exploratory', 'gate']
    assert study.memberships(DESIGN, study.RunSpec(A, 'softmax', 10, 100, 4)) == ['primary', 'gate']


def test_build_design_overrides():
    d = study.build_design(epochs=480, lr_base=0.2, val_interval=10)
    assert (d.recipe_a.epochs, d.recipe_a.lr_base, d.recipe_a.val_interval) == (480, 0.2, 10)
    assert (d.recipe_b.epochs, d.recipe_b.lr_base, d.recipe_b.val_interval) == (480, 0.4, 10)
    assert d.recipe_s4 == d.recipe_a
    d = study.build_design(s4_epochs=360, epochs_b=300, lr_base_b=0.8)
    assert (d.recipe_s4.epochs, d.recipe_a.epochs, d.recipe_b.epochs, d.recipe_b.lr_base) == (360, 240, 300, 0.8)
    assert d.comparison('S4').recipe.epochs == 360
    q = study.build_design(quick=True)
    assert q == study.QUICK_DESIGN and q.recipe_a.epochs == 2


@pytest.mark.parametrize('epochs, milestones', [(240, (90, 180, 210)), (480, (180, 360, 420)),
                                                (100, (38, 75, 88)), (2, (1,)), (1, ())])
def test_recipe_a_milestones_scale_with_epochs(epochs, milestones):
    assert study.Recipe('A', epochs).milestones == milestones
    assert study.Recipe('B', epochs, 0.4).milestones == ()


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="name='C'"):
        study.Recipe('C')
    with pytest.raises(ValueError, match='epochs=0'):
        study.Recipe('A', 0)
    with pytest.raises(ValueError, match='lr_base=0'):
        study.Recipe('A', 240, 0)
    with pytest.raises(ValueError, match='softmax runs'):
        study.RunSpec(A, 'softmax', 10, 100, 0, 4, 'discriminative')
    with pytest.raises(ValueError, match="grouping='greedy'"):
        study.RunSpec(A, 'Type-II', 10, 100, 0, 4, 'greedy')


# ---------------------------------------------------------------------------------------------- train.py argv

def _after(argv, flag, n=1):
    i = argv.index(flag)
    return argv[i + 1:i + 1 + n]


def test_recipe_a_argv_has_the_paper_schedule_and_augmentation():
    argv = study.train_argv(study.RunSpec(A, 'Type-II', 10, 100, 3, 4, 'discriminative'), '/data', '/work')
    assert _after(argv, '--sched') == ['multistep'] and _after(argv, '--decay-rate') == ['0.1']
    assert _after(argv, '--decay-milestones', 3) == ['90', '180', '210'] and _after(argv, '--epochs') == ['240']
    assert _after(argv, '--warmup-epochs') == ['0'] and _after(argv, '--lr-base') == ['0.1']
    assert _after(argv, '--scale', 2) == ['0.8', '1.0'] and _after(argv, '--hflip') == ['0.5']
    for flag in ('--color-jitter', '--reprob', '--smoothing'):
        assert _after(argv, flag) == ['0']
    assert _after(argv, '--val-interval') == ['20'] and _after(argv, '--train-eval-interval') == ['20']
    assert _after(argv, '--loss') == ['gsl'] and _after(argv, '--gsl-type') == ['II']
    assert _after(argv, '--gsl-groups') == ['4'] and _after(argv, '--gsl-grouping') == ['discriminative']
    assert _after(argv, '--class-subset') == ['10'] and _after(argv, '--samples-per-class') == ['100']
    assert _after(argv, '--seed') == ['3'] and _after(argv, '--output') == ['/work']
    assert '--train-crop-mode' not in argv and '--cosine' not in argv


def test_recipe_b_argv_is_cosine_with_translation_augmentation():
    argv = study.train_argv(study.RunSpec(B, 'softmax', 10, 100, 0), '/data', '/work')
    assert _after(argv, '--sched') == ['cosine'] and _after(argv, '--warmup-epochs') == ['5']
    assert _after(argv, '--warmup-lr') == ['1e-4'] and _after(argv, '--min-lr') == ['0']
    assert _after(argv, '--lr-base') == ['0.4'] and _after(argv, '--epochs') == ['240']
    assert _after(argv, '--train-crop-mode') == ['rkrr'] and _after(argv, '--scale', 2) == ['1.0', '1.3']
    assert _after(argv, '--ratio', 2) == ['1.0', '1.0'] and _after(argv, '--hflip') == ['0']
    assert '--decay-milestones' not in argv and '--gsl-type' not in argv
    assert _after(argv, '--loss') == ['ce']
    assert B.lr == pytest.approx(0.1)


@pytest.mark.parametrize('loss, grouping, flags', [
    ('softmax', None, ['--loss', 'ce']),
    ('Type-I', 'random', ['--loss', 'gsl', '--gsl-type', 'I', '--gsl-groups', '4', '--gsl-grouping', 'random']),
    ('Type-II', 'zero-aware', ['--loss', 'gsl', '--gsl-type', 'II', '--gsl-groups', '4', '--gsl-grouping',
                               'zero-aware'])])
def test_loss_flags(loss, grouping, flags):
    spec = study.RunSpec(A, loss, 10, 100, 0, *(() if loss == 'softmax' else (4, grouping)))
    argv = study.train_argv(spec, '/data', '/work')
    assert argv[argv.index('--loss'):] == flags


def test_train_py_reads_the_argv_as_intended():
    from timm_gsl.cli.train import parse_args
    args, _ = parse_args(study.train_argv(study.RunSpec(A, 'Type-II', 10, 100, 1, 4, 'random'), '/d', '/w'))
    assert (args.sched, args.epochs, args.decay_milestones, args.lr_base, args.batch_size) == (
        'multistep', 240, [90, 180, 210], 0.1, 64)
    assert (args.val_interval, args.train_eval_interval, args.gsl_type, args.gsl_grouping) == (20, 20, 'II', 'random')
    args, _ = parse_args(study.train_argv(study.RunSpec(B, 'softmax', 10, 100, 1), '/d', '/w'))
    assert (args.sched, args.warmup_epochs, args.warmup_lr, args.min_lr, args.train_crop_mode) == (
        'cosine', 5, 1e-4, 0, 'rkrr')
    assert (args.scale, args.ratio, args.hflip, args.loss) == ([1.0, 1.3], [1.0, 1.0], 0., 'ce')


# ---------------------------------------------------------------------------------------------- statistics

def test_paired_stats_against_a_hand_computation():
    s = study.paired_stats([10., 12., 9., 11.], [12., 13., 12., 11.])  # differences -2, -1, -3, 0
    sd = math.sqrt(5 / 3)
    half = 3.182446305284263 * sd / 2  # t(0.975, 3) x SD / sqrt(4)
    assert (s.n, s.wins) == (4, 3)  # a tie is no win
    assert s.mean == pytest.approx(-1.5) and s.sd == pytest.approx(sd)
    assert (s.ci_low, s.ci_high) == (pytest.approx(-1.5 - half), pytest.approx(-1.5 + half))
    # t = -1.5 / (sd / 2) = -2.3238 on 3 degrees of freedom.
    assert s.p == pytest.approx(0.1027, abs=5e-4)


def test_paired_stats_match_scipy_ttest_rel():
    stats = pytest.importorskip('scipy.stats')
    treatment = [31.2, 28.9, 30.4, 33.0, 29.5]
    baseline = [32.0, 30.1, 30.0, 34.2, 31.4]
    s = study.paired_stats(treatment, baseline)
    ref = stats.ttest_rel(treatment, baseline)
    assert s.p == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (s.ci_low, s.ci_high) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
    assert s.wins == 4


def test_paired_stats_edge_cases():
    one = study.paired_stats([1.], [3.])
    assert (one.n, one.mean, one.sd, one.ci_low, one.p, one.wins) == (1, -2., None, None, None, 1)
    same = study.paired_stats([1., 2.], [2., 3.])
    assert (same.sd, same.ci_low, same.ci_high, same.p) == (0., -1., -1., 0.)
    assert study.paired_stats([1., 2.], [1., 2.]).p == 1.
    with pytest.raises(ValueError, match='same non-zero length'):
        study.paired_stats([1.], [1., 2.])
    with pytest.raises(ValueError, match='same non-zero length'):
        study.paired_stats([], [])


def test_scipy_is_imported_lazily():
    code = 'import sys; import experiments.overfit_study; print("scipy" in sys.modules, "torch" in sys.modules)'
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ['False', 'False']


def test_holm_against_a_hand_worked_example():
    # Sorted: 0.005 x5 = 0.025; 0.01 x4 = 0.04; 0.03 x3 = 0.09; 0.04 x2 = 0.08 -> 0.09 (monotone); 0.5 x1 = 0.5.
    assert study.holm_adjust([0.01, 0.04, 0.03, 0.005, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.5])
    assert study.holm_adjust([0.3, 0.4]) == pytest.approx([0.6, 0.6])  # 0.4 x 1 raised to 0.6
    assert study.holm_adjust([0.6, 0.7, 0.01]) == pytest.approx([1., 1., 0.03])  # capped at 1
    assert study.holm_adjust([0.02]) == [0.02] and study.holm_adjust([]) == []
    with pytest.raises(ValueError, match='1.5'):
        study.holm_adjust([1.5])


# ---------------------------------------------------------------------------------------------- gate

def _history(eval_losses, clean_top1=100., clean_loss=0.01, every=2, groups=None, top1=80.):
    """One row per epoch; test and clean-train measured every ``every`` epochs and at the last."""
    epochs = len(eval_losses) * every
    rows = []
    for i in range(epochs):
        measured = (i + 1) % every == 0
        row = dict(epoch=float(i), train_loss=0.5, train_softmax_loss=0.4, lr=0.1,
                   eval_loss=eval_losses[(i + 1) // every - 1] if measured else None,
                   eval_top1=top1 + i * 0.1 if measured else None, eval_top5=100. if measured else None,
                   train_clean_loss=clean_loss if measured else None, train_clean_top1=clean_top1 if measured else None)
        if groups:
            row['train_gsl_zero_frac'] = 0.25
            row.update({f'train_gsl_nonzero_g{g}': float(g) for g in range(1, groups + 1)})
            row.update({f'train_gsl_loss_g{g}': g / 10 for g in range(1, groups + 1)})
        rows.append(row)
    return rows


def test_gate_passes_an_over_fitting_run():
    r = study.gate_check(_history([1.0, 0.6, 0.5, 0.7], clean_top1=99.5, clean_loss=0.05))
    assert r.passed and r.fits_top1 and r.fits_loss and r.test_loss_rises
    assert (r.min_test_loss, r.min_test_loss_epoch, r.final_test_loss) == (0.5, 6, 0.7)


@pytest.mark.parametrize('history, failing', [
    (_history([1.0, 0.5, 0.7], clean_top1=99.4), 'fits_top1'),
    (_history([1.0, 0.5, 0.7], clean_loss=0.051), 'fits_loss'),
    (_history([1.0, 0.7, 0.5]), 'test_loss_rises'),  # minimum at the last evaluation
    (_history([1.0, 0.5, 0.5]), 'test_loss_rises'),  # flat after the minimum
    (_history([0.5]), 'test_loss_rises'),  # a single evaluation cannot rise
])
def test_gate_fails_on_each_criterion(history, failing):
    r = study.gate_check(history)
    assert not r.passed and not getattr(r, failing)
    assert all(getattr(r, c) for c in ('fits_top1', 'fits_loss', 'test_loss_rises') if c != failing)


def test_gate_fails_when_clean_train_metrics_are_missing():
    rows = [{k: v for k, v in row.items() if not k.startswith('train_clean')} for row in _history([1., .5, .7])]
    r = study.gate_check(rows)
    assert not r.passed and r.clean_top1 is None and r.test_loss_rises
    assert not study.gate_check([]).passed


# ---------------------------------------------------------------------------------------------- records, report

def _record(spec, error, history=None, wall_s=100.):
    history = history if history is not None else _history(
        [1.0, 0.5, 0.7], top1=100. - error - 0.2, groups=spec.groups)
    history[-1]['eval_top1'] = 100. - error
    return study.make_record(spec, history, wall_s, ['--x'], 'abc', False, ['primary'],
                             versions={'torch': 'x'}, host={'cpus': 2}, finished='now')


def test_summarize_history():
    out = study.summarize_history(_history([1.0, 0.5, 0.7], groups=4), 4)
    assert out['test_loss'] == 0.7 and out['test_top1'] == pytest.approx(80.5)
    assert out['best_test_top1'] == pytest.approx(80.5) and out['clean_train_top1'] == 100.
    assert out['zero_feature_fraction'] == 0.25
    assert out['group_nonzero'] == [1., 2., 3., 4.] and out['group_loss'] == pytest.approx([.1, .2, .3, .4])
    soft = study.summarize_history(_history([1.0]), None)
    assert soft['zero_feature_fraction'] is soft['group_nonzero'] is soft['group_loss'] is None


def test_record_has_the_required_fields():
    spec = study.RunSpec(A, 'Type-II', 10, 100, 2, 4, 'discriminative')
    record = _record(spec, 20.)
    for key in ('run_id', 'comparisons', 'recipe', 'seed', 'loss', 'gsl_type', 'grouping', 'groups', 'classes',
                'samples_per_class', 'epochs', 'test_top1', 'test_loss', 'best_test_top1', 'clean_train_top1',
                'clean_train_loss', 'zero_feature_fraction', 'group_nonzero', 'group_loss', 'wall_s', 'git_commit',
                'git_dirty', 'train_argv', 'history', 'versions', 'host', 'finished'):
        assert key in record, key
    assert (record['gsl_type'], record['recipe']['name'], record['recipe']['milestones']) == ('II', 'A', [90, 180, 210])
    assert record['train_argv'] == ['train.py', '--x']
    softmax = _record(study.RunSpec(A, 'softmax', 10, 100, 2), 20.)
    assert (softmax['gsl_type'], softmax['grouping'], softmax['groups'], softmax['group_loss']) == (None,) * 4


def _study_records():
    """Primary seeds 0-2 (Type-II better by 1, 2, 0.5 pp), S1 and S2 at seeds 0-2, B's softmax seed 0 failing."""
    records = []
    primary, s1, s2, s5 = (DESIGN.comparison(n) for n in ('primary', 'S1', 'S2', 'S5'))
    for seed, (soft, t2, t1, rnd) in enumerate([(30., 29., 31., 30.5), (32., 30., 31., 32.5), (31., 30.5, 30., 30.)]):
        records += [_record(primary.baseline(seed), soft), _record(primary.treatment(seed), t2),
                    _record(s1.treatment(seed), t1), _record(s2.treatment(seed), rnd)]
    records.append(_record(s5.baseline(0), 25., history=_history([1.0, 0.7, 0.5])))  # test loss never rises
    return records


def test_report_from_synthetic_records():
    records = _study_records()
    text = study.format_report(DESIGN, records)
    assert f'{len(records)} of 37 planned runs present' in text
    # Gate: A's three runs pass, two pending; B's failing run voids S5.
    assert 'Gate pending (recipe A (240 epochs, lr_base 0.1), 10x100): 3 of 5' in text
    assert 'comparisons under recipe B (240 epochs, lr_base 0.4) do not count' in text
    assert '**FAIL**' in text and text.count('**pass**') == 3
    # Primary: seeds 3, 4 not yet run; statistics of the three pairs.
    section = text.split('## 2.')[1].split('## 3.')[0]
    assert '| 3 | not yet run | not yet run |  |' in section and '| 1 | 32.00 | 30.00 | -2.00 |' in section
    s = study.paired_stats([29., 30., 30.5], [30., 32., 31.])
    assert f'mean {s.mean:+.2f} pp, SD {s.sd:.2f}, 95% CI [{s.ci_low:+.2f}, {s.ci_high:+.2f}], wins 3/3, ' \
           f'paired t-test p = {s.p:.3g} (n = 3 of 5 seeds)' in section
    # Secondary: Holm over S1 and S2 (the others have no pairs).
    p1 = study.paired_stats([31., 31., 30.], [30., 32., 31.]).p
    p2 = study.paired_stats([30.5, 32.5, 30.], [30., 32., 31.]).p
    h1, h2 = study.holm_adjust([p1, p2])
    secondary = text.split('## 3.')[1].split('## 4.')[0]
    row = next(line for line in secondary.splitlines() if line.startswith('| S1 |'))
    assert f'| {p1:.3g} | {h1:.3g} | pending |' in row
    row = next(line for line in secondary.splitlines() if line.startswith('| S2 |'))
    assert f'| {p2:.3g} | {h2:.3g} | pending |' in row
    assert 'Holm over the 2 secondaries' in secondary and 'interim until every secondary is complete' in secondary
    # Verdicts: the primary lacks seeds 3 and 4; S1 and S2 have their seeds but their gate is pending.
    assert 'Verdict: pending (3 of 5 seeds).' in section
    assert row.endswith('| pending | pending (gate) |')
    # Descriptive test loss: every run's last test loss is 0.7 in these records.
    assert 'softmax 0.700, Type-II 0.700; difference mean +0.000' in section and 'lower on 0/3 seeds' in section
    s5 = next(line for line in secondary.splitlines() if line.startswith('| S5 |'))
    assert 'not yet run' in s5 and 'does not count' in s5
    assert [line[:5] for line in secondary.splitlines() if line.startswith('| S')] == [
        '| S1 ', '| S2 ', '| S3 ', '| S4 ', '| S5 ']
    exploratory = text.split('## 4.')[1].split('## 5.')[0]
    assert 'not in the Holm family' in exploratory and 'zero-aware' in exploratory and 'not yet run' in exploratory
    health = text.split('## 5.')[1].split('## 6.')[0]
    row = next(line for line in health.splitlines() if line.startswith('| Type-II G4 discriminative, 10x100'))
    assert '| 3 | 0.250 | [1.0, 2.0, 3.0, 4.0] | [0.100, 0.200, 0.300, 0.400] |' in row
    fit = text.split('## 6.')[1].split('## 7.')[0]
    assert 'softmax, 10x100, recipe A' in fit and '| 0.0100 | 100.00 | 0.7000 | 0.5000 |' in fit
    assert f'{len(records)} runs in the folder, {len(records) * 100 / 3600:.2f} h' in text


def test_report_with_no_runs_and_with_a_passing_gate():
    empty = study.format_report(DESIGN, [])
    assert 'Difference: not yet run.' in empty and 'do not count' not in empty
    primary = DESIGN.comparison('primary')
    records = [_record(primary.baseline(s), 30.) for s in primary.seeds]
    text = study.format_report(DESIGN, records)
    assert 'Gate passed (recipe A (240 epochs, lr_base 0.1), 10x100): all 5 softmax runs over-fit' in text


def test_report_states_the_primary_verdict_once_complete():
    primary = DESIGN.comparison('primary')
    records = []
    for seed, (soft, t2) in enumerate([(30., 29.), (32., 30.), (31., 30.5), (30., 29.5), (31., 30.)]):
        records += [_record(primary.baseline(seed), soft), _record(primary.treatment(seed), t2)]
    text = study.format_report(DESIGN, records)
    assert 'the 95% interval excludes zero): **Type-II lower error than softmax**.' in text
    records[1] = _record(primary.treatment(0), 33.)  # one seed much worse: the interval now spans zero
    assert '**no difference shown**' in study.format_report(DESIGN, records)


def test_exploratory_is_compared_with_the_discriminative_arm_on_shared_seeds():
    primary, zero = DESIGN.comparison('primary'), DESIGN.comparison('exploratory')
    records = [_record(primary.baseline(s), 30.) for s in range(3)]
    records += [_record(primary.treatment(s), e) for s, e in enumerate([29., 30., 28.])]
    records += [_record(zero.treatment(s), e) for s, e in enumerate([28., 30.5])]  # seed 2 not run yet
    by_id = {r['run_id']: r for r in records}
    arms = study.arm_stats(zero, primary, by_id)
    expected = study.paired_stats([28., 30.5], [29., 30.])  # literal: zero-aware minus discriminative, seeds 0, 1
    assert (arms.n, arms.mean, arms.wins, arms.p) == (expected.n, expected.mean, expected.wins, expected.p)
    assert study.arm_stats(zero, primary, {}) is None
    section = study.format_report(DESIGN, records).split('## 4.')[1].split('## 5.')[0]
    assert (f'Descriptive, not a test: Type-II zero-aware minus Type-II discriminative grouping (the primary '
            f'comparison\'s runs; same data, recipe and seeds): mean {expected.mean:+.2f} pp') in section
    assert 'zero-aware lower on 1/2 seeds.' in section
    assert 'Descriptive, not a test' not in study.format_report(DESIGN, records[:6])


@pytest.mark.parametrize('diffs,gate,p,expected', [
    ([-1., -2., -1.5], 'pass', None, 'lower error'),
    ([1., 2., 1.5], 'pass', None, 'higher error'),
    ([-1., 1., -0.5], 'pass', None, 'no difference shown'),
    ([-1., -2., -1.5], 'pass', 0.2, 'no difference shown'),  # a Holm-adjusted p decides when given
    ([-1., -2.], 'pass', None, 'pending (2 of 3 seeds)'),
    ([-1., -2., -1.5], 'pending', None, 'pending (gate)'),
    ([-1., -2., -1.5], 'fail', None, 'does not count (gate failed)'),
])
def test_comparison_verdict(diffs, gate, p, expected):
    stats = study.paired_stats([30. + d for d in diffs], [30.] * len(diffs))
    assert study.comparison_verdict(stats, 3, gate, p) == expected
    assert study.comparison_verdict(None, 3, 'pass') == 'pending (0 of 3 seeds)'


def test_write_report_writes_markdown_and_plot(tmp_path):
    for record in _study_records():
        study.write_json(os.path.join(tmp_path, 'results', record['run_id'] + '.json'), record)
    records = study.write_report(str(tmp_path), DESIGN)
    assert len(records) == 13
    assert (tmp_path / 'report.md').read_text().startswith('# Over-fitting study')
    assert (tmp_path / 'loss_curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert sorted(os.listdir(tmp_path)) == ['loss_curves.png', 'report.md', 'results']  # no temporary files


def test_mean_curve_averages_the_histories_measuring_each_epoch():
    h1 = [dict(eval_loss=None), dict(eval_loss=1.0), dict(eval_loss=0.5)]
    h2 = [dict(eval_loss=None), dict(eval_loss=3.0)]
    assert study.mean_curve([h1, h2], 'eval_loss') == [(2, 2.0), (3, 0.5)]


def test_loss_curves_one_panel_per_comparison_softmax_first():
    s1 = DESIGN.comparison('S1')
    soft0 = _record(s1.baseline(0), 30., history=_history([1.0, 0.4], clean_loss=0.2))
    soft1 = _record(s1.baseline(1), 30., history=_history([3.0, 0.6], clean_loss=0.0))
    type1 = _record(s1.treatment(0), 30., history=_history([2.0, 0.8], clean_loss=0.1))
    other = _record(DESIGN.comparison('S3').baseline(0), 30., history=_history([9.0, 9.0]))  # another condition
    curves = study.loss_curves(s1, [soft0, soft1, type1, other])
    assert [(c.arm, c.what, c.runs) for c in curves] == [
        ('softmax', 'test loss', 2), ('softmax', 'clean-train loss', 2),
        ('Type-I', 'test loss', 1), ('Type-I', 'clean-train loss', 1)]
    assert curves[0].points == ((2, 2.0), (4, 0.5))  # means of 1.0 and 3.0, of 0.4 and 0.6
    assert curves[1].points == ((2, 0.1), (4, 0.1))  # (0.2 + 0.0) / 2: the zero counts in the mean
    assert curves[2].points == ((2, 2.0), (4, 0.8)) and curves[3].points == ((2, 0.1), (4, 0.1))
    assert study.loss_curves(DESIGN.comparison('S4'), [soft0, type1]) == []  # no run of its condition


# ---------------------------------------------------------------------------------------------- estimate, CLI

def test_throughputs_and_estimate():
    records = [dict(recipe=dict(name='A'), classes=10, samples_per_class=100, epochs=240, wall_s=w)
               for w in (600., 1200., 800.)]  # 400, 200, 300 images/s
    rates = study.throughputs(records + [dict(bad=1)])
    assert rates == {'A/1000': 300., 'A': 300., '*': 300.}
    assert study.estimate_seconds(study.RunSpec(A, 'softmax', 10, 500, 0), rates) == pytest.approx(4000.)
    big = dict(recipe=dict(name='A'), classes=10, samples_per_class=500, epochs=240, wall_s=2000.)  # 600 images/s
    rates = study.throughputs(records + [big])
    assert (rates['A/5000'], rates['A/1000'], rates['A']) == (600., 300., 350.)
    assert study.estimate_seconds(study.RunSpec(A, 'softmax', 10, 500, 0), rates) == pytest.approx(2000.)
    assert study.estimate_seconds(study.RunSpec(A, 'softmax', 4, 100, 0), rates) == pytest.approx(96000 / 350.)
    assert study.estimate_seconds(study.RunSpec(B, 'softmax', 10, 100, 0), {'A': 300., '*': 250.}) == \
        pytest.approx(960.)  # no B measurement: the overall median
    assert study.estimate_seconds(study.RunSpec(B, 'softmax', 10, 100, 0), {}) == pytest.approx(240000 / 230)


def test_plan_prints_pending_runs_and_hours(tmp_path, capsys):
    runs = study.plan_runs(DESIGN)
    done = study.make_record(runs[0], _history([1., .5, .7]), 480., [], None, None, versions={}, host={})  # 500/s
    study.write_json(study.result_path(str(tmp_path), runs[0]), done)
    assert study.main(['--output', str(tmp_path), '--plan']) == 0
    out = capsys.readouterr().out
    expected = sum(r.train_images * r.recipe.epochs / 500. for r in runs[1:]) / 3600
    assert f'37 runs planned, 1 done, 36 to go: about {expected:.2f} h at measured recipe A: 500' in out
    assert f'Total: {expected:.2f} h for 36 runs.' in out
    assert runs[0].run_id not in out and f'  {runs[1].run_id}: 1000 images x 240 epochs, ~480 s' in out
    assert not (tmp_path / 'report.md').exists()  # --plan builds nothing
    assert study.main(['--output', str(tmp_path / 'new'), '--plan', '--only', 'S4']) == 0
    assert 'about 8.70 h at 230 (assumed)' in capsys.readouterr().out  # 6 runs x 5000 x 240 / 230
    assert study.main(['--output', str(tmp_path / 'new'), '--plan', '--only', 'S4', '--seeds', '2', '0']) == 0
    out = capsys.readouterr().out
    assert out.startswith('4 runs planned, 0 done, 4 to go') and '-s1:' not in out
    assert [line.split(':')[0].strip()[-2:] for line in out.splitlines()[1:5]] == ['s0', 's0', 's2', 's2']


@pytest.mark.parametrize('argv, flag, value', [
    (['--epochs', '0'], '--epochs', "'0'"), (['--epochs', 'x'], '--epochs', "'x'"),
    (['--lr-base', '0'], '--lr-base', "'0'"), (['--lr-base', 'nan'], '--lr-base', "'nan'"),
    (['--val-interval', '0'], '--val-interval', "'0'"), (['--threads', '0'], '--threads', "'0'"),
    (['--max-runs', '-1'], '--max-runs', "'-1'"), (['--s4-epochs', '0'], '--s4-epochs', "'0'"),
    (['--only', 'S9'], '--only', "'S9'"), (['--seeds', '-1'], '--seeds', "'-1'"),
    (['--only', 'S4', '--seeds', '1', '3'], '--seeds', "'3'"), (['--plan', '--report-only'], '--report-only', '--plan'),
    (['--fashion-mnist-dir', '/nonexistent/fmnist'], '--fashion-mnist-dir', "'/nonexistent/fmnist'")])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, flag, value):
    output = tmp_path / 'study'
    with pytest.raises(SystemExit) as e:
        study.main(['--output', str(output), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('python -m experiments.overfit_study: error: argument ' + flag)
    assert value in err[-1] and any(w in err[-1] for w in ('expected', 'choose from', 'not allowed'))
    assert not output.exists()  # no work done


def test_module_runs_from_the_repo_root(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'experiments.overfit_study', '--output', str(tmp_path), '--plan',
                          '--quick'], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith('11 runs planned, 0 done, 11 to go')


# ---------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    # Synthetic IDX files in Debian's layout: the test runs where dataset-fashion-mnist is not installed.
    source = write_fashion_mnist_idx(str(tmp_path / 'idx'))
    output = tmp_path / 'quick'
    argv = [sys.executable, '-m', 'experiments.overfit_study', '--output', str(output), '--quick', '--only',
            'primary', '--threads', '1', '--data-cache', str(tmp_path / 'cache'), '--fashion-mnist-dir', source]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    out = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    records = study.load_results(str(output))
    assert [r['loss'] for r in records] == ['softmax', 'Type-II']  # file-name order
    for r in records:
        assert r['epochs_recorded'] == 2 and len(r['history']) == 2
        assert r['test_top1'] is not None and r['clean_train_loss'] is not None
        assert '<scratch>' in r['train_argv'] and r['git_commit']
    gsl = records[1]
    assert 0 <= gsl['zero_feature_fraction'] <= 1 and len(gsl['group_nonzero']) == len(gsl['group_loss']) == 4
    text = (output / 'report.md').read_text()
    assert 'GATE FAILED' in text  # two epochs do not over-fit
    assert (output / 'loss_curves.png').exists() and os.listdir(output / '.scratch') == []
    again = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and '2 done, 0 to go' in again.stdout
