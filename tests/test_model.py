import dataclasses

import pytest
import torch

from fedllm_flwr.config import AdapterConfig, ModelConfig
from fedllm_flwr.errors import UserError
from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state, set_adapter_state
from fedllm_flwr.model_files import resolve_model


@pytest.fixture
def bundle(tiny_cfg):
    clear_model_cache()
    cfg = tiny_cfg("train.precision=bf16")
    return build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)


def test_adapter_is_only_lora_weights_in_fp32(bundle):
    state = get_adapter_state(bundle.model)
    assert state and all("lora_" in k for k in state)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state} == {"q_proj", "v_proj"}
    assert all(v.dtype == torch.float32 for v in state.values())
    assert bundle.dtype == torch.bfloat16  # the frozen base runs in half precision on CPU
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_adapter_state_round_trip(bundle):
    state = get_adapter_state(bundle.model)
    changed = {k: torch.randn_like(v) for k, v in state.items()}
    set_adapter_state(bundle.model, changed)
    back = get_adapter_state(bundle.model)
    assert all(torch.equal(back[k], changed[k]) for k in state)
    with pytest.raises(ValueError, match="missing"):
        set_adapter_state(bundle.model, dict(list(changed.items())[1:]))


def test_initial_adapter_is_seeded(tiny_cfg):
    cfg = tiny_cfg()
    clear_model_cache()
    a = get_adapter_state(build_model(cfg.model, cfg.peft, "auto", seed=1).model)
    clear_model_cache()
    b = get_adapter_state(build_model(cfg.model, cfg.peft, "auto", seed=1).model)
    clear_model_cache()
    c = get_adapter_state(build_model(cfg.model, cfg.peft, "auto", seed=2).model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_model_is_cached_per_process(tiny_cfg):
    cfg = tiny_cfg()
    first = build_model(cfg.model, cfg.peft, "auto", cfg.seed)
    assert build_model(cfg.model, cfg.peft, "auto", cfg.seed) is first


def test_absent_target_modules_are_named(tiny_cfg):
    cfg = tiny_cfg()
    with pytest.raises(UserError, match=r"qkv not found in the model; its linear layers are: .*q_proj"):
        build_model(cfg.model, AdapterConfig(target_modules=["q_proj", "qkv"]), "auto", 0)


@pytest.mark.parametrize(
    "name, message",
    [
        ("no-such-model", "not a known alias"),
        ("/nonexistent/folder", "neither a model folder nor a .gguf file"),
        ("/nonexistent/model.gguf", "does not exist"),
    ],
)
def test_unknown_model_names_are_refused(name, message):
    with pytest.raises(UserError, match=message):
        resolve_model(ModelConfig(name=name))


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(ModelConfig(name=str(tmp_path)))


def test_fp16_on_cpu_is_refused(tiny_cfg):
    cfg = tiny_cfg()
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        build_model(cfg.model, cfg.peft, "fp16", 0)


def test_a_converted_model_is_stored_once_in_the_compute_dtype(tiny_model_dir, tmp_path):
    import shutil

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from fedllm_flwr.model_files import CONVERTED, weights_in

    folder = tmp_path / "converted"
    shutil.copytree(tiny_model_dir, folder)
    (folder / CONVERTED).touch()
    target = weights_in(str(folder), torch.bfloat16)
    assert target == f"{folder}-bf16"
    with safe_open(f"{target}/model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118 (not a dict)
    written = (tmp_path / "converted-bf16" / "model.safetensors").stat().st_mtime_ns
    assert weights_in(str(folder), torch.bfloat16) == target
    assert (tmp_path / "converted-bf16" / "model.safetensors").stat().st_mtime_ns == written  # once
    copy = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16).state_dict()
    cast = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(copy[k], cast[k]) for k in cast)  # the same weights as casting on load
    assert weights_in(str(folder), torch.float32) == str(folder)
    assert weights_in(str(tiny_model_dir), torch.bfloat16) == str(tiny_model_dir)  # not ours: loaded as it is


def test_generation_hands_the_lm_head_contiguous_inputs(bundle):
    """A strided input makes torch's CPU linear copy the head's weight per row (15 s
    instead of 1 s for 16 greedy answers of 16 tokens on Gemma 3)."""
    from fedllm_flwr.data.prompts import format_prompt
    from fedllm_flwr.evaluate.generation import generate

    seen = []
    head = bundle.model.get_base_model().get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    prompts = [format_prompt("What is 4 + 5?"), format_prompt("Reverse: cat dog bird")]
    try:
        answers = generate(bundle.model, bundle.tokenizer, prompts, max_new_tokens=4)
    finally:
        hook.remove()
    assert len(answers) == 2 and len(seen) >= 2 and all(seen)


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), torch.float16), ((8, 0), torch.bfloat16)])
def test_auto_precision_takes_bf16_only_on_gpus_that_compute_in_it(monkeypatch, capability, expected):
    """A T4 (7.5) runs bf16 only by emulation, which torch.cuda.is_bf16_supported() counts by
    default: auto must give it fp16 (with a GradScaler); an A100 (8.0) gets bf16."""
    from types import SimpleNamespace

    from fedllm_flwr.model import resolve_dtype

    major, minor = capability
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major, minor=minor)
    )
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    assert resolve_dtype("auto", torch.device("cuda")) == expected


def _base_tensors(bundle) -> dict[str, torch.Tensor]:
    """Every frozen parameter and every buffer of a bundle's model, by name."""
    model = bundle.model
    frozen = {n: p for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return frozen | dict(model.named_buffers(remove_duplicate=False))


def test_sites_of_unequal_ranks_share_one_base_and_train_as_if_alone(tiny_cfg):
    """model.share_base: a worker serving sites of ranks 2 and 4 holds one frozen base
    (a 7B base per rank would not fit), and each site's numbers are those of a model
    built for it alone."""
    from fedllm_flwr.client import local_evaluate, local_train

    cfg = tiny_cfg()
    sites = {rank: dataclasses.replace(cfg, peft=cfg.peft.at_rank(rank)) for rank in (2, 4)}

    def bundle_of(rank):
        site = sites[rank]
        return build_model(site.model, site.peft, site.train.precision, site.seed)

    def train(rank):
        state, metrics = local_train(sites[rank], bundle_of(rank).initial, 1, rank // 2 - 1, 2)
        return state, metrics["train-loss"]

    def evaluate(rank, state):
        return local_evaluate(sites[rank], state, rank // 2 - 1, 2)["eval-loss"]

    clear_model_cache()
    low, high = bundle_of(2), bundle_of(4)
    assert low is not high and low.model is not high.model
    low_base, high_base = _base_tensors(low), _base_tensors(high)
    assert set(low_base) == set(high_base) and len(low_base) > 10
    assert all(low_base[n].data_ptr() == high_base[n].data_ptr() for n in low_base)
    assert {tuple(v.shape) for k, v in low.initial.items() if "lora_A" in k} == {(2, 32)}
    assert {tuple(v.shape) for k, v in high.initial.items() if "lora_A" in k} == {(4, 32)}
    # Interleaved in one process: rank 2 trains, rank 4 trains, rank 2 is evaluated after it.
    low_state, low_loss = train(2)
    high_state, high_loss = train(4)
    together = (low_loss, evaluate(2, low_state), high_loss, evaluate(4, high_state))
    alone = []
    for rank in (2, 4):
        clear_model_cache()
        state, loss = train(rank)
        alone += [loss, evaluate(rank, state)]
        trained = low_state if rank == 2 else high_state
        assert all(torch.equal(state[k], trained[k]) for k in state)
    assert together == tuple(alone)


def test_share_base_false_keeps_a_model_per_client(tiny_cfg):
    cfg = tiny_cfg()
    clear_model_cache()
    one, two = (build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed, owner) for owner in (0, 1))
    first, second = _base_tensors(one), _base_tensors(two)
    assert not any(first[n].data_ptr() == second[n].data_ptr() for n in first if first[n].numel())
