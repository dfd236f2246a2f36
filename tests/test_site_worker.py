"""Site workers (`fedllm_flwr.site_worker`) with a stub handler (`tests/site_worker_stub.py`):
the wire, who may connect, and what happens when a worker dies, errs, idles or is stale.

Every worker a test starts runs `site_worker_stub:handle` (Flower imports only, ~1 s to
start) in a short temp directory (a socket's path is at most 107 bytes), and is killed
by its pid when the test ends (`workers`). Each test has its own key, because
conftest gives each its own FEDLLM_FLWR_CACHE, which is part of the key.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import psutil
import pytest
import site_worker_stub
from conftest import ROOT, docs_hooks
from conftest import TINY_OVERRIDES as TINY
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.serde import context_to_proto, message_to_proto

from fedllm_flwr.keys import WARM_UP_KEY
from fedllm_flwr.site_worker import paths, protocol, proxy, server
from fedllm_flwr.site_worker.paths import WorkerFiles, WorkerKey

STUB = "site_worker_stub:handle"


def wait_for(condition, timeout: float = 30.0, what: str = "") -> None:
    """Poll `condition` until true; fail after `timeout` seconds (a bound on a hang, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting after {timeout:g} s: {what}")
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """Whether `pid` exited (reaping it if it was our child)."""
    with contextlib.suppress(psutil.Error, ChildProcessError):
        psutil.Process(pid).wait(timeout=0)
    return paths.process_identity(pid) is None


@pytest.fixture
def workers(monkeypatch):
    """A private worker directory, the site worker forced on; every worker started
    during the test (by a proxy here, or listed in the directory) killed by pid after it."""
    directory = Path(tempfile.mkdtemp(prefix="sw"))
    monkeypatch.setenv("FEDLLM_SITE_WORKER", "on")
    monkeypatch.setenv("FEDLLM_SITE_WORKER_DIR", str(directory))
    monkeypatch.setenv("FEDLLM_SITE_WORKER_IDLE", "60")
    extra: list[int] = []
    yield directory, extra
    pids = {p.pid for p in proxy._SPAWNED} | set(extra)
    pids |= {s["pid"] for f in directory.glob("*.json") if (s := WorkerFiles(directory, f.stem).status())}
    for pid in pids - {os.getpid()}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda pid=pid: gone(pid), 10, f"pid {pid} to exit")
    proxy._SPAWNED.clear()
    shutil.rmtree(directory, ignore_errors=True)


def message(kind: str = MessageType.TRAIN, **config) -> Message:
    content = RecordDict({"x": ArrayRecord({"a": Array(np.arange(4, dtype=np.float32))})})
    content["config"] = ConfigRecord(config)
    return Message(content, dst_node_id=7, message_type=kind)


def context(state: RecordDict | None = None, **run_config) -> Context:
    return Context(run_id=3, node_id=7, node_config={"partition-id": 1}, state=state or RecordDict(),
                   run_config=run_config)  # fmt: skip


@contextlib.contextmanager
def served_in_thread(directory: Path, handshake_timeout: float = 5.0):
    """A worker for the stub's key, run by `server.serve` in a thread of this process."""
    key = WorkerKey.current(STUB)
    stop, reasons = threading.Event(), []
    thread = threading.Thread(
        target=lambda: reasons.append(server.serve(key, directory, None, 60, STUB, None, handshake_timeout, stop))
    )
    thread.start()
    files = WorkerFiles(directory, key.name)
    wait_for(lambda: files.json.exists(), 10, "the worker to listen")
    try:
        yield files
    finally:
        stop.set()
        thread.join(10)
    assert reasons == ["told to stop"]


def test_messages_and_contexts_cross_as_the_same_flower_protos(task_identity):
    msg = message(flag=True, blob=b"\x00\x01", names=["a", "b"], rate=0.5)
    msg.content["metrics"] = MetricRecord({"loss": 1.25, "steps": [1, 2]})
    again = protocol.decode_message(protocol.encode_message(msg))
    assert message_to_proto(again) == message_to_proto(msg) and again.object_id == msg.object_id
    assert again.content["config"]["blob"] == b"\x00\x01" and again.content["config"]["flag"] is True
    ctx = context(RecordDict({"kept": ConfigRecord({"n": 2})}), overrides="train.lr=1e-3")
    assert context_to_proto(protocol.decode_context(protocol.encode_context(ctx))) == context_to_proto(ctx)


def test_the_new_state_is_written_into_the_same_object():
    """Flower pushes the very `context.state` object back, and SecAgg+'s mod writes to it
    after the handler: the reply's state replaces its records in place."""
    secagg = ConfigRecord({"stage": "setup"})
    state = RecordDict({"secaggplus": secagg, "stub": ConfigRecord({"n": 1}), "gone": ConfigRecord({"x": 1})})
    before = id(state)
    new = RecordDict({"secaggplus": ConfigRecord({"stage": "setup"}), "stub": ConfigRecord({"n": 2})})
    proxy.apply_state(state, new)
    assert id(state) == before and set(state) == {"secaggplus", "stub"}
    assert state["stub"]["n"] == 2 and dict(state["secaggplus"]) == {"stage": "setup"}


def test_a_forwarded_message_gets_what_a_direct_call_gets(workers, task_identity):
    directory, _ = workers
    state = RecordDict({"secaggplus": ConfigRecord({"stage": "setup"}), "gone": ConfigRecord({"x": 1})})
    direct_ctx, ctx = context(RecordDict(dict(state))), context(state)
    direct = site_worker_stub.handle("train", message(), direct_ctx)
    with served_in_thread(directory):
        age = time.time() - psutil.Process().create_time()
        reply = proxy.forward("train", message(), ctx, handler=STUB)
    assert reply is not None and ctx.state is state  # written into the object the ClientApp holds
    assert set(state) == set(direct_ctx.state) == {"secaggplus", "stub"} and state["stub"]["n"] == 1
    assert np.array_equal(reply["echo"]["a"].numpy(), direct["echo"]["a"].numpy())
    assert reply["info"]["pid"] == os.getpid()  # served by the thread's worker, not a spawned one
    # `started` (process-start-seconds) is the proxy's start-up up to the handler, not the worker's
    assert direct["info"]["started"] == -1.0 and reply["info"]["started"] >= age


def test_the_worker_logs_each_messages_start_up_and_the_benchmark_reads_it(workers, task_identity, caplog, tmp_path):
    directory, _ = workers
    caplog.set_level(logging.INFO, logger="fedllm_flwr.site_worker")
    with served_in_thread(directory):
        proxy.forward("train", message(), context(), handler=STUB)
        proxy.forward("evaluate", message(MessageType.EVALUATE), context(), handler=STUB)
    (tmp_path / "k.log").write_text(caplog.text)
    first, second = client_startup().worker_timelines(tmp_path)
    assert (first["kind"], first["first"], second["kind"], second["first"]) == ("train", True, "evaluate", False)
    for m in (first, second):  # process ages: Flower loaded the app, then the proxy sent, then the handler began
        assert 0 < m["app"] <= m["sent"] <= m["handler"]


def test_the_proxy_and_the_client_app_never_import_torch(workers, tmp_path):
    directory, extra = workers
    code = f"""
import sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
import client_app
from fedllm_flwr.site_worker import proxy
msg = Message(RecordDict({{"x": ArrayRecord({{"a": Array(np.arange(2.0))}})}}), dst_node_id=1,
              message_type=MessageType.TRAIN)
ctx = Context(run_id=1, node_id=1, node_config={{}}, state=RecordDict(), run_config={{}})
reply = proxy.forward("train", msg, ctx, handler={STUB!r})
print(reply["info"]["pid"], ctx.state["stub"]["n"], "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pid, n, torch_loaded = out.stdout.split()
    extra.append(int(pid))
    assert int(pid) != os.getpid() and n == "1" and torch_loaded == "False"


def test_connections_without_the_secret_or_from_another_user_are_refused(workers, task_identity, caplog, monkeypatch):
    directory, _ = workers
    caplog.set_level(logging.INFO, "fedllm_flwr.site_worker")
    with served_in_thread(directory, handshake_timeout=0.3) as files:

        def raw() -> Connection:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(files.sock))
            return Connection(sock.detach())

        with raw() as conn, pytest.raises(protocol.AuthError, match="did not prove"):
            protocol.handshake_client(conn, b"w" * 32, files.name)  # a client with the wrong secret
        wait_for(lambda: "refused unauthenticated" in caplog.text, 10, "the worker to refuse the wrong secret")
        with raw() as conn:  # a client that answers the worker's proof with a made-up one
            conn.send_bytes(protocol.MAGIC + b"n" * protocol.NONCE_BYTES)
            conn.recv_bytes(256)
            conn.send_bytes(b"p" * 32)
            with pytest.raises(EOFError):
                conn.recv_bytes(256)  # no OK: the worker closed the connection
        assert "wrong proof of the secret" in caplog.text
        with raw():  # says nothing: refused after the handshake timeout, the worker goes on
            wait_for(lambda: files.status()["refused"] == 3, 10, "the worker to refuse the silent client")
            assert "no answer within 0.3 s" in caplog.text
        real = protocol.peer_credentials
        monkeypatch.setattr(server, "peer_credentials", lambda s: (real(s)[0], os.getuid() + 1, 0))
        with pytest.raises(protocol.AuthError, match="closed during the handshake"):
            protocol.connect(files).close()
        assert f"uid {os.getuid() + 1}: not this worker's user" in caplog.text
        monkeypatch.setattr(server, "peer_credentials", real)
        ctx = context()
        assert proxy.forward("train", message(), ctx, handler=STUB) is not None  # its own user is served
        assert ctx.state["stub"]["n"] == 1 and files.status()["refused"] == 4 and files.status()["served"] == 1
        with protocol.connect(files) as conn:  # authenticated, but not a request: the worker goes on
            conn.send_bytes(b"not json")
            with pytest.raises(EOFError):
                conn.recv_bytes()
        assert "bad request from pid" in caplog.text
        assert proxy.forward("train", message(), ctx, handler=STUB) is not None and ctx.state["stub"]["n"] == 2


def test_only_this_user_may_enter_the_directory_or_use_its_files(workers, task_identity, caplog, monkeypatch):
    directory, _ = workers
    with served_in_thread(directory) as files:
        assert proxy.forward("train", message(), context(), handler=STUB) is not None
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE(files.sock.stat().st_mode) == 0o600 and stat.S_IMODE(files.key.stat().st_mode) == 0o600
    loose = Path(tempfile.mkdtemp(prefix="sw"))
    try:
        loose.chmod(0o755)
        monkeypatch.setenv("FEDLLM_SITE_WORKER_DIR", str(loose))
        ctx = context()
        assert proxy.forward("train", message(), ctx, handler=STUB) is None and not set(ctx.state)
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.startswith("site worker off") and "mode 755" in warning and not list(loose.iterdir())
    finally:
        shutil.rmtree(loose)


def test_two_proxies_starting_at_once_start_one_worker(workers):
    directory, extra = workers
    code = f"""
import sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
from fedllm_flwr.site_worker import proxy
msg = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
ctx = Context(run_id=1, node_id=1, node_config={{}}, state=RecordDict(), run_config={{}})
print(proxy.forward("train", msg, ctx, handler={STUB!r})["info"]["pid"])
"""
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    pids = [int(p.communicate(timeout=120)[0]) for p in procs]
    extra.extend(pids)
    assert pids[0] == pids[1]
    (log,) = directory.glob("*.log")
    assert log.read_text().count("listening on") == 1 and "another worker holds the key" not in log.read_text()
    assert WorkerFiles(directory, log.stem).status()["served"] == 2


def test_a_worker_killed_mid_message_is_replaced_and_the_state_applied_once(workers, task_identity, caplog):
    directory, _ = workers
    caplog.set_level(logging.INFO, "fedllm_flwr.site_worker")
    busy, marker = directory / "busy", directory / "marker"
    ctx, results = context(), []
    msg = message(busy=str(busy), marker=str(marker))
    thread = threading.Thread(target=lambda: results.append(proxy.forward("block", msg, ctx, handler=STUB)))
    thread.start()
    wait_for(busy.exists, 60, "the worker to start the message")
    (status,) = [WorkerFiles(directory, f.stem).status() for f in directory.glob("*.json")]
    os.kill(status["pid"], signal.SIGKILL)
    thread.join(60)
    (reply,) = results
    assert reply is not None and reply["info"]["pid"] not in (status["pid"], os.getpid())
    assert ctx.state["stub"]["n"] == 1  # the lost attempt committed nothing
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("lost (EOFError" in w and "retrying on a fresh one" in w for w in warnings), warnings


def test_a_worker_that_cannot_start_leaves_the_message_to_the_client_app(workers, task_identity, caplog):
    directory, _ = workers
    ctx = context()
    assert proxy.forward("train", message(), ctx, handler="site_worker_stub_missing:handle") is None
    assert not set(ctx.state)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "site worker unavailable: running this train message in the ClientApp process" in warnings
    (log,) = directory.glob("*.log")
    assert log.read_text().count("ModuleNotFoundError") == 2  # the first try and its retry


def test_a_failing_message_is_raised_and_not_retried(workers, task_identity):
    ctx = context(RecordDict({"stub": ConfigRecord({"n": 5})}))
    with pytest.raises(proxy.SiteWorkerError, match="ValueError: boom") as error:
        proxy.forward("raise", message(), ctx, handler=STUB)
    assert "site_worker_stub.py" in error.value.worker_traceback and ctx.state["stub"]["n"] == 5
    reply = proxy.forward("train", message(), ctx, handler=STUB)
    (json_file,) = workers[0].glob("*.json")
    status = WorkerFiles(workers[0], json_file.stem).status()
    assert reply["info"]["pid"] == status["pid"] and status["served"] == 1 and ctx.state["stub"]["n"] == 6


def test_an_idle_worker_exits_and_removes_its_socket_and_secret(workers, task_identity, monkeypatch):
    directory, _ = workers
    monkeypatch.setenv("FEDLLM_SITE_WORKER_IDLE", "0.5")
    pid = proxy.forward("train", message(), context(), handler=STUB)["info"]["pid"]
    wait_for(lambda: gone(pid), 10, "the idle worker to exit")
    assert not list(directory.glob("*.sock")) and not list(directory.glob("*.key"))
    assert "exiting (idle for 0.5 s; served 1)" in next(directory.glob("*.log")).read_text()


def test_a_worker_ends_with_its_owner_and_refuses_another_owners_message(workers, task_identity, monkeypatch):
    directory, extra = workers
    owners = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    extra.extend(p.pid for p in owners)
    identities = [paths.process_identity(p.pid) for p in owners]
    monkeypatch.setattr(proxy, "site_owner", lambda: identities[0])
    first = proxy.forward("train", message(), context(), handler=STUB)["info"]["pid"]
    monkeypatch.setattr(proxy, "site_owner", lambda: identities[1])  # the SuperNode restarted on the same port
    ctx = context()
    second = proxy.forward("train", message(), ctx, handler=STUB)["info"]["pid"]
    assert second != first and ctx.state["stub"]["n"] == 1
    wait_for(lambda: gone(first), 10, "the first owner's worker to exit")
    log = next(directory.glob("*.log")).read_text()
    assert "stale: a message from another owner" in log
    owners[1].kill()
    owners[1].wait()
    wait_for(lambda: gone(second), 5, "the worker to exit when its owner is gone")
    assert f"owner pid {owners[1].pid} is gone" in next(directory.glob("*.log")).read_text()


def test_another_environment_gets_another_worker(workers, task_identity, monkeypatch, tmp_path):
    first = proxy.forward("train", message(), context(), handler=STUB)["info"]["pid"]
    assert proxy.forward("train", message(), context(), handler=STUB)["info"]["pid"] == first
    monkeypatch.setenv("FEDLLM_FLWR_CACHE", str(tmp_path / "other-cache"))
    second = proxy.forward("train", message(), context(), handler=STUB)["info"]["pid"]
    assert second != first and len(list(workers[0].glob("*.sock"))) == 2


def test_the_key_covers_the_code_a_fab_ships_and_a_worker_refuses_another_key(workers, task_identity, monkeypatch,
                                                                               tmp_path):  # fmt: skip
    for name in ("client_app.py", "fedllm_flwr/node.py", "conf/config.yaml", "README.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    before = paths.code_hash(tmp_path)
    (tmp_path / "README.md").write_text("not shipped")
    assert paths.code_hash(tmp_path) == before
    (tmp_path / "conf/config.yaml").write_text("num_rounds: 2")
    assert paths.code_hash(tmp_path) != before
    # A proxy whose code differs from what a worker started from its import path would run:
    # the worker's own key is not the one asked for, so it refuses to serve under it.
    monkeypatch.setattr(paths, "code_hash", lambda root=None: "other code")
    assert proxy.forward("train", message(), context(), handler=STUB) is None
    assert "this worker's key is" in next(workers[0].glob("*.log")).read_text()


def test_another_model_makes_the_worker_stale_and_changed_data_is_forgotten(workers, task_identity, capsys):
    directory, _ = workers
    first = proxy.forward("train", message(), context(model="a", data="1"), handler=STUB)["info"]["pid"]
    again = proxy.forward("train", message(), context(model="a", data="2"), handler=STUB)["info"]["pid"]
    fresh = proxy.forward("train", message(), context(model="b", data="2"), handler=STUB)["info"]["pid"]
    assert first == again != fresh
    log = next(directory.glob("*.log")).read_text()
    assert "forgetting what was read" in log and "stale: another model" in log
    from fedllm_tools.cli import main

    assert main(["site-worker", "list"]) == 0  # fedllm-flwr site-worker, as a site runs it
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 1 and listed[0].startswith(f"{next(directory.glob('*.json')).stem} pid={fresh} alive=1")
    assert main(["site-worker", "stop"]) == 0  # the command stops the directory's workers (SIGTERM)
    wait_for(lambda: gone(fresh), 10, "the stopped worker to exit")
    assert "exiting (signal SIGTERM" in next(directory.glob("*.log")).read_text()
    with served_in_thread(directory):  # in this process, where the stub records forget_data's calls
        site_worker_stub.FORGOTTEN.clear()
        proxy.forward("train", message(), context(model="b", data="3"), handler=STUB)
        proxy.forward("train", message(), context(model="b", data="4"), handler=STUB)
        forgotten = site_worker_stub.FORGOTTEN
        assert forgotten == [os.getpid()]  # once: for "4", not for the first data this worker saw


def test_the_node_fingerprint_sees_a_changed_model_file_or_data_file(tiny_model_dir, tmp_path, task_identity):
    from fedllm_flwr import node

    data = tmp_path / "site.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n')
    ctx = context(overrides=f"model.name={tiny_model_dir}")
    ctx.node_config["data-path"] = str(data)
    before = node.fingerprint(message(), ctx)
    assert before == node.fingerprint(message(), ctx)
    config = tiny_model_dir / "config.json"
    info = config.stat()
    try:
        os.utime(config, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
        touched = node.fingerprint(message(), ctx)
    finally:
        os.utime(config, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert touched["model"] != before["model"] and touched["data"] == before["data"]
    data.write_text(data.read_text() * 2)
    assert node.fingerprint(message(), ctx)["data"] != before["data"]


def test_auto_is_on_only_in_a_deployed_client_app(monkeypatch, caplog):
    deployed = ["/venv/bin/flwr-clientapp", "--runtime-api-address", "127.0.0.1:9094", "--parent-pid", "1"]
    assert proxy.in_deployed_clientapp(deployed) and not proxy.in_deployed_clientapp(deployed[:1])
    assert not proxy.in_deployed_clientapp(["/venv/bin/flwr-simulation", *deployed[1:]])
    assert paths.site_address(deployed) == "127.0.0.1:9094" and paths.site_address(["pytest"]) == "local"
    monkeypatch.delenv("FEDLLM_SITE_WORKER", raising=False)
    assert proxy.mode() == "off"  # tests and simulation keep their processes: nothing to gain
    monkeypatch.setattr(sys, "argv", deployed)
    assert proxy.mode() == "on"
    monkeypatch.setenv("FEDLLM_SITE_WORKER", "off")
    assert proxy.mode() == "off"
    monkeypatch.setenv("FEDLLM_SITE_WORKER", "sometimes")
    assert proxy.mode() == "off" and "FEDLLM_SITE_WORKER=sometimes: use one of auto, on, off" in caplog.text


def test_a_deployed_client_app_without_a_worker_answers_a_warm_up_at_once(monkeypatch, task_identity):
    deployed = ["/venv/bin/flwr-clientapp", "--runtime-api-address", "127.0.0.1:9094", "--parent-pid", "1"]
    warm_up = message(MessageType.QUERY, **{WARM_UP_KEY: 1})
    monkeypatch.setenv("FEDLLM_SITE_WORKER", "off")
    assert proxy.forward("query", warm_up, context()) is None  # simulation: this process lives on, warm it
    monkeypatch.setattr(sys, "argv", deployed)
    reply = proxy.forward("query", warm_up, context())  # this process ends with the message: nothing to warm
    assert reply is not None and reply["info"]["warmed"] == 0
    assert proxy.forward("query", message(MessageType.QUERY), context()) is None  # other queries run here


def test_the_owner_is_the_supernode_behind_the_superexec():
    """flwr-clientapp's --parent-pid is its SuperExec, whose own --parent-pid is the SuperNode
    (here: this test process); without one (process isolation), the SuperExec itself."""
    sleep = [sys.executable, "-c", "import time; time.sleep(30)"]
    superexec = subprocess.Popen([*sleep, "--parent-pid", str(os.getpid())])
    alone = subprocess.Popen(sleep)
    try:
        wait_for(lambda: "--parent-pid" in psutil.Process(superexec.pid).cmdline(), 10, "the argv to show")
        clientapp = ["flwr-clientapp", "--runtime-api-address", "127.0.0.1:9094", "--parent-pid"]
        assert paths.site_owner([*clientapp, str(superexec.pid)]) == paths.process_identity(os.getpid())
        assert paths.site_owner([*clientapp, str(alone.pid)]) == paths.process_identity(alone.pid)
        assert paths.site_owner(["pytest"]) is None
    finally:
        for proc in (superexec, alone):
            proc.kill()
            proc.wait()


def test_the_node_resets_what_a_message_changed_in_a_warm_process():
    """`peak-memory-mb` is each message's own in a warm worker: after the reset it no longer
    shows an earlier message's peak (whatever this test process held before)."""
    import torch

    from fedllm_flwr import client, data, node
    from fedllm_flwr.metrics import peak_memory_mb

    def rss_mb() -> float:
        return psutil.Process().memory_info().rss / 2**20

    node.reset_process()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # what train.threads leaves behind
    # 320 MB, mapped and given back to the kernel: the peak an earlier message left. Mapped
    # directly: malloc may serve a large array from pages the process already holds (and
    # keep them after), so neither its allocation nor its release need move the RSS.
    grown = mmap.mmap(-1, 320 * 2**20)
    for offset in range(0, len(grown), mmap.PAGESIZE):
        grown[offset] = 1
    with_it = rss_mb()
    grown.close()
    assert rss_mb() < with_it - 200 <= peak_memory_mb()
    node.reset_process()
    assert torch.get_num_threads() == threads
    assert peak_memory_mb() < with_it - 200  # this message's peak from now on
    client._DATA[("k",)], data._RECORDS["k"], data._TRAIN_SETS["k"] = None, None, None
    node.forget_data()
    assert not client._DATA and not data._RECORDS and not data._TRAIN_SETS


def _live_workers(directory: Path) -> list[dict]:
    """The status of every worker in `directory` whose process still runs."""
    found = [WorkerFiles(directory, f.stem).status() for f in directory.glob("*.json")]
    return [s for s in found if s and paths.process_identity(s["pid"]) is not None]


@pytest.mark.slow
@pytest.mark.usefixtures("task_identity")
def test_a_federation_through_a_site_worker_matches_one_in_process_even_when_the_worker_is_killed(
    workers, monkeypatch, tiny_model_dir, tmp_path
):
    """The real node code in a worker: the same metrics and final adapter as in the
    ClientApp's own process, also when the worker is SIGKILLed between rounds (the next
    message starts a fresh one: the worker is a cache, `context.state` the truth)."""
    from federation import run_federation
    from safetensors.numpy import load_file

    directory, _ = workers
    job = [f"model.name={tiny_model_dir}", *TINY, "train.threads=1", "log.curves=false", "num_rounds=3",
           f"run.output_dir={tmp_path}"]  # fmt: skip
    monkeypatch.setenv("FEDLLM_SITE_WORKER", "off")
    plain = run_federation(monkeypatch, [*job, "run.name=plain"], nodes=2)
    assert not _live_workers(directory)

    killed = []

    def kill_the_worker(run, server_round):  # noqa: ANN001
        if server_round == 1:
            (status,) = _live_workers(directory)  # both nodes of this process share one
            os.kill(status["pid"], signal.SIGKILL)
            wait_for(lambda: gone(status["pid"]), 10, "the killed worker to exit")
            killed.append(status["pid"])

    monkeypatch.setenv("FEDLLM_SITE_WORKER", "on")
    warm = run_federation(monkeypatch, [*job, "run.name=warm"], nodes=2, after_round=kill_the_worker)
    (after,) = _live_workers(directory)
    assert killed and after["pid"] != killed[0]
    assert after["served"] >= 8  # rounds 2 and 3: a train and an evaluate message for each node

    figures = ("train-loss", "eval-loss", "accuracy", "examples-seen", "clients-ok", "clients-failed")
    rows = [[{k: r.get(k) for k in figures} for r in run.rows()] for run in (plain, warm)]
    assert rows[0] == rows[1] and len(rows[0]) == 4
    adapters = [load_file(run.path / "adapter" / "final" / "adapter_model.safetensors") for run in (plain, warm)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(np.array_equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def client_startup():
    """benchmarks/client_startup.py as a module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import client_startup
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return client_startup


def test_the_docs_table_of_deployed_rounds_is_the_benchmarks_results():
    """The figures live in the benchmark's results files; the docs ask for the table by
    name and the build writes it from them (client_startup.table)."""
    client_startup = globals()["client_startup"]()
    results = sorted(client_startup.RESULTS.glob("*.json"))
    assert {p.stem for p in results} >= {"deployment-off", "deployment-auto", "simulation"}
    hooks = docs_hooks()
    page = (ROOT / "docs" / "results" / "deployment.md").read_text()
    assert "<!-- generated: site-worker -->" in page, "docs/results/deployment.md no longer asks for the table"
    assert hooks.render(page).count(client_startup.table()) == 1
