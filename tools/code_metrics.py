"""Print the package's shape: lines per module, the longest functions and which module imports which.

Run from the repository root: ``python -m tools.code_metrics`` (``--longest N`` functions, default 15).
Reads the source with :mod:`ast`; imports nothing from the package.
"""
from __future__ import annotations

import argparse
import ast
import os
from typing import Dict, List, Set, Tuple

PACKAGE = 'timm_gsl'


def package_modules(root: str) -> Dict[str, str]:
    """Module name -> file path for every ``.py`` file of the package under ``root``."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(root, PACKAGE)):
        for name in sorted(files):
            if not name.endswith('.py'):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, root)[:-3].split(os.sep)
            if parts[-1] == '__init__':
                parts = parts[:-1]
            modules['.'.join(parts)] = path
    return modules


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ''
    base = module.split('.') if is_package else module.split('.')[:-1]
    base = base[:len(base) - node.level + 1]
    return '.'.join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: str, known: Set[str]) -> Set[str]:
    """The package modules that ``module`` imports anywhere in its source (lazy imports included)."""
    tree = ast.parse(open(path, encoding='utf-8').read())
    found = set()
    for node in ast.walk(tree):
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, path.endswith('__init__.py'))
            submodules = [f'{target}.{a.name}' for a in node.names if f'{target}.{a.name}' in known]
            names = submodules if submodules else [target]
        for name in names:
            if name in known and name != module:
                found.add(name)
    return found


def longest_functions(path: str) -> List[Tuple[int, str]]:
    """(lines, qualified name) of every function and method in the file; docstrings are not counted."""
    tree = ast.parse(open(path, encoding='utf-8').read())
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = child.end_lineno - child.lineno + 1
                first = child.body[0] if child.body else None
                if isinstance(first, ast.Expr) and isinstance(getattr(first, 'value', None), ast.Constant) \
                        and isinstance(first.value.value, str):
                    lines -= first.end_lineno - first.lineno + 1
                out.append((lines, prefix + child.name))
                visit(child, prefix + child.name + '.')
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + '.')
    visit(tree, '')
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--longest', type=int, default=15, help='how many of the longest functions to list')
    args = parser.parse_args()
    root = os.getcwd()
    modules = package_modules(root)
    print('## Lines per module')
    for name, path in sorted(modules.items()):
        print(f'{sum(1 for _ in open(path, encoding="utf-8")):6d}  {name}')
    print(f'\n## The {args.longest} longest functions (lines, docstrings not counted)')
    functions = [(n, f'{module}.{q}') for module, path in modules.items() for n, q in longest_functions(path)]
    for n, name in sorted(functions, reverse=True)[:args.longest]:
        print(f'{n:6d}  {name}')
    print('\n## Imports within the package')
    for name, path in sorted(modules.items()):
        deps = sorted(imports_of(name, path, set(modules)))
        print(f'{name} -> {", ".join(deps) if deps else "-"}')


if __name__ == '__main__':
    main()
