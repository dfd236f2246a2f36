"""Every PEFT method through the federated path, one row per method, on the tiny model."""

import warnings

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from peft import AutoPeftModelForCausalLM

from fedllm_flwr.client import local_train
from fedllm_flwr.evaluate.generation import generate
from fedllm_flwr.model import build_model, clear_model_cache, count_parameters, get_adapter_state, set_adapter_state
from fedllm_flwr.peft_methods.builders import BUILDERS
from fedllm_flwr.peft_methods.compat import PEFT_METHODS
from fedllm_flwr.run_dir import RunDir
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg
from fedllm_flwr.transport import manifest_of, pack, unpack_state

# (conf/peft preset, trainable parameter names must contain one of these)
ROWS = [
    ("lora", ("lora_A", "lora_B")),
    ("dora", ("lora_A", "lora_B", "lora_magnitude_vector")),
    ("adalora", ("lora_A", "lora_B", "lora_E")),
    ("loha", ("hada_w1", "hada_w2")),
    ("ia3", ("ia3_l",)),
    ("prompt_tuning", ("prompt_encoder",)),
    ("p_tuning", ("mlp_head", "embedding")),
    ("prefix_tuning", ("prompt_encoder",)),
    ("ffa_lora", ("lora_B",)),  # a preset of lora (peft.freeze_a): only B trains
]


def test_every_method_has_a_builder_a_preset_and_a_row():
    from fedllm_flwr.config import conf_dir

    assert set(BUILDERS) == set(PEFT_METHODS) <= {m for m, _ in ROWS}
    assert {p.stem for p in (conf_dir() / "peft").glob("*.yaml")} == {m for m, _ in ROWS}


def reply_for(node: int, state: dict, n: int) -> Message:
    content = pack(state)
    content["metrics"] = MetricRecord({"num-examples": n, "train-loss": 1.0})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


@pytest.mark.parametrize("method, markers", ROWS, ids=[m for m, _ in ROWS])
def test_method_trains_round_trips_aggregates_and_saves(method, markers, tiny_cfg, tmp_path, task_identity):
    clear_model_cache()
    # AdaLoRA is refused for federated averaging (see config/schema.py); its row trains as `local`.
    scenario = "scenario=local" if method == "adalora" else "scenario=fed"
    cfg = tiny_cfg(f"peft={method}", scenario, "peft.num_virtual_tokens=4", f"run.output_dir={tmp_path}", "run.name=r")
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    start = get_adapter_state(bundle.model)
    trainable, _ = count_parameters(bundle.model)
    assert start and sum(v.numel() for v in start.values()) == trainable
    assert all(any(m in name for m in markers) for name in start), list(start)[:3]
    assert all(p.dtype == torch.float32 for p in bundle.model.parameters() if p.requires_grad)

    # Two clients train a round from the same global adapter.
    s0, m0 = local_train(cfg, start, 1, 0, 2)
    s1, m1 = local_train(cfg, start, 1, 1, 2)
    assert np.isfinite(m0["train-loss"]) and np.isfinite(m1["train-loss"])
    assert any(not torch.equal(s0[k], start[k]) for k in start), "training changed nothing"

    # The wire format round-trips exactly (up to fp16) into the model.
    set_adapter_state(bundle.model, unpack_state(pack(s0), manifest_of(s0)))
    assert all(torch.equal(get_adapter_state(bundle.model)[k], s0[k].half().float()) for k in s0)

    # Two replies average to the num-examples-weighted mean (the mechanics; the config
    # refuses AdaLoRA under scenario=fed, tested below).
    strategy = AdapterFedAvg()
    strategy._expected = manifest_of(start)
    arrays, _ = strategy.aggregate_train(1, [reply_for(1, s0, 3), reply_for(2, s1, 1)])
    for key in start:
        want = (3 * s0[key].half().float() + 1 * s1[key].half().float()) / 4
        assert np.allclose(arrays[key].numpy(), want.numpy(), atol=1e-6)

    # The saved adapter reloads with peft alone, quietly, and generates.
    averaged = {k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}
    saved = RunDir.create(cfg).save_adapters(bundle.model, "final", {"": averaged})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = AutoPeftModelForCausalLM.from_pretrained(str(saved))
    answers = generate(loaded, bundle.tokenizer, ["What is 1 + 1?"], batch_size=1, max_new_tokens=3)
    assert len(answers) == 1 and len(answers[0]) == 1


def test_cache_free_greedy_matches_generate_for_every_prompt_method_and_keeps_the_prefix(tiny_cfg):
    from fedllm_flwr.data.prompts import format_prompt
    from fedllm_flwr.evaluate.generation import greedy_without_cache

    prompts = [format_prompt("What is 12 + 30?"), format_prompt("Write in capital letters: apple river")]
    clear_model_cache()
    cfg = tiny_cfg("peft=lora", "train.precision=fp32")  # bf16 noise would flip near-ties
    lora = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    state = get_adapter_state(lora.model)
    set_adapter_state(lora.model, {k: torch.randn_like(v) for k, v in state.items()})
    greedy = generate(lora.model, lora.tokenizer, prompts, batch_size=2, max_new_tokens=6)
    assert greedy_without_cache(lora.model, lora.tokenizer, prompts, 6) == [c[0] for c in greedy]

    # Prompt tuning and P-tuning decode with the KV cache from their virtual tokens and the
    # prompt, once: peft's own generate() inserted the virtual tokens again at every step.
    for method in ("prompt_tuning", "p_tuning"):
        clear_model_cache()
        cfg = tiny_cfg(f"peft={method}", "peft.num_virtual_tokens=4", "train.precision=fp32")
        bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
        state = get_adapter_state(bundle.model)
        set_adapter_state(bundle.model, {k: torch.randn_like(v) for k, v in state.items()})
        widths = []
        layer = bundle.model.get_base_model().model.layers[0]
        hook = layer.mlp.register_forward_pre_hook(lambda module, args, seen=widths: seen.append(args[0].shape[1]))
        greedy = generate(bundle.model, bundle.tokenizer, prompts, batch_size=2, max_new_tokens=6)
        hook.remove()
        assert widths[1:] == [1] * (len(widths) - 1), (method, widths)  # one new position per step
        assert greedy_without_cache(bundle.model, bundle.tokenizer, prompts, 6) == [c[0] for c in greedy], method

    # Prefix tuning decodes from a cache seeded with its prefix, one new position per step,
    # and answers as the forward pass (training's view of the prefix) does.
    clear_model_cache()
    cfg = tiny_cfg("peft=prefix_tuning", "peft.num_virtual_tokens=4", "train.precision=fp32")
    prefix = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    state = get_adapter_state(prefix.model)
    outputs = []
    for scale in (0.0, 20.0):
        set_adapter_state(prefix.model, {k: torch.randn_like(v) * scale for k, v in state.items()})
        widths = []
        layer = prefix.model.get_base_model().model.layers[0]
        hook = layer.mlp.register_forward_pre_hook(lambda module, args, seen=widths: seen.append(args[0].shape[1]))
        outputs.append(generate(prefix.model, prefix.tokenizer, prompts, batch_size=2, max_new_tokens=6))
        hook.remove()
        assert widths[1:] == [1] * (len(widths) - 1), widths
        assert greedy_without_cache(prefix.model, prefix.tokenizer, prompts, 6) == [c[0] for c in outputs[-1]]
    assert outputs[0] != outputs[1]  # the prefix reaches the answers


@pytest.mark.parametrize("window", [256, 8])
def test_prefix_decoding_with_a_sliding_window_matches_the_forward_pass(window):
    """Gemma 3 mixes sliding-window layers: the cached decoding is used while prefix,
    prompt and answer fit in the window; past it, the exact cache-free decoding."""
    from peft import PrefixTuningConfig, get_peft_model
    from tiny import build_tokenizer
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from fedllm_flwr.data.prompts import format_prompt
    from fedllm_flwr.evaluate.generation import greedy_without_cache

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512, sliding_window=window,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    model = get_peft_model(Gemma3ForCausalLM(config), PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init's, so that answers differ per prompt
            p.copy_(torch.randn_like(p) * (1.0 if p.requires_grad else 0.2))
    prompts = [format_prompt("What is 12 + 30?"), format_prompt("Write in capital letters: apple river"), "x"]
    answers = [c[0] for c in generate(model, tokenizer, prompts, batch_size=3, max_new_tokens=8)]
    assert len(set(answers)) > 1
    assert answers == greedy_without_cache(model, tokenizer, prompts, 8)


def test_adalora_prunes_its_rank_budget_and_is_refused_for_fed(tiny_cfg):
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.errors import UserError

    with pytest.raises(UserError, match="peft=adalora cannot be combined with scenario=fed: AdaLoRA"):
        load_cfg(["peft=adalora"])
    clear_model_cache()
    cfg = tiny_cfg("peft=adalora", "scenario=local", "train.local_steps=6", "peft.target_r=2")
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    start = get_adapter_state(bundle.model)
    assert not any("ranknum" in k for k in start)
    state, _ = local_train(cfg, start, 1, 0, 1)
    e = torch.cat([v.flatten() for k, v in state.items() if "lora_E" in k])
    assert 0 < int((e == 0).sum()) < e.numel()  # some singular values pruned to zero, not all
