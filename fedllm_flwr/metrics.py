"""Cost accounting (memory, seconds) and the per-round metrics log: its writer and its
reader. Light at import (torch is imported where memory is measured): reports and plots
read run folders without the ML stack."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm_flwr.errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, else peak RSS. On Linux
    the kernel's VmHWM, which a warm site worker resets before each message
    (`node.reset_process`); getrusage's ru_maxrss keeps the peak of the process's whole
    life once any of its threads has exited, so it serves only where /proc has no VmHWM."""
    if device is not None and device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
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


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of run folder `run`'s metrics.jsonl, one per round logged; UserError
    naming the file and line for a line that is not JSON."""
    path = run / "metrics.jsonl"
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}, line {number} is not JSON") from None
    return rows


def _end_failed(tracker) -> str:  # noqa: ANN001 - a tracking.Tracker
    """End a dropped tracker's record as failed, never left running (best effort: its
    server may be the reason it was dropped); says how that went, for the warning."""
    try:
        tracker.finish(False, None)
    except Exception as exc:
        return f"its record could not be ended either ({exc})"
    return "its record is ended as failed"


class MetricsLog:
    """Append-only JSONL, one object per round; each line is flushed when written, and
    handed to the run's live trackers (fedllm_flwr/tracking.py). A tracker that fails is
    dropped, its record ended as failed, and the run goes on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.trackers: list = []

    def write(self, row: dict[str, Any]) -> None:
        clean = {k: _clean(v) for k, v in row.items()}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")
        for tracker in list(self.trackers):
            try:
                tracker.log_row(clean)
            except Exception as exc:  # a tracker server gone away must not stop the run
                self.trackers.remove(tracker)
                log.warning("%s stopped logging this run (%s); %s", type(tracker).__name__, exc, _end_failed(tracker))

    def close(self, completed: bool, final: Path | None = None) -> None:
        """End every tracker's run: completed (with the final adapter) or failed."""
        for tracker in self.trackers:
            try:
                tracker.finish(completed, final)
            except Exception as exc:
                log.warning("%s could not end this run: %s", type(tracker).__name__, exc)
        self.trackers = []
