"""Record-level DP-SGD at a site (privacy=dp_sgd): its accounting, its clipping and noise,
its zeroth-order scalars, and a site that keeps to its budget."""

import json
import math

import numpy as np
import pytest
import torch
from federation import run_federation
from flwr.app import ConfigRecord, RecordDict
from opacus.accountants import RDPAccountant

from fedllm_flwr import node
from fedllm_flwr.config import PrivacyConfig, load_cfg
from fedllm_flwr.errors import UserError
from fedllm_flwr.keys import SAT_OUT_KEY
from fedllm_flwr.lm_loss import lm_loss
from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state
from fedllm_flwr.privacy.dp_sgd import OverBudget, RecordDP, plan_round, poisson_steps
from fedllm_flwr.privacy.ledger import DpLedger
from fedllm_flwr.transport import pack


def test_a_sites_epsilon_is_opacus_stepped_one_step_at_a_time_over_a_hand_schedule():
    """Rounds of 10, 10 and 4 steps, a round sat out between: the ledger's (z, q, steps)
    gives the epsilon of Opacus's accountant stepped once per step, after every round."""
    privacy = PrivacyConfig(name="dp_sgd", noise_multiplier=1.1, delta=1e-5)
    ledger, opacus = DpLedger(), RDPAccountant()
    schedule = [10, 10, 0, 4]  # 0: the site sat the round out
    for steps in schedule:
        if steps:
            plan_round(ledger, privacy, records=360, batch=8, steps=steps, rounds=len(schedule))
            ledger.steps += steps
            for _ in range(steps):
                opacus.step(noise_multiplier=1.1, sample_rate=8 / 360)
        assert ledger.epsilon(1e-5) == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-9)
    assert ledger.sample_rate == 8 / 360 and ledger.steps == 24
    assert 0 < ledger.epsilon(1e-5) < ledger.epsilon(1e-5, steps=48) < ledger.epsilon(1e-6, steps=48)
    assert DpLedger(noise_multiplier=0.0, sample_rate=0.1, steps=1).epsilon(1e-5) == math.inf


def test_a_target_epsilon_sets_the_noise_that_spends_it_over_the_planned_steps():
    privacy = PrivacyConfig(name="dp_sgd", target_epsilon=3.0, delta=1e-5)
    ledger = DpLedger()
    for _ in range(3):
        plan_round(ledger, privacy, records=360, batch=8, steps=10, rounds=3)
        ledger.steps += 10
    assert privacy.target_epsilon * 0.97 <= ledger.epsilon(1e-5) <= privacy.target_epsilon
    with pytest.raises(OverBudget, match="would pass the budget 3"):  # a fourth round the plan did not have
        plan_round(ledger, privacy, records=360, batch=8, steps=10, rounds=3)
    assert ledger.sat_out == 1 and ledger.steps == 30  # nothing spent


def test_a_delta_not_below_one_over_the_sites_records_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"privacy.delta=0.01 is not below 1 / this site's 360 training records"):
        plan_round(DpLedger(), PrivacyConfig(name="dp_sgd", delta=1e-2), records=360, batch=8, steps=10, rounds=3)


def _lm_batch(ids: list[int], response_from: int) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([ids])
    labels = input_ids.clone()
    labels[0, :response_from] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def test_one_records_gradient_moves_a_step_by_at_most_C_over_the_expected_batch(tiny_cfg):
    """Without noise, a record whose loss is huge (its labels made improbable by a scaled
    head) still moves the step's gradient by at most C / qN, while its own gradient is
    far larger; with noise, each coordinate gets N(0, (z C / qN)^2)."""
    clear_model_cache()
    cfg = tiny_cfg()
    model = build_model(cfg.model, cfg.peft, "fp32", cfg.seed).model
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # move LoRA's B off zero so every adapter tensor has a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    record = _lm_batch([5, 9, 17, 3, 44, 8], response_from=2)
    loss = lm_loss(model, record)
    loss.backward()
    own = math.sqrt(sum(float(p.grad.square().sum()) for p in params))
    clip, expected_batch = 0.01, 4.0
    assert own > 10 * clip  # far over the bound: the record's own gradient is clipped

    private = RecordDP(noise_multiplier=0.0, clipping_norm=clip, expected_batch=expected_batch)
    mean_loss, used = private.gradient(params, [record, record], lambda b: lm_loss(model, b), lambda b: 1)
    moved = math.sqrt(sum(float(p.grad.square().sum()) for p in params))
    assert used == 2 and private.clipped == 2 and mean_loss == pytest.approx(float(loss))
    assert moved == pytest.approx(2 * clip / expected_batch, rel=1e-4)  # each record C / qN, same direction
    private.gradient(params, [record], lambda b: lm_loss(model, b), lambda b: 1)
    assert math.sqrt(sum(float(p.grad.square().sum()) for p in params)) <= clip / expected_batch * (1 + 1e-5)

    noisy = RecordDP(noise_multiplier=2.0, clipping_norm=clip, expected_batch=expected_batch)
    noisy.gradient(params, [record], lambda b: lm_loss(model, b), lambda b: 0)  # nothing to learn: noise only
    values = torch.cat([p.grad.reshape(-1) for p in params])
    assert values.numel() > 1000
    assert float(values.std()) == pytest.approx(2.0 * clip / expected_batch, rel=0.1)
    again = RecordDP(noise_multiplier=2.0, clipping_norm=clip, expected_batch=expected_batch)
    again.gradient(params, [record], lambda b: lm_loss(model, b), lambda b: 0)
    assert not torch.equal(values, torch.cat([p.grad.reshape(-1) for p in params]))  # not drawn from a known seed


def test_a_zeroth_order_step_clips_each_records_difference_and_noises_the_scalar():
    private = RecordDP(noise_multiplier=0.0, clipping_norm=1.0, expected_batch=4.0)
    assert private.scalar(torch.tensor([1e6, -0.5, 0.25])) == pytest.approx((1.0 - 0.5 + 0.25) / 4)
    assert private.clipped == 1
    noisy = RecordDP(noise_multiplier=3.0, clipping_norm=0.5, expected_batch=2.0)
    draws = np.array([noisy.scalar(torch.zeros(0)) for _ in range(4000)])
    assert draws.std() == pytest.approx(3.0 * 0.5 / 2.0, rel=0.05) and abs(draws.mean()) < 0.05


def test_records_are_drawn_by_poisson_sampling_each_collated_alone():
    class Data:
        def __len__(self):
            return 1000

        def example(self, i):
            return None if i % 10 == 0 else i  # every tenth record dropped by truncation

    steps = poisson_steps(Data(), 0.05, lambda rows, pad: rows, 0)
    sizes = [len(next(steps)) for _ in range(400)]
    assert all(isinstance(r, list) and len(r) == 1 for r in next(steps))
    assert np.mean(sizes) == pytest.approx(1000 * 0.9 * 0.05, rel=0.05) and np.std(sizes) > 2
    together = poisson_steps(Data(), 0.0, lambda rows, pad: rows, 0, together=True)
    assert next(together) is None  # no record drawn: the step has only its noise


def test_accumulation_sets_the_expected_batch_and_a_round_releases_only_what_reads_no_record(tiny_cfg):
    """Under DP-SGD `train.grad_accum` only sets the expected batch (q = batch x accum / N):
    every record weighs 1 / qN whatever micro-batch it would have fallen in. The round's
    steps are added to the ledger, and its metrics are the released ones and the budget."""
    from fedllm_flwr.client import _setup, local_train
    from fedllm_flwr.privacy.dp_sgd import RELEASED

    clear_model_cache()
    cfg = tiny_cfg("privacy=dp_sgd", "train.grad_accum=2", "privacy.noise_multiplier=0.8")
    state = get_adapter_state(build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed).model)
    ledger = DpLedger()
    trained, metrics = local_train(cfg, state, 1, 0, 2, ledger=ledger)
    records = len(_setup(cfg, 0, 2)[1].train)
    assert ledger.sample_rate == pytest.approx(2 * 4 / records) and ledger.steps == cfg.train.local_steps
    assert ledger.noise_multiplier == 0.8
    assert set(metrics) <= RELEASED | {"dp-epsilon", "dp-steps", "dp-noise-multiplier", "dp-sample-rate"}
    assert metrics["dp-epsilon"] == pytest.approx(ledger.epsilon(cfg.privacy.delta))
    assert any(not torch.equal(trained[k], state[k]) for k in state)  # it stepped (noise at least)


def _train_message(cfg, server_round: int) -> RecordDict:
    content = pack(get_adapter_state(build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed).model))
    content["config"] = ConfigRecord({"server-round": server_round})
    return content


def test_a_site_over_its_budget_sits_out_and_says_so(tiny_cfg, tiny_model_dir):
    """Planned for 2 rounds at epsilon 2, a site asked for a third keeps its budget: its
    reply says it sat out, with what it has spent, and carries no update."""
    clear_model_cache()
    overrides = [f"model.name={tiny_model_dir}", "dataset.synthetic.train_per_task=20", "train.local_steps=2",
                 "train.batch_size=4", "num_rounds=2", "privacy=dp_sgd", "privacy.target_epsilon=2"]  # fmt: skip
    cfg = tiny_cfg(*overrides[1:])
    run_config, node_config = {"overrides": " ".join(overrides)}, {"partition-id": 0, "num-partitions": 2}
    kept = RecordDict()
    replies = []
    for server_round in (1, 2, 3):
        state = node.NodeState.load(kept)
        replies.append(node.train(_train_message(cfg, server_round), run_config, node_config, state))
        state.save(kept)
    spent = [float(r["metrics"]["dp-epsilon"]) for r in replies]
    assert 0 < spent[0] < spent[1] <= 2.0 and spent[2] == spent[1]
    assert [r["metrics"].get(SAT_OUT_KEY, 0) for r in replies] == [0, 0, 1]
    assert not replies[2].array_records and "train-loss" not in replies[0]["metrics"]
    assert (DpLedger.load(kept).steps, DpLedger.load(kept).sat_out) == (4, 1)


def test_a_supernode_with_a_smaller_budget_sits_out_and_the_server_counts_it(
    monkeypatch, tiny_model_dir, task_identity
):
    """The run's noise for everyone, one site capped (`--node-config dp-max-epsilon`) at
    what one round spends: it trains round 1, sits out round 2 (counted, not a failure),
    and the summary has each site's epsilon."""
    base = [f"model.name={tiny_model_dir}", "dataset.synthetic.train_per_task=20", "dataset.synthetic.test_per_task=2",
            "train.local_steps=2", "train.batch_size=4", "num_rounds=2", "eval.max_new_tokens=2", "log.curves=false",
            "privacy=dp_sgd", "privacy.noise_multiplier=1.0"]  # fmt: skip
    ledger = DpLedger(noise_multiplier=1.0, sample_rate=4 / 36, steps=2)
    cap = ledger.epsilon(1e-5) * 1.01  # one round's spend: a second would pass it
    configs = [{"partition-id": 0, "num-partitions": 2, "dp-max-epsilon": cap},
               {"partition-id": 1, "num-partitions": 2}]  # fmt: skip
    run = run_federation(monkeypatch, base, nodes=2, node_configs=configs)
    rows = {r["round"]: r for r in run.rows()}
    assert rows[1]["clients-ok"] == 2 and not rows[1].get("clients-sat-out")
    assert rows[2]["clients-ok"] == 1 and rows[2]["clients-sat-out"] == 1 and not rows[2].get("clients-failed")
    privacy = json.loads((run.path / "summary.json").read_text())["privacy"]
    assert privacy["rounds-sat-out"] == 1 and privacy["level"] == "record"
    assert privacy["site-epsilon"]["client_0"] == pytest.approx(ledger.epsilon(1e-5), rel=1e-6)
    assert privacy["site-epsilon"]["client_1"] > privacy["site-epsilon"]["client_0"]


def test_settings_whose_accounting_would_be_wrong_are_refused_naming_both_keys():
    for overrides, names in [
        (["privacy=dp", "privacy.target_epsilon=3"], ("privacy.target_epsilon=3.0", "privacy=dp")),
        (["privacy=dp_sgd", "privacy.secagg=true", "privacy.max_epsilon=3"], ("privacy.max_epsilon", "secagg")),
        (["privacy=dp_sgd", "train.precision=fp16"], ("privacy=dp_sgd", "train.precision=fp16")),
        (["privacy=secagg", "privacy.secagg=true"], ("privacy.secagg=true", "privacy=secagg")),
        (["privacy=dp_sgd", "algorithm=zo", "privacy.secagg=true"], ("algorithm=zo", "privacy.secagg=true")),
    ]:
        with pytest.raises(UserError) as caught:
            load_cfg(overrides)
        message = str(caught.value)
        assert "\n" not in message and all(n in message for n in names), message


def test_the_studys_tables_are_written_from_its_results_file_in_the_site_and_the_readme():
    """The results page and the README ask for the study by name; both are written from
    benchmarks/results/privacy/results.json (the README's block by `python docs/hooks.py
    readme`, and kept equal to it here), with every setting the study ran."""
    from conftest import ROOT, docs_hooks

    hooks = docs_hooks()
    results = json.loads((ROOT / "benchmarks" / "results" / "privacy" / "results.json").read_text())
    page = (ROOT / "docs" / "results" / "features.md").read_text()
    assert "<!-- generated: privacy -->" in page
    rendered = hooks.render(page)
    readme = (ROOT / "README.md").read_text()
    assert "<!-- generated: privacy-summary -->" in readme
    assert hooks.readme(readme) == readme, "the README's privacy table is stale: run `python docs/hooks.py readme`"
    for name in results:
        assert f"| {name} |" in rendered and f"| {name} |" in readme
    assert {"plain", "dp-z1", "lora-dpsgd-eps8", "ffa_lora-dpsgd-eps8", "zo-dp-eps8"} <= set(results)
    assert all(r["level"] == "record" for n, r in results.items() if "dpsgd" in n or n.startswith("zo-dp"))


def test_a_private_zeroth_order_step_moves_by_at_most_C_per_record_over_the_expected_batch():
    """MeZO's two-point step under privacy=dp_sgd: each record's difference along z is
    clipped before the sum, so records whose losses change enormously along z still give
    |g| <= drawn x C / qN (noise off), and the step's coefficient is lr x that g."""
    from fedllm_flwr.algorithms.zo.mezo import private_estimate, two_point, zo_train

    weights = torch.zeros(5)

    def record_losses(model, batch):  # noqa: ANN001, ANN202 - each record's loss moves 1e6 x faster than the last
        return batch["scale"] * weights.sum()

    batch = {"scale": torch.tensor([1e6, -1e6, 1e3])}
    private = RecordDP(noise_multiplier=0.0, clipping_norm=0.5, expected_batch=6.0)
    g, _ = two_point(None, [weights], batch, record_losses, seed=7, eps=1e-3, estimate=private_estimate(private))
    assert abs(g) <= 3 * 0.5 / 6.0 + 1e-12 and private.clipped == 3
    assert torch.equal(weights, torch.zeros(5))  # the parameters end as they began
    pool = np.arange(4, dtype=np.int64)
    draw = np.random.default_rng(0)
    batches = iter([batch, None])  # the second step drew no record: its step is noise alone (none here)
    result = zo_train(None, [weights], batches, pool, draw, 2, lambda k: 0.1, 1e-3, record_losses, private=private)
    assert len(result.coefficients) <= 2 and all(abs(c) <= 0.1 * 3 * 0.5 / 6.0 + 1e-12
                                                  for c in result.coefficients.values())  # fmt: skip
