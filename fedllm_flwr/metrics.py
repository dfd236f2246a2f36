"""Cost accounting (memory, seconds) and the per-round metrics log."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, else peak RSS."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def process_age_seconds() -> float:
    """Seconds since this process was created (interpreter start, imports, ...)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null keeps every line parseable
    if isinstance(value, float):
        return round(value, 6)
    return value


class MetricsLog:
    """Append-only JSONL, one object per round; each line is flushed when written."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
