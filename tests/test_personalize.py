"""Personalization: FedAvg + local fine-tuning (FT)."""

import pytest

from fedllm_flwr.client import personalize
from fedllm_flwr.config import load_cfg
from fedllm_flwr.errors import UserError
from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state


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
