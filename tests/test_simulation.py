"""The harness that runs `flwr run` for sweeps, tests and benchmarks: the app it stages."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedllm_tools.processes import pids_using
from fedllm_tools.simulation import LocalRay, stage_app

ROOT = Path(__file__).resolve().parents[1]


def test_the_staged_repository_packs_into_the_same_fab(tmp_path):
    staged = stage_app(ROOT, tmp_path / "app")
    fab = build_fab_from_disk(staged)
    assert fab == build_fab_from_disk(ROOT)
    # The apps, the package and its configs travel; results, docs, scripts and tests do not.
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert {n.split("/")[0] for n in names} == {"server_app.py", "client_app.py", "pyproject.toml", "fedllm_flwr",
                                                "conf", ".info"}  # fmt: skip
    assert "conf/config.yaml" in names and "fedllm_flwr/node.py" in names
    # The tooling (this harness among it) stays here: sites receive the apps and the core only.
    assert [n for n in names if n.startswith("fedllm_tools/") or n.endswith(("/simulation.py", "/cli.py"))] == []
    assert not (staged / ".venv").exists() and not (staged / ".git").exists()
    assert (staged / "fedllm_flwr" / "server" / "run.py").is_file() and (staged / "pyproject.toml").is_file()


def test_staging_skips_what_flower_leaves_out_and_nothing_it_packs(tmp_path):
    app = tmp_path / "app"
    files = {
        # Flower's own filters only: no fab-include (whose patterns must match files here).
        "pyproject.toml": re.sub(r"\nfab-include = .*", "", (ROOT / "pyproject.toml").read_text()),
        ".gitignore": "outputs/\n*.log\nsecret.json\n",
        "pkg/mod.py": "x = 1\n",
        "pkg/conf/a.yaml": "a: 1\n",
        "pkg/data.json": "{}\n",
        "pkg/weights.bin": "not packaged",
        "pkg/test_mod.py": "excluded by Flower's own patterns\n",
        "secret.json": "{}\n",
        "run.log": "ignored\n",
        "outputs/result.json": "{}\n",
        ".venv/lib/site.py": "y = 2\n",
        "build/lib/x.py": "z = 3\n",
        "docs/README.md": "# docs\n",
    }
    for name, text in files.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    os.symlink(app / "pkg" / "mod.py", app / "pkg" / "link.py")
    staged = stage_app(app, tmp_path / "staged")
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)
    kept = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert kept == [".gitignore", "docs/README.md", "pkg/conf/a.yaml", "pkg/data.json", "pkg/mod.py",
                    "pkg/test_mod.py", "pyproject.toml", "secret.json"]  # fmt: skip


@pytest.mark.slow
def test_a_ray_head_on_loopback_stops_every_process_by_its_files_and_leaves_no_folder():
    with LocalRay(num_cpus=1) as ray:
        head = ray.temp_dir
        assert ray.address.startswith("127.0.0.1:") and pids_using(head)  # raylet, GCS, agents
    assert not head.exists() and not pids_using(head)


def _wait_until_its_arguments_show(proc: subprocess.Popen, timeout: float = 30) -> None:
    """/proc/PID/cmdline reads empty until the kernel has laid out the new program's
    arguments, which can come after Popen has returned on a loaded machine."""
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    if not cmdline.parent.is_dir():
        return
    deadline = time.monotonic() + timeout
    while cmdline.read_bytes().split(b"\0")[-2:-1] != [proc.args[-1].encode()]:
        assert time.monotonic() < deadline, f"{proc.args} never showed its arguments"
        time.sleep(0.01)


def test_stopping_a_superlink_never_kills_a_process_whose_pid_argument_only_begins_like_its_own():
    """Pids wrap around at pid_max: a SuperLink with pid 123 stopping must leave another
    run's `flwr-simulation --parent-pid 1234` alone, and still stop its own."""
    from fedllm_tools.processes import kill_with_arguments

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", "--parent-pid"]
    other, own = (subprocess.Popen([*sleeper, pid]) for pid in ("999123", "99912"))
    try:
        for proc in (other, own):  # Popen returns before exec has set a process's arguments
            _wait_until_its_arguments_show(proc)
        kill_with_arguments("--parent-pid", "99912")
        assert own.wait(timeout=10) is not None
        assert other.poll() is None, "a process of another run was stopped"
    finally:
        for proc in (other, own):
            proc.kill()
            proc.wait()
