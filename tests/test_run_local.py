"""scripts/run_local.sh stops the SuperLink its own `flwr run` started, and no other."""

import os
import signal
import subprocess
import time

from conftest import ROOT

# A stand-in for `flwr run`: like Flower, it starts "its" local SuperLink detached with a
# copy of its environment; meanwhile another run starts a SuperLink of its own.
FAKE_FLWR = """#!/usr/bin/env bash
setsid bash -c 'exec -a "flower-superlink --insecure --simulation --port 1" sleep 300' </dev/null >/dev/null 2>&1 &
echo $! > {out}/ours.pid
env -u FEDLLM_FLWR_RUN_LOCAL setsid bash -c 'exec -a "flower-superlink --insecure --simulation --port 2" sleep 300' \\
  </dev/null >/dev/null 2>&1 &
echo $! > {out}/other.pid
sleep 0.5
echo "[fedllm-flwr] done in 0.5 s"
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_run_local_stops_only_the_superlink_it_started(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "flwr").write_text(FAKE_FLWR.format(out=tmp_path))
    (bin_dir / "flwr").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    pids = []
    try:
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "run_local.sh")], env=env, capture_output=True, text=True, timeout=120
        )
        pids = [int((tmp_path / f"{who}.pid").read_text()) for who in ("ours", "other")]
        assert result.returncode == 0, result.stdout + result.stderr
        ours, other = pids
        deadline = time.monotonic() + 10
        while alive(ours) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(ours), "the SuperLink this run started is still running"
        assert alive(other), "a SuperLink another run started was stopped"
        assert f"Stopped the local SuperLink this run started (PID {ours})" in result.stdout
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
