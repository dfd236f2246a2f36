"""Where a site worker's files live, and the key that names a worker.

A worker may serve a message only if it runs the same code, in the same environment,
for the same site and handler as the ClientApp that asks: all of that goes into the
worker's key, and the key names its socket. What can change under the same key (the
model files, the site's data file) the worker checks on each message (`server`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

#: Bumped whenever the frames or the handshake change: old workers are then never asked.
PROTOCOL = 1
#: The node's handler, run by the worker as `module:function`.
DEFAULT_HANDLER = "fedllm_flwr.node:handle"
#: What a FAB ships (pyproject.toml's `fab-include`): the code a worker must share with its proxy.
FAB_FILES = ("server_app.py", "client_app.py", "fedllm_flwr/**/*.py", "conf/**/*.yaml")
#: Environment variables that change what a node computes or where it reads and writes.
ENV_PREFIXES = ("FEDLLM_", "HF_", "TRANSFORMERS_", "CUDA_", "OMP_", "MKL_", "PYTORCH_", "TORCH_", "MLFLOW_")
#: ... except the site worker's own settings, which do not change a reply.
ENV_OWN = "FEDLLM_SITE_WORKER"
#: The longest path a Unix socket may have (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107


class UnsafeDir(Exception):
    """The worker directory is not a private directory of this user."""


def app_root() -> Path:
    """The folder that holds `client_app.py` and `fedllm_flwr/`: a FAB's install or a checkout."""
    return Path(__file__).resolve().parents[2]


def worker_dir() -> Path:
    """`$FEDLLM_SITE_WORKER_DIR`, else `$XDG_RUNTIME_DIR/fedllm-flwr`, else
    `/tmp/fedllm-flwr-<uid>`; created 0700. UnsafeDir when it is not a real directory
    owned by this user that no one else may enter (another user could then replace a
    socket or read a secret)."""
    uid = os.getuid()
    if os.environ.get("FEDLLM_SITE_WORKER_DIR"):
        path = Path(os.environ["FEDLLM_SITE_WORKER_DIR"])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "fedllm-flwr"
    else:
        path = Path(f"/tmp/fedllm-flwr-{uid}")
    if len(str(path)) + 27 > MAX_SOCKET_PATH:  # "/" + 20 hex digits + ".sock" + spare
        path = Path(f"/tmp/fedllm-flwr-{uid}")
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDir(f"{path} is not a directory")
    if info.st_uid != uid:
        raise UnsafeDir(f"{path} belongs to uid {info.st_uid}, not {uid}")
    if info.st_mode & 0o077:
        raise UnsafeDir(f"{path} has mode {stat.S_IMODE(info.st_mode):o}; others may enter it (want 700)")
    return path


def code_hash(root: Path | None = None) -> str:
    """sha256 over the relative path and bytes of every file a FAB ships (~90 files, ~1 MB:
    a few ms): a worker started from other code never serves this one."""
    root = root or app_root()
    digest = hashlib.sha256()
    files = sorted({p for pattern in FAB_FILES for p in root.glob(pattern) if p.is_file()})
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def env_fingerprint() -> str:
    """sha256 of the environment variables a node reads (ENV_PREFIXES), the interpreter
    (a run's own venv gets its own worker) and Flower's version."""
    import flwr

    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES) and not k.startswith(ENV_OWN)}
    parts = {"env": sorted(env.items()), "python": os.path.realpath(sys.executable), "flwr": flwr.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def argv_value(flag: str, argv: list[str] | None = None) -> str | None:
    """The value after `flag` (or in `flag=value`) in `argv` (default: this process's)."""
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def site_address(argv: list[str] | None = None) -> str:
    """The SuperNode's Runtime API address from a flwr-clientapp's argv: which site this
    is. "local" outside a deployed ClientApp (tests, explicit starts without it)."""
    return argv_value("--runtime-api-address", argv) or "local"


def process_identity(pid: int) -> tuple[int, float] | None:
    """(pid, create_time) of a live process, or None: with the create time, a pid that
    the system gave to another process later is not taken for the first."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return pid, proc.create_time()
    except (psutil.Error, ValueError):
        return None


def site_owner(argv: list[str] | None = None) -> tuple[int, float] | None:
    """The process a worker serves and must not outlive: the SuperNode. flwr-clientapp's
    `--parent-pid` is its SuperExec, whose own `--parent-pid` (subprocess isolation) is
    the SuperNode; else (process isolation) the SuperExec itself; None outside Flower."""
    superexec = argv_value("--parent-pid", argv)
    if superexec is None or not superexec.isdigit():
        return None
    try:
        supernode = argv_value("--parent-pid", psutil.Process(int(superexec)).cmdline())
    except psutil.Error:
        supernode = None
    if supernode is not None and supernode.isdigit() and (owner := process_identity(int(supernode))):
        return owner
    return process_identity(int(superexec))


@dataclass(frozen=True)
class WorkerKey:
    """What a worker was started for; `name` (20 hex digits of its sha256) names its files."""

    site: str
    code: str
    env: str
    handler: str
    uid: int
    protocol: int = PROTOCOL

    @classmethod
    def current(cls, handler: str = DEFAULT_HANDLER, site: str | None = None) -> WorkerKey:
        return cls(site or site_address(), code_hash(), env_fingerprint(), handler, os.getuid())

    def parts(self) -> dict:
        return {"site": self.site, "code": self.code, "env": self.env, "handler": self.handler,
                "uid": self.uid, "protocol": self.protocol}  # fmt: skip

    @property
    def name(self) -> str:
        return hashlib.sha256(json.dumps(self.parts(), sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class WorkerFiles:
    """A worker's files in the worker directory (`<name>.<suffix>`):
    sock: its Unix socket (0600); key: its 32-byte secret (0600);
    lock: held by the worker for its whole life (the kernel drops it when it dies);
    use: held by one proxy for connect-or-spawn and its request;
    json: its pid, owner, key parts and counts; log: its log."""

    dir: Path
    name: str

    @property
    def sock(self) -> Path:
        return self.dir / f"{self.name}.sock"

    @property
    def key(self) -> Path:
        return self.dir / f"{self.name}.key"

    @property
    def lock(self) -> Path:
        return self.dir / f"{self.name}.lock"

    @property
    def use(self) -> Path:
        return self.dir / f"{self.name}.use"

    @property
    def json(self) -> Path:
        return self.dir / f"{self.name}.json"

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}.log"

    def status(self) -> dict | None:
        """The worker's json, or None when it has none (yet)."""
        try:
            return json.loads(self.json.read_text())
        except (OSError, ValueError):
            return None

    def write_status(self, status: dict) -> None:
        """Replace the json at once (0600), so a reader never sees half of it."""
        tmp = self.dir / f".{self.name}.json.{os.getpid()}"
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(status, f)
        os.replace(tmp, self.json)
