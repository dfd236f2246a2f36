"""The server's last step of each round (`ServerEvaluator`): its row and checkpoint."""

import numpy as np
from flwr.app import Array, ArrayRecord

from fedllm_flwr.model import build_model
from fedllm_flwr.run_dir import RunDir
from fedllm_flwr.server.evaluation import ServerEvaluator
from fedllm_flwr.server.resume import resume_run
from fedllm_flwr.strategy import AdapterFedAvg


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

    reopened, done, adapter = resume_run(tiny_cfg(*common, f"resume={run_dir.path}"), AdapterFedAvg())
    assert done == 1  # round 2 is trained again
    assert adapter["w"].numpy().tolist() == [1.0, 1.0]
    assert [r["round"] for r in reopened.rows()] == [0, 1]
