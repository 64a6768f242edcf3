"""What the scenario tests report beyond pass/fail: a table a scenario records (the fault scenarios'
lookups, failures, wrong vectors and updates) is printed in pytest's terminal summary, whatever
``-s`` says, and written to a file beside the run's temporary directories."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

REPORTS = pytest.StashKey[dict[str, list[dict[str, Any]]]]()


@pytest.fixture(scope="session")
def scenario_report(request: pytest.FixtureRequest) -> dict[str, list[dict[str, Any]]]:
    """Tables by title; a test appends rows (dicts, the same keys in each) to ``report[title]``."""
    return request.config.stash.setdefault(REPORTS, {})


def format_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Rows as aligned text columns, headed by their keys."""
    columns = list(rows[0])
    cells = [columns] + [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for title, rows in config.stash.get(REPORTS, {}).items():
        if not rows:
            continue
        terminalreporter.section(title)
        for line in format_table(rows):
            terminalreporter.write_line(line)
