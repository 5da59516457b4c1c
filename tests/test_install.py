"""The package as a user gets it: built into a wheel, installed into a fresh virtual environment.

The wheel is built from a copy of the working tree (what ``pip install .`` would see), installed
with ``--no-deps`` into a virtual environment that sees the site-packages of the interpreter running
the tests (torch, timm, ... are reused, nothing is downloaded), and every command then runs from a
temporary folder that holds neither the repository nor its ``train.py``/``validate.py`` shims.

"The interpreter running the tests" is whatever ran pytest: the system Python (as in CI), a user's
venv or a conda env. ``venv --system-site-packages`` would not do: it exposes the *base* Python's
site-packages, which inside a venv or conda env lacks torch. The nested environment is therefore
created isolated and given a ``.pth`` file that adds this interpreter's site directories (after
its own, so the wheel installed into it wins).
"""
from __future__ import annotations

import ast
import csv
import importlib.metadata
import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path
from typing import Dict, List, Sequence, Set

import pytest
import yaml

import timm_gsl.cli.train
import timm_gsl.cli.validate
import timm_gsl.train
import timm_gsl.validate
from timm_gsl.data import EMBEDDED_DATASET, embedded_dataset_info

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'timm_gsl'
SCRIPTS = {'timm-gsl-train': 'timm_gsl.cli.train:cli', 'timm-gsl-validate': 'timm_gsl.cli.validate:cli'}
# What the package needs at run time, as the issue lists it; pyproject may add to it, never drop from it.
REQUIRED = {'torch', 'torchvision', 'timm', 'safetensors', 'huggingface-hub', 'pyyaml', 'numpy', 'pillow'}
# Small enough for a minute on two CPU cores: 50 images per class, one epoch of a tiny ResNet.
TRAIN_FLAGS = ['--epochs', '1', '--model', 'test_resnet', '--samples-per-class', '50', '--seed', '0']


def _normalize(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


def _pyproject() -> dict:
    with open(REPO / 'pyproject.toml', 'rb') as f:
        return tomllib.load(f)


def _source_files() -> List[Path]:
    # What `pip install .` sees: the working tree less what git ignores (build outputs, caches, runs).
    if (REPO / '.git').exists() and shutil.which('git'):
        listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                                cwd=REPO, capture_output=True, check=True).stdout.decode().split('\0')
        return [Path(p) for p in listed if p and (REPO / p).is_file()]
    skip = {'.git', '__pycache__', 'build', 'dist', 'output', '.venv', '.pytest_cache', '.hypothesis'}
    return [p.relative_to(REPO) for p in REPO.rglob('*')
            if p.is_file() and not skip.intersection(p.relative_to(REPO).parts) and '.egg-info' not in str(p)]


def _env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME', 'PYTHONSTARTUP')}
    # One torch thread, as in conftest.py: several of these processes share two CI cores.
    env.update(PIP_DISABLE_PIP_VERSION_CHECK='1', PIP_NO_INPUT='1', COLUMNS='100', OMP_NUM_THREADS='1')
    return env


def _run(command: Sequence[str], cwd: Path, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == expect, (
        f'{" ".join(map(str, command))} exited with {done.returncode}, expected {expect}\n'
        f'--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}')
    return done


@pytest.fixture(scope='module')
def installed(tmp_path_factory) -> Dict[str, Path]:
    """Build the wheel, install it into a fresh virtual environment; the paths of both and of a work folder."""
    pytest.importorskip('setuptools', minversion='77', reason='an offline wheel build needs setuptools>=77')
    root = tmp_path_factory.mktemp('install')
    source, dist, venv, work = root / 'source', root / 'dist', root / 'venv', root / 'work'
    for relative in _source_files():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, source / relative)
    work.mkdir()
    # Absolute paths: a bare folder name would be looked up on the package index as a project name.
    _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-q',
          '-w', dist, source], cwd=work)
    wheels = sorted(dist.glob('timm_gsl-*.whl'))
    assert len(wheels) == 1, wheels
    _run([sys.executable, '-m', 'venv', venv], cwd=work)
    bin_dir = venv / ('Scripts' if os.name == 'nt' else 'bin')
    python = bin_dir / ('python.exe' if os.name == 'nt' else 'python')
    _share_site_packages(python, work)
    _run([python, '-m', 'pip', 'install', '--no-deps', '--no-index', '-q', wheels[0]], cwd=work)
    return dict(wheel=wheels[0], venv=venv, bin=bin_dir, python=python, work=work)


def _running_site_dirs() -> List[str]:
    """The site-packages folders of the interpreter running the tests, in its own order of precedence."""
    dirs = list(site.getsitepackages()) if hasattr(site, 'getsitepackages') else []
    if site.ENABLE_USER_SITE and site.getusersitepackages() in sys.path:
        dirs.append(site.getusersitepackages())
    paths = sysconfig.get_paths()
    dirs += [paths['purelib'], paths['platlib']]
    unique: List[str] = []
    for folder in dirs:
        if os.path.isdir(folder) and os.path.realpath(folder) not in map(os.path.realpath, unique):
            unique.append(folder)
    return unique


def _share_site_packages(python: Path, work: Path) -> None:
    """Make the nested venv at ``python`` import what this interpreter imports (torch, timm, ...).

    A ``.pth`` file in the venv's own site-packages runs ``site.addsitedir`` on each of our site
    folders: they are appended after the venv's own folder (so its wheel of timm_gsl comes first) and
    their ``.pth`` files are processed too, as ``--system-site-packages`` does for the base Python.
    """
    own = Path(_run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                    cwd=work).stdout.strip())
    folders = _running_site_dirs()
    assert folders, 'the interpreter running the tests has no site-packages folder'
    own.mkdir(parents=True, exist_ok=True)
    # One line starting with `import`: site.py runs it (with its own namespace, hence map, not a comprehension).
    (own / '_timm_gsl_test_parent_site.pth').write_text(f'import site; list(map(site.addsitedir, {folders!r}))\n')


def _script(installed: Dict[str, Path], name: str) -> Path:
    path = installed['bin'] / (name + ('.exe' if os.name == 'nt' else ''))
    assert path.is_file(), f'console script {name} is not installed in {installed["bin"]}'
    return path


def _flags(help_text: str) -> Set[str]:
    return set(re.findall(r'(?<![\w-])--?[A-Za-z][\w-]*', help_text))


def _catches_import_error(node: ast.Try) -> bool:
    caught = set()
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        caught.update(k.id for k in kinds if isinstance(k, ast.Name))
    return bool(caught & {'ImportError', 'ModuleNotFoundError', 'Exception'})


def _unguarded_third_party_imports() -> Set[str]:
    # Top-level modules the package imports anywhere (module level or inside a function), except in a
    # `try:` that catches ImportError: those are optional features (wandb, tensorflow, functorch).
    names = set()
    for path in PACKAGE.rglob('*.py'):
        tree = ast.parse(path.read_text(), filename=str(path))
        guarded = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.Try) and _catches_import_error(node)
                   for statement in node.body for inner in ast.walk(statement)}
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            if isinstance(node, ast.Import):
                names.update(alias.name.split('.')[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split('.')[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != 'timm_gsl'}


# ------------------------------------------------------------------------------------------------
# Without building anything
# ------------------------------------------------------------------------------------------------

def test_console_scripts_point_at_the_package_entry_points():
    assert _pyproject()['project']['scripts'] == SCRIPTS
    assert timm_gsl.cli.train.cli.__module__ == 'timm_gsl.cli.train'
    assert timm_gsl.cli.validate.cli.__module__ == 'timm_gsl.cli.validate'
    # python -m timm_gsl.train / .validate forward to the same entry points.
    assert timm_gsl.train.cli is timm_gsl.cli.train.cli and timm_gsl.validate.cli is timm_gsl.cli.validate.cli


@pytest.mark.parametrize('module', [timm_gsl.cli.train, timm_gsl.cli.validate])
def test_cli_returns_none_so_a_console_script_exits_with_status_zero(module, monkeypatch):
    # A console-script wrapper runs sys.exit(cli()): anything but None or an int would exit with 1.
    seen = []
    monkeypatch.setattr(module, 'main', lambda argv=None: seen.append(argv) or {'top1': 1.0})
    assert module.cli() is None
    assert seen == [None]


@pytest.mark.parametrize('module', [timm_gsl.cli.train, timm_gsl.cli.validate])
def test_cli_exits_with_status_2_on_an_unknown_flag(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['prog', '--no-such-flag'])
    with pytest.raises(SystemExit) as e:
        module.cli()
    assert e.value.code == 2
    assert '--no-such-flag' in capsys.readouterr().err


def test_every_module_the_package_needs_comes_from_a_required_dependency():
    # Not from an extra: `pip install timm-gsl` alone must train (which draws the learning curves).
    declared = {_normalize(re.split(r'[<>=!~;\[ ]', r)[0]) for r in _pyproject()['project']['dependencies']}
    assert REQUIRED <= declared, REQUIRED - declared
    providers = importlib.metadata.packages_distributions()
    needed = _unguarded_third_party_imports()
    assert {'torch', 'timm', 'numpy', 'yaml', 'PIL'} <= needed  # the scan sees the imports
    for module in sorted(needed):
        distributions = {_normalize(d) for d in providers.get(module, [module])}
        assert distributions & declared, f'{module} is imported unconditionally but no required dependency provides it'


def test_timm_requirement_matches_the_tested_release():
    timm_requirement = [r for r in _pyproject()['project']['dependencies'] if _normalize(r).startswith('timm>')]
    assert timm_requirement == ['timm>=1.0.31']
    from packaging.version import Version
    assert Version(importlib.metadata.version('timm')) >= Version('1.0.31')


# ------------------------------------------------------------------------------------------------
# The built wheel, installed
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_wheel_holds_the_package_and_its_dataset_and_nothing_else(installed):
    with zipfile.ZipFile(installed['wheel']) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(next(n for n in names if n.endswith('.dist-info/METADATA'))).decode()
        entry_points = wheel.read(next(n for n in names if n.endswith('.dist-info/entry_points.txt'))).decode()
    package_files = {p.as_posix() for p in _source_files() if p.parts[0] == PACKAGE.name}
    in_wheel = {n for n in names if '.dist-info/' not in n}
    assert in_wheel == package_files
    assert {n.split('/')[0] for n in in_wheel} == {'timm_gsl'}  # no tests/, benchmarks/, tools/, shims
    dataset = [n for n in in_wheel if n.startswith('timm_gsl/datasets/')]
    assert any(n.endswith('.npz') for n in dataset) and any(n.endswith('meta.json') for n in dataset)
    for name in dataset:  # byte for byte, not an LFS pointer or a stale copy
        with zipfile.ZipFile(installed['wheel']) as wheel:
            assert wheel.read(name) == (REPO / name).read_bytes(), name
    requires = {_normalize(re.split(r'[<>=!~;\[ ]', line.split(':', 1)[1].strip())[0])
                for line in metadata.splitlines() if line.startswith('Requires-Dist:') and 'extra ==' not in line}
    assert REQUIRED <= requires
    assert 'Requires-Dist: timm>=1.0.31' in metadata
    for name, target in SCRIPTS.items():
        assert re.search(rf'^{re.escape(name)}\s*=\s*{re.escape(target)}\s*$', entry_points, re.M), entry_points


@pytest.mark.slow
def test_installed_package_is_imported_from_the_virtual_environment(installed):
    code = ('import json, timm_gsl, timm_gsl.data as d; '
            'print(json.dumps([timm_gsl.__file__, len(d.create_dataset(d.EMBEDDED_DATASET, split="validation"))]))')
    location, val_images = json.loads(_run([installed['python'], '-c', code], cwd=installed['work']).stdout)
    site = sysconfig.get_path('purelib', vars={'base': str(installed['venv']), 'platbase': str(installed['venv'])})
    assert Path(location).resolve().is_relative_to(Path(site).resolve()), location
    assert not Path(location).resolve().is_relative_to(REPO)
    assert val_images == embedded_dataset_info()['num_val'] > 0


@pytest.mark.slow
def test_installed_scripts_take_exactly_the_flags_of_the_repository_scripts(installed):
    reference = {}
    for script, shim in (('timm-gsl-train', 'train.py'), ('timm-gsl-validate', 'validate.py')):
        reference[shim] = _flags(_run([sys.executable, REPO / shim, '--help'], cwd=REPO).stdout)
        assert {'--help', '--model', '--batch-size', '--workers'} <= reference[shim]
        console = _flags(_run([_script(installed, script), '--help'], cwd=installed['work']).stdout)
        assert console == reference[shim], (script, console ^ reference[shim])
    # python -m timm_gsl.validate is run in the training test below.
    as_module = _flags(_run([installed['python'], '-m', 'timm_gsl.train', '--help'], cwd=installed['work']).stdout)
    assert as_module == reference['train.py'], as_module ^ reference['train.py']


@pytest.mark.slow
def test_installed_scripts_train_one_epoch_then_validate_the_best_checkpoint(installed):
    work = installed['work']
    train = _run([_script(installed, 'timm-gsl-train'), *TRAIN_FLAGS, '--output', work / 'runs',
                  '--experiment', 'one-epoch'], cwd=work)
    assert '*** Best metric: ' in train.stdout + train.stderr and 'Best top1' in train.stdout + train.stderr
    run_dir = work / 'runs' / 'one-epoch'
    for name in ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar'):
        assert (run_dir / name).is_file(), name
    with open(run_dir / 'args.yaml') as f:
        recorded = yaml.safe_load(f)
    # No data flag: the installed package found its own copy of the dataset.
    assert recorded['dataset'] == EMBEDDED_DATASET and recorded['model'] == 'test_resnet'
    with open(run_dir / 'summary.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == [0]
    trained_top1 = float(rows[0]['eval_top1'])

    validate = _run([_script(installed, 'timm-gsl-validate'), '--checkpoint', run_dir / 'model_best.pth.tar',
                     '--workers', '0', '--results-file', work / 'results.json', '--results-format', 'json'],
                    cwd=work)
    printed = json.loads(validate.stdout.split('--result\n', 1)[1])
    with open(work / 'results.json') as f:
        written = json.load(f)
    assert printed == written
    assert written['model'] == 'test_resnet'  # taken from the checkpoint's recorded training arguments
    assert 0.0 <= written['top1'] <= written['top5'] <= 100.0
    # The same weights on the same validation split: the evaluation at the end of the epoch.
    assert written['top1'] == pytest.approx(trained_top1, abs=0.5)

    # python -m runs the same code, and a refused command line exits with 2 through the script too.
    again = _run([installed['python'], '-m', 'timm_gsl.validate', '--checkpoint', run_dir / 'model_best.pth.tar',
                  '--workers', '0'], cwd=work)
    assert json.loads(again.stdout.split('--result\n', 1)[1]) == written
    _run([_script(installed, 'timm-gsl-train'), '--no-such-flag'], cwd=work, expect=2)
