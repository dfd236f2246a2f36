"""Run `flwr run` against a private simulation SuperLink, and stop it by PID.

`flwr run .` on the default `local` connection starts a detached SuperLink on a
fixed port and leaves it running, shared by every later run on the machine.
Tests and benchmarks need the opposite: their own SuperLink on free loopback
ports, their own FLWR_HOME, their output in a file, and every process stopped
when they end. `LocalSimulation` provides that.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedllm_tools.processes import kill_with_arguments, stop_group, stop_ray, wait_for_port

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Otherwise each run would `uv sync` the app's dependencies into a new env.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes we start: ours, FLOWER_ENV, `extra`, a
    FLWR_HOME of their own, and this interpreter's bin folder first on PATH (a
    SuperLink starts `flower-superexec`, and that `flwr-simulation`, from PATH)."""
    env = {**os.environ, **FLOWER_ENV, **(extra or {}), "FLWR_HOME": str(flwr_home)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit for a script, so `with LocalSimulation(...)` unwinds
    and stops its SuperLink and Ray as it does on Ctrl-C."""

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


class LocalSimulation:
    """A simulation SuperLink on 127.0.0.1, owned by this object.

    with LocalSimulation(workdir) as sim:
        result = sim.run(app_dir, overrides="num_rounds=2", num_supernodes=2)
    """

    def __init__(self, workdir: Path, env: dict[str, str] | None = None, client_cpus: int = 1) -> None:
        self.workdir = Path(workdir)
        #: Whole CPUs each simulated client claims unless a run says otherwise: Flower starts
        #: as many ClientApp workers as the Ray cluster's CPUs divided by this.
        self.client_cpus = client_cpus
        self.flwr_home = self.workdir / "flwr-home"
        # Ray's socket paths must stay short: keep its temp dir near /tmp.
        self.ray_tmp = Path(os.environ.get("FEDLLM_RAY_TMP", "/tmp")) / f"ray-{os.getpid()}-{_free_port()}"
        self.env = flower_env(self.flwr_home, env)
        self.env["RAY_TMPDIR"] = str(self.ray_tmp)
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.log_path = self.workdir / "superlink.log"

    def start(self) -> LocalSimulation:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.ray_tmp.mkdir(parents=True, exist_ok=True)
        port = self.port = _free_port()  # Flower 1.42 serves every SuperLink API on one HTTP port
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        command = [
            _bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(port),
            "--database", str(self.workdir / "state.db"),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            # A new session, so stop() can end the SuperLink and everything it spawned.
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_for_port(port, self.process, self.log_path)
        except BaseException:  # also SIGTERM (stop_on_sigterm) or Ctrl-C while it starts
            self.stop()
            raise
        return self

    def flwr(self, *args: str, timeout: float = 600, log_name: str = "flwr.log") -> subprocess.CompletedProcess:
        """Run a `flwr` CLI command against this SuperLink; output goes to a file too."""
        return run_flwr(args, self.env, self.workdir / log_name, timeout)

    def run(
        self,
        app_dir: Path,
        overrides: str = "",
        num_supernodes: int = 2,
        timeout: float = 600,
        cpus: int | None = None,
    ) -> subprocess.CompletedProcess:
        """`flwr run APP --stream` with Hydra overrides and N simulated SuperNodes
        (APP staged once into the work dir: see `stage_app`)."""
        resources = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus or self.client_cpus}"
        args = ["run", str(self.staged(app_dir)), "--stream", "--federation-config", resources]
        if overrides:
            args += ["--run-config", f"overrides={_toml_string(overrides)}"]
        return self.flwr(*args, timeout=timeout, log_name="flwr-run.log")

    def run_once(
        self, app_dir: Path, runs: Path, name: str, overrides: list[str], num_supernodes: int, timeout: float
    ) -> Path:
        """A benchmark's job: `run` with `run.name=name` under `runs`, unless that run
        folder already holds a summary (a benchmark resumes); a folder without one (an
        interrupted job) is removed and run again. RuntimeError with the output's tail
        if the run fails. Returns the run folder."""
        folder = runs / name
        if (folder / "summary.json").is_file():
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        print(f"[benchmark] {name}: flwr run . {' '.join(overrides)}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        every = [*overrides, f"run.output_dir={runs}", f"run.name={name}"]
        result = self.run(app_dir, " ".join(every), num_supernodes=num_supernodes, timeout=timeout)
        if result.returncode != 0 or not (folder / "summary.json").is_file():
            raise RuntimeError(f"{name} failed:\n{result.stdout[-3000:]}")
        print(f"[benchmark] {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        return folder

    def staged(self, app_dir: Path) -> Path:
        """The staged copy of `app_dir` this harness runs (made on first use)."""
        return staged_copy(app_dir, self.workdir)

    def stop(self) -> None:
        """Stop the SuperLink and its children (simulation, Ray) by process group."""
        if self.process is None:
            return
        pgid = self.process.pid  # leader of its own session and process group
        stop_group(self.process, signal.SIGTERM)
        self.process = None
        # SuperExec and Ray's daemons start their own sessions: when a run was still
        # going, find them by what ties them to this SuperLink and stop them too.
        # A run whose server was interrupted leaves its flwr-simulation behind too.
        for words in (("--parent-pid", str(pgid)), ("--runtime-api-address", f"127.0.0.1:{self.port}")):
            kill_with_arguments(*words)
        stop_ray(self.ray_tmp)

    def __enter__(self) -> LocalSimulation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalRay:
    """A Ray head on 127.0.0.1 that several simulations share, owned by this object.

    A simulation SuperLink whose environment names it in RAY_ADDRESS runs its
    ClientApp actors there instead of starting (and stopping) a Ray instance of
    its own for every run.

    with LocalRay() as ray, LocalSimulation(workdir, env={"RAY_ADDRESS": ray.address}) as sim:
        ...
    """

    def __init__(self, num_cpus: int | None = None) -> None:
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.port = 0
        self.temp_dir: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> LocalRay:
        import tempfile

        self.port = _free_port()
        # Ray's socket paths must stay short: its temp dir goes straight under /tmp.
        # Named after this process, as LocalSimulation's, so a process's Ray files are found by its pid.
        tmp_root = os.environ.get("FEDLLM_RAY_TMP", "/tmp")
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"ray-{os.getpid()}-head-", dir=tmp_root))
        command = [
            _bin("ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
            f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}", "--include-dashboard=false",
            "--disable-usage-stats",
        ]  # fmt: skip
        # Ray's own defaults for these are fixed numbers (10001, 8265, 52365, ...): two heads
        # on one machine (tests on several workers) would collide.
        for option in ("ray-client-server-port", "dashboard-port", "dashboard-agent-listen-port",
                       "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"):  # fmt: skip
            command.append(f"--{option}={_free_port()}")
        try:
            started = subprocess.run(
                command, env={**os.environ, **FLOWER_ENV}, capture_output=True, text=True, timeout=120, check=False,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            if started.returncode != 0:
                raise RuntimeError(f"ray start --head failed: {started.stderr[-2000:]}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process of this head, by the files they hold in its temp dir."""
        if self.temp_dir is not None:
            stop_ray(self.temp_dir)
            self.temp_dir = None

    def __enter__(self) -> LocalRay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_flwr(args, env: dict[str, str], log_path: Path, timeout: float) -> subprocess.CompletedProcess:
    """A `flwr` CLI command with its output in `log_path`, returned as stdout."""
    with open(log_path, "wb") as handle:
        proc = subprocess.run(
            [_bin("flwr"), *args], env=env, stdout=handle, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, timeout=timeout, check=False,
        )  # fmt: skip
    return subprocess.CompletedProcess(proc.args, proc.returncode, log_path.read_text(errors="replace"), "")


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy into `dest` the files of `app_dir` that `flwr run` could package; returns `dest`.

    Flower's FAB builder lists every file under the app folder before it filters
    them, a virtual environment inside it included (over 50,000 files for this
    repository's .venv: ~3.5 s of CPU at every `flwr run`). The staged copy skips
    the folders Flower's own exclude patterns or the app's .gitignore leave out,
    and keeps only the kinds of file Flower packages, so the FAB built from it is
    the same, byte for byte (tests/test_simulation.py), and builds in a fraction
    of a second. Copied once: a harness stages the app when it first runs it.
    """
    import pathspec
    from flwr.common.constant import FAB_EXCLUDE_PATTERNS, FAB_INCLUDE_PATTERNS

    app_dir = Path(app_dir).resolve()
    ignore = app_dir / ".gitignore"
    lines = [*FAB_EXCLUDE_PATTERNS, ".git/", *(ignore.read_text().splitlines() if ignore.is_file() else [])]
    excluded = pathspec.GitIgnoreSpec.from_lines(lines)
    packaged = pathspec.GitIgnoreSpec.from_lines(FAB_INCLUDE_PATTERNS)
    shutil.rmtree(dest, ignore_errors=True)
    for folder, subfolders, files in os.walk(app_dir):
        rel = Path(folder).relative_to(app_dir)
        # A folder goes when its pattern names it ("build/") or everything in it ("build/**").
        subfolders[:] = [
            d for d in subfolders
            if not (excluded.match_file(f"{(rel / d).as_posix()}/") or excluded.match_file((rel / d / "-").as_posix()))
        ]  # fmt: skip
        for name in files:
            source, target = Path(folder) / name, dest / rel / name
            if source.is_symlink() or not (packaged.match_file((rel / name).as_posix()) or name == ".gitignore"):
                continue  # Flower skips links too
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


_STAGED: dict[tuple[Path, Path], Path] = {}


def staged_copy(app_dir: Path, workdir: Path) -> Path:
    """`stage_app(app_dir)` into a folder of `workdir`, once per process."""
    key = (Path(app_dir).resolve(), Path(workdir).resolve())
    if key not in _STAGED or not _STAGED[key].is_dir():
        _STAGED[key] = stage_app(app_dir, Path(workdir) / f"app-{len(_STAGED)}")
    return _STAGED[key]


def _toml_string(text: str) -> str:
    """A TOML basic string for `--run-config key=value`."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
