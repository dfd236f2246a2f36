"""Each feature as a whole run: the ServerApp's `run_server` and every node's real
ClientApp in this process (tests/federation.py), with no Flower start-up, checked by
what the run leaves behind: metrics rows, summary.json, the adapters it saved (loaded
back with peft), the bytes that travelled, personalization files. tests/invariants.py's
checks run after every round where they apply.

tests/test_e2e.py keeps the real `flwr run` for what only it shows: the simulation
runtime (FAB, Ray workers, trackers) and Flower's status of a failed run.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import TINY_OVERRIDES, finite
from federation import run_federation
from invariants import check_resume, check_round
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file

from fedllm_flwr.config import load_cfg
from fedllm_flwr.model import build_model, get_adapter_state
from fedllm_flwr.transport import message_bytes, pack

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(autouse=True)
def server_log(caplog):
    """The server's `[fedllm-flwr]` lines (Flower's logger, at INFO), as a run prints them."""
    caplog.set_level(logging.INFO)
    return caplog


def job(model_dir, out, name: str, *extra: str) -> list[str]:
    """The tiny model's overrides for a run saved as `out/name`. One torch thread, also
    under scenario=global (whose one training node would take every core): the tiny
    model's matrices are too small to share out, and the test workers share the cores.
    No curves.png (a second of matplotlib a run): test_e2e's real run checks it is drawn,
    test_tracking.py what it draws."""
    return [f"model.name={model_dir}", *TINY_OVERRIDES, "train.threads=1", "log.curves=false", *extra,
            f"run.output_dir={out}", f"run.name={name}"]  # fmt: skip


def fp16_message_bytes(model_dir, *overrides: str) -> int:
    """The bytes of a whole adapter sent in fp16 (the default message)."""
    cfg = load_cfg([f"model.name={model_dir}", *TINY_OVERRIDES, *overrides])
    return message_bytes(pack(get_adapter_state(build_model(cfg.model, cfg.peft).model)))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("scenario", "preset", "nodes", "metric"), [("global", "gsm8k", 3, "accuracy"), ("local", "dolly", 4, "rougeL")]
)
def test_scenarios_and_benchmark_presets_run_with_the_same_command(
    monkeypatch, tiny_model_dir, tmp_path, scenario, preset, nodes, metric
):
    """Each scenario on one of FS-LLM's benchmark presets (local files in the presets'
    formats): the scenario's participation and adapters, the preset's metric."""
    if preset == "gsm8k":
        qa = [
            {"question": f"{i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
            for i in range(40)
        ]
        data = [f"dataset.path={write_jsonl(tmp_path / 'train.jsonl', qa[:30])}",
                f"dataset.test_path={write_jsonl(tmp_path / 'test.jsonl', qa[30:])}"]  # fmt: skip
    else:
        cats = ["open_qa", "classification", "summarization", "brainstorming"]
        rows = [
            {"instruction": f"q{i}", "context": "", "response": f"r{i}", "category": cats[i % 4]} for i in range(40)
        ]
        data = [f"dataset.path={write_jsonl(tmp_path / 'dolly.jsonl', rows)}"]
    overrides = job(tiny_model_dir, tmp_path / "runs", "s", f"dataset={preset}", *data, "dataset.max_seq_len=64",
                    "num_rounds=2", "eval.shots=1", "eval.limit=4", "strategy.min_available_nodes=3",
                    f"scenario={scenario}")  # fmt: skip
    run = run_federation(monkeypatch, overrides, nodes=nodes, after_round=check_round)
    rows = run.rows()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(finite(r[metric], 0, 1) for r in rows)
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["metric"] == metric and summary["score-final"] == rows[-1][metric]
    final = run.path / "adapter" / "final"
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


def test_partial_sharing_keeps_lora_b_on_the_clients_and_fine_tunes_with_it(
    monkeypatch, tiny_model_dir, tmp_path, server_log
):
    overrides = job(tiny_model_dir, tmp_path / "runs", "p", "num_rounds=2", "personalize.private=[lora_B]",
                    "personalize.ft_steps=2", "eval.client_metric=true")  # fmt: skip
    run = run_federation(monkeypatch, overrides, nodes=2, after_round=check_round)
    assert "partial sharing: 4 of 8 adapter tensors stay on the clients" in server_log.text
    rows = run.rows()
    tensors = load_file(run.path / "adapter" / "final" / "adapter_model.safetensors")
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
    ft = [json.loads(line) for line in (run.path / "personalization.jsonl").read_text().splitlines()]
    assert [r["partition-id"] for r in ft] == [0, 1]
    for r in ft:
        assert finite(r["before-eval-loss"], 0) and finite(r["after-eval-loss"], 0), r
        assert finite(r["before-accuracy"], 0, 1) and finite(r["after-accuracy"], 0, 1), r
    assert ft[0]["before-eval-loss"] == pytest.approx(rows[-1]["client_0-held-out-loss"], rel=1e-4)
    assert json.loads((run.path / "summary.json").read_text())["personalization"]["clients"] == 2
    personalized = run.path / "adapter" / "personalized"
    own = [load_file(personalized / f"client_{pid}" / "adapter_model.safetensors") for pid in (0, 1)]
    assert all(float(t.abs().max()) > 0 for k, t in own[0].items() if "lora_B" in k)
    assert any(not (own[0][k] == own[1][k]).all() for k in own[0] if "lora_B" in k)
    for pid in (0, 1):
        AutoPeftModelForCausalLM.from_pretrained(str(personalized / f"client_{pid}"))


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory):
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("deep") / "model", layers=8)


@pytest.mark.parametrize("scenario", ["fed", "local"])
def test_fedot_clients_train_on_the_emulator_and_the_adapter_plugs_into_the_full_model(
    monkeypatch, deep_model_dir, tmp_path, scenario
):
    overrides = job(deep_model_dir, tmp_path / "runs", "ot", "num_rounds=2", "algorithm=fedot",
                    "algorithm.drop_rate=0.5", "algorithm.distill_steps=2", f"scenario={scenario}")  # fmt: skip
    run = run_federation(monkeypatch, overrides, nodes=2, after_round=check_round)
    rows = run.rows()
    fedot = json.loads((run.path / "summary.json").read_text())["fedot"]
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
    final = run.path / "adapter" / "final"
    adapters = [final] if scenario == "fed" else [final / "client_0", final / "client_1"]
    for folder in adapters:
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(deep_model_dir)
        assert config["layers_to_transform"] == [0, 1, 6, 7]
        model = AutoPeftModelForCausalLM.from_pretrained(str(folder))
        assert model.get_base_model().config.num_hidden_layers == 8
        layers = {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_B" in n}
        assert layers == {"0", "1", "6", "7"}


class MachineStopped(Exception):
    """The server's machine stopping under a run."""


def test_mifa_under_half_availability_logs_who_took_part_and_resumes_to_the_same_adapter(
    monkeypatch, tiny_model_dir, tmp_path, server_log
):
    """MIFA (strategy state) under 50% availability (a schedule), 4 rounds: the run logs
    who took part each round; stopped as round 3 starts and resumed on fresh nodes, it
    ends where the uninterrupted run ends."""
    from fedllm_flwr.strategy.availability import Availability

    out = tmp_path / "runs"
    common = ["num_rounds=4", "strategy=mifa", "strategy.availability=uniform", "strategy.available_p=0.5",
              "strategy.min_available_nodes=3", "peft.dropout=0.1", "seed=0"]  # fmt: skip
    whole = run_federation(monkeypatch, job(tiny_model_dir, out, "whole", *common), nodes=3, after_round=check_round)
    assert "[fedllm-flwr] nodes: " in server_log.text  # every node described its partition
    whole_rows = whole.rows()
    taken = [r.get("participants") for r in whole_rows[1:]]
    assert all(isinstance(t, str) for t in taken)
    counts = [len([p for p in t.split(",") if p]) for t in taken]
    assert [r["clients-sampled"] or 0 for r in whole_rows[1:]] == counts and min(counts) < 3  # someone was away
    schedule = Availability("uniform", p=0.5, seed=0)
    assert taken == [",".join(str(p) for p in range(3) if schedule.available(r, p)) for r in (1, 2, 3, 4)]

    cut = {}

    def stop_after_round_2(run, server_round):  # noqa: ANN001
        check_round(run, server_round)
        cut["run"] = run
        if server_round == 2:  # round 2 is logged and checkpointed; round 3 never comes
            raise MachineStopped

    with pytest.raises(MachineStopped):
        run_federation(monkeypatch, job(tiny_model_dir, out, "cut", *common), nodes=3, after_round=stop_after_round_2)
    metrics = out / "cut" / "metrics.jsonl"
    assert not (out / "cut" / "adapter" / "final").exists()
    assert len(metrics.read_text().splitlines()) == 3  # rounds 0, 1 and 2

    server_log.clear()
    resumed = run_federation(monkeypatch, job(tiny_model_dir, out, "cut", *common, f"resume={out / 'cut'}"), nodes=3,
                             after_round=check_round)  # fmt: skip
    assert "resuming" in server_log.text
    rows = resumed.rows()
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # none missing, none twice
    assert [r["participants"] for r in rows[1:]] == taken
    a = load_file(out / "whole" / "adapter" / "final" / "adapter_model.safetensors")
    b = load_file(out / "cut" / "adapter" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert any(float(a[k].abs().max()) > 0 for k in a if "lora_B" in k)  # it did train
    check_resume(whole, cut["run"], resumed)  # and bit for bit: checkpoint, strategy state, every row's figures


def test_compressed_messages_shrink_and_the_run_still_trains(monkeypatch, tiny_model_dir, tmp_path):
    out = tmp_path / "runs"
    sent = {}
    for codec in ("int8", "topk"):
        # The top-k run also checks eval.every=0: no evaluation at all, the server's or the clients'.
        extra = ["eval.every=0"] if codec == "topk" else []
        overrides = job(tiny_model_dir, out, codec, "num_rounds=2", f"compression={codec}", *extra)
        rows = run_federation(monkeypatch, overrides, nodes=2, after_round=check_round).rows()
        assert all(r["clients-ok"] == 2 and not r.get("clients-dropped") for r in rows[1:])
        sent[codec] = (rows[1]["bytes-down"] / 2, rows[1]["bytes-up"] / 2, rows)
        # LoRA's B starts at zero: nonzero B in the final adapter is the clients' updates, decoded and added.
        tensors = load_file(out / codec / "adapter" / "final" / "adapter_model.safetensors")
        assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k), codec
    fp16 = fp16_message_bytes(tiny_model_dir)
    assert sent["int8"][0] < fp16 < sent["topk"][0]  # top-k comes down in fp16 (with the round config)
    assert sent["topk"][1] < sent["int8"][1] < fp16
    assert all(finite(r["eval-loss"], 0) for r in sent["int8"][2])
    assert all(r["eval-loss"] is None for r in sent["topk"][2])
    assert all(r.get("client-eval-loss") is None and r.get("eval-bytes-down") is None for r in sent["topk"][2])
    assert all(finite(r["client-eval-loss"], 0) for r in sent["int8"][2][1:])
    summary = json.loads((out / "topk" / "summary.json").read_text())
    assert summary["eval-loss-final"] is None and (out / "topk" / "adapter" / "final").is_dir()


def test_sites_of_unequal_ranks_federate_and_every_adapter_loads_at_the_global_rank(
    monkeypatch, tiny_model_dir, tmp_path, server_log
):
    overrides = job(tiny_model_dir, tmp_path / "runs", "ranks", "num_rounds=2", "strategy=svd",
                    "peft.client_ranks=[2,4]", "personalize.ft_steps=1")  # fmt: skip
    run = run_federation(monkeypatch, overrides, nodes=2, after_round=check_round)
    assert "LoRA ranks by partition: {0: 2, 1: 4}; the global adapter has rank 4" in server_log.text
    rows = run.rows()
    for r in rows[1:]:
        assert r["clients-ok"] == 2 and not r.get("clients-dropped"), r
        assert finite(r["lora-aggregation-error"], 0, 1) and finite(r["client-eval-loss"], 0), r
    # Each node was sent its own rank: one rank-2 and one rank-4 adapter (plus the round's config).
    cfg = load_cfg([f"model.name={tiny_model_dir}", *TINY_OVERRIDES])
    rank2, rank4 = (
        message_bytes(pack(get_adapter_state(build_model(cfg.model, cfg.peft.at_rank(r)).model))) for r in (2, 4)
    )
    assert 0 < rows[1]["bytes-down"] - (rank2 + rank4) < 1024 and rows[1]["bytes-down"] < 2 * rank4
    # adapter/final and each site's personalized adapter load with peft at the global rank 4.
    for folder in ("final", "personalized/client_0", "personalized/client_1"):
        config = json.loads((run.path / "adapter" / folder / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (4, 8), folder
        AutoPeftModelForCausalLM.from_pretrained(str(run.path / "adapter" / folder))


def test_stacking_merges_every_round_exactly_and_exports_the_merged_delta(monkeypatch, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer

    from fedllm_flwr.data import test_records, tokenize_set
    from fedllm_flwr.evaluate.loss import evaluate_loss

    overrides = job(tiny_model_dir, tmp_path / "runs", "stack", "num_rounds=2", "strategy=stacking",
                    "peft.client_ranks=[2,4]")  # fmt: skip
    run = run_federation(monkeypatch, overrides, nodes=2, after_round=check_round)
    rows = run.rows()
    assert [r["merged-rank"] for r in rows[1:]] == [6, 12]  # (2 + 4) ranks a round, stacked
    assert all(r["lora-aggregation-error"] == 0.0 and r["clients-ok"] == 2 for r in rows[1:])
    # Round 1's evaluation messages carry round 1's stack (to each of the 2 nodes): 2 layers x
    # (q_proj 6 x (32 + 32) + v_proj 6 x (32 + 16)) values in fp16, beyond the adapter.
    assert rows[1]["eval-bytes-down"] - rows[1]["bytes-down"] > 2 * 2 * 2 * (6 * 64 + 6 * 48)
    assert all(finite(r["client-eval-loss"], 0) for r in rows[1:])
    # adapter/final is the merged delta as a LoRA adapter of the stacked rank, and scores
    # what the server scored in the last round.
    final = run.path / "adapter" / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (12, 24)
    cfg = load_cfg([f"model.name={tiny_model_dir}", *TINY_OVERRIDES])
    model = AutoPeftModelForCausalLM.from_pretrained(str(final), dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    loss = evaluate_loss(model, tokenize_set(cfg, test_records(cfg), tok), tok.pad_token_id, cfg.eval.batch_size)
    assert loss["loss"] == pytest.approx(rows[-1]["eval-loss"], rel=1e-2)
    assert abs(rows[-1]["eval-loss"] - rows[0]["eval-loss"]) > 1e-4  # the merged delta changed the model


def test_zeroth_order_on_every_base_weight_stops_resumes_and_saves_a_transformers_model(
    monkeypatch, tiny_model_dir, tmp_path, server_log
):
    """zo.params=full, stopped after round 1 and resumed: the server rebuilds its weights
    from the kept seed lists, the resumed run's fresh nodes catch up from round 0, and
    model/final is the base checkpoint moved by exactly the aggregated steps."""
    from safetensors.numpy import load_file as load_numpy
    from transformers import AutoModelForCausalLM

    from fedllm_flwr.algorithms.zo.full_weights import pristine
    from fedllm_flwr.algorithms.zo.mezo import apply_steps, seed_pool
    from fedllm_flwr.run_dir import RunDir

    out, store = tmp_path / "runs", tmp_path / "store"
    common = ["num_rounds=2", "algorithm=zo", "zo.params=full", "zo.lr=1e-3", f"zo.store_dir={store}"]
    first = run_federation(monkeypatch, job(tiny_model_dir, out, "full", *common, "run.stop_after=1"), nodes=2,
                           after_round=check_round)  # fmt: skip
    assert json.loads((first.path / "summary.json").read_text())["status"] == "completed"
    server_log.clear()
    resumed = run_federation(monkeypatch, job(tiny_model_dir, out, "full", *common, f"resume={out / 'full'}"),
                             nodes=2, after_round=check_round)  # fmt: skip
    assert "zo: replayed 1 rounds" in server_log.text
    assert "stop_after: 0" in (out / "full" / "config.yaml").read_text()  # the resumed start's, not the first's
    rows = resumed.rows()
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
    saved = load_numpy(out / "full" / "model" / "final" / "model.safetensors")
    assert all(np.array_equal(saved[k], v.numpy()) for k, v in expected.items() if k in saved)
    assert any(not np.array_equal(saved[k], v.numpy()) for k, v in pristine(str(tiny_model_dir)).items() if k in saved)
    AutoModelForCausalLM.from_pretrained(str(out / "full" / "model" / "final"))


@pytest.mark.parametrize(("task", "scenario"), [("reward", "fed"), ("dpo", "local"), ("dpo", "global")])
def test_preference_tasks_federate_and_report_preference_accuracy(monkeypatch, tiny_model_dir, tmp_path, task,
                                                                   scenario):  # fmt: skip
    """A reward model and DPO on the preference pairs: every scenario runs with pairs
    once (the scenarios do not depend on the task), DPO in two."""
    loss = "reward_loss=hinge" if task == "reward" else "dpo_loss=ipo"
    overrides = job(tiny_model_dir, tmp_path / "runs", "rm", "num_rounds=2", f"task={task}", loss,
                    f"scenario={scenario}")  # fmt: skip
    run = run_federation(monkeypatch, overrides, nodes=2, after_round=check_round)
    rows = run.rows()
    for r in rows:
        assert finite(r["preference-accuracy"], 0, 1) and finite(r["margin"]) and finite(r["eval-loss"], 0), r
    if scenario == "global":  # one holder of all the pairs
        assert all(r["clients-ok"] == 1 for r in rows[1:])
    else:
        assert all(r["clients-ok"] == 2 and finite(r["client-eval-preference-accuracy"], 0, 1) for r in rows[1:])
        assert "client_1-held-out-preference-accuracy" in rows[-1]
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["metric"] == "preference-accuracy" and summary["score-final"] == rows[-1]["preference-accuracy"]
    final = run.path / "adapter" / "final" / ("client_0" if scenario == "local" else "")
    if task == "dpo":  # greedy answers scored against both responses before training and at the end
        assert abs(rows[0]["margin"]) < 1e-6  # the policy starts as its reference
        assert all(finite(rows[k]["closer-to-chosen"], 0, 1) for k in (0, -1)) and "closer-to-chosen" not in rows[1]
        AutoPeftModelForCausalLM.from_pretrained(str(final))
    else:
        from peft import AutoPeftModelForSequenceClassification

        AutoPeftModelForSequenceClassification.from_pretrained(str(final), num_labels=1)


def test_differential_privacy_clips_noises_and_accounts_every_round(monkeypatch, tiny_model_dir, tmp_path):
    clip = 0.01  # below any update the tiny model makes in 2 steps, so every one is clipped
    overrides = job(tiny_model_dir, tmp_path / "runs", "dp", "num_rounds=2", "privacy=dp",
                    "privacy.noise_multiplier=0.5", f"privacy.clipping_norm={clip}", "eval.every=2",
                    "eval.initial=false")  # fmt: skip
    run = run_federation(monkeypatch, overrides, nodes=2, after_round=check_round)
    rows = run.rows()
    assert rows[0]["eval-loss"] is None and finite(rows[2]["eval-loss"], 0)  # eval.initial=false: no round-0 scores
    assert rows[1].get("client-eval-loss") is None and finite(rows[2]["client-eval-loss"], 0)  # the clients' too
    for r in rows[1:]:
        assert r["clients-ok"] == 2 and 0 < r["update-norm-max"] <= clip * (1 + 1e-6)
        assert r["noise-std"] == pytest.approx(0.5 * clip / 2)
        assert r["dp-sample-rate"] == 1.0 and r["dp-clients"] == 2  # both nodes sampled, every round
    assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"] and rows[2]["delta"] == 1e-5
    summary = json.loads((run.path / "summary.json").read_text())["privacy"]
    assert summary["epsilon"] == pytest.approx(rows[2]["epsilon"], rel=1e-5)
    assert summary["releases"] == 2 and summary["sample-rates"] == [1.0, 1.0] and summary["sampled-clients"] == [2, 2]


def test_secure_aggregation_runs_through_the_secagg_plus_protocol(monkeypatch, tiny_model_dir, tmp_path):
    three = ["strategy.min_available_nodes=3", "strategy.min_train_nodes=3", "strategy.min_evaluate_nodes=3"]
    overrides = job(tiny_model_dir, tmp_path / "runs", "secagg", *three, "num_rounds=2", "privacy=secagg",
                    "eval.every=2", "strategy.fraction_evaluate=0")  # fmt: skip
    run = run_federation(monkeypatch, overrides, nodes=3, after_round=check_round)
    rows = run.rows()
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients-ok"] == 3 and r["clients-failed"] == 0, r
        assert r["bytes-up"] > 0 and r["train-loss"] > 0
    assert finite(rows[2]["eval-loss"], 0)
    # Every round is SecAgg+'s four stages (setup, share keys, masked vectors, unmask) with
    # each node; what a node trained left it masked only (check_round's secagg check).
    trained = [x.node for x in run.grid.traffic if x.kind == "train"]
    assert {node: trained.count(node) for node in set(trained)} == {101: 2 * 4, 102: 2 * 4, 103: 2 * 4}
    tensors = load_file(run.path / "adapter" / "final" / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # the unmasked mean was applied


def test_a_client_poisoning_every_round_is_dropped_and_learning_goes_on(
    monkeypatch, tiny_model_dir, tmp_path, server_log
):
    """Partition 1 runs tests/poisoned_client.py's ClientApp: it sends NaN tensors, NaN and
    Inf weights, a wrong shape and a wrong codec."""
    import poisoned_client

    overrides = job(tiny_model_dir, tmp_path / "runs", "poisoned", "num_rounds=5", "train.lr=0.01",
                    "strategy.fraction_evaluate=0")  # fmt: skip
    run = run_federation(monkeypatch, overrides, nodes=2, app=poisoned_client.app)
    rows = run.rows()
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]
    for r in rows[1:]:
        assert r["clients-ok"] == 1 and r["clients-dropped"] == 1 and r["clients-failed"] == 1, r
    losses = [r["eval-loss"] for r in rows]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    tensors = load_file(run.path / "adapter" / "final" / "adapter_model.safetensors")
    assert all(t.isfinite().all() for t in tensors.values())
    assert all(np.isfinite(v).all() for arrays in run.arrays.values() for v in arrays.values())  # every round's
    assert "reply from node" in server_log.text and "dropped" in server_log.text
