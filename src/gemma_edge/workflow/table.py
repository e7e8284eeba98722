"""The one table formatter: tabulate, for the text tables in logs and the Markdown tables in reports.

Callers format each cell themselves (their number formats differ by column) and name each
column's alignment; tabulate sizes the columns. Numbers are never re-parsed from the cells.
"""

from __future__ import annotations

from collections.abc import Sequence

from tabulate import tabulate


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A plain-text table for a log: `align` has one letter per column, "l" or "r"."""
    return _table(headers, rows, align, "simple")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A Markdown (pipe) table for a report, alignment marked in its separator row."""
    return _table(headers, rows, align, "pipe")


def _table(headers, rows, align: str, fmt: str) -> str:
    if len(align) != len(headers) or any(len(row) != len(headers) for row in rows):
        raise ValueError(
            f"a table of {len(headers)} columns got alignment {align!r} and rows of {sorted({len(r) for r in rows})}"
        )
    colalign = [{"l": "left", "r": "right"}[letter] for letter in align]
    return tabulate(
        [[str(cell) for cell in row] for row in rows],
        headers=list(headers),
        tablefmt=fmt,
        colalign=colalign,
        disable_numparse=True,
    )
