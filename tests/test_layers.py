"""The package's layers: lower layers never import upper ones, no import cycles, no library module loads a command line.

The picture (``timm_gsl/cli/__init__.py`` and the README's "Package layout"):

    math and the run record (functional, calibration, record, naming)
    -> timm integration (head, loss, loss_factory, task, registry, distillation, naflex)
    -> engine (engine/*) -> data, hub -> command lines (cli/*, and the aliases train, validate, __main__)
"""
import json
import os
import subprocess
import sys

import pytest

from tools.code_metrics import imports_of, package_modules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Layer of each top-level part of the package; a module may import its own layer and the ones below.
LAYERS = {
    'functional': 0, 'calibration': 0, 'record': 0, 'naming': 0,
    'head': 1, 'loss': 1, 'loss_factory': 1, 'task': 1, 'registry': 1, 'distillation': 1, 'naflex': 1,
    'timm_gsl': 1,  # the package's __init__: the public API of the two layers below it
    'engine': 2,
    'data': 3, 'hub': 3,
    'cli': 4, 'train': 4, 'validate': 4, '__main__': 4,
}
FRONTS = ('timm_gsl.cli', 'timm_gsl.train', 'timm_gsl.validate', 'timm_gsl.__main__')


MODULES = package_modules(ROOT)  # module name -> file (tools/code_metrics.py reads the graph from the source)


def _part(module):
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else 'timm_gsl'


def _imports(module):
    """The package modules ``module`` imports, at module level or inside functions (lazy imports count too)."""
    return imports_of(module, MODULES[module], set(MODULES))


def test_every_module_has_a_layer():
    assert {_part(m) for m in MODULES} <= set(LAYERS), sorted({_part(m) for m in MODULES} - set(LAYERS))


@pytest.mark.parametrize('module', sorted(MODULES))
def test_no_module_imports_an_upper_layer(module):
    upward = sorted(m for m in _imports(module)
                    if LAYERS[_part(m)] > LAYERS[_part(module)])
    assert not upward, f'{module} (layer {LAYERS[_part(module)]}) imports {upward}'


def test_no_import_cycles():
    graph = {m: _imports(m) for m in MODULES}
    # A package importing its own submodules (its __init__ re-exporting them) is not a cycle.
    for m in graph:
        graph[m] = {d for d in graph[m] if not (d.startswith(m + '.') and MODULES[m].endswith('__init__.py'))}
    state, stack = {}, []

    def visit(m):
        state[m] = 'open'
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 'open':
                cycle = stack[stack.index(d):] + [d]
                pytest.fail(f'import cycle: {" -> ".join(cycle)}')
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 'done'

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_importing_any_library_module_loads_no_command_line():
    # One fresh interpreter; between modules the package is dropped from sys.modules (torch and timm stay).
    library = sorted(m for m in MODULES if not m.startswith(FRONTS))
    script = (
        'import importlib, json, sys\n'
        f'library = {library!r}\n'
        'loaded = {}\n'
        'for name in library:\n'
        '    for m in [m for m in sys.modules if m == "timm_gsl" or m.startswith("timm_gsl.")]:\n'
        '        del sys.modules[m]\n'
        '    importlib.import_module(name)\n'
        f'    loaded[name] = sorted(m for m in sys.modules if m.startswith({FRONTS!r}))\n'
        'print(json.dumps(loaded))\n')
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(loaded) == set(library)
    assert {m: fronts for m, fronts in loaded.items() if fronts} == {}


# Library modules speak in their own keywords: a command line passes them its flag names (``names``). All but the
# hub's: its model card shows train.py commands as content, and its messages name both the flag and the keyword.
KEYWORD_MODULES = sorted(m for m in MODULES if not m.startswith(FRONTS + ('timm_gsl.hub',)))


@pytest.mark.parametrize('module', KEYWORD_MODULES)
def test_library_messages_name_keywords_not_flags(module):
    import ast
    import re
    with open(MODULES[module]) as f:
        tree = ast.parse(f.read())
    # Docstrings (of modules, classes, functions and attributes): strings standing alone as statements.
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    flags = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and id(node) not in docstrings and re.search(r'--[a-z]', node.value)]
    assert flags == [], f'{module} spells command-line flags outside its docstrings: {flags[:5]}'
