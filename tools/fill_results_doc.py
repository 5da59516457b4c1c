"""Copy the measured tables of ``results/table.md`` and ``results/overfit/report.md`` into ``docs/results.md``.

``experiments/reproduce.py`` writes ``results/table.md``; the page ``docs/results.md`` sets those numbers
beside the paper's Table B.2 and adds the prose. The tables on the page sit between marker comments
(``<!-- measured:NAME -->`` ... ``<!-- /measured -->``) and are rebuilt here, so that no number on the page
is typed by hand; ``tests/test_results_doc.py`` checks the two files agree.

The over-fitting study (``python -m experiments.overfit_study``) writes ``results/overfit/report.md``;
blocks marked ``<!-- overfit:N -->`` ... ``<!-- /overfit -->`` get the body of its section ``## N. ...``,
verbatim.

    python -m tools.fill_results_doc [--table results/table.md] [--overfit-report results/overfit/report.md]
                                     [--doc docs/results.md]
"""
import argparse
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from timm_gsl.engine.atomic import write_text_atomic

from experiments.reproduce import PAPER_TABLE_B2  # the paper's Table B.2, as the report quotes it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MARKED = re.compile(r'(<!-- measured:(\w+) -->\n)(.*?)(<!-- /measured -->)', re.S)
_OVERFIT = re.compile(r'(<!-- overfit:(\d+) -->\n)(.*?)(<!-- /overfit -->)', re.S)


def overfit_section(report: str, number: str) -> str:
    """The body of section ``## {number}. ...`` of the over-fitting study's report, without blank edges."""
    match = re.search(r'^## ' + re.escape(number) + r'\. .*?$(.*?)(?=^## |\Z)', report, re.M | re.S)
    if not match:
        raise ValueError(f'the over-fitting report has no section "## {number}. "')
    return match.group(1).strip('\n')


def fill_overfit(doc: str, report: str) -> Tuple[str, List[str]]:
    """The page ``doc`` with every ``overfit:N`` block replaced by section N of ``report``."""
    filled = []

    def replace(match: 're.Match') -> str:
        filled.append(match.group(2))
        return match.group(1) + overfit_section(report, match.group(2)) + '\n' + match.group(4)

    return _OVERFIT.sub(replace, doc), filled


def _section(text: str, heading: str) -> str:
    match = re.search(r'^## ' + re.escape(heading) + r'.*?$(.*?)(?=^## |\Z)', text, re.M | re.S)
    if not match:
        raise ValueError(f'the report has no section "## {heading}"')
    return match.group(1)


def _tables(section: str) -> List[List[str]]:
    """The Markdown tables of a section, each as its lines."""
    tables, current = [], []
    for line in section.splitlines():
        if line.startswith('|'):
            current.append(line.strip())
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip('|').split('|')]


def blocks(table: str) -> Dict[str, str]:
    """The page's tables, by marker name, built from the report text ``table``."""
    out = {}
    for name, heading, unit in (('classes', 'Number of classes', 'classes'),
                                ('samples', 'Samples per class', 'per class')):
        (measured,) = _tables(_section(table, heading))
        header = _cells(measured[0])[1:]
        paper = PAPER_TABLE_B2[name]
        columns = list(paper['softmax'])
        lines = ['| | Paper: ' + ' | '.join(columns) + f' {unit} | Here: ' + ' | '.join(header) + ' |',
                 '|---|' + '---|' * (len(columns) + len(header))]
        for row in measured[2:]:
            loss, *cells = _cells(row)
            lines.append(f'| {loss} | ' + ' | '.join(f'{paper[loss][c]:.1f}' for c in columns) + ' | '
                         + ' | '.join(cells) + ' |')
        out[name] = '\n'.join(lines)
    (ablation,) = _tables(_section(table, 'Grouping ablation'))
    out['ablation'] = '\n'.join(ablation)
    for name, heading in (('differences', 'Differences'), ('fit', 'Fit')):
        section = _section(table, heading)
        titles = [line for line in section.splitlines() if line.endswith(':') and not line.startswith('|')]
        out[name] = '\n\n'.join(f'{title}\n\n' + '\n'.join(t) for title, t in zip(titles, _tables(section)))
    match = re.search(r'^(\d+) runs, ([\d.]+) h of wall time in all\.$', table, re.M)
    if not match:
        raise ValueError('the report does not state its runs and wall time')
    out['walltime'] = f'{match.group(1)} runs, {match.group(2)} h of training wall time in all (summed over runs).'
    return out


def fill(doc: str, table: str) -> Tuple[str, List[str]]:
    """The page ``doc`` with every marked block rebuilt from ``table``; also the names filled."""
    built = blocks(table)
    filled = []

    def replace(match: 're.Match') -> str:
        name = match.group(2)
        if name not in built:
            raise ValueError(f'docs marker measured:{name} is unknown, expected one of {sorted(built)}')
        filled.append(name)
        return match.group(1) + built[name] + '\n' + match.group(4)

    return _MARKED.sub(replace, doc), filled


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--table', default=os.path.join(ROOT, 'results', 'table.md'))
    parser.add_argument('--overfit-report', default=os.path.join(ROOT, 'results', 'overfit', 'report.md'))
    parser.add_argument('--doc', default=os.path.join(ROOT, 'docs', 'results.md'))
    args = parser.parse_args(argv)
    with open(args.table, encoding='utf-8') as f:
        table = f.read()
    with open(args.overfit_report, encoding='utf-8') as f:
        report = f.read()
    with open(args.doc, encoding='utf-8') as f:
        doc = f.read()
    text, filled = fill(doc, table)
    text, overfit = fill_overfit(text, report)
    filled += [f'overfit:{n}' for n in overfit]
    write_text_atomic(args.doc, text)
    print(f'{args.doc}: filled {", ".join(filled) or "nothing"} from {args.table} and {args.overfit_report}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
