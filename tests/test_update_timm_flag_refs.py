"""Tests of tools/update_timm_flag_refs.py on a small script shaped like timm's train.py and validate.py."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data')

from tools import update_timm_flag_refs as tool  # noqa: E402

# Every construct timm's scripts use: a -c/--config parser, groups, a positional added to the parser
# inside a group's section, a mutually exclusive group, implicit defaults, float and arithmetic
# defaults, a custom action, choices, and parser-level flags after a section comment.
TRAIN = textwrap.dedent('''\
    import argparse
    from timm import utils

    config_parser = parser = argparse.ArgumentParser(description='Training Config', add_help=False)
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML config file specifying default arguments')

    parser = argparse.ArgumentParser(description='PyTorch ImageNet Training')

    # Dataset parameters
    group = parser.add_argument_group('Dataset parameters')
    # Keep this argument outside the dataset group because it is positional.
    parser.add_argument('data', nargs='?', metavar='DIR', const=None,
                        help='path to dataset (positional is *deprecated*, use --data-dir)')
    group.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')

    # Model parameters
    group = parser.add_argument_group('Model parameters')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs)
    scripting_group = group.add_mutually_exclusive_group()
    scripting_group.add_argument('--torchscript', dest='torchscript', action='store_true')
    scripting_group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor')

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--weight-decay', type=float, default=2e-5)
    group.add_argument('--no-prefetcher', action='store_false')
    group.add_argument('--ratio', type=float, nargs='+', default=[3./4., 4./3.], metavar='RATIO')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')
    group.add_argument('--schedule', default='constant', type=str, choices=('constant', 'progressive'))

    # Knowledge Distillation parameters
    parser.add_argument('--kd-model-name', default=None, type=str, help='teacher')
    parser.add_argument('--kd-distill-type', default='logit', type=str, choices=['logit', 'feature', 'token'])


    def _parse_args():
        args_config, remaining = config_parser.parse_known_args()
        return parser.parse_args(remaining)
''')

TRAIN_ROWS = [
    ('top-level', '-c/--config', "''", 'type=str'),
    ('Dataset parameters', 'data', 'None', "nargs='?', const=None"),
    ('Dataset parameters', '--data-dir', 'None', ''),
    ('Model parameters', '--input-size', 'None', 'type=int, nargs=3'),
    ('Model parameters', '-b/--batch-size', '128', 'type=int'),
    ('Model parameters', '--model-kwargs', '{}', "nargs='*', action=utils.ParseKwargs"),
    ('Model parameters', '--torchscript', 'False', "action='store_true'"),
    ('Model parameters', '--torchcompile', 'None', "type=str, nargs='?', const='inductor'"),
    ('Optimizer parameters', '--weight-decay', '2e-05', 'type=float'),
    ('Optimizer parameters', '--no-prefetcher', 'True', "action='store_false'"),
    ('Optimizer parameters', '--ratio', '[3.0 / 4.0, 4.0 / 3.0]', "type=float, nargs='+'"),
    ('Optimizer parameters', '--decay-rate/--dr', '0.1', 'type=float'),
    ('Optimizer parameters', '--schedule', "'constant'", "type=str, choices=('constant', 'progressive')"),
    ('Knowledge distillation (parser-level, no group)', '--kd-model-name', 'None', 'type=str'),
    ('Knowledge distillation (parser-level, no group)', '--kd-distill-type', "'logit'",
     "type=str, choices=['logit', 'feature', 'token']"),
]

VALIDATE = textwrap.dedent('''\
    import argparse
    from timm.utils import ParseKwargs

    parser = argparse.ArgumentParser(description='PyTorch ImageNet Validation')
    parser.add_argument('data', nargs='?', metavar='DIR', const=None)
    parser.add_argument('--model', '-m', metavar='NAME', default='dpn92')
    parser.add_argument('--pretrained', dest='pretrained', action='store_true')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    scripting_group = parser.add_mutually_exclusive_group()
    scripting_group.add_argument('--aot-autograd', default=False, action='store_true')

    # NaFlex loader arguments
    parser.add_argument('--naflex-max-seq-len', type=int, default=576)
''')

VALIDATE_ROWS = [
    ('top-level', 'data', 'None', "nargs='?', const=None"),
    ('top-level', '--model/-m', "'dpn92'", ''),
    ('top-level', '--pretrained', 'False', "action='store_true'"),
    ('top-level', '--model-kwargs', '{}', "nargs='*', action=ParseKwargs"),
    ('top-level', '--aot-autograd', 'False', "action='store_true'"),
    ('top-level', '--naflex-max-seq-len', '576', 'type=int'),
]


def test_rows_follow_timms_groups_defaults_and_kinds():
    assert tool.flag_rows(TRAIN) == TRAIN_ROWS
    assert tool.flag_rows(VALIDATE) == VALIDATE_ROWS


@pytest.fixture
def checkout(tmp_path):
    (tmp_path / 'timm').mkdir()
    (tmp_path / 'timm' / 'version.py').write_text("__version__ = '9.9.9'\n")
    (tmp_path / 'train.py').write_text(TRAIN)
    (tmp_path / 'validate.py').write_text(VALIDATE)
    return tmp_path


def _run(*args):
    return subprocess.run([sys.executable, '-m', 'tools.update_timm_flag_refs'] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_command_writes_the_tsv_format_the_tests_read(checkout, tmp_path):
    out = tmp_path / 'out'
    done = _run(checkout, '--output-dir', out)
    assert done.returncode == 0, done.stderr
    for name, rows in (('train', TRAIN_ROWS), ('validate', VALIDATE_ROWS)):
        lines = (out / f'timm-{name}-flags.tsv').read_text().splitlines()
        assert lines[0].startswith('# argparse flags of timm 9.9.9') and f'{name}.py' in lines[0]
        assert lines[1] == '# group\tflags\tdefault\tkind'
        assert [tuple(line.split('\t')) for line in lines[2:]] == rows
    # --check: up to date, then out of date after a flag changes; nothing is written by it.
    assert _run(checkout, '--output-dir', out, '--check').returncode == 0
    (checkout / 'validate.py').write_text(VALIDATE.replace('default=576', 'default=1024'))
    before = (out / 'timm-validate-flags.tsv').read_text()
    done = _run(checkout, '--output-dir', out, '--check')
    assert done.returncode == 1 and 'timm-validate-flags.tsv' in done.stderr
    assert (out / 'timm-validate-flags.tsv').read_text() == before


def test_files_without_a_checkout_need_a_description(checkout, tmp_path):
    done = _run('--train', checkout / 'train.py', '--validate', checkout / 'validate.py', '--output-dir', tmp_path)
    assert done.returncode == 2 and '--describe' in done.stderr
    done = _run('--train', checkout / 'train.py', '--validate', checkout / 'validate.py', '--output-dir', tmp_path,
                '--describe', 'timm 1.2.3 (tag v1.2.3)')
    assert done.returncode == 0, done.stderr
    first_line = (tmp_path / 'timm-train-flags.tsv').read_text().splitlines()[0]
    assert first_line.startswith('# argparse flags of timm 1.2.3 (tag v1.2.3) train.py')


@pytest.mark.parametrize('name', ['train', 'validate'])
def test_reference_tsvs_in_the_repository_are_in_the_tools_format(name):
    lines = open(os.path.join(DATA, f'timm-{name}-flags.tsv'), encoding='utf-8').read().splitlines()
    assert lines[0].startswith('# argparse flags of timm 1.0.31 ') and f' {name}.py ' in lines[0]
    assert lines[1] == tool.HEADER
    rows = [tuple(line.split('\t')) for line in lines[2:]]
    assert len(rows) > 50 and all(len(row) == 4 and row[0] and row[1] for row in rows)
    assert tool.render(rows, 'timm 1.0.31 (the v1.0.31 release)', f'{name}.py').splitlines() == lines
