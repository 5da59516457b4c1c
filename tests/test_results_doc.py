"""docs/results.md quotes only numbers that experiments/reproduce.py wrote to results/table.md.

The page sets the paper's Table B.2 beside the rerun; every measured cell on it must be the cell of the
committed report (and every paper cell the value the script quotes), so a hand-typed or stale number fails.
"""
import os
import re

import pytest

from experiments import reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, 'docs', 'results.md')
TABLE = os.path.join(ROOT, 'results', 'table.md')
OVERFIT = os.path.join(ROOT, 'results', 'overfit', 'report.md')


def _read(path):
    with open(path, encoding='utf-8') as f:
        return f.read()


def _section(text, heading):
    """The text from the ``## heading...`` line to the next ``## `` line."""
    match = re.search(r'^## ' + re.escape(heading) + r'.*?$(.*?)(?=^## |\Z)', text, re.M | re.S)
    assert match, f'no section "## {heading}"'
    return match.group(1)


def _rows(section):
    """Body rows of the Markdown tables in ``section``: {first cell: [other cells]}, in order of appearance."""
    rows = []
    for line in section.splitlines():
        if line.startswith('|') and not set(line) <= set('|-: '):
            cells = [c.strip() for c in line.strip().strip('|').split('|')]
            rows.append((cells[0], cells[1:]))
    return rows[1:] if rows else rows  # the first row is the header


def test_measured_cells_are_the_reports_and_paper_cells_the_papers():
    doc, table = _read(DOC), _read(TABLE)
    for study, heading in (('classes', 'Number of classes'), ('samples', 'Samples per class')):
        measured = dict(_rows(_section(table, heading)))
        doc_rows = dict(_rows(_section(doc, heading)))
        assert set(doc_rows) == set(reproduce.LOSSES) == set(measured), heading
        paper = reproduce.PAPER_TABLE_B2[study]
        for loss, cells in doc_rows.items():
            assert len(cells) == 8, (heading, loss, cells)
            assert cells[:4] == [f'{v:.1f}' for v in paper[loss].values()], (heading, loss)
            assert cells[4:] == measured[loss], (heading, loss)
    ablation = _rows(_section(table, 'Grouping ablation'))
    assert _rows(_section(doc, 'Grouping ablation')) == ablation and ablation


@pytest.mark.parametrize('heading', ['Differences', 'Fit'])
def test_paired_differences_and_fit_are_copied_from_the_report(heading):
    doc = _section(_read(DOC), heading)
    report = _section(_read(TABLE), heading)
    doc_tables = [line.strip() for line in doc.splitlines() if line.startswith('|') or line.endswith(':')]
    report_tables = [line.strip() for line in report.splitlines() if line.startswith('|') or line.endswith(':')]
    assert doc_tables and doc_tables == report_tables


def test_stated_run_count_and_wall_time_are_the_reports():
    doc, table = _read(DOC), _read(TABLE)
    match = re.search(r'^(\d+) runs, ([\d.]+) h of wall time in all\.$', table, re.M)
    assert match
    assert f'{match.group(1)} runs' in doc and f'{match.group(2)} h' in doc


def _overfit_section(report, number):
    match = re.search(r'^## ' + re.escape(number) + r'\. .*?$(.*?)(?=^## |\Z)', report, re.M | re.S)
    assert match, f'no section "## {number}. " in the over-fitting report'
    return match.group(1).strip('\n')


def test_overfitting_study_blocks_are_the_reports_sections_verbatim():
    doc, report = _read(DOC), _read(OVERFIT)
    blocks = re.findall(r'<!-- overfit:(\d+) -->\n(.*?)\n<!-- /overfit -->', doc, re.S)
    # The gate, the primary and the secondary comparisons at least are on the page.
    assert {'1', '2', '3'} <= {number for number, _ in blocks}
    for number, body in blocks:
        assert body == _overfit_section(report, number), f'section {number} differs from the report'
