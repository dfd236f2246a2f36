"""How long the test suite takes: `make test` and `make test-fast`, as one results file.

    python benchmarks/test_suite.py --out benchmarks/results/test_suite.json [--fast]

Runs the suite exactly as `make test` does (pytest with `TEST_WORKERS` xdist workers, 3 by
default, `--maxschedchunk=1`; `--fast`: `make test-fast`'s in-process tier, `-m "not
slow"`), with `--durations=15`, in this checkout's `.venv`. Writes to OUT, under the
tier's name (`test` or `test-fast`), the counts of passed, failed and skipped tests, the
wall seconds, the 15 slowest tests and the commit and machine, keeping the other tier's
entry, and prints the entry. Not a test: 5 to 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: pytest's last line, "1 failed, 823 passed, 3 skipped, 29 warnings in 411.00s (0:06:51)" (framed by = without -q).
SUMMARY = re.compile(r"^=* ?(\d+ (?:passed|failed|skipped|errors?|warnings?|deselected)\b.*?) in ([\d.]+)s", re.M)
FAILED = re.compile(r"^FAILED (\S+)", re.M)
SLOW = re.compile(r"^([\d.]+)s (call|setup|teardown) +(\S+)$", re.M)


def run(fast: bool) -> dict:
    workers = os.environ.get("TEST_WORKERS", "3")
    python = ROOT / ".venv" / "bin" / "python"
    command = [str(python), "-m", "pytest", "-n", workers, "--maxschedchunk=1", "--durations=15", "-q"]
    if fast:
        command += ["-m", "not slow"]
    env = {**os.environ, "PATH": f"{python.parent}:{os.environ.get('PATH', '')}"}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    summaries = SUMMARY.findall(result.stdout)
    if not summaries:
        raise RuntimeError(f"pytest printed no summary:\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}")
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summaries[-1][0])}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "command": "make test-fast" if fast else "make test",
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0),
        "skipped": counts.get("skipped", 0),
        "seconds": round(seconds, 1),
        "workers": int(workers),
        "cores": len(os.sched_getaffinity(0)),
        "commit": commit.stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "slowest": [
            {"seconds": float(s), "phase": phase, "test": name} for s, phase, name in SLOW.findall(result.stdout)
        ],  # fmt: skip
        "failures": FAILED.findall(result.stdout),
        "returncode": result.returncode,
    }


def markdown(results: dict) -> str:
    """Each tier's counts and time, then the slowest tests of the whole suite."""
    lines = ["| command | passed | failed | skipped | seconds | xdist workers on cores | commit, date |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for entry in results.values():
        lines.append(f"| `{entry['command']}` | {entry['passed']} | {entry['failed']} | {entry['skipped']} "
                     f"| {entry['seconds']:.0f} | {entry['workers']} on {entry['cores']} "
                     f"| {entry['commit']}, {entry['date']} |")  # fmt: skip
    whole = results.get("test") or next(iter(results.values()))
    slow = "; ".join(f"`{s['test']}` {s['seconds']:.0f} s" for s in whole["slowest"][:5])
    failed = "".join(f" It failed `{name}`." for e in results.values() for name in e.get("failures", []))
    return "\n".join(lines) + f"\n\nThe slowest tests of `{whole['command']}`: {slow}.{failed}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fast", action="store_true", help="make test-fast's tier instead of make test")
    args = parser.parse_args()
    entry = run(args.fast)
    out = args.out.expanduser().resolve()
    kept = json.loads(out.read_text()) if out.is_file() else {}
    kept["test-fast" if args.fast else "test"] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(kept, indent=1) + "\n")
    print(json.dumps(entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
