"""Peak memory of a group of processes, sampled while they run.

    with ProcessMemory(lambda: descendants()) as mem:
        ...                      # start and run the processes
    mem.peak()                   # {"rss-mb": ..., "pss-mb": ..., "by-process": {...}}

Every `interval` seconds the sampler sums, over the processes `find()` returns,
their resident set (RSS: every page a process maps, shared ones included, so a
sum counts shared libraries and page cache once per process) and their
proportional set (PSS: each shared page divided among the processes sharing
it, so the sum is the physical memory the group takes). Both peaks are kept,
with the per-process breakdown at the PSS peak.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import psutil


def label(process: psutil.Process) -> str:
    """A short name for a process of a Flower simulation (or a bare loop)."""
    try:
        cmd = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    for needle, name in (
        ("flower-superlink", "superlink"), ("flower-superexec", "superexec"), ("flwr-simulation", "simulation"),
        ("ClientAppActor", "client actor"), ("raylet", "ray raylet"), ("gcs_server", "ray gcs"),
        ("log_monitor", "ray log monitor"), ("dashboard", "ray dashboard"), ("ray::IDLE", "ray idle worker"),
        ("default_worker.py", "ray worker"), ("bare_loop.py", "bare loop"), ("--trainer-loop", "trainer loop"),
        ("/flwr ", "flwr cli"),
    ):  # fmt: skip
        if needle in cmd:
            return name
    return process.name()


def descendants(*, exclude_self: bool = True) -> list[psutil.Process]:
    """Every process started (directly or not) by this one."""
    me = psutil.Process()
    found = me.children(recursive=True)
    return [p for p in found if not (exclude_self and p.pid == os.getpid())]


class ProcessMemory:
    """Sample the memory of `find()`'s processes until stopped."""

    def __init__(self, find: Callable[[], list[psutil.Process]], interval: float = 0.5) -> None:
        self.find, self.interval = find, interval
        self.peak_rss = self.peak_pss = 0.0
        self.at_peak: dict[str, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss = pss = 0.0
        by_label: dict[str, float] = {}
        for process in self.find():
            try:
                info = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss += info.rss / 2**20
            pss += info.pss / 2**20
            name = label(process)
            by_label[name] = by_label.get(name, 0.0) + info.pss / 2**20
        self.samples += 1
        self.peak_rss = max(self.peak_rss, rss)
        if pss > self.peak_pss:
            self.peak_pss, self.at_peak = pss, by_label

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> ProcessMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self) -> dict:
        return {
            "rss-mb": round(self.peak_rss, 1),
            "pss-mb": round(self.peak_pss, 1),
            "pss-mb-by-process-at-peak": {k: round(v, 1) for k, v in sorted(self.at_peak.items())},
            "samples": self.samples,
        }
