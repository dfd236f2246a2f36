"""Tables as people read them: Markdown for the eye, CSV for their tools, and the one
way a value becomes a cell (used by `report`, `sweep_summary` and the benchmarks)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def cell(value: Any, spec: str = "", missing: str = "") -> str:
    """A table cell: `missing` for None or NaN, yes/no for a bool, a number by `spec`
    (e.g. ".3f", ",.0f", "g"; "" prints it as Python does), anything else as text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return format(value, spec)
    return str(value)


def mean_std(mean: float, std: float, digits: int = 3) -> str:
    """A mean over seeds with its spread, as "0.412 ± 0.031"."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """The lines of a Markdown table; values that are not text yet go through `cell`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(v if isinstance(v, str) else cell(v) for v in row) + " |" for row in rows]


def write_csv(path: Path, table: list[dict[str, Any]]) -> None:
    """Rows of dicts as a CSV file with a header (the first row's keys)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
