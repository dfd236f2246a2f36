"""`fedllm-flwr site-worker serve|list|stop` (or `python -m fedllm_flwr.site_worker`, which
a proxy uses: the tooling is not shipped to sites): run, list and stop site workers.

A proxy starts its worker with `serve` (`command` builds that command line, so its
arguments are defined once, here). A site that manages its own services may start one
itself, from the same app folder and environment as its SuperNode (else the key never
matches a proxy's: `list` prints each worker's key parts to compare).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from fedllm_flwr.site_worker.paths import (
    DEFAULT_HANDLER,
    UnsafeDir,
    WorkerFiles,
    WorkerKey,
    process_identity,
    worker_dir,
)

PROG = "python -m fedllm_flwr.site_worker"


def command(*args: str) -> list[str]:
    """The command line that runs this module with this interpreter."""
    return [sys.executable, "-m", "fedllm_flwr.site_worker", *args]


def parse_owner(text: str) -> tuple[int, float] | None:
    """`PID` (its start time looked up now) or `PID:CREATE_TIME`; None when that process is gone."""
    pid, _, created = text.partition(":")
    found = process_identity(int(pid))
    if found is None or (created and found[1] != float(created)):
        return None
    return found


def workers(directory: Path) -> list[WorkerFiles]:
    return [WorkerFiles(directory, p.stem) for p in sorted(directory.glob("*.json")) if not p.name.startswith(".")]


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="the worker directory (default: $FEDLLM_SITE_WORKER_DIR, ...)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_args = sub.add_parser("serve", help="run a worker until idle, its owner gone, or stopped")
    serve_args.add_argument("--handler", default=DEFAULT_HANDLER, help="module:function run for each message")
    serve_args.add_argument("--site", help="the SuperNode's Runtime API address (flwr-clientapp's), or 'local'")
    serve_args.add_argument("--owner", help="PID[:CREATE_TIME] of the SuperNode: the worker ends with it")
    serve_args.add_argument("--address", help="without an owner: end when this Runtime API stops answering")
    serve_args.add_argument("--idle-timeout", type=float, default=900.0, help="seconds without a message (900)")
    serve_args.add_argument("--expect", help="the key its proxy computed: refuse to start under another")
    sub.add_parser("list", help="the workers in the directory, with their key parts")
    stop_args = sub.add_parser("stop", help="stop workers (SIGTERM); all when no name is given")
    stop_args.add_argument("names", nargs="*", help="key names (20 hex digits), as `list` prints them")
    args = parser.parse_args(argv)
    if args.dir:
        os.environ["FEDLLM_SITE_WORKER_DIR"] = args.dir
    try:
        directory = worker_dir()
    except UnsafeDir as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve(args, directory)
    if args.command == "list":
        for files in workers(directory):
            status = files.status() or {}
            alive = process_identity(status.get("pid") or 0) == (status.get("pid"), status.get("create_time"))
            counts = f"served={status.get('served')} refused={status.get('refused')}"
            print(f"{files.name} pid={status.get('pid')} alive={int(alive)} {counts} owner={status.get('owner')} "
                  f"parts={status.get('parts')}")  # fmt: skip
        return 0
    names = set(args.names)
    for files in workers(directory):
        status = files.status() or {}
        pid = status.get("pid")
        if (not names or files.name in names) and pid and process_identity(pid) == (pid, status.get("create_time")):
            os.kill(pid, signal.SIGTERM)
            print(f"stopped {files.name} (pid {pid})")
    return 0


def _serve(args: argparse.Namespace, directory: Path) -> int:
    from fedllm_flwr.site_worker.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    log = logging.getLogger("fedllm_flwr.site_worker")
    owner = parse_owner(args.owner) if args.owner else None
    if args.owner and owner is None:
        log.error("site worker: owner %s is gone; not starting", args.owner)
        return 2
    key = WorkerKey.current(args.handler, args.site)
    if args.expect and key.name != args.expect:
        log.error("site worker: this worker's key is %s, not %s (its parts: %s)", key.name, args.expect, key.parts())
        return 3
    serve(key, directory, owner, args.idle_timeout, args.handler, args.address)
    return 0


if __name__ == "__main__":
    sys.exit(main())
