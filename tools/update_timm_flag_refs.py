#!/usr/bin/env python3
"""Regenerate tests/data/timm-{train,validate}-flags.tsv from timm's own train.py and validate.py.

The tests check that our ``train.py`` and ``validate.py`` take every flag of timm's, with timm's
defaults and kinds. The reference lists come from timm's scripts, which are not in timm's pip
package: pass a checkout of https://github.com/huggingface/pytorch-image-models (at the release
``pyproject.toml`` requires), or the two files themselves.

The scripts are read, never run: every ``add_argument`` call is found with :mod:`ast`, and each
becomes one tab-separated row:

* ``group``: the title of the argument group the call adds to (``add_argument_group('Title')``; a
  mutually exclusive group inherits its parent's); ``top-level`` for a parser without groups (the
  ``-c/--config`` parser, all of validate.py). A call on the parser itself takes the group of its
  section: the current group, unless a comment that opens a paragraph (``# Knowledge Distillation
  parameters``) started a new section since, which gives ``Knowledge distillation (parser-level, no
  group)``;
* ``flags``: the option strings (or the positional's name), joined by ``/``, in source order;
* ``default``: the ``default=`` expression as ``ast.unparse`` writes it (``2e-05``, ``[3.0 / 4.0, ...]``);
  without one, argparse's implicit default (``False`` for ``store_true``, ``True`` for
  ``store_false``, else ``None``);
* ``kind``: the ``type``, ``nargs``, ``const``, ``action`` and ``choices`` keywords present, in that
  order, as source text, joined by ``, ``.

Usage:
    python -m tools.update_timm_flag_refs ~/src/pytorch-image-models            # writes tests/data/
    python -m tools.update_timm_flag_refs --train T.py --validate V.py --describe 'timm 1.0.31 (v1.0.31)'
    python -m tools.update_timm_flag_refs ~/src/pytorch-image-models --check    # exit 1 if they differ
"""
from __future__ import annotations

import argparse
import ast
import io
import os
import re
import subprocess
import sys
import tokenize
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(ROOT, 'tests', 'data')
FILES = {'train': 'timm-train-flags.tsv', 'validate': 'timm-validate-flags.tsv'}
HEADER = '# group\tflags\tdefault\tkind'
KIND_KEYWORDS = ('type', 'nargs', 'const', 'action', 'choices')
TOP_LEVEL = 'top-level'
PROVENANCE = '# argparse flags of '  # the first line of a TSV: what it was read from


def _paragraph_comments(source: str) -> List[Tuple[int, str]]:
    """``(line, text)`` of each whole-line comment that opens a paragraph (after a blank line or at the top)."""
    lines = source.splitlines()
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        row, col = token.start
        if lines[row - 1][:col].strip():  # a comment after code on the same line
            continue
        if row == 1 or not lines[row - 2].strip():
            found.append((row, token.string.lstrip('#').strip()))
    return found


def _section_label(comment: str) -> str:
    """``'Knowledge Distillation parameters'`` -> ``'Knowledge distillation (parser-level, no group)'``."""
    name = re.sub(r'\s+(parameters|arguments|args|options)$', '', comment.strip(), flags=re.I)
    return f'{name.capitalize()} (parser-level, no group)'


def _implicit_default(keywords: Dict[str, ast.expr]) -> str:
    action = keywords.get('action')
    if isinstance(action, ast.Constant):
        if action.value == 'store_true':
            return 'False'
        if action.value == 'store_false':
            return 'True'
    return 'None'


class _Collector(ast.NodeVisitor):
    """Walks a module in source order, following which names hold parsers and which hold groups."""

    def __init__(self, comments: List[Tuple[int, str]]):
        self.comments = comments
        self.parsers: Dict[str, int] = {}  # name -> parser id
        self.groups: Dict[str, Tuple[int, str]] = {}  # name -> (parser id, title)
        self.current_group: Dict[int, Tuple[str, int]] = {}  # parser id -> (title, line it was made)
        self.rows: List[Tuple[str, str, str, str]] = []
        self._next_parser = 0

    # -- what a call makes ------------------------------------------------------------------------
    def _made_by(self, value: ast.expr, line: int):
        """('parser', id) / ('group', (parser id, title)) for a call that creates one, else None."""
        if not isinstance(value, ast.Call):
            return None
        func = value.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name == 'ArgumentParser':
            self._next_parser += 1
            return 'parser', self._next_parser
        if not isinstance(func, ast.Attribute) or not isinstance(func.value, ast.Name):
            return None
        owner = func.value.id
        if name == 'add_argument_group':
            parser = self.parsers.get(owner, self.groups.get(owner, (None,))[0])
            title = value.args[0] if value.args else next(
                (k.value for k in value.keywords if k.arg == 'title'), None)
            title = title.value if isinstance(title, ast.Constant) else TOP_LEVEL
            if parser is not None:
                self.current_group[parser] = (title, line)
            return 'group', (parser, title)
        if name == 'add_mutually_exclusive_group':
            if owner in self.groups:
                return 'group', self.groups[owner]
            if owner in self.parsers:
                return 'group', (self.parsers[owner], self._parser_level_group(self.parsers[owner], line))
        return None

    def visit_Assign(self, node: ast.Assign) -> None:
        made = self._made_by(node.value, node.lineno)
        self.visit(node.value)
        for target in node.targets:
            if not isinstance(target, ast.Name):
                continue
            self.parsers.pop(target.id, None)
            self.groups.pop(target.id, None)
            if made and made[0] == 'parser':
                self.parsers[target.id] = made[1]
            elif made and made[0] == 'group':
                self.groups[target.id] = made[1]

    def visit_Expr(self, node: ast.Expr) -> None:
        self._made_by(node.value, node.lineno)  # a group made and not kept still starts a section
        self.generic_visit(node)

    # -- add_argument -----------------------------------------------------------------------------
    def _parser_level_group(self, parser: int, line: int) -> str:
        current = self.current_group.get(parser)
        if current is None:
            return TOP_LEVEL
        title, made_at = current
        since = [text for row, text in self.comments if made_at < row < line]
        return _section_label(since[-1]) if since else title

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        func = node.func
        if not (isinstance(func, ast.Attribute) and func.attr == 'add_argument' and isinstance(func.value, ast.Name)):
            return
        owner = func.value.id
        if owner in self.groups:
            group = self.groups[owner][1]
        elif owner in self.parsers:
            group = self._parser_level_group(self.parsers[owner], node.lineno)
        else:
            return
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        default = ast.unparse(keywords['default']) if 'default' in keywords else _implicit_default(keywords)
        kind = ', '.join(f'{k}={ast.unparse(keywords[k])}' for k in KIND_KEYWORDS if k in keywords)
        self.rows.append((group, '/'.join(names), default, kind))


def flag_rows(source: str, filename: str = '<script>') -> List[Tuple[str, str, str, str]]:
    """The ``(group, flags, default, kind)`` rows of every ``add_argument`` call in a script's source."""
    collector = _Collector(_paragraph_comments(source))
    collector.visit(ast.parse(source, filename=filename))
    return collector.rows


def render(rows: Sequence[Tuple[str, str, str, str]], describe: str, script: str) -> str:
    """The TSV text: a provenance comment, the column header, one line per flag."""
    for row in rows:
        if any('\t' in cell or '\n' in cell for cell in row):
            raise ValueError(f'a cell of {row!r} holds a tab or a newline; the TSV cannot represent it')
    lines = [f'{PROVENANCE}{describe} {script} (regenerate with tools/update_timm_flag_refs.py, '
             f'do not edit by hand)', HEADER]
    lines += ['\t'.join(row) for row in rows]
    return '\n'.join(lines) + '\n'


def describe_checkout(root: str) -> Optional[str]:
    """``timm <version> (commit <sha>)`` of a checkout, from timm/version.py and git where available."""
    version = None
    version_file = os.path.join(root, 'timm', 'version.py')
    if os.path.isfile(version_file):
        match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", open(version_file).read())
        version = match.group(1) if match else None
    commit = None
    try:
        commit = subprocess.run(['git', '-C', root, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                                timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    if version is None and commit is None:
        return None
    return f'timm {version or "(unknown version)"}' + (f' (commit {commit})' if commit else '')


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkout', nargs='?', default=None,
                        help='a pytorch-image-models checkout holding train.py, validate.py and timm/version.py')
    parser.add_argument('--train', default=None, metavar='FILE', help="timm's train.py (default: CHECKOUT/train.py)")
    parser.add_argument('--validate', default=None, metavar='FILE',
                        help="timm's validate.py (default: CHECKOUT/validate.py)")
    parser.add_argument('--describe', default=None, metavar='TEXT',
                        help="what the files are, for the TSVs' first line, e.g. 'timm 1.0.31 (tag v1.0.31)' "
                             '(default: the version and git commit of CHECKOUT)')
    parser.add_argument('--output-dir', default=DEFAULT_OUTPUT, metavar='DIR',
                        help='where the TSVs go (default: tests/data of this repository)')
    parser.add_argument('--check', action='store_true', default=False,
                        help='write nothing; exit 1 when a TSV would change (the provenance line is ignored)')
    return parser


def _body(text: str) -> List[str]:
    return [line for line in text.splitlines() if not line.startswith(PROVENANCE)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    scripts = {'train': args.train, 'validate': args.validate}
    for name in scripts:
        if scripts[name] is None and args.checkout:
            scripts[name] = os.path.join(args.checkout, f'{name}.py')
    missing = [f'--{name}' for name, path in scripts.items() if not path]
    if missing:
        parser.error(f'give a CHECKOUT or {" and ".join(missing)}.')
    for name, path in scripts.items():
        if not os.path.isfile(path):
            parser.error(f'{name}.py: no such file {path!r}.')
    describe = args.describe or (describe_checkout(args.checkout) if args.checkout else None)
    if not describe:
        parser.error('--describe is needed: the timm version of the files cannot be read from a checkout.')
    changed = []
    for name, path in scripts.items():
        with open(path, encoding='utf-8') as f:
            text = render(flag_rows(f.read(), path), describe, f'{name}.py')
        target = os.path.join(args.output_dir, FILES[name])
        old = open(target, encoding='utf-8').read() if os.path.isfile(target) else None
        if args.check:
            if old is None or _body(old) != _body(text):
                changed.append(target)
            continue
        os.makedirs(args.output_dir, exist_ok=True)
        with open(target, 'w', encoding='utf-8') as f:
            f.write(text)
        print(f'wrote {target} ({len(text.splitlines()) - 2} flags)')
    if changed:
        print('out of date: ' + ', '.join(changed), file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
