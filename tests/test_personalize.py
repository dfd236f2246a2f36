"""Personalization: FedAvg + local fine-tuning (FT)."""

import numpy as np
import pytest
from conftest import TINY_OVERRIDES
from federation import run_federation

from fedllm_flwr.client import personalize
from fedllm_flwr.config import load_cfg
from fedllm_flwr.errors import UserError
from fedllm_flwr.keys import PERSONALIZE_KEY
from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state
from fedllm_flwr.transport import pack, unpack


def test_ft_tunes_on_the_clients_data_and_scores_before_and_after(tiny_cfg):
    clear_model_cache()
    cfg = tiny_cfg("personalize.ft_steps=8", "train.lr=0.05", "train.precision=fp32")
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    start = get_adapter_state(bundle.model)
    state, metrics = personalize(cfg, start, 0, 2)
    assert set(metrics) >= {"before-eval-loss", "after-eval-loss", "before-accuracy", "after-accuracy", "ft-loss"}
    assert metrics["after-eval-loss"] < metrics["before-eval-loss"]  # tuned toward the client's own data
    assert any((state[k] - start[k]).abs().max() > 0 for k in start)


def test_ft_is_for_the_fed_scenario():
    with pytest.raises(UserError, match="personalize.ft_steps"):
        load_cfg(["personalize.ft_steps=3", "scenario=local"])


def test_ft_with_partial_sharing_tunes_the_nodes_own_private_tensors(tiny_cfg):
    import torch

    clear_model_cache()
    cfg = tiny_cfg("personalize.ft_steps=2", "personalize.private=[lora_B]", "train.precision=fp32")
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    full = get_adapter_state(bundle.model)
    shared = {k: v for k, v in full.items() if "lora_B" not in k}
    own = {k: torch.full_like(v, 0.01) for k, v in full.items() if "lora_B" in k}  # this node's, not the initial
    state, metrics = personalize(cfg, shared, 0, 2, private=own)
    assert set(state) == set(full) and metrics["after-eval-loss"] > 0
    assert all((state[k] - own[k]).abs().max() < 0.05 for k in own)  # tuned from the node's own tensors
    assert all((state[k] - full[k]).abs().max() > 0 for k in own)


def test_ft_draws_depend_on_the_seed_and_the_client_not_on_what_ran_before(tiny_cfg):
    import torch

    clear_model_cache()
    cfg = tiny_cfg("personalize.ft_steps=2", "train.precision=fp32", "peft.dropout=0.5")
    start = get_adapter_state(build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed).model)
    first, _ = personalize(cfg, start, 0, 2)
    torch.rand(1000)  # the worker ran something else in between
    again, _ = personalize(cfg, start, 0, 2)
    other, _ = personalize(cfg, start, 1, 2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


# -- through a whole federation (tests/federation.py) ------------------------------------

THREE_NODES = [
    "num_rounds=1",
    "eval.every=0",
    "log.curves=false",
    "personalize.ft_steps=2",
    "strategy.min_available_nodes=3",
    "strategy.min_train_nodes=3",
    "strategy.min_evaluate_nodes=3",
]


def _personalization(run):
    return [x for x in run.grid.traffic if x.message.content.config_records.get("config", {}).get(PERSONALIZE_KEY)]


@pytest.mark.parametrize(
    "protection",
    [["privacy=secagg", "privacy.max_weight=100"], ["privacy=dp", "privacy.noise_multiplier=0.1"],
     ["personalize.private=[lora_B]"]],
    ids=["secagg", "dp", "private"],
)  # fmt: skip
def test_a_protected_personalized_adapter_never_leaves_its_node(monkeypatch, tiny_model_dir, task_identity, protection):
    """Under SecAgg+ the server may learn only the sum, under DP only noised releases, and
    private tensors never travel: FedAvg + FT's adapters stay on their nodes (each keeps its
    own in peft's format) and only the before/after scores reach the server."""
    run = run_federation(monkeypatch, [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, *THREE_NODES, *protection])
    personal = _personalization(run)
    assert len(personal) == 3 and not any(x.reply.has_error() for x in personal)
    assert all(not x.reply.content.array_records for x in personal)  # scores only
    for pid in range(3):
        assert (run.path / "adapter" / "personalized" / f"client_{pid}" / "adapter_config.json").is_file()
    rows = (run.path / "personalization.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all("after-eval-loss" in row for row in rows)


def test_a_personalization_reply_of_the_wrong_shape_is_dropped_not_saved(monkeypatch, tiny_model_dir, task_identity):
    def wrong_shape(message, content):
        if (
            message.content.config_records.get("config", {}).get(PERSONALIZE_KEY)
            and message.metadata.dst_node_id == 102
        ):
            state = unpack(content)
            name = next(iter(state))
            state[name] = np.zeros((1, 1), np.float32)
            metrics = content["metrics"]
            content = pack(state)
            content["metrics"] = metrics
        return content

    run = run_federation(monkeypatch, [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, *THREE_NODES],
                         tamper=wrong_shape)  # fmt: skip
    saved = sorted(p.name for p in (run.path / "adapter" / "personalized").iterdir())
    assert saved == ["client_0", "client_2"]  # node 102 (partition 1) sent a tensor of another shape
    assert len((run.path / "personalization.jsonl").read_text().splitlines()) == 2
