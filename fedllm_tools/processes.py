"""Stopping what a harness started, by PID and by what it holds: never a process
another run started.

A SuperLink's simulation process is found by its `--parent-pid` argument (whole
words, so pid 123 never matches 1234), a Ray instance by its temp folder (its agents
rename themselves and outlive a killed raylet), a process group by its leader.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def kill_matching(pattern: str) -> None:
    """SIGTERM, then SIGKILL, every process whose command line contains `pattern` (a path
    unique to one run: Ray's processes carry it inside longer arguments)."""

    def find() -> list[int]:
        found = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True, check=False)
        return [int(p) for p in found.stdout.split()]

    kill_found(find)


def kill_with_arguments(*words: str) -> None:
    """SIGTERM, then SIGKILL, every process whose arguments hold `words` in a row, each
    whole: `--parent-pid 123` never matches `--parent-pid 1234`, another run's process
    (pids wrap around at pid_max, so short ones are common)."""

    def holds(argv: list[str]) -> bool:
        return any(argv[i : i + len(words)] == list(words) for i in range(len(argv) - len(words) + 1))

    def find() -> list[int]:
        if not Path("/proc").is_dir():  # not Linux: pgrep on the joined line, bounded by spaces
            pattern = f"(^| ){' '.join(words)}( |$)"
            found = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True, check=False)
            return [int(p) for p in found.stdout.split()]
        pids = []
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
                if proc.name.isdigit() and holds((proc / "cmdline").read_bytes().decode(errors="replace").split("\0")):
                    pids.append(int(proc.name))
        return pids

    kill_found(find)


def stop_ray(temp_dir: Path) -> None:
    """Stop every process of the Ray instance whose temp dir is `temp_dir`, then remove it.

    By command line (raylet, GCS) and by the files they hold open there: Ray's agents
    rename themselves `ray::DashboardAgent` and outlive a killed raylet for minutes."""
    kill_matching(str(temp_dir))
    kill_found(lambda: pids_using(temp_dir))
    shutil.rmtree(temp_dir, ignore_errors=True)


def pids_using(folder: Path) -> list[int]:
    """Processes with a file open under `folder`. Ray's processes keep their logs in
    its temp dir, also those whose command line reads only `ray::DashboardAgent`."""
    prefix = str(folder) + os.sep
    pids = []
    if not Path("/proc").is_dir():  # not Linux: the command-line patterns have to do
        return pids
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
            if any(os.readlink(fd).startswith(prefix) for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
    return pids


def kill_found(find, grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL, every process `find()` lists (never this one), giving
    each signal up to `grace` seconds; returns as soon as none is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [pid for pid in find() if pid != os.getpid()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = [pid for pid in find() if pid != os.getpid()]
        if not pids:
            return


def wait_for_port(port: int, process: subprocess.Popen, log_path: Path, timeout: float = 60) -> None:
    """Return once 127.0.0.1:`port` accepts connections; RuntimeError if `process`
    exits first or nothing listens within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{Path(process.args[0]).name} exited with {process.returncode}; see {log_path}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s; see {log_path}")


def stop_group(process: subprocess.Popen, sig: int) -> None:
    """Signal the group a process leads (its own session), wait, then SIGKILL what is left."""
    for signal_, wait in ((sig, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, signal_)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        break
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # children may outlive the leader briefly
