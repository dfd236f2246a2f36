"""What a run is told to use outside its own process, checked before it starts.

The run folder's parent (or the folder `resume` names), the TensorBoard folder, the
MLflow tracking store, the model cache a GGUF is converted into and the local data
files: each is checked before the run folder is created or a message is sent, and a
problem is one line naming the key or variable, the address or path, and the cause:

    MLFLOW_TRACKING_URI: http://127.0.0.1:5000: connection refused (is the tracking server running?)
    run.output_dir: /srv/runs: not writable (permission denied)

`check_external` raises the first problem as a UserError (run_server);
`fedllm-flwr check` prints every check, one line each. Nothing is written: a folder
is probed with an unnamed temporary file in it (O_TMPFILE), closed at once, and a
folder that does not exist yet is judged by its nearest existing parent.

Light at import (no torch): the CLI and a sweep's driver can check a config without
the ML stack.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import shutil
import socket
import ssl
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fedllm_flwr.algorithms.registry import algorithm_for
from fedllm_flwr.config import Config
from fedllm_flwr.errors import UserError
from fedllm_flwr.model_files import ALIASES, model_cache_dir
from fedllm_flwr.run_dir import CHECKPOINT, resolve_run_path
from fedllm_flwr.tracking import mlflow_store

#: Free space a folder a run writes into must have. A round adds one adapter to the run
#: folder (LoRA r=8 on SmolLM2-135M: 460,800 fp32 values, 1.8 MB) and replaces the
#: checkpoint (the same again plus the strategy's state); 100 MB holds dozens of rounds,
#: so a disk this full fails a run at start rather than mid-way. It is a floor, not an
#: estimate: a full model (`zo.params=full`, FedOT) or a conversion needs more.
MIN_FREE_MB = 100
#: Seconds a service has to answer (connect, then reply): long enough for a server
#: across sites, short enough that a run told a wrong address stops at once.
TIMEOUT_S = 5.0
#: A read-only MLflow REST call that any tracking server answers with JSON.
MLFLOW_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"
#: Database stores MLflow takes in MLFLOW_TRACKING_URI, by their default port.
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


@dataclass(frozen=True)
class Check:
    """One thing a run uses: the key or variable naming it, its address or path, and
    either the problem found (`problem`) or what was found (`detail`)."""

    key: str
    target: str
    problem: str = ""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem

    def line(self) -> str:
        if self.problem:
            return f"{self.key}: {self.target}: {self.problem}"
        return f"{self.key}: {self.target} ({self.detail})"


def run_checks(cfg: Config) -> list[Check]:
    """Every check that applies to `cfg`, in the order a run meets what it checks."""
    run_path = Path(cfg.resume).expanduser() if cfg.resume else resolve_run_path(cfg)
    found = [_resume_folder(run_path) if cfg.resume else _output_dir(cfg, run_path)]
    if cfg.log.tensorboard:
        shown = run_path if cfg.resume or cfg.run.name else run_path.with_name("<run>")
        found.append(_folder("log.tensorboard", run_path / "tensorboard", shown / "tensorboard"))
    if cfg.log.mlflow:
        found.append(_mlflow(cfg, run_path))
    if _uses_model_cache(cfg):
        found.append(_model_cache(cfg))
    found += [_data_file(key, path) for key, path in cfg.dataset.local_files()]
    return found


def check_external(cfg: Config) -> None:
    """Raise the first problem `run_checks` finds as a one-line UserError."""
    for check in run_checks(cfg):
        if not check.ok:
            raise UserError(check.line())


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MB"


def _write_error(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "not writable (permission denied)"
    if exc.errno == errno.EROFS:
        return "not writable (a read-only file system)"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space (the disk or the quota is full)"
    return f"not writable ({exc.strerror or type(exc).__name__})"


def _writable(folder: Path) -> tuple[str, str]:
    """(problem, detail) for writing into `folder`; one that does not exist yet must be
    creatable in its nearest existing parent. Leaves nothing behind."""
    folder = folder.absolute()
    existing = folder
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as exc:  # a parent that may not be searched
        return f"cannot be reached ({exc.strerror})", ""
    where = "" if existing == folder else f"cannot be created in {existing}: "
    if not existing.is_dir():
        return ("is a file, not a folder" if existing == folder else f"cannot be created: {existing} is a file"), ""
    if not os.access(existing, os.W_OK | os.X_OK):
        return where + "not writable (permission denied)", ""
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return where + _write_error(exc), ""
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_MB * 2**20:
        return f"{where}no space ({_size(free)} free; a run needs at least {MIN_FREE_MB} MB)", ""
    return "", f"{'writable' if existing == folder else 'can be created'}, {_size(free)} free"


def _folder(key: str, folder: Path, shown: Path | None = None) -> Check:
    problem, detail = _writable(folder)
    return Check(key, str(shown or folder), problem, detail)


def _output_dir(cfg: Config, run_path: Path) -> Check:
    with contextlib.suppress(OSError):  # a parent that may not be searched: _writable says so
        if cfg.run.name and run_path.is_dir() and any(run_path.iterdir()):
            return Check("run.name", str(run_path), "already exists and is not empty; choose another run.name")
    relative = not Path(cfg.run.output_dir).expanduser().is_absolute()
    return _folder("run.output_dir (in $FEDLLM_FLWR_HOME)" if relative else "run.output_dir", run_path.parent)


def _resume_folder(path: Path) -> Check:
    try:
        if not path.is_dir():
            return Check("resume", str(path), "is a file, not a run folder" if path.exists() else "does not exist")
        if not (path / "config.yaml").is_file():
            return Check("resume", str(path), "not a run folder (no config.yaml)")
        if not (path / CHECKPOINT).is_file():
            why = "it stopped before its first round ended"
            return Check("resume", str(path), f"holds no checkpoint ({CHECKPOINT}): {why}")
    except OSError as exc:
        return Check("resume", str(path), f"cannot be reached ({exc.strerror})")
    return _folder("resume", path)


def _uses_model_cache(cfg: Config) -> bool:
    """Whether the server writes into the model cache: it converts a GGUF (an offline
    alias or a .gguf file) there, and some algorithms keep files there (FedOT's emulators)."""
    name = cfg.model.name.strip()
    converted = name.lower() in ALIASES or name.endswith(".gguf")
    return converted or algorithm_for(cfg).server_writes_model_cache


def _model_cache(cfg: Config) -> Check:
    key = "model.cache_dir" if cfg.model.cache_dir or not os.environ.get("FEDLLM_FLWR_CACHE") else "FEDLLM_FLWR_CACHE"
    return _folder(key, model_cache_dir(cfg.model))


def _data_file(key: str, path: Path) -> Check:
    try:
        if not path.exists():
            hint = "" if path.is_absolute() else f" (relative to {Path.cwd()}: give an absolute path)"
            return Check(key, str(path), f"does not exist{hint}")
        if not path.is_file():
            return Check(key, str(path), "is a folder, not a data file" if path.is_dir() else "not a regular file")
        size = path.stat().st_size
    except OSError as exc:
        return Check(key, str(path), f"cannot be reached ({exc.strerror})")
    if not os.access(path, os.R_OK):
        return Check(key, str(path), "not readable (permission denied)")
    return Check(key, str(path), detail=f"readable, {_size(size)}")


def _shown_uri(uri: str) -> str:
    """`uri` with a password in it masked."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def _mlflow(cfg: Config, run_path: Path) -> Check:
    uri, artifacts = mlflow_store(cfg, run_path)
    if artifacts is not None:  # the local store beside the run folders
        return _sqlite("log.mlflow", uri)
    key, parts = "MLFLOW_TRACKING_URI", urlsplit(uri)
    scheme = parts.scheme.lower().split("+")[0]
    if scheme in ("http", "https"):
        problem = _mlflow_http(uri)
        return Check(key, _shown_uri(uri), problem, "" if problem else "answers as an MLflow tracking server")
    if scheme == "sqlite":
        return _sqlite(key, uri)
    if scheme in ("", "file"):  # MLflow's folder store
        return _folder(key, Path(unquote(parts.path) if scheme else uri).expanduser())
    port = parts.port or DB_PORTS.get(scheme)
    if parts.hostname and port:
        problem = _connect(parts.hostname, port)
        return Check(key, _shown_uri(uri), problem, "" if problem else f"{parts.hostname}:{port} accepts connections")
    return Check(key, _shown_uri(uri), detail=f"not checked: a {scheme} store")


def _sqlite(key: str, uri: str) -> Check:
    """An SQLite store: its file (SQLAlchemy's form: sqlite:///relative.db,
    sqlite:////absolute.db, sqlite:// in memory) must be writable, or creatable."""
    rest = uri.split("://", 1)[1].split("?", 1)[0]
    path = rest[1:] if rest.startswith("/") else rest
    if path in ("", ":memory:"):
        return Check(key, uri, detail="in memory")
    db = Path(unquote(path)).expanduser().absolute()
    if db.exists():
        writable = os.access(db, os.R_OK | os.W_OK)
        return Check(key, str(db), "" if writable else "not writable (permission denied)", "writable")
    problem, detail = _writable(db.parent)
    return Check(key, str(db), f"its folder {db.parent}: {problem}" if problem else "", f"its folder {detail}")


def _connect(host: str, port: int) -> str:
    """The problem reaching host:port over TCP, or ''."""
    try:
        socket.create_connection((host, port), timeout=TIMEOUT_S).close()
    except ConnectionRefusedError:
        return "connection refused (is the server running?)"
    except TimeoutError:
        return f"timed out after {TIMEOUT_S:g} s"
    except socket.gaierror:
        return f"host {host} not found"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return ""


def _mlflow_request(uri: str) -> tuple[urllib.request.Request, ssl.SSLContext | None]:
    """The probe as MLflow's client would send it: its credentials and TLS settings."""
    headers = {}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    context = None
    if uri.lower().startswith("https"):
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            context = ssl._create_unverified_context()  # noqa: S323 - what the user asked MLflow for
        else:
            context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
    return urllib.request.Request(uri.rstrip("/") + MLFLOW_PROBE, headers=headers), context


def _mlflow_http(uri: str) -> str:
    """The problem with `uri` as an MLflow tracking server, or ''."""
    request, context = _mlflow_request(uri)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context) as reply:
            status, body = reply.status, reply.read(1 << 16)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(1 << 16)
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused (is the tracking server running?)"
        if isinstance(reason, TimeoutError):
            return f"timed out after {TIMEOUT_S:g} s"
        if isinstance(reason, socket.gaierror):
            return f"host {urlsplit(uri).hostname} not found"
        if isinstance(reason, ssl.SSLError):
            return f"TLS failed ({reason.reason or reason})"
        return str(getattr(reason, "strerror", None) or reason)
    except TimeoutError:
        return f"timed out after {TIMEOUT_S:g} s (connected, no answer)"
    except (OSError, ValueError) as exc:  # a reset connection, a reply that is not HTTP
        return f"no HTTP answer ({exc})"
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if status == 200 and isinstance(answer, dict) and set(answer) <= {"experiments", "next_page_token"}:
        return ""
    if status in (401, 403):
        needed = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"
        return f"refused the credentials (HTTP {status}): set {needed}"
    if isinstance(answer, dict) and "error_code" in answer:
        message = str(answer.get("message", "")).splitlines()[0] if answer.get("message") else ""
        return f"MLflow answered {answer['error_code']} (HTTP {status}): {message}".rstrip(": ")
    return f"answers, but not as an MLflow tracking server (HTTP {status} for GET {MLFLOW_PROBE.split('?')[0]})"
