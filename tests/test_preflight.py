"""What a run is told to use outside its process, each with a bad value: one line naming
the key or variable, the address or path and the cause, and nothing written. No network,
no MLflow server: the services are a closed port, a socket that never answers and a
plain HTTP server, all on 127.0.0.1."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import stat
import threading
import types
from pathlib import Path

import pytest

from fedllm_flwr import preflight
from fedllm_flwr.config import load_cfg
from fedllm_flwr.errors import UserError
from fedllm_flwr.preflight import check_external, run_checks
from fedllm_flwr.run_dir import CHECKPOINT
from fedllm_tools.cli import main

AS_ROOT = os.geteuid() == 0


@pytest.fixture
def home(tmp_path) -> Path:
    """$FEDLLM_FLWR_HOME (conftest's isolated_dirs): where a run folder would appear."""
    return tmp_path / "home"


@pytest.fixture
def read_only(monkeypatch):
    """Make a folder read-only (0o500). As root, whom permission bits do not stop, the
    process is made to answer as any other user would: no write without the owner's bit."""
    real_access = os.access

    def access_as_user(path, mode, *args, **kwargs):
        if mode & os.W_OK and os.path.exists(path) and not os.stat(path).st_mode & stat.S_IWUSR:
            return False
        return real_access(path, mode, *args, **kwargs)

    if AS_ROOT:
        monkeypatch.setattr(os, "access", access_as_user)
    made = []

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o500)
        made.append(folder)
        return folder

    yield make
    for folder in made:
        folder.chmod(0o700)  # so pytest can remove tmp_path


def refused(cfg) -> str:
    """The one line `check_external` raises."""
    with pytest.raises(UserError) as info:
        check_external(cfg)
    line = str(info.value)
    assert "\n" not in line
    return line


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def http_server(handler: type[http.server.BaseHTTPRequestHandler]):
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class WebPage(http.server.BaseHTTPRequestHandler):
    """Some other web service: an HTML page for every path."""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = b"<html><body>It works!</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class TrackingServer(WebPage):
    """What an MLflow tracking server answers to the probe."""

    def do_GET(self):  # noqa: N802
        assert self.path == preflight.MLFLOW_PROBE
        body = b'{"experiments": [{"experiment_id": "0", "name": "Default"}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """127.0.0.1 is asked directly, whatever proxy the machine has."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_mlflow_at_a_closed_port_is_refused(monkeypatch, tiny_cfg, home):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    line = refused(tiny_cfg("log.mlflow=true"))
    assert line == f"MLFLOW_TRACKING_URI: {uri}: connection refused (is the tracking server running?)"
    assert not home.exists()


def test_mlflow_that_never_answers_times_out(monkeypatch, tiny_cfg, home):
    monkeypatch.setattr(preflight, "TIMEOUT_S", 0.3)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        line = refused(tiny_cfg("log.mlflow=true"))
    assert line == f"MLFLOW_TRACKING_URI: {uri}: timed out after 0.3 s (connected, no answer)"
    assert not home.exists()


def test_mlflow_uri_answered_by_another_web_service_is_refused(monkeypatch, tiny_cfg, home):
    with http_server(WebPage) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        line = refused(tiny_cfg("log.mlflow=true"))
    expected = "answers, but not as an MLflow tracking server (HTTP 200 for GET /api/2.0/mlflow/experiments/search)"
    assert line == f"MLFLOW_TRACKING_URI: {uri}: {expected}"
    assert not home.exists()


def test_a_tracking_server_that_answers_as_mlflow_passes(monkeypatch, tiny_cfg):
    with http_server(TrackingServer) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        (found,) = [c for c in run_checks(tiny_cfg("log.mlflow=true")) if c.key == "MLFLOW_TRACKING_URI"]
    assert found.ok and found.line() == f"MLFLOW_TRACKING_URI: {uri} (answers as an MLflow tracking server)"


def test_an_mlflow_sqlite_store_in_a_read_only_folder_is_refused(monkeypatch, tiny_cfg, tmp_path, read_only, home):
    folder = read_only(tmp_path / "tracking")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")
    line = refused(tiny_cfg("log.mlflow=true"))
    assert line == f"MLFLOW_TRACKING_URI: {folder}/mlflow.db: its folder {folder}: not writable (permission denied)"
    assert list(folder.iterdir()) == [] and not home.exists()


def test_a_read_only_output_folder_is_refused(tiny_cfg, tmp_path, read_only, home):
    parent = read_only(tmp_path / "runs")
    line = refused(tiny_cfg(f"run.output_dir={parent}/outputs"))
    assert line == f"run.output_dir: {parent}/outputs: cannot be created in {parent}: not writable (permission denied)"
    assert list(parent.iterdir()) == []


def test_an_output_folder_under_a_file_is_refused(tiny_cfg, tmp_path):
    """What stops a write for root too: a regular file where a folder should be."""
    (tmp_path / "runs").write_text("not a folder\n")
    line = refused(tiny_cfg(f"run.output_dir={tmp_path}/runs/outputs"))
    assert line == f"run.output_dir: {tmp_path}/runs/outputs: cannot be created: {tmp_path}/runs is a file"
    assert (tmp_path / "runs").read_text() == "not a folder\n"


def test_a_full_disk_is_refused(monkeypatch, tiny_cfg, home):
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=20 * 2**20))
    line = refused(tiny_cfg())
    assert line == (
        f"run.output_dir (in $FEDLLM_FLWR_HOME): {home}/outputs: cannot be created in {home.parent}: "
        "no space (20 MB free; a run needs at least 100 MB)"
    )
    assert not home.exists()


def test_a_named_run_folder_that_holds_files_is_refused(tiny_cfg, home):
    (home / "outputs" / "job").mkdir(parents=True)
    (home / "outputs" / "job" / "config.yaml").write_text("{}\n")
    line = refused(tiny_cfg("run.name=job"))
    assert line == f"run.name: {home}/outputs/job: already exists and is not empty; choose another run.name"


def test_a_missing_data_file_is_refused(tiny_cfg, tmp_path, home):
    data = tmp_path / "notes.jsonl"
    line = refused(tiny_cfg("dataset=file", f"dataset.path={data}"))
    assert line == f"dataset.path: {data}: does not exist"
    assert not home.exists()


def test_a_missing_test_file_of_a_file_dataset_is_refused(tiny_cfg, tmp_path):
    data, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    line = refused(tiny_cfg("dataset=file", f"dataset.path={data}", f"dataset.test_path={test}"))
    assert line == f"dataset.test_path: {test}: does not exist"


def test_a_hub_dataset_is_not_a_local_file():
    cfg = load_cfg(["dataset=file", "dataset.path=openai/gsm8k"])
    assert cfg.dataset.local_files() == []


def test_a_resume_folder_without_a_checkpoint_is_refused(tiny_cfg, home):
    run = home / "outputs" / "stopped"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    line = refused(tiny_cfg(f"resume={run}"))
    assert line == f"resume: {run}: holds no checkpoint ({CHECKPOINT}): it stopped before its first round ended"
    assert [p.name for p in run.iterdir()] == ["config.yaml"]


def test_a_resume_folder_that_does_not_exist_is_refused(tiny_cfg, tmp_path):
    line = refused(tiny_cfg(f"resume={tmp_path}/gone"))
    assert line == f"resume: {tmp_path}/gone: does not exist"


def test_a_read_only_tensorboard_folder_of_a_resumed_run_is_refused(tiny_cfg, home, read_only):
    run = home / "outputs" / "stopped"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    (run / CHECKPOINT).write_bytes(b"")
    board = read_only(run / "tensorboard")
    line = refused(tiny_cfg(f"resume={run}", "log.tensorboard=true"))
    assert line == f"log.tensorboard: {board}: not writable (permission denied)"
    assert list(board.iterdir()) == []


@pytest.mark.parametrize("writer", ["model.name=smollm2-135m-instruct", "algorithm=fedot"])
def test_a_read_only_model_cache_is_refused_when_the_server_writes_there(
    writer, tiny_model_dir, tmp_path, read_only, home
):
    """A GGUF is converted into the cache; FedOT keeps its emulators there."""
    cache = read_only(tmp_path / "models")
    model = [] if writer.startswith("model.name") else [f"model.name={tiny_model_dir}"]
    line = refused(load_cfg([*model, writer, f"model.cache_dir={cache}"]))
    assert line == f"model.cache_dir: {cache}: not writable (permission denied)"
    assert list(cache.iterdir()) == [] and not home.exists()


def test_a_model_folder_needs_no_cache(tiny_cfg, tmp_path, read_only):
    cache = read_only(tmp_path / "models")
    assert all(c.key != "model.cache_dir" for c in run_checks(tiny_cfg(f"model.cache_dir={cache}")))


def test_every_check_passes_on_the_defaults_and_writes_nothing(tiny_cfg, home, tmp_path):
    data = tmp_path / "notes.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n' * 4)
    cfg = tiny_cfg("log.tensorboard=true", "log.mlflow=true", "dataset=file", f"dataset.path={data}")
    checks = run_checks(cfg)
    assert [c.key for c in checks] == [
        "run.output_dir (in $FEDLLM_FLWR_HOME)",
        "log.tensorboard",
        "log.mlflow",
        "dataset.path",
    ]
    assert all(c.ok for c in checks), [c.line() for c in checks]
    assert checks[2].line().startswith(f"log.mlflow: {home}/outputs/mlflow.db (its folder can be created, ")
    check_external(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.jsonl"]  # no home, no cache


def test_the_server_stops_at_the_line_before_it_uses_the_grid(monkeypatch, tiny_cfg, home):
    """run_server checks before anything: a grid that fails on first use is never touched."""
    from fedllm_flwr.server.run import run_server

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(UserError, match="^MLFLOW_TRACKING_URI: .*: connection refused"):
        run_server(object(), tiny_cfg("log.mlflow=true"))
    assert not home.exists()


def test_check_command_prints_an_ok_line_per_check_and_exits_0(tiny_model_dir, capsys, home):
    assert main(["check", f"model.name={tiny_model_dir}", "dataset.synthetic.train_per_task=10"]) == 0
    out = capsys.readouterr().out
    assert f"ok      run.output_dir (in $FEDLLM_FLWR_HOME): {home}/outputs (can be created, " in out
    assert "adapter: lora" in out
    assert not home.exists()


def test_check_command_exits_2_with_the_line_on_a_bad_value(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "notes.jsonl"
    args = ["check", f"model.name={tiny_model_dir}", "dataset=file", f"dataset.path={data}"]
    assert main(args) == 2
    captured = capsys.readouterr()
    line = f"dataset.path: {data}: does not exist"
    assert f"problem {line}" in captured.out.splitlines()
    assert captured.err == f"fedllm-flwr: error: {line}\n"
    assert "adapter:" not in captured.out  # the model is not loaded
