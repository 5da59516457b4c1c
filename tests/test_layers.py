"""The package's layers: lower layers never import upper ones, no import cycles, no library module loads a command line.

The picture (``timm_gsl/cli/__init__.py`` and the README's "Package layout"):

    math (functional) -> timm integration (head, loss, loss_factory, task, registry, distillation, naflex)
    -> engine (engine/*) -> data, hub -> command lines (cli/*, and the aliases train, validate, __main__)
"""
import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'timm_gsl')

# Layer of each top-level part of the package; a module may import its own layer and the ones below.
LAYERS = {
    'functional': 0,
    'head': 1, 'loss': 1, 'loss_factory': 1, 'task': 1, 'registry': 1, 'distillation': 1, 'naflex': 1,
    'timm_gsl': 1,  # the package's __init__: the public API of the two layers below it
    'engine': 2,
    'data': 3, 'hub': 3,
    'cli': 4, 'train': 4, 'validate': 4, '__main__': 4,
}
FRONTS = ('timm_gsl.cli', 'timm_gsl.train', 'timm_gsl.validate', 'timm_gsl.__main__')


def _modules():
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == '__init__':
                    parts = parts[:-1]
                found['.'.join(parts)] = path
    return found


MODULES = _modules()


def _part(module):
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else 'timm_gsl'


def _imports(module, path, top_level_only):
    """The package modules ``module`` imports (at module level only, or anywhere)."""
    tree = ast.parse(open(path, encoding='utf-8').read())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module level includes imports under `if`/`try` at the top, not inside functions
        nodes = [n for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.ClassDef))
                 for n in ast.walk(top)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split('.') if path.endswith('__init__.py') else module.split('.')[:-1]
                base = base[:len(base) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            subs = [f'{target}.{a.name}' for a in node.names if f'{target}.{a.name}' in MODULES]
            found.update(subs or ([target] if target in MODULES else []))
    found.discard(module)
    return found


def test_every_module_has_a_layer():
    assert {_part(m) for m in MODULES} <= set(LAYERS), sorted({_part(m) for m in MODULES} - set(LAYERS))


@pytest.mark.parametrize('module', sorted(MODULES))
def test_no_module_imports_an_upper_layer(module):
    upward = sorted(m for m in _imports(module, MODULES[module], top_level_only=False)
                    if LAYERS[_part(m)] > LAYERS[_part(module)])
    assert not upward, f'{module} (layer {LAYERS[_part(module)]}) imports {upward}'


def test_no_import_cycles():
    graph = {m: _imports(m, p, top_level_only=False) for m, p in MODULES.items()}
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
