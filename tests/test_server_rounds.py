"""The server's last step of each round (`ServerEvaluator`): its row and checkpoint."""

import json

import numpy as np
import pytest
from conftest import TINY_OVERRIDES
from flwr.app import Array, ArrayRecord

from fedllm_flwr.config import load_cfg
from fedllm_flwr.errors import UserError
from fedllm_flwr.model import build_model
from fedllm_flwr.run_dir import RunDir
from fedllm_flwr.server.evaluation import ServerEvaluator
from fedllm_flwr.server.resume import resume_run
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg


def test_a_round_every_client_failed_in_is_logged_but_a_resumed_run_trains_it_again(tiny_cfg, tmp_path):
    """When the machine stops under a run, its clients can die before its server: the
    server logs a round in which every client failed. Counted as done, that round
    would be lost to a resumed run."""
    common = ("num_rounds=3", "eval.every=0", "eval.initial=false", f"run.output_dir={tmp_path}", "run.name=cut",
              "run.save_every_round=false")  # fmt: skip
    cfg = tiny_cfg(*common)
    run_dir = RunDir.create(cfg)
    strategy = AdapterFedAvg()
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    evaluator = ServerEvaluator(cfg, bundle, [], run_dir, strategy)
    evaluator(0, ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}))
    for server_round, ok in ((1, 2), (2, 0)):
        strategy.ledger.set(server_round, "clients-sampled", 2)
        strategy.ledger.set(server_round, "clients-ok", ok)
        strategy.ledger.add(server_round, "clients-failed", 2 - ok)
        evaluator(server_round, ArrayRecord({"w": Array(np.full(2, server_round, dtype=np.float32))}))
    rows = run_dir.rows()
    assert [(r["round"], r["clients-ok"], r["clients-failed"]) for r in rows] == [(0, None, None), (1, 2, 0), (2, 0, 2)]

    reopened, done, adapter, _ = resume_run(tiny_cfg(*common, f"resume={run_dir.path}"))
    assert done == 1  # round 2 is trained again
    assert adapter["w"].numpy().tolist() == [1.0, 1.0]
    assert [r["round"] for r in reopened.rows()] == [0, 1]


class VanishingClients:
    """The ClientApp in this process, one Context per node, until round `gone`: from then
    on every node answers with an error, as when the clients' machines stop under a run."""

    def __init__(self, overrides: list[str], nodes: int, gone: int) -> None:
        from flwr.app import Context, RecordDict

        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions": nodes},
                             state=RecordDict(), run_config={"overrides": " ".join(overrides)})
            for i in range(nodes)
        }  # fmt: skip
        self.gone = gone

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message

        import client_app

        out = []
        for message in messages:
            if message.content.config_records["config"]["server-round"] >= self.gone:
                out.append(Message(Error(code=0, reason="node gone"), reply_to=message))
            else:
                out.append(client_app.app(message, self.contexts[message.metadata.dst_node_id]))
        return out


def vanishing_run(tiny_model_dir, tmp_path, *overrides: str) -> None:
    """A 5-round run in `tmp_path`/gone on 2 in-process clients that stop answering from round 2 on."""
    from fedllm_flwr.server.run import run_server

    every = [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=5", "eval.every=0", "eval.initial=false",
             "strategy.fraction_evaluate=0", "log.curves=false", f"run.output_dir={tmp_path}", "run.name=gone",
             *overrides]  # fmt: skip
    run_server(VanishingClients(every, nodes=2, gone=2), load_cfg(every))


def test_a_run_whose_clients_all_vanish_stops_and_says_how_to_go_on(
    tiny_model_dir, tmp_path, task_identity, monkeypatch
):
    """Clients gone from round 2 on: after `run.max_rounds_without_reply` (default 3) rounds
    without a reply the run stops as such, not as completed, and names the round to resume."""
    from fedllm_flwr.server import run as server_run

    ended = []

    class Tracker:
        def log_row(self, row):
            pass

        def finish(self, completed, adapter):
            ended.append((completed, adapter))

    monkeypatch.setattr(server_run, "open_trackers", lambda *a: [Tracker()])
    with pytest.raises(UserError) as stopped:
        vanishing_run(tiny_model_dir, tmp_path)
    assert ended == [(False, None)]  # an MLflow run ends as FAILED
    run = tmp_path / "gone"
    message = str(stopped.value)
    assert message.startswith("stopped after round 4 of 5: no client reply since round 2") and "\n" not in message
    assert "checkpoint holds round 1" in message and f"resume={run}" in message
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["reason"] == message
    assert summary["checkpoint-round"] == 1 and summary["last-round"] == 4
    assert not (run / "adapter" / "final").exists()
    assert [(r["round"], r["clients-ok"]) for r in RunDir(run).rows()] == [(0, None), (1, 2), (2, 0), (3, 0), (4, 0)]
    # Once the clients are back, the run goes on after round 1.
    again = [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=5", "eval.every=0", "eval.initial=false",
             "strategy.fraction_evaluate=0", "log.curves=false", f"resume={run}"]  # fmt: skip
    reopened, done, _, _ = resume_run(load_cfg(again))
    assert done == 1 and [r["round"] for r in reopened.rows()] == [0, 1] and not (run / "summary.json").exists()


def test_max_rounds_without_reply_0_runs_every_round(tiny_model_dir, tmp_path, task_identity):
    vanishing_run(tiny_model_dir, tmp_path, "run.max_rounds_without_reply=0")
    assert json.loads((tmp_path / "gone" / "summary.json").read_text())["status"] == "completed"
    assert [r["round"] for r in RunDir(tmp_path / "gone").rows()] == [0, 1, 2, 3, 4, 5]


def test_rounds_nobody_was_sampled_in_are_no_client_loss(tiny_cfg, tmp_path):
    """strategy.availability can draw nobody for a round: no reply was expected, so such a
    round neither counts towards the stop nor ends a run of rounds without replies."""
    cfg = tiny_cfg("num_rounds=8", "eval.every=0", "eval.initial=false", f"run.output_dir={tmp_path}",
                   "run.name=sparse", "run.save_every_round=false", "run.max_rounds_without_reply=2")  # fmt: skip
    strategy = AdapterFedAvg()
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    evaluator = ServerEvaluator(cfg, bundle, [], RunDir.create(cfg), strategy)
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    evaluator(0, arrays)
    # (sampled, ok) per round: 1 trains, 2 loses its clients, 3 draws nobody, 4 trains
    # (the clients are back), 5 loses them, 6 draws nobody, 7 loses them again.
    rounds = ((2, 2), (2, 0), (0, 0), (2, 1), (2, 0), (0, 0), (2, 0))
    with pytest.raises(UserError, match="stopped after round 7 of 8: no client reply since round 5") as stopped:
        for server_round, (sampled, ok) in enumerate(rounds, start=1):
            strategy.ledger.set(server_round, "clients-sampled", sampled)
            strategy.ledger.set(server_round, "clients-ok", ok)
            evaluator(server_round, arrays)
    assert "checkpoint holds round 6" in str(stopped.value)  # a round that drew nobody keeps the adapter
    assert [r["round"] for r in evaluator.rows] == list(range(8))


def test_a_negative_max_rounds_without_reply_is_one_line(tiny_cfg):
    with pytest.raises(UserError, match=r"run.max_rounds_without_reply must be >= 0 \(0: never stop\), got -1"):
        tiny_cfg("run.max_rounds_without_reply=-1")


def test_a_second_run_in_the_same_process_starts_from_the_seeded_adapter(monkeypatch, tiny_model_dir, task_identity):
    """The server's model is cached per process and every evaluation loads an adapter into
    it: a run must start from the seeded initial adapter, not from what the run before
    left there, or two runs of one config (a test, a sweep's warm server) differ."""
    from conftest import TINY_OVERRIDES
    from federation import run_federation

    overrides = [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=2", "log.curves=false"]
    first, second = (run_federation(monkeypatch, overrides, nodes=2) for _ in range(2))
    assert [r["train-loss"] for r in first.rows()] == [r["train-loss"] for r in second.rows()]
    assert all(np.array_equal(first.arrays[2][k], second.arrays[2][k]) for k in first.arrays[2])
