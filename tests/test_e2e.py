"""The real thing: `flwr run` of this app on a private simulation SuperLink."""

import importlib.util
import json
import math
import re

import pytest
from conftest import ROOT, TINY_OVERRIDES
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

from fedllm_flwr.metrics import read_metrics
from fedllm_flwr.simulation import LocalRay, LocalSimulation

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
    # stack, ~9 s of CPU) is paid once per run, not once per client. Runs that need
    # clients side by side pass `cpus=1`.
    work = tmp_path_factory.mktemp("sim")
    env = {"FEDLLM_FLWR_CACHE": str(work / "cache"), "RAY_ADDRESS": ray_head.address}
    with LocalSimulation(work, env=env, client_cpus=ray_head.num_cpus) as simulation:
        yield simulation


def run_status(sim) -> dict:
    listing = sim.flwr("ls", "--format", "json", log_name="ls.log")
    runs = json.loads(listing.stdout[listing.stdout.index("{") :])["runs"]
    return max(runs, key=lambda r: r["pending-at"])


def finite(value, low: float = -math.inf, high: float = math.inf) -> bool:
    """A number (not None, not NaN or Inf) within [low, high]."""
    return isinstance(value, int | float) and math.isfinite(value) and low <= value <= high


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


@pytest.mark.parametrize(
    ("scenario", "preset", "nodes", "metric"), [("global", "gsm8k", 3, "accuracy"), ("local", "dolly", 4, "rougeL")]
)
def test_scenarios_and_benchmark_presets_run_with_the_same_command(
    sim, tiny_model_dir, tmp_path, scenario, preset, nodes, metric
):
    """Each scenario on one of FS-LLM's benchmark presets (local files in the presets'
    formats): the scenario's participation and adapters, the preset's metric."""

    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    if preset == "gsm8k":
        qa = [
            {"question": f"{i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
            for i in range(40)
        ]
        data = [f"dataset.path={write('train.jsonl', qa[:30])}", f"dataset.test_path={write('test.jsonl', qa[30:])}"]
    else:
        cats = ["open_qa", "classification", "summarization", "brainstorming"]
        rows = [
            {"instruction": f"q{i}", "context": "", "response": f"r{i}", "category": cats[i % 4]} for i in range(40)
        ]
        data = [f"dataset.path={write('dolly.jsonl', rows)}"]
    out = tmp_path / "runs"
    overrides = " ".join(
        [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, f"dataset={preset}", *data, "dataset.max_seq_len=64",
         "num_rounds=2", "eval.shots=1", "eval.limit=4", "strategy.min_available_nodes=3", f"scenario={scenario}",
         f"run.output_dir={out}", "run.name=s"]
    )  # fmt: skip
    result = sim.run(ROOT, overrides=overrides, num_supernodes=nodes, timeout=400)
    assert run_status(sim)["status"] == "finished:completed", result.stdout[-3000:]
    run = out / "s"
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(finite(r[metric], 0, 1) for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"] == metric and summary["score-final"] == rows[-1][metric]
    final = run / "adapter" / "final"
    if scenario == "global":
        assert all(r["clients-sampled"] == 1 and r["clients-ok"] == 1 for r in rows[1:])
        assert rows[1]["examples-seen"] == nodes * 2 * 4  # every client's worth of 2 steps x batch 4
        assert (final / "adapter_config.json").is_file()
    else:
        assert all(r["clients-ok"] == nodes for r in rows[1:])
        assert all(finite(r[f"{metric}-std"], 0, 1) and finite(r["client_1-eval-loss"], 0) for r in rows[1:])
        assert rows[-1]["client_0-eval-loss"] != rows[-1]["client_1-eval-loss"]  # different adapters
        assert sorted(p.name for p in final.iterdir()) == [f"client_{i}" for i in range(nodes)]
        AutoPeftModelForCausalLM.from_pretrained(str(final / "client_1"))


def test_partial_sharing_keeps_lora_b_on_the_clients_and_fine_tunes_with_it(sim, tiny_model_dir, tmp_path):
    out = tmp_path / "runs"
    overrides = " ".join(
        [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=2", "personalize.private=[lora_B]",
         "personalize.ft_steps=2", "eval.client_metric=true", f"run.output_dir={out}", "run.name=p"]
    )  # fmt: skip
    result = sim.run(ROOT, overrides=overrides, num_supernodes=2, timeout=400)
    assert run_status(sim)["status"] == "finished:completed", result.stdout[-3000:]
    assert "partial sharing: 4 of 8 adapter tensors stay on the clients" in result.stdout
    rows = read_metrics(out / "p")
    from safetensors.torch import load_file

    tensors = load_file(out / "p" / "adapter" / "final" / "adapter_model.safetensors")
    shared_fp16 = 2 * sum(t.numel() for k, t in tensors.items() if "lora_A" in k)
    for r in rows[1:]:
        per_client = r["bytes-down"] / 2
        assert shared_fp16 < per_client < shared_fp16 + 2048  # only the A matrices travel
        assert {"client_0-held-out-loss", "client_1-held-out-accuracy"} <= set(r)
    assert rows[-1]["client_0-held-out-loss"] != rows[-1]["client_1-held-out-loss"]
    # The server never saw a B matrix: the global adapter keeps the initial (zero) ones.
    assert all(float(t.abs().max()) == 0.0 for k, t in tensors.items() if "lora_B" in k)
    # FedAvg + FT after the last round starts from each node's own B: the personalized
    # adapters differ from each other and carry trained B matrices.
    ft = [json.loads(line) for line in (out / "p" / "personalization.jsonl").read_text().splitlines()]
    assert [r["partition-id"] for r in ft] == [0, 1]
    for r in ft:
        assert finite(r["before-eval-loss"], 0) and finite(r["after-eval-loss"], 0), r
        assert finite(r["before-accuracy"], 0, 1) and finite(r["after-accuracy"], 0, 1), r
    assert ft[0]["before-eval-loss"] == pytest.approx(rows[-1]["client_0-held-out-loss"], rel=1e-4)
    assert json.loads((out / "p" / "summary.json").read_text())["personalization"]["clients"] == 2
    own = [load_file(out / "p" / "adapter" / "personalized" / f"client_{pid}" / "adapter_model.safetensors")
           for pid in (0, 1)]  # fmt: skip
    assert all(float(t.abs().max()) > 0 for k, t in own[0].items() if "lora_B" in k)
    assert any(not (own[0][k] == own[1][k]).all() for k in own[0] if "lora_B" in k)
    for pid in (0, 1):
        AutoPeftModelForCausalLM.from_pretrained(str(out / "p" / "adapter" / "personalized" / f"client_{pid}"))


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory):
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("deep") / "model", layers=8)


@pytest.mark.parametrize("scenario", ["fed", "local"])
def test_fedot_clients_train_on_the_emulator_and_the_adapter_plugs_into_the_full_model(
    sim, deep_model_dir, tmp_path, scenario
):
    out = tmp_path / "runs"
    overrides = " ".join(
        [f"model.name={deep_model_dir}", *TINY_OVERRIDES, "num_rounds=2", "algorithm=fedot",
         "algorithm.drop_rate=0.5", "algorithm.distill_steps=2", f"scenario={scenario}",
         f"run.output_dir={out}", "run.name=ot"]
    )  # fmt: skip
    result = sim.run(ROOT, overrides=overrides, num_supernodes=2, timeout=400)
    assert run_status(sim)["status"] == "finished:completed", result.stdout[-3000:]
    run = out / "ot"
    rows = read_metrics(run)
    summary = json.loads((run / "summary.json").read_text())
    fedot = summary["fedot"]
    assert fedot["full-layers"] == 8 and fedot["emulator-layers"] == 6 and fedot["dropped-layers"] == [3, 4]
    assert fedot["emulator-parameters"] < fedot["full-parameters"]
    # Every client trained a 6-layer model with the emulator's parameter count.
    for r in rows[1:]:
        assert r["model-layers"] == 6 and r["model-parameters"] == fedot["emulator-parameters"]
    # The emulator went to each node once; later rounds carry the adapter only.
    assert rows[1]["bytes-broadcast"] == 2 * fedot["broadcast-message-bytes"]
    assert fedot["broadcast-message-bytes"] > fedot["emulator-file-bytes"] * 0.9
    assert all(r.get("bytes-broadcast") is None for r in rows[2:])
    assert rows[1]["bytes-down"] == rows[2]["bytes-down"] < 2 * fedot["broadcast-message-bytes"] / 5
    assert finite(fedot["distill-loss-first"], 0)
    # Both evaluation modes, every evaluated round.
    for r in rows:
        assert finite(r["eval-loss"], 0) and finite(r["emu-eval-loss"], 0), r
        assert finite(r["accuracy"], 0, 1) and finite(r["emu-accuracy"], 0, 1), r
    assert rows[-1]["eval-loss"] != rows[-1]["emu-eval-loss"]
    # The saved adapter is for the full model: its layers 0, 1, 6, 7.
    final = run / "adapter" / "final"
    adapters = [final] if scenario == "fed" else [final / "client_0", final / "client_1"]
    for folder in adapters:
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(deep_model_dir)
        assert config["layers_to_transform"] == [0, 1, 6, 7]
        model = AutoPeftModelForCausalLM.from_pretrained(str(folder))
        assert model.get_base_model().config.num_hidden_layers == 8
        layers = {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_B" in n}
        assert layers == {"0", "1", "6", "7"}


def test_mifa_under_half_availability_logs_who_took_part_and_resumes_to_the_same_adapter(sim, tiny_model_dir, tmp_path):
    """MIFA (strategy state) under 50% availability (a schedule), 4 rounds: the run logs
    who took part each round; stopped during round 3 and resumed, it ends where the
    uninterrupted run ends."""
    import subprocess
    import threading
    import time

    from safetensors.torch import load_file

    from fedllm_flwr.strategy.availability import Availability

    out = tmp_path / "runs"
    common = [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=4", "strategy=mifa",
              "strategy.availability=uniform", "strategy.available_p=0.5", "strategy.min_available_nodes=3",
              "peft.dropout=0.1", "seed=0", f"run.output_dir={out}"]  # fmt: skip
    whole = sim.run(ROOT, overrides=" ".join([*common, "run.name=whole"]), num_supernodes=3, timeout=400)
    assert run_status(sim)["status"] == "finished:completed", whole.stdout[-3000:]
    assert "[fedllm-flwr] nodes: " in whole.stdout  # every node described its partition
    whole_rows = read_metrics(out / "whole")
    taken = [r.get("participants") for r in whole_rows[1:]]
    assert all(isinstance(t, str) for t in taken)
    counts = [len([p for p in t.split(",") if p]) for t in taken]
    assert [r["clients-sampled"] or 0 for r in whole_rows[1:]] == counts and min(counts) < 3  # someone was away
    schedule = Availability("uniform", p=0.5, seed=0)
    assert taken == [",".join(str(p) for p in range(3) if schedule.available(r, p)) for r in (1, 2, 3, 4)]

    result = {}
    runner = threading.Thread(
        target=lambda: result.update(r=sim.run(ROOT, " ".join([*common, "run.name=cut"]), num_supernodes=3))
    )
    runner.start()
    metrics = out / "cut" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    # The server process dies during round 3 (`flwr stop` would let a simulation finish).
    pattern = f"flwr-simulation --runtime-api-address 127.0.0.1:{sim.port}"
    killed = subprocess.run(["pkill", "-9", "-f", pattern], check=False)
    assert killed.returncode == 0
    runner.join(timeout=300)
    assert not (out / "cut" / "adapter" / "final").exists()
    assert 2 <= len(metrics.read_text().splitlines()) - 1 < 4

    resumed = sim.run(ROOT, overrides=" ".join([*common, "run.name=cut", f"resume={out / 'cut'}"]), num_supernodes=3)
    assert run_status(sim)["status"] == "finished:completed", resumed.stdout[-3000:]
    assert "resuming" in resumed.stdout
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # none missing, none twice
    assert [r["participants"] for r in rows[1:]] == taken
    a = load_file(out / "whole" / "adapter" / "final" / "adapter_model.safetensors")
    b = load_file(out / "cut" / "adapter" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert any(float(a[k].abs().max()) > 0 for k in a if "lora_B" in k)  # it did train


def test_compressed_messages_shrink_and_the_run_still_trains(sim, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "runs"
    sent = {}
    for codec in ("int8", "topk"):
        # The top-k run also checks eval.every=0: no evaluation at all, the server's or the clients'.
        extra = ["eval.every=0"] if codec == "topk" else []
        overrides = " ".join(
            [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=2", f"compression={codec}", *extra,
             f"run.output_dir={out}", f"run.name={codec}"]
        )  # fmt: skip
        result = sim.run(ROOT, overrides=overrides, num_supernodes=2, timeout=400)
        assert run_status(sim)["status"] == "finished:completed", result.stdout[-3000:]
        rows = read_metrics(out / codec)
        assert all(r["clients-ok"] == 2 and not r.get("clients-dropped") for r in rows[1:])
        sent[codec] = (rows[1]["bytes-down"] / 2, rows[1]["bytes-up"] / 2, rows)
        # LoRA's B starts at zero: nonzero B in the final adapter is the clients' updates, decoded and added.
        tensors = load_file(out / codec / "adapter" / "final" / "adapter_model.safetensors")
        assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k), codec
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.model import build_model, get_adapter_state
    from fedllm_flwr.transport import message_bytes, pack

    cfg = load_cfg([f"model.name={tiny_model_dir}", *TINY_OVERRIDES])
    fp16 = message_bytes(pack(get_adapter_state(build_model(cfg.model, cfg.peft).model)))  # the default message
    assert sent["int8"][0] < fp16 < sent["topk"][0]  # top-k comes down in fp16 (with the round config)
    assert sent["topk"][1] < sent["int8"][1] < fp16
    assert all(finite(r["eval-loss"], 0) for r in sent["int8"][2])
    assert all(r["eval-loss"] is None for r in sent["topk"][2])
    assert all(r.get("client-eval-loss") is None and r.get("eval-bytes-down") is None for r in sent["topk"][2])
    assert all(finite(r["client-eval-loss"], 0) for r in sent["int8"][2][1:])
    summary = json.loads((out / "topk" / "summary.json").read_text())
    assert summary["eval-loss-final"] is None and (out / "topk" / "adapter" / "final").is_dir()


def test_sites_of_unequal_ranks_federate_and_every_adapter_loads_at_the_global_rank(sim, tiny_model_dir, tmp_path):
    out = tmp_path / "runs"
    overrides = " ".join(
        [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=2", "strategy=svd", "peft.client_ranks=[2,4]",
         "personalize.ft_steps=1", f"run.output_dir={out}", "run.name=ranks"]
    )  # fmt: skip
    result = sim.run(ROOT, overrides=overrides, num_supernodes=2, timeout=400)
    assert run_status(sim)["status"] == "finished:completed", result.stdout[-3000:]
    assert "LoRA ranks by partition: {0: 2, 1: 4}; the global adapter has rank 4" in result.stdout
    rows = read_metrics(out / "ranks")
    for r in rows[1:]:
        assert r["clients-ok"] == 2 and not r.get("clients-dropped"), r
        assert finite(r["lora-aggregation-error"], 0, 1) and finite(r["client-eval-loss"], 0), r
    # Each node was sent its own rank: one rank-2 and one rank-4 adapter (plus the round's config).
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.model import build_model, get_adapter_state
    from fedllm_flwr.transport import message_bytes, pack

    cfg = load_cfg([f"model.name={tiny_model_dir}", *TINY_OVERRIDES])
    rank2, rank4 = (
        message_bytes(pack(get_adapter_state(build_model(cfg.model, cfg.peft.at_rank(r)).model))) for r in (2, 4)
    )
    assert 0 < rows[1]["bytes-down"] - (rank2 + rank4) < 1024 and rows[1]["bytes-down"] < 2 * rank4
    # adapter/final and each site's personalized adapter load with peft at the global rank 4.
    for folder in ("final", "personalized/client_0", "personalized/client_1"):
        config = json.loads((out / "ranks" / "adapter" / folder / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (4, 8), folder
        AutoPeftModelForCausalLM.from_pretrained(str(out / "ranks" / "adapter" / folder))


def test_stacking_merges_every_round_exactly_and_exports_the_merged_delta(sim, tiny_model_dir, tmp_path):
    out = tmp_path / "runs"
    overrides = " ".join(
        [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=2", "strategy=stacking",
         "peft.client_ranks=[2,4]", f"run.output_dir={out}", "run.name=stack"]
    )  # fmt: skip
    result = sim.run(ROOT, overrides=overrides, num_supernodes=2, timeout=400)
    assert run_status(sim)["status"] == "finished:completed", result.stdout[-3000:]
    rows = read_metrics(out / "stack")
    assert [r["merged-rank"] for r in rows[1:]] == [6, 12]  # (2 + 4) ranks a round, stacked
    assert all(r["lora-aggregation-error"] == 0.0 and r["clients-ok"] == 2 for r in rows[1:])
    # Round 1's evaluation messages carry round 1's stack (to each of the 2 nodes): 2 layers x
    # (q_proj 6 x (32 + 32) + v_proj 6 x (32 + 16)) values in fp16, beyond the adapter.
    assert rows[1]["eval-bytes-down"] - rows[1]["bytes-down"] > 2 * 2 * 2 * (6 * 64 + 6 * 48)
    assert all(finite(r["client-eval-loss"], 0) for r in rows[1:])
    # adapter/final is the merged delta as a LoRA adapter of the stacked rank, and scores
    # what the server scored in the last round.
    final = out / "stack" / "adapter" / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (12, 24)
    import torch

    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.data import test_records, tokenize_set
    from fedllm_flwr.evaluate.loss import evaluate_loss

    cfg = load_cfg([f"model.name={tiny_model_dir}", *TINY_OVERRIDES])
    model = AutoPeftModelForCausalLM.from_pretrained(str(final), dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    loss = evaluate_loss(model, tokenize_set(cfg, test_records(cfg), tok), tok.pad_token_id, cfg.eval.batch_size)
    assert loss["loss"] == pytest.approx(rows[-1]["eval-loss"], rel=1e-2)
    assert abs(rows[-1]["eval-loss"] - rows[0]["eval-loss"]) > 1e-4  # the merged delta changed the model


def test_zeroth_order_on_every_base_weight_stops_resumes_and_saves_a_transformers_model(sim, tiny_model_dir, tmp_path):
    """zo.params=full, stopped after round 1 and resumed: the server rebuilds its weights
    from the kept seed lists, the resumed run's fresh nodes catch up from round 0, and
    model/final is the base checkpoint moved by exactly the aggregated steps."""
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from fedllm_flwr.full_weights import pristine
    from fedllm_flwr.run_dir import RunDir
    from fedllm_flwr.zo import apply_steps, seed_pool

    out, store = tmp_path / "runs", tmp_path / "store"
    common = [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=2", "algorithm=zo", "zo.params=full",
              "zo.lr=1e-3", f"zo.store_dir={store}", f"run.output_dir={out}", "run.name=full"]  # fmt: skip
    first = sim.run(ROOT, overrides=" ".join([*common, "run.stop_after=1"]), num_supernodes=2, timeout=400)
    assert run_status(sim)["status"] == "finished:completed", first.stdout[-3000:]
    resumed = sim.run(ROOT, overrides=" ".join([*common, f"resume={out / 'full'}"]), num_supernodes=2, timeout=400)
    assert run_status(sim)["status"] == "finished:completed", resumed.stdout[-3000:]
    assert "zo: replayed 1 rounds" in resumed.stdout
    assert "stop_after: 0" in (out / "full" / "config.yaml").read_text()  # the resumed start's, not the first's
    rows = read_metrics(out / "full")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:  # round 2's nodes are new: they caught up on round 1 and their replies were taken
        assert r["clients-ok"] == 2 and not r.get("clients-dropped") and finite(r["train-loss"], 0), r
        assert finite(r["client-eval-loss"], 0), r  # the nodes scored the global weights on their held-out data
        assert 0 < r["bytes-down"] / 2 < 20_000 and 0 < r["bytes-up"] / 2 < 20_000, r
    # At most two weight files per node of each run: those its saved state names, and the newest.
    assert 4 <= len(list(store.glob("*.safetensors"))) <= 8
    assert not (out / "full" / "adapter").exists()
    _, _, kept = RunDir(out / "full").read_checkpoint()
    expected = {k: v.clone() for k, v in pristine(str(tiny_model_dir)).items()}
    for t in (1, 2):
        steps = zip(kept[f"zo/{t}/indices"], kept[f"zo/{t}/coefficients"], strict=True)
        apply_steps(list(expected.values()), seed_pool(0, 4096), steps)
    saved = load_file(out / "full" / "model" / "final" / "model.safetensors")
    assert all(np.array_equal(saved[k], v.numpy()) for k, v in expected.items() if k in saved)
    assert any(not np.array_equal(saved[k], v.numpy()) for k, v in pristine(str(tiny_model_dir)).items() if k in saved)
    AutoModelForCausalLM.from_pretrained(str(out / "full" / "model" / "final"))


@pytest.mark.parametrize(("task", "scenario"), [("reward", "fed"), ("dpo", "local"), ("dpo", "global")])
def test_preference_tasks_federate_and_report_preference_accuracy(sim, tiny_model_dir, tmp_path, task, scenario):
    """A reward model and DPO on the preference pairs: every scenario runs with pairs
    once (the scenarios do not depend on the task), DPO in two."""
    out = tmp_path / "runs"
    loss = "reward_loss=hinge" if task == "reward" else "dpo_loss=ipo"
    overrides = " ".join(
        [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=2", f"task={task}", loss,
         f"scenario={scenario}", f"run.output_dir={out}", "run.name=rm"]
    )  # fmt: skip
    result = sim.run(ROOT, overrides=overrides, num_supernodes=2, timeout=400)
    assert run_status(sim)["status"] == "finished:completed", result.stdout[-3000:]
    rows = read_metrics(out / "rm")
    for r in rows:
        assert finite(r["preference-accuracy"], 0, 1) and finite(r["margin"]) and finite(r["eval-loss"], 0), r
    if scenario == "global":  # one holder of all the pairs
        assert all(r["clients-ok"] == 1 for r in rows[1:])
    else:
        assert all(r["clients-ok"] == 2 and finite(r["client-eval-preference-accuracy"], 0, 1) for r in rows[1:])
        assert "client_1-held-out-preference-accuracy" in rows[-1]
    summary = json.loads((out / "rm" / "summary.json").read_text())
    assert summary["metric"] == "preference-accuracy" and summary["score-final"] == rows[-1]["preference-accuracy"]
    final = out / "rm" / "adapter" / "final" / ("client_0" if scenario == "local" else "")
    if task == "dpo":  # greedy answers scored against both responses before training and at the end
        assert abs(rows[0]["margin"]) < 1e-6  # the policy starts as its reference
        assert all(finite(rows[k]["closer-to-chosen"], 0, 1) for k in (0, -1)) and "closer-to-chosen" not in rows[1]
        AutoPeftModelForCausalLM.from_pretrained(str(final))
    else:
        from peft import AutoPeftModelForSequenceClassification

        AutoPeftModelForSequenceClassification.from_pretrained(str(final), num_labels=1)


def test_differential_privacy_clips_noises_and_accounts_every_round(sim, tiny_model_dir, tmp_path):
    out = tmp_path / "runs"
    clip = 0.01  # below any update the tiny model makes in 2 steps, so every one is clipped
    overrides = " ".join(
        [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=2", "privacy=dp", "privacy.noise_multiplier=0.5",
         f"privacy.clipping_norm={clip}", "eval.every=2", "eval.initial=false", f"run.output_dir={out}", "run.name=dp"]
    )  # fmt: skip
    result = sim.run(ROOT, overrides=overrides, num_supernodes=2, timeout=400)
    assert run_status(sim)["status"] == "finished:completed", result.stdout[-3000:]
    rows = read_metrics(out / "dp")
    assert rows[0]["eval-loss"] is None and finite(rows[2]["eval-loss"], 0)  # eval.initial=false: no round-0 scores
    assert rows[1].get("client-eval-loss") is None and finite(rows[2]["client-eval-loss"], 0)  # the clients' too
    for r in rows[1:]:
        assert r["clients-ok"] == 2 and 0 < r["update-norm-max"] <= clip * (1 + 1e-6)
        assert r["noise-std"] == pytest.approx(0.5 * clip / 2)
        assert r["dp-sample-rate"] == 1.0 and r["dp-clients"] == 2  # both nodes sampled, every round
    assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"] and rows[2]["delta"] == 1e-5
    summary = json.loads((out / "dp" / "summary.json").read_text())["privacy"]
    assert summary["epsilon"] == pytest.approx(rows[2]["epsilon"], rel=1e-5)
    assert summary["releases"] == 2 and summary["sample-rates"] == [1.0, 1.0] and summary["sampled-clients"] == [2, 2]


def test_secure_aggregation_runs_in_simulation(sim, tiny_model_dir, tmp_path):
    out = tmp_path / "runs"
    nodes = ["strategy.min_available_nodes=3", "strategy.min_train_nodes=3", "strategy.min_evaluate_nodes=3"]
    overrides = " ".join(
        [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, *nodes, "num_rounds=2", "privacy=secagg", "eval.every=2",
         "strategy.fraction_evaluate=0", f"run.output_dir={out}", "run.name=secagg"]
    )  # fmt: skip
    result = sim.run(ROOT, overrides=overrides, num_supernodes=3, timeout=400)
    assert run_status(sim)["status"] == "finished:completed", result.stdout[-3000:]
    rows = read_metrics(out / "secagg")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients-ok"] == 3 and r["clients-failed"] == 0, result.stdout[-3000:]
        assert r["bytes-up"] > 0 and r["train-loss"] > 0
    assert finite(rows[2]["eval-loss"], 0)
    from safetensors.torch import load_file

    tensors = load_file(out / "secagg" / "adapter" / "final" / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # the unmasked mean was applied


def poisoned_app(root, folder):
    """This app with a ClientApp that spoils one client's replies (tests/poisoned_client.py)."""
    import shutil

    folder.mkdir()
    for name in ("server_app.py", "client_app.py", "README.md"):
        shutil.copy(root / name, folder / name)
    shutil.copy(root / "tests" / "poisoned_client.py", folder / "poisoned_client.py")
    text = (root / "pyproject.toml").read_text()
    text = text.replace('clientapp = "client_app:app"', 'clientapp = "poisoned_client:app"')
    # Its FAB: these files only (the package comes from the environment's install).
    text = re.sub(r"fab-include = \[.*\]", 'fab-include = ["*.py"]', text)
    (folder / "pyproject.toml").write_text(text)
    return folder


def test_a_client_poisoning_every_round_is_dropped_and_learning_goes_on(sim, tiny_model_dir, tmp_path):
    """Partition 1 sends NaN tensors, NaN and Inf weights, a wrong shape and a wrong codec."""
    import numpy as np
    from safetensors.numpy import load_file

    app = poisoned_app(ROOT, tmp_path / "app")
    out = tmp_path / "runs"
    overrides = " ".join(
        [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=5", "train.lr=0.01",
         "strategy.fraction_evaluate=0", f"run.output_dir={out}", "run.name=poisoned"]
    )  # fmt: skip
    result = sim.run(app, overrides=overrides, num_supernodes=2, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:]
    assert run_status(sim)["status"] == "finished:completed", result.stdout[-3000:]
    rows = read_metrics(out / "poisoned")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]
    for r in rows[1:]:
        assert r["clients-ok"] == 1 and r["clients-dropped"] == 1 and r["clients-failed"] == 1, r
    losses = [r["eval-loss"] for r in rows]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    tensors = load_file(out / "poisoned" / "adapter" / "final" / "adapter_model.safetensors")
    assert all(np.isfinite(t).all() for t in tensors.values())
    assert "reply from node" in result.stdout and "dropped" in result.stdout
