"""FedOT: the layer split, the emulator a client receives, and the key mapping back."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny_model
from transformers import AutoModelForCausalLM

from fedllm_flwr.algorithms.fedot import emulator as fedot
from fedllm_flwr.data.prompts import iter_batches, tokenize_records
from fedllm_flwr.data.synthetic import generate
from fedllm_flwr.errors import UserError
from fedllm_flwr.model import clear_model_cache, count_parameters, get_adapter_state, load_tokenizer


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory):
    """The tiny model with 8 decoder layers, so there is a middle to drop."""
    return save_tiny_model(tmp_path_factory.mktemp("deep") / "model", layers=8)


@pytest.fixture(autouse=True)
def fresh_models():
    clear_model_cache()
    yield
    clear_model_cache()


def test_plan_keeps_the_papers_layer_counts_for_smollm2():
    # SmolLM2-135M: 30 layers, adapter 2 + 2, 26 middle layers.
    plan = fedot.make_plan(30, 2, 0.2)
    assert plan.bottom == (0, 1) and plan.top == (28, 29)
    assert len(plan.middle) == round(26 * 0.8) == 21
    assert plan.middle[0] == 2 and plan.middle[-1] == 27  # uniform stride spans the middle
    assert len(plan.emulator_layers) == 25 and len(plan.dropped) == 5
    strides = {b - a for a, b in zip(plan.middle, plan.middle[1:], strict=False)}
    assert strides <= {1, 2}
    half = fedot.make_plan(30, 2, 0.5)
    assert len(half.middle) == 13 and len(half.emulator_layers) == 17
    assert fedot.make_plan(30, 2, 0.0).emulator_layers == tuple(range(30))
    assert half.adapter_full == [0, 1, 28, 29] and half.adapter_emulator == [0, 1, 15, 16]


@pytest.mark.parametrize("k", [0, 4])
def test_plan_refuses_an_adapter_that_leaves_no_middle(k):
    with pytest.raises(ValueError, match="algorithm.adapter_layers"):
        fedot.make_plan(8, k, 0.2)


def test_keys_map_from_emulator_to_full_numbering():
    plan = fedot.make_plan(8, 2, 0.5)  # emulator: 0 1 [2 or 3 ...] 6 7
    state = {"base_model.model.model.layers.5.self_attn.q_proj.lora_A.default.weight": torch.zeros(1)}
    n = len(plan.emulator_layers)
    assert plan.adapter_emulator[-1] == n - 1
    mapped = plan.to_full({k.replace("layers.5", f"layers.{n - 1}"): v for k, v in state.items()})
    assert list(mapped) == ["base_model.model.model.layers.7.self_attn.q_proj.lora_A.default.weight"]
    with pytest.raises(ValueError, match="outside the decoder layers"):
        plan.to_full({"base_model.model.lm_head.weight": torch.zeros(1)})


def test_emulator_without_dropping_computes_what_the_full_model_does(deep_model_dir):
    full = AutoModelForCausalLM.from_pretrained(deep_model_dir)
    emulator = fedot.build_emulator(full, fedot.make_plan(8, 2, 0.0))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(emulator(ids).logits, full(ids).logits)
    assert len(fedot.decoder_layers(full)) == 8  # the full model is left whole


def test_a_client_never_holds_the_dropped_layers(deep_model_dir, tmp_path):
    """What the server sends is a model folder with the reduced layer count and
    parameter count, and none of its tensors is one of the dropped layers'."""
    full = AutoModelForCausalLM.from_pretrained(deep_model_dir)
    plan = fedot.make_plan(8, 2, 0.5)
    assert len(plan.dropped) == 2
    emulator = fedot.build_emulator(full, plan)
    folder, fingerprint = fedot.save_emulator(emulator, load_tokenizer(str(deep_model_dir)), tmp_path / "server")

    # The client's side: install the files it was sent, load them.
    files = fedot.package(folder)
    client_folder = fedot.install(files, fingerprint, tmp_path / "client")
    client = AutoModelForCausalLM.from_pretrained(client_folder)
    assert client.config.num_hidden_layers == len(fedot.decoder_layers(client)) == 6
    full_params, client_params = count_parameters(full)[1], count_parameters(client)[1]
    per_layer = sum(p.numel() for p in fedot.decoder_layers(full)[0].parameters())
    assert client_params == full_params - 2 * per_layer

    sent = load_file(client_folder / "model.safetensors")
    dropped = [p for i in plan.dropped for p in fedot.decoder_layers(full)[i].parameters() if p.dim() == 2]
    kept = [p for i in plan.emulator_layers for p in fedot.decoder_layers(full)[i].parameters() if p.dim() == 2]
    sent_matrices = [t for t in sent.values() if t.dim() == 2]
    assert dropped and kept
    for weight in dropped:
        assert not any(t.shape == weight.shape and torch.equal(t, weight.detach()) for t in sent_matrices)
    for weight in kept:  # the check above can find a layer: it finds every kept one
        assert any(t.shape == weight.shape and torch.equal(t, weight.detach()) for t in sent_matrices)


def test_install_refuses_files_that_do_not_match_the_fingerprint(deep_model_dir, tmp_path):
    full = AutoModelForCausalLM.from_pretrained(deep_model_dir)
    emulator = fedot.build_emulator(full, fedot.make_plan(8, 2, 0.5))
    folder, fingerprint = fedot.save_emulator(emulator, load_tokenizer(str(deep_model_dir)), tmp_path / "server")
    files = fedot.package(folder)
    files["config.json"] = files["config.json"].replace(b'"num_hidden_layers": 6', b'"num_hidden_layers": 8')
    with pytest.raises(ValueError, match="does not match its fingerprint"):
        fedot.install(files, fingerprint, tmp_path / "client")
    assert fedot.installed(fingerprint, tmp_path / "client") is None  # nothing half-written


def test_distillation_aligns_the_emulator_to_the_full_middle(deep_model_dir):
    full = AutoModelForCausalLM.from_pretrained(deep_model_dir)
    plan = fedot.make_plan(8, 2, 0.5)
    emulator = fedot.build_emulator(full, plan)
    bottom_before = [p.clone() for p in emulator.model.layers[0].parameters()]
    tok = load_tokenizer(str(deep_model_dir))
    data = tokenize_records(generate(["subtract", "sort"], 20, seed=1), tok, 64)
    torch.manual_seed(0)
    losses = fedot.distill_emulator(full, emulator, plan, iter_batches(data, 8, tok.pad_token_id, 0), 30, 3e-3)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    for before, after in zip(bottom_before, emulator.model.layers[0].parameters(), strict=True):
        assert torch.equal(before, after)  # the adapter layers are the full model's, untouched
    assert not any(p.requires_grad for p in emulator.parameters())


def test_prepare_builds_matching_full_and_emulator_adapters(deep_model_dir, tiny_cfg):
    cfg = tiny_cfg("algorithm=fedot", "algorithm.drop_rate=0.5", f"model.name={deep_model_dir}")
    setup = fedot.prepare(cfg)
    emu_state = get_adapter_state(setup.emulator.model)
    assert {k.split(".layers.")[1].split(".")[0] for k in emu_state} == {"0", "1", "4", "5"}
    full_keys = set(get_adapter_state(setup.full.model))
    assert {k.split(".layers.")[1].split(".")[0] for k in full_keys} == {"0", "1", "6", "7"}
    assert set(setup.plan.to_full(emu_state)) == full_keys
    assert setup.emulator.model.get_base_model().config.num_hidden_layers == 6
    assert fedot.installed(setup.fingerprint, fedot.model_cache_dir(cfg.model)) == setup.folder


def test_fedot_config_is_checked(tiny_cfg):
    for method in ("prompt_tuning", "ia3"):
        with pytest.raises(UserError, match="cannot be limited to some layers"):
            tiny_cfg("algorithm=fedot", f"peft={method}")
    with pytest.raises(UserError, match="drop_rate"):
        tiny_cfg("algorithm=fedot", "algorithm.drop_rate=1.0")
    with pytest.raises(UserError, match="adapter_layers"):
        fedot.prepare(tiny_cfg("algorithm=fedot", "algorithm.adapter_layers=1"))  # 2 layers: no middle
