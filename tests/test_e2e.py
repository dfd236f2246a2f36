"""The real thing: `flwr run` of this app on a private simulation SuperLink.

Only what a real run shows is tested here: the simulation runtime (the FAB, Ray's
ClientApp workers, the trackers) and Flower's own status of a failed run. Every
feature's run, with its checks, is in tests/test_federation_runs.py, in this process.
"""

import importlib.util
import json
import math

import pytest
from conftest import ROOT, TINY_OVERRIDES, finite
from peft import AutoPeftModelForCausalLM

from fedllm_flwr.metrics import read_metrics
from fedllm_tools.simulation import LocalRay, LocalSimulation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head():
    """One Ray instance for the module: a run would otherwise start and stop its own."""
    with LocalRay() as ray:
        yield ray


@pytest.fixture(scope="module")
def sim(tmp_path_factory, ray_head):
    # Module-scoped, so set up before the per-test isolated_dirs: give the
    # SuperLink (and the apps it starts) a model cache of its own, never $HOME's.
    # Each client claims every CPU of the module's Ray head, so a run starts one ClientApp
    # worker that serves its clients in turn: the start-up of a worker (importing the ML
    # stack) is paid once per run, not once per client. Runs that need
    # clients side by side pass `cpus=1`.
    work = tmp_path_factory.mktemp("sim")
    env = {"FEDLLM_FLWR_CACHE": str(work / "cache"), "RAY_ADDRESS": ray_head.address}
    with LocalSimulation(work, env=env, client_cpus=ray_head.num_cpus) as simulation:
        yield simulation


def run_status(sim) -> dict:
    listing = sim.flwr("ls", "--format", "json", log_name="ls.log")
    runs = json.loads(listing.stdout[listing.stdout.index("{") :])["runs"]
    return max(runs, key=lambda r: r["pending-at"])


def test_two_supernodes_two_rounds(sim, ray_head, tiny_model_dir, tmp_path):
    out = tmp_path / "runs"
    tracked = [f"log.{name}=true" for name in ("tensorboard", "mlflow") if importlib.util.find_spec(name)]
    overrides = " ".join(
        [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=2", f"run.output_dir={out}", "run.name=e2e"]
        + tracked
    )
    logs = ray_head.temp_dir / "session_latest" / "logs"

    def actors() -> int:
        return sum("ClientAppActor" in p.read_text(errors="replace") for p in logs.glob("worker-*.out"))

    before = actors()
    # One CPU per client: the two clients train side by side in two ClientApp workers.
    result = sim.run(ROOT, overrides=overrides, num_supernodes=2, timeout=400, cpus=1)
    assert result.returncode == 0, result.stdout[-3000:]
    assert run_status(sim)["status"] == "finished:completed", result.stdout[-3000:]
    run = out / "e2e"
    assert "[fedllm-flwr] run folder: " + str(run) in result.stdout
    # The ClientApp actors ran on the module's Ray head (RAY_ADDRESS); the simulation started no Ray of its own.
    assert not list(sim.ray_tmp.glob("session_*"))
    assert actors() - before == min(2, ray_head.num_cpus)

    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(set(rows[0]) <= set(r) for r in rows[1:])  # one schema: rows load as a table
    for r in rows:
        assert finite(r["eval-loss"], 0) and r["eval-ppl"] == pytest.approx(math.exp(r["eval-loss"]), rel=1e-4), r
        assert finite(r["accuracy"], 0, 1) and finite(r["accuracy-add"], 0, 1) and finite(r["seconds"], 0), r
    assert rows[0]["train-loss"] is None and rows[0]["bytes-down"] is None
    for r in rows[1:]:
        assert finite(r["train-loss"], 0) and finite(r["client-eval-loss"], 0), r
        assert r["bytes-down"] > 0 and r["bytes-up"] > 0 and r["skipped-steps"] == 0, r
        assert r["clients-ok"] == 2 and r["clients-failed"] == 0 and not r.get("clients-dropped")
        assert finite(r["lora-aggregation-error"], 0, 1), r  # averaging A and B apart loses a little

    # Only adapter weights travel: the fp16 payload plus a small framing per tensor.
    # (For SmolLM2's LoRA that framing is ~1%: see test_smollm2.py.)
    adapter = run / "adapter" / "final"
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    fp16_bytes = 2 * sum(t.numel() for t in tensors.values())
    for r in rows[1:]:
        for key in ("bytes-down", "bytes-up"):
            per_client = r[key] / 2
            assert fp16_bytes < per_client < fp16_bytes + 250 * len(tensors) + 1024, (key, per_client, fp16_bytes)

    cfg_text = (run / "config.yaml").read_text()
    assert "num_rounds: 2" in cfg_text and str(tiny_model_dir) in cfg_text
    assert {p.name for p in (run / "adapter").iterdir()} == {"round_1", "round_2", "final"}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) * 2 == fp16_bytes
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    check_trackers(run, rows, tracked)


def check_trackers(run, rows, tracked):
    """What TensorBoard's and MLflow's own readers load back equals metrics.jsonl."""
    expected = [(r["round"], r["eval-loss"]) for r in rows]
    if "log.tensorboard=true" in tracked:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        got = [(e.step, e.value) for e in events.Scalars("round/eval-loss")]
        assert got == [(step, pytest.approx(value, rel=1e-6)) for step, value in expected]
        assert [e.step for e in events.Scalars("client_1/held-out-loss")] == [1, 2]
    if "log.mlflow=true" in tracked:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{run.parent / 'mlflow.db'}")
        (found,) = client.search_runs([client.get_experiment_by_name("fedllm-flwr").experiment_id])
        assert found.info.run_name == "e2e" and found.info.status == "FINISHED"
        assert found.data.params["num_rounds"] == "2"
        history = client.get_metric_history(found.info.run_id, "round/eval-loss")
        assert sorted((m.step, m.value) for m in history) == [(s, pytest.approx(v, rel=1e-9)) for s, v in expected]
        artifacts = {a.path for a in client.list_artifacts(found.info.run_id, "adapter")}
        assert "adapter/adapter_model.safetensors" in artifacts


def test_bad_input_fails_the_run_early_and_leaves_no_final_adapter(sim, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    out = tmp_path / "runs"
    overrides = f"model.name={tiny_model_dir} dataset=file dataset.path={bad} run.output_dir={out} run.name=bad"
    result = sim.run(ROOT, overrides=overrides, num_supernodes=2, timeout=300)
    message = f"{bad}, line 2: missing field 'output' (dataset.fields.output)"
    assert f"[fedllm-flwr] {message}" in result.stdout
    status = run_status(sim)
    assert status["status"] == "finished:failed" and message in status["status-details"]
    assert not (out / "bad").exists()
