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
