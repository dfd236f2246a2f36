"""The site worker: a long-lived process that runs the node's handler for its proxies.

`serve` takes the worker's lock (held for its whole life: the kernel drops it when the
process dies, however it dies), writes a fresh secret, listens on its Unix socket and
answers one request per connection, until it has been idle for `idle_timeout`
seconds, its owner (the SuperNode) is gone, it is told to stop, or a message shows it
is stale. It listens before the handler imports the ML stack, so a proxy connects
within a second or two of spawning it.

The handler is `module:function`, called as `function(kind, msg, context, started=)`;
its module may also define:
- `fingerprint(msg, context) -> dict`: "model" (what the worker loaded and may have
  changed: another one makes it answer `stale` and exit, and the proxy starts a fresh
  worker) and "data" (another one makes it call `forget_data()`);
- `forget_data()`: drop what was read from the site's data;
- `reset_process()`: undo, before each message, what an earlier one changed in the process.

A handler's exception is the message's failure, as in the ClientApp: the reply says
so ("error") and the worker goes on. The worker never writes Flower's state: a reply
lost on the way (the proxy killed) changes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import os
import select
import signal
import socket
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

from fedllm_flwr.site_worker.paths import WorkerFiles, WorkerKey, process_identity
from fedllm_flwr.site_worker.protocol import (
    HANDSHAKE_SECONDS,
    AuthError,
    decode_context,
    decode_message,
    encode_records,
    handshake_server,
    peer_credentials,
    recv_json,
    send_json,
)

log = logging.getLogger("fedllm_flwr.site_worker")

#: Seconds between the loop's checks of its idle time and its owner.
TICK = 0.2
#: Without an owner's pid, the site's Runtime API is probed this often; 3 failures in a row end the worker.
PROBE_SECONDS = 5.0


class _Stop(BaseException):
    """End the worker, for the reason given (a BaseException: no handler's `except Exception`
    may swallow a SIGTERM)."""


def load_handler(spec: str):
    """The function and module named by `module:function`."""
    module_name, _, function = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, function), module


class Worker:
    """One worker's state; `serve` builds and runs it."""

    def __init__(self, key: WorkerKey, files: WorkerFiles, owner: tuple[int, float] | None, address: str | None,
                 idle_timeout: float, handler: str, handshake_timeout: float = HANDSHAKE_SECONDS,
                 stop: threading.Event | None = None):  # fmt: skip
        self.key, self.files, self.owner, self.address = key, files, owner, address
        self.idle_timeout, self.handshake_timeout, self.stop = idle_timeout, handshake_timeout, stop
        self.handle, module = load_handler(handler)
        self.fingerprint = getattr(module, "fingerprint", None)
        self.forget_data = getattr(module, "forget_data", None)
        self.reset_process = getattr(module, "reset_process", None)
        self.model, self.data = None, None  # the first message's model, the last message's data
        self.served, self.refused, self.probe_failures = 0, 0, 0
        self.listener: socket.socket | None = None
        self.started = time.time()
        self.secret = os.urandom(32)

    def open(self) -> None:
        """Write the secret, then bind and listen (0600): a proxy that sees the socket finds the secret."""
        for path in (self.files.sock, self.files.key):
            path.unlink(missing_ok=True)
        fd = os.open(self.files.key, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.secret)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600: no moment where others may connect
        try:
            self.listener.bind(str(self.files.sock))
        finally:
            os.umask(old)
        os.chmod(self.files.sock, 0o600)
        self.listener.listen(8)
        self.write_status()
        log.info("site worker %s: pid %d listening on %s", self.files.name, os.getpid(), self.files.sock)

    def close(self) -> None:
        """Stop listening and remove the socket, secret and status (the lock goes with the process)."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            for path in (self.files.sock, self.files.key, self.files.json):
                path.unlink(missing_ok=True)

    def write_status(self) -> None:
        me = process_identity(os.getpid())
        self.files.write_status({
            "pid": os.getpid(), "create_time": me[1] if me else None, "owner": self.owner,
            "address": self.address, "parts": self.key.parts(), "started": self.started,
            "served": self.served, "refused": self.refused, "idle_timeout": self.idle_timeout,
        })  # fmt: skip

    def run(self) -> str:
        """Serve until a reason to stop; returns it."""
        last_active, last_probe = time.monotonic(), time.monotonic()
        try:
            while True:
                if self.stop is not None and self.stop.is_set():
                    return "told to stop"
                ready, _, _ = select.select([self.listener], [], [], TICK)
                if ready:
                    self.accept()
                    last_active = time.monotonic()
                    continue
                if time.monotonic() - last_active > self.idle_timeout:
                    return f"idle for {self.idle_timeout:g} s"
                if self.owner is not None and process_identity(self.owner[0]) != tuple(self.owner):
                    return f"owner pid {self.owner[0]} is gone"
                if self.owner is None and self.address and time.monotonic() - last_probe > PROBE_SECONDS:
                    last_probe = time.monotonic()
                    if self.site_gone():
                        return f"the site's Runtime API at {self.address} did not answer 3 times"
        except _Stop as stop:
            return str(stop)

    def site_gone(self) -> bool:
        host, _, port = self.address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
            self.probe_failures = 0
        except (OSError, ValueError):
            self.probe_failures += 1
        return self.probe_failures >= 3

    def accept(self) -> None:
        sock, _ = self.listener.accept()
        try:
            pid, uid, _ = peer_credentials(sock)
            if uid != os.getuid():
                self.refuse(f"refused connection from pid {pid} uid {uid}: not this worker's user")
                return
            conn = Connection(sock.detach())
        finally:
            sock.close()
        with conn:
            try:
                handshake_server(conn, self.secret, self.files.name, self.handshake_timeout)
            except (AuthError, OSError) as exc:
                self.refuse(f"refused unauthenticated connection from pid {pid}: {exc}")
                return
            try:
                self.serve_one(conn, pid)
            except (EOFError, OSError) as exc:  # the proxy went away: nothing was committed on its side
                log.warning("site worker %s: connection from pid %d lost (%s)", self.files.name, pid, exc)
            except Exception as exc:  # noqa: BLE001 - a malformed request ends its connection, not the worker
                log.warning("site worker %s: bad request from pid %d (%s: %s)", self.files.name, pid,
                            type(exc).__name__, exc)  # fmt: skip

    def refuse(self, line: str) -> None:
        self.refused += 1
        log.warning("site worker %s: %s", self.files.name, line)
        self.write_status()

    def serve_one(self, conn: Connection, pid: int) -> None:
        """One request: the handler's reply and new state, or why not. The log line of
        a served message splits its start-up (seconds of the proxy's process age): when
        the proxy's module was imported (Flower's part: interpreter, Flower, the run's
        records and app), when it sent the message (our app and the proxy), when the
        handler started (the transfer and the freshness checks)."""
        if not conn.poll(self.handshake_timeout):
            raise EOFError("no request after the handshake")
        header = recv_json(conn)
        if header.get("op") != "handle":
            raise ValueError(f"unknown op {header.get('op')!r}")
        msg, context = decode_message(conn.recv_bytes()), decode_context(conn.recv_bytes())
        owner = header.get("owner")
        if owner is not None and self.owner is not None and tuple(owner) != tuple(self.owner):
            self.stale(conn, f"a message from another owner (pid {owner[0]}; this worker's is {self.owner[0]})")
        self.check_fresh(conn, msg, context)
        self.set_task_identity(header, context)
        proxy_age = header.get("proxy_age")
        started = proxy_age + max(0.0, time.time() - header["sent"]) if proxy_age is not None else None
        if self.reset_process is not None:
            self.reset_process()
        t0 = time.perf_counter()
        try:
            reply = self.handle(header["kind"], msg, context, started=started)
        except Exception as exc:  # noqa: BLE001 - the message's failure, the proxy raises it
            log.warning("site worker %s: %s message failed: %s: %s", self.files.name, header["kind"],
                        type(exc).__name__, exc)  # fmt: skip
            send_json(conn, {"status": "error", "error_type": type(exc).__name__, "error": str(exc),
                             "traceback": traceback.format_exc(), "worker_pid": os.getpid()})  # fmt: skip
            return
        seconds = time.perf_counter() - t0
        reply_bytes, state_bytes = encode_records(reply), encode_records(context.state)
        self.served += 1  # counted before the reply leaves: whoever reads the status after it sees it
        self.write_status()
        send_json(conn, {"status": "ok", "handler_seconds": seconds, "cold": self.served == 1,
                         "worker_pid": os.getpid()})  # fmt: skip
        conn.send_bytes(reply_bytes)
        conn.send_bytes(state_bytes)
        timeline = ""
        if started is not None and header.get("app_age") is not None:
            timeline = f" (start-up: app {header['app_age']:.2f} s, sent {proxy_age:.2f} s, handler {started:.2f} s)"
        log.info("site worker %s: served %s for pid %d in %.2f s%s", self.files.name, header["kind"], pid, seconds,
                 timeline)  # fmt: skip

    def check_fresh(self, conn: Connection, msg, context) -> None:  # noqa: ANN001 - Flower's Message, Context
        """Stale on another model than the first one served; forget the data when its file changed."""
        if self.fingerprint is None:
            return
        try:
            found = self.fingerprint(msg, context)
        except Exception as exc:  # noqa: BLE001 - the handler will meet (and report) the same problem
            log.warning("site worker %s: no fingerprint (%s: %s)", self.files.name, type(exc).__name__, exc)
            return
        model, data = found.get("model"), found.get("data")
        if self.model is None:
            self.model = model
        elif model != self.model:
            self.stale(conn, "another model than the one it holds")
        if self.data is not None and data != self.data and self.forget_data is not None:
            log.info("site worker %s: the site's data changed; forgetting what was read", self.files.name)
            self.forget_data()
        self.data = data

    def stale(self, conn: Connection, reason: str) -> None:
        """Answer `stale` and end: the proxy asks a fresh worker. The socket goes first,
        so the proxy cannot reach this worker again while it exits."""
        self.close()
        send_json(conn, {"status": "stale", "reason": reason, "worker_pid": os.getpid()})
        raise _Stop(f"stale: {reason}")

    @staticmethod
    def set_task_identity(header: dict, context) -> None:  # noqa: ANN001 - Flower's Context
        """Flower builds a Message from the task's identity (the reply's sender): this message's."""
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id = context.run_id, context.node_id
        TaskIdentity.task_id = int(header.get("task_id") or 0)


def serve(key: WorkerKey, directory: Path, owner: tuple[int, float] | None = None, idle_timeout: float = 900.0,
          handler: str | None = None, address: str | None = None, handshake_timeout: float = HANDSHAKE_SECONDS,
          stop: threading.Event | None = None) -> str:  # fmt: skip
    """Run a worker for `key` in `directory` until it has a reason to stop; returns the
    reason. Returns at once when another worker holds the key's lock."""
    files = WorkerFiles(directory, key.name)
    lock = os.open(files.lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        log.info("site worker %s: another worker holds the key; exiting", key.name)
        return "another worker holds the key"
    worker = None
    try:
        worker = Worker(key, files, owner, address, idle_timeout, handler or key.handler, handshake_timeout, stop)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, _raise_stop)
        worker.open()
        reason = worker.run()
        log.info("site worker %s: exiting (%s; served %d)", key.name, reason, worker.served)
        return reason
    except _Stop as stop_signal:
        log.info("site worker %s: exiting (%s)", key.name, stop_signal)
        return str(stop_signal)
    finally:
        if worker is not None:
            worker.close()
        with contextlib.suppress(OSError):
            os.close(lock)  # the lock file stays: unlinking it would let a second worker lock a new inode


def _raise_stop(signum: int, frame) -> None:  # noqa: ANN001 - a signal handler's frame
    raise _Stop(f"signal {signal.Signals(signum).name}")
