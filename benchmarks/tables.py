"""Cells for the benchmark scripts' markdown tables."""


def num(x, spec: str = ".3f") -> str:
    """`x` formatted by `spec`, or "-" where the value is missing."""
    return format(x, spec) if isinstance(x, (int, float)) else "-"
