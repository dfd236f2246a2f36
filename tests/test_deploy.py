"""Deployment runtime on loopback: TLS, SuperNode authentication, per-site data."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, TINY_OVERRIDES
from safetensors.torch import load_file

from fedllm_flwr.config import load_cfg
from fedllm_flwr.data.synthetic import generate
from fedllm_flwr.errors import UserError
from fedllm_flwr.metrics import read_metrics
from fedllm_tools.deploy import LocalDeployment, make_credentials

pytestmark = pytest.mark.slow


def write_site(path, task, n, seed):
    path.write_text("".join(json.dumps(r) + "\n" for r in generate([task], n, seed=seed)))
    return path


def test_credentials_are_complete_private_and_kept(tmp_path):
    creds = make_credentials(tmp_path / "c", 2)
    for path in (creds.folder / "ca.key", creds.server_key, creds.node_key(0), creds.node_key(1)):
        assert path.stat().st_mode & 0o077 == 0, path  # secrets readable by the owner only
    assert creds.node_public_key(1).read_text().startswith("ecdsa-sha2-nistp384 ")
    before = creds.node_key(0).read_bytes()
    make_credentials(tmp_path / "c", 3)  # adding a node keeps the others' keys
    assert creds.node_key(0).read_bytes() == before and creds.node_key(2).is_file()


def test_sites_need_a_server_test_file():
    with pytest.raises(UserError, match="dataset.test_path"):
        load_cfg(["dataset.source=sites"])


def node_env(tmp_path, site_workers: Path, mode: str = "auto"):
    """The deployment's environment: its own model cache, one torch thread per process (the
    nodes share the machine's cores: with a thread per core each, they would spin-wait for
    one another), and its own site-worker folder; `mode` is FEDLLM_SITE_WORKER (auto: each
    SuperNode's messages run in its warm worker; off: in the ClientApp's fresh process)."""
    return {"FEDLLM_FLWR_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
            "FEDLLM_SITE_WORKER": mode, "FEDLLM_SITE_WORKER_DIR": str(site_workers)}  # fmt: skip


@pytest.fixture
def site_workers():
    """A short private folder for site workers (a socket's path is at most 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="sw"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def live_workers(folder: Path) -> list[dict]:
    """The status of each site worker in `folder` whose process runs."""
    from fedllm_flwr.site_worker.paths import WorkerFiles, process_identity

    found = [WorkerFiles(folder, f.stem).status() for f in folder.glob("*.json")]
    return [s for s in found if s and process_identity(s["pid"]) == (s["pid"], s["create_time"])]


def test_authenticated_sites_federate_adapters_and_seed_lists_an_unknown_node_is_refused(
    tiny_model_dir, tmp_path, site_workers
):
    """Two registered sites, each training on its own file, federate an adapter under SecAgg+
    and then seed lists (zeroth-order); a third node whose key was never registered is
    refused meanwhile. Each site's messages run in its warm site worker, which ends with
    its SuperNode. Plain FedAvg over TLS and node authentication, with a fresh ClientApp
    process doing each message's work, is the killed-node test's run."""
    sites = [
        write_site(tmp_path / "site_a.jsonl", "add", 30, 1),
        write_site(tmp_path / "site_b.jsonl", "reverse", 50, 2),
    ]
    server_test = write_site(tmp_path / "server_test.jsonl", "add", 8, 3)
    creds = make_credentials(tmp_path / "creds", 3)
    out = tmp_path / "runs"
    with LocalDeployment(tmp_path / "fed", creds, env=node_env(tmp_path, site_workers)) as dep:
        dep.register(0)
        dep.register(1)
        for i, site in enumerate(sites):
            dep.start_node(i, {"data-path": str(site)})
        intruder = dep.start_node(2, {"data-path": str(sites[0])})  # its key was never registered

        overrides = " ".join(
            [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "dataset.source=sites",
             f"dataset.test_path={server_test}", "strategy.fraction_evaluate=0", f"run.output_dir={out}"]
        )  # fmt: skip
        # SecAgg+ over the sites: each protocol stage is a message to every site.
        result = dep.run(ROOT, f"{overrides} run.name=s privacy=secagg num_rounds=1", timeout=400)
        assert "[fedllm-flwr] done in" in result.stdout, result.stdout[-3000:]
        # Refused while the run went on, and never counted in it (2 clients a round, below).
        assert intruder.process.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in intruder.log_path.read_text()
        assert "No SuperNode found with the given public key" in (dep.workdir / "superlink.log").read_text()
        # Zeroth-order on the adapter, seed lists only: each message is a fresh ClientApp
        # process, so a node's adapter lives in its context state; round 1's steps reach
        # it with round 2's training message (no evaluation messages here).
        result = dep.run(ROOT, f"{overrides} run.name=z algorithm=zo num_rounds=2", timeout=400)
        assert "[fedllm-flwr] done in" in result.stdout, result.stdout[-3000:]
        listing = dep.flwr("ls", "--format", "json", log_name="ls.log").stdout
        runs = json.loads(listing[listing.index("{") :])["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"] * 2
        # One warm worker per site served both runs (the same code, environment and model).
        warm = live_workers(site_workers)
        # Each served both runs' warm-ups (which started it, while the server started),
        # SecAgg+'s training message (its other stages are the ClientApp's mod) and
        # zeroth-order's two.
        assert len(warm) == 2 and all(w["served"] == 5 for w in warm), [(w["pid"], w["served"]) for w in warm]
    from fedllm_flwr.site_worker.paths import process_identity

    assert all(process_identity(w["pid"]) != (w["pid"], w["create_time"]) for w in warm)  # ended with their nodes
    secure = read_metrics(out / "s")
    assert [r["round"] for r in secure] == [0, 1]
    assert secure[1]["clients-ok"] == 2 and secure[1]["clients-failed"] == 0 and secure[1]["secagg-clients"] == 2
    assert (out / "s" / "adapter" / "final" / "adapter_config.json").is_file()
    zo_rows = read_metrics(out / "z")
    assert [r["round"] for r in zo_rows] == [0, 1, 2]
    assert [r["clients-ok"] for r in zo_rows[1:]] == [2, 2] and not any(r.get("clients-dropped") for r in zo_rows)
    for r in [*secure[1:], *zo_rows[1:]]:
        # Each site trained on its own file, less its 10% held out: 27 + 45 examples.
        assert r["num-examples"] == 27 + 45, r
    # Seed indices and coefficients, never weights: well under FedKSeed's 20 KB a client a round.
    assert all(0 < r[key] / 2 < 20_000 for r in zo_rows[1:] for key in ("bytes-down", "bytes-up"))
    # The server applied the same seed lists to the same initial adapter: LoRA's B moved off zero.
    tensors = load_file(out / "z" / "adapter" / "final" / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)


def test_a_killed_supernode_fails_its_round_and_a_rejoining_one_takes_part_again(
    tiny_model_dir, tmp_path, site_workers
):
    import signal
    import threading
    import time

    creds = make_credentials(tmp_path / "creds", 2)
    out = tmp_path / "runs"
    # Every round waits until both nodes are connected (round 3 for the rejoining one), sends
    # to both and aggregates the replies it gets. No client evaluation: on a deployment every
    # message starts a ClientApp process, and training is what is tested.
    overrides = " ".join(
        [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=3", "strategy.min_available_nodes=2",
         "strategy.min_train_nodes=2", "strategy.round_timeout=120", "strategy.fraction_evaluate=0",
         f"run.output_dir={out}", "run.name=f"]
    )  # fmt: skip
    with LocalDeployment(tmp_path / "fed", creds, env=node_env(tmp_path, site_workers, "off")) as dep:
        for i in range(2):
            dep.register(i)
            dep.start_node(i, {"partition-id": i, "num-partitions": 2})
        result = {}
        runner = threading.Thread(target=lambda: result.update(r=dep.run(ROOT, overrides, timeout=900)))
        runner.start()
        log, metrics = dep.workdir / "flwr-run.log", out / "f" / "metrics.jsonl"

        def wait_until(done, limit=400):
            deadline = time.monotonic() + limit
            while runner.is_alive() and time.monotonic() < deadline:
                if done():
                    return True
                time.sleep(0.5)
            return False

        def rounds_logged():
            return [json.loads(x)["round"] for x in metrics.read_text().splitlines()] if metrics.is_file() else []

        # Round 2's training messages are out: kill node 1 while it works on its own.
        assert wait_until(lambda: log.is_file() and log.read_text().count("configure_train") >= 2)
        time.sleep(3)
        dep.stop_node(1, signal.SIGKILL)
        assert wait_until(lambda: 2 in rounds_logged())
        dep.start_node(1, {"partition-id": 1, "num-partitions": 2})  # the same key: the same node rejoins
        runner.join(timeout=900)
        assert "[fedllm-flwr] done in" in result["r"].stdout, result["r"].stdout[-3000:]
    rows = read_metrics(out / "f")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]  # no round lost or repeated
    assert rows[1]["clients-ok"] == 2
    assert rows[2]["clients-ok"] == 1 and rows[2]["clients-failed"] == 1  # the killed node's failure is recorded
    assert rows[2]["failed-nodes"]
    assert rows[3]["clients-ok"] == 2  # it took part again after rejoining
    assert not list(site_workers.iterdir())  # FEDLLM_SITE_WORKER=off: every message ran in its own process
