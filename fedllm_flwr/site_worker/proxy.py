"""The ClientApp's side of a site worker: forward a message, or say it cannot.

`forward` sends the message and its context to the site's worker (started on first
use), and returns the reply's content after writing the worker's new node state into
`context.state`, in place: Flower pushes that very object back to the SuperNode, and
SecAgg+'s mod writes to it after the handler. None means "run it here": the worker is
off, or was lost twice (a worker that dies mid-message is retried once on a fresh one;
re-running a message is safe, `fedllm_flwr.node.NodeState.identity`). A failure of the
message itself is raised as `SiteWorkerError`, as it would have been in this process,
and not retried. `context.state` changes only after a complete reply.

`FEDLLM_SITE_WORKER`: `auto` (default: on in a deployed `flwr-clientapp`, off in
simulation and tests, whose processes already live as long as a run), `on`, `off`.
`FEDLLM_SITE_WORKER_IDLE`: seconds a worker waits for its next message (900).
`FEDLLM_SITE_WORKER_START_TIMEOUT`: seconds to wait for a new worker's socket (60).

Light at import, like the ClientApp: no torch, no node code.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedllm_flwr.site_worker.__main__ import command
from fedllm_flwr.site_worker.paths import (
    DEFAULT_HANDLER,
    PROTOCOL,
    UnsafeDir,
    WorkerFiles,
    WorkerKey,
    app_root,
    argv_value,
    process_identity,
    site_owner,
    worker_dir,
)
from fedllm_flwr.site_worker.protocol import (
    AuthError,
    HandshakeClosed,
    connect,
    decode_records,
    encode_context,
    encode_message,
    recv_json,
    send_json,
)
from fedllm_flwr.worker_start import is_warm_up

log = logging.getLogger("fedllm_flwr.site_worker")

MODES = ("auto", "on", "off")
#: Polling interval while a new worker starts (it listens within a second or two).
WAIT_SECONDS = 0.05
#: When this module was imported: in a deployed ClientApp, right after Flower loaded the app.
_IMPORTED = time.time()
#: Workers this process started: kept, so that Python does not warn that they still run.
_SPAWNED: list[subprocess.Popen] = []


class SiteWorkerError(Exception):
    """The message failed in the site worker; the worker's exception type, message and traceback."""

    def __init__(self, header: dict):
        self.error_type, self.error = header.get("error_type", "Exception"), header.get("error", "")
        self.worker_traceback = header.get("traceback", "")
        super().__init__(f"{self.error_type}: {self.error} (in site worker pid {header.get('worker_pid')})")


class WorkerGone(Exception):
    """The worker did not answer: not started, exited, killed, or failed the handshake."""


def in_deployed_clientapp(argv: list[str] | None = None) -> bool:
    """Whether this process is Flower's `flwr-clientapp`, started by a SuperNode for one message."""
    argv = sys.argv if argv is None else argv
    named = bool(argv) and Path(argv[0]).name == "flwr-clientapp"
    return named and argv_value("--runtime-api-address", argv) is not None


def mode() -> str:
    """`on` or `off` for this process, from FEDLLM_SITE_WORKER (see the module's docstring);
    off where the platform lacks Unix sockets with peer credentials (Windows, macOS)."""
    value = os.environ.get("FEDLLM_SITE_WORKER", "auto").strip().lower() or "auto"
    if value not in MODES:
        log.warning("FEDLLM_SITE_WORKER=%s: use one of %s; the site worker is off", value, ", ".join(MODES))
        return "off"
    if value == "auto":
        value = "on" if in_deployed_clientapp() else "off"
    if value == "on" and not (hasattr(socket, "AF_UNIX") and hasattr(socket, "SO_PEERCRED")):
        return "off"
    return value


def forward(kind: str, msg: Message, context: Context, handler: str = DEFAULT_HANDLER) -> RecordDict | None:
    """The reply's content for `msg` from the site worker, with `context.state` updated;
    None to run it in this process. SiteWorkerError when the message itself failed.
    A warm-up with no worker, in a process that ends with the message, has nothing to
    warm: answered at once."""
    if mode() == "off":
        if is_warm_up(msg) and in_deployed_clientapp():
            return RecordDict({"info": ConfigRecord({"warmed": 0})})
        return None
    try:
        directory = worker_dir()
    except (UnsafeDir, OSError) as exc:
        log.warning("site worker off: %s", exc)
        return None
    key = WorkerKey.current(handler)
    files = WorkerFiles(directory, key.name)
    owner = site_owner()
    age = _age()
    header = {"op": "handle", "v": PROTOCOL, "kind": kind, "task_id": _task_id(), "proxy_age": age,
              "app_age": age - (time.time() - _IMPORTED), "owner": owner}  # fmt: skip
    frames = (encode_message(msg), encode_context(context))
    with _locked(files.use):  # one message at a time per worker; two proxies never both spawn one
        for attempt in (1, 2):
            try:
                reply_header, reply, state = _exchange(_connect_or_spawn(files, key, owner), header, frames)
            except WorkerGone as exc:
                again = "retrying on a fresh one" if attempt == 1 else "giving up"
                log.warning("site worker %s lost (%s); %s", key.name, exc, again)
                _kill(files)
                continue
            status = reply_header.get("status")
            if status == "stale":
                log.info("site worker %s is stale (%s); starting a fresh one", key.name, reply_header.get("reason"))
                continue
            if status == "error":
                raise SiteWorkerError(reply_header)
            apply_state(context.state, state)
            seconds, cold = reply_header.get("handler_seconds", 0.0), reply_header.get("cold")
            log.info("site worker %s (pid %s): %s in %.2f s, %s", key.name, reply_header.get("worker_pid"), kind,
                     seconds, "cold" if cold else "warm")  # fmt: skip
            return reply
    log.warning("site worker unavailable: running this %s message in the ClientApp process", kind)
    return None


def apply_state(state: RecordDict, new: RecordDict) -> None:
    """Make `state` (the very object Flower pushes back) hold exactly `new`'s records."""
    for key in [k for k in state if k not in new]:
        del state[key]
    for key, value in new.items():
        state[key] = value


def _exchange(conn, header: dict, frames: tuple[bytes, bytes]) -> tuple[dict, RecordDict | None, RecordDict | None]:  # noqa: ANN001
    """Send one request and read its whole reply; WorkerGone if the connection breaks on the way."""
    with conn:
        try:
            send_json(conn, {**header, "sent": time.time()})
            for frame in frames:
                conn.send_bytes(frame)
            reply = recv_json(conn)
            if reply.get("status") != "ok":
                return reply, None, None
            return reply, decode_records(conn.recv_bytes()), decode_records(conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise WorkerGone(f"{type(exc).__name__} {exc}".strip()) from None


def _connect_or_spawn(files: WorkerFiles, key: WorkerKey, owner: tuple[int, float] | None):
    """A connection to the key's worker, starting one when none holds its lock."""
    timeout = float(os.environ.get("FEDLLM_SITE_WORKER_START_TIMEOUT", "60"))
    deadline, proc = time.monotonic() + timeout, None
    while True:
        try:
            return connect(files)
        except HandshakeClosed:
            pass  # a worker still exiting (killed, stale) closes what its socket accepted
        except AuthError as exc:
            raise WorkerGone(f"handshake failed: {exc}") from None
        except OSError:
            pass  # no socket (yet), or nobody behind it
        if proc is None and _lock_free(files.lock):
            proc = _spawn(files, key, owner)
        elif proc is not None and proc.poll() not in (None, 0):
            raise WorkerGone(f"the new worker exited with {proc.returncode}; see {files.log}")
        if time.monotonic() > deadline:
            if proc is not None and proc.poll() is None:
                proc.kill()
            raise WorkerGone(f"no worker listening after {timeout:g} s; see {files.log}")
        time.sleep(WAIT_SECONDS)


def _spawn(files: WorkerFiles, key: WorkerKey, owner: tuple[int, float] | None) -> subprocess.Popen:
    """Start a worker with this process's interpreter and import path (Flower puts the
    FAB's folder first on it), in the SuperNode's process group: stopping the node stops it."""
    for path in (files.sock, files.key):
        path.unlink(missing_ok=True)  # a dead worker's: a proxy must not find them before the new one's
    args = ["--dir", str(files.dir), "serve", "--handler", key.handler, "--site", key.site, "--expect", key.name,
            "--idle-timeout", os.environ.get("FEDLLM_SITE_WORKER_IDLE", "900")]  # fmt: skip
    if owner is not None:
        args += ["--owner", f"{owner[0]}:{owner[1]!r}"]
    elif key.site != "local":
        args += ["--address", key.site]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = os.open(files.log, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
    try:
        proc = subprocess.Popen(command(*args), cwd=app_root(), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, close_fds=True)  # fmt: skip
    finally:
        os.close(out)
    _SPAWNED.append(proc)
    log.info("started site worker pid %d (key %s); its log: %s", proc.pid, key.name, files.log)
    return proc


def _kill(files: WorkerFiles) -> None:
    """Kill the key's worker if it still runs (it failed its proxy); by pid and start time only."""
    status = files.status() or {}
    pid, created = status.get("pid"), status.get("create_time")
    if pid and pid != os.getpid() and process_identity(pid) == (pid, created):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _lock_free(path: Path) -> bool:
    """Whether no worker holds the lock at `path` (the kernel frees it when a worker dies)."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _task_id() -> int | None:
    from flwr.supercore.task_identity import TaskIdentity

    try:
        return TaskIdentity.task_id
    except RuntimeError:
        return None


def _age() -> float:
    from fedllm_flwr.metrics import process_age_seconds

    return process_age_seconds()
