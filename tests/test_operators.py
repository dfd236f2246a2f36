"""Trainer operators, each a config switch: response-only logits, gradient
checkpointing, quantized bases, precision, and one base model per worker."""

import importlib.util

import pytest
import torch

from fedllm_flwr.client import local_train
from fedllm_flwr.data import client_data
from fedllm_flwr.data.prompts import LazyExamples, iter_batches, tokenize_records
from fedllm_flwr.data.synthetic import generate
from fedllm_flwr.lm_loss import lm_loss
from fedllm_flwr.model import _BUNDLES, build_model, clear_model_cache, get_adapter_state, set_adapter_state
from fedllm_flwr.train import train_steps


@pytest.fixture
def bundle_data(tiny_cfg):
    def make(*overrides):
        clear_model_cache()
        cfg = tiny_cfg("train.precision=fp32", "peft.dropout=0.0", *overrides)
        bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
        return cfg, bundle, client_data(cfg, bundle.tokenizer, 0, 1)

    return make


def gradients(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "p_tuning", "prefix_tuning"])
def test_response_logits_give_the_models_own_loss_and_gradients(bundle_data, method):
    cfg, bundle, data = bundle_data(f"peft={method}")
    batch = next(iter_batches(data.train, 4, bundle.tokenizer.pad_token_id, seed=0))
    own = bundle.model(**batch).loss
    positions = []  # how many positions of each row the LM head ran at
    hook = bundle.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: positions.append(args[0].shape[-2] if args[0].dim() == 3 else None)
    )
    sliced = lm_loss(bundle.model, batch, response_logits=True)
    hook.remove()
    torch.testing.assert_close(sliced, own, rtol=1e-5, atol=1e-6)
    responses = (batch["labels"][:, 1:] != -100).any(dim=0).sum().item()
    assert positions == [None if method == "lora" else responses]  # lora: the kept rows, flattened
    assert responses < batch["input_ids"].shape[1] - 1  # the prompt is left out
    g_own, g_sliced = gradients(bundle.model, own), gradients(bundle.model, lm_loss(bundle.model, batch))
    for name in g_own:
        torch.testing.assert_close(g_sliced[name], g_own[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_checkpointing_recomputes_one_layer_in_n_and_trains_the_same(bundle_data, every):
    cfg, bundle, data = bundle_data()
    model, start = bundle.model, get_adapter_state(bundle.model)
    # A pre-hook inside each layer's checkpointed forward: the recompute stops early, after
    # the last saved tensor it needs, so a forward hook need not fire a second time.
    layers = model.get_base_model().model.layers
    calls = [0] * len(layers)
    hooks = [layer.self_attn.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]  # fmt: skip
    results = {}
    for enabled in (False, True):
        set_adapter_state(model, start)
        calls[:] = [0] * len(layers)
        train = cfg.train.__class__(
            **{**vars(cfg.train), "local_steps": 2, "gradient_checkpointing": enabled, "checkpoint_every": every}
        )
        train_steps(model, iter_batches(data.train, 4, bundle.tokenizer.pad_token_id, seed=0), train)
        results[enabled] = (get_adapter_state(model), list(calls))
    for hook in hooks:
        hook.remove()
    assert results[False][1] == [2] * len(layers)  # 2 steps, one forward each
    recomputed = [i for i, n in enumerate(results[True][1]) if n == 4]  # and again in the backward pass
    assert len(recomputed) == len(layers) // every and set(results[True][1]) <= {2, 4}
    for name, value in results[False][0].items():
        torch.testing.assert_close(results[True][0][name], value, rtol=1e-4, atol=1e-6)
    assert not model.get_base_model().is_gradient_checkpointing  # switched off again after the call


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
@pytest.mark.parametrize(("quantization", "layer_type"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_a_quantized_base_trains_the_same_adapter_tensors(tiny_cfg, quantization, layer_type):
    clear_model_cache()
    plain = tiny_cfg()
    keys = {k: v.shape for k, v in get_adapter_state(build_model(plain.model, plain.peft).model).items()}
    cfg = tiny_cfg(f"model.quantization={quantization}")
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    q_proj = bundle.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == layer_type
    start = get_adapter_state(bundle.model)
    assert {k: v.shape for k, v in start.items()} == keys  # the same messages federate
    assert all(v.dtype == torch.float32 for v in start.values())
    state, metrics = local_train(cfg, start, 1, 0, 2)
    assert metrics["train-loss"] == metrics["train-loss"] and metrics["train-loss"] > 0  # finite
    assert any(not torch.equal(state[k], start[k]) for k in start)


def test_fp16_with_loss_scaling_is_cuda_only(tiny_cfg):
    from fedllm_flwr.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the CUDA test below applies")
    clear_model_cache()
    cfg = tiny_cfg("train.precision=fp16")
    with pytest.raises(UserError, match="needs CUDA"):
        build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a GradScaler needs CUDA")
def test_fp16_on_cuda_trains_with_a_grad_scaler(tiny_cfg, monkeypatch):
    clear_model_cache()
    cfg = tiny_cfg("train.precision=fp16")
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    scaled = []
    original = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, x: scaled.append(1) or original(self, x))
    start = get_adapter_state(bundle.model)
    state, metrics = local_train(cfg, start, 1, 0, 2)
    assert bundle.dtype == torch.float16 and scaled and metrics["train-loss"] > 0
    assert all(v.dtype == torch.float32 for v in state.values())


@pytest.mark.parametrize("share", [True, False])
def test_a_worker_serving_several_clients_holds_one_base_unless_told_otherwise(tiny_cfg, share):
    clear_model_cache()
    cfg = tiny_cfg(f"model.share_base={str(share).lower()}")
    start = get_adapter_state(build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed).model)
    states = [local_train(cfg, start, 1, partition, 4)[0] for partition in range(4)]
    bases = {id(bundle.model.get_base_model()) for bundle in _BUNDLES.values()}
    assert len(bases) == (1 if share else 5)  # the server-side bundle above, plus one per client
    # Swapping adapters in and out of one base gives every client what its own model would.
    clear_model_cache()
    own = tiny_cfg("model.share_base=false")
    for partition, state in enumerate(states):
        reference, _ = local_train(own, start, 1, partition, 4)
        assert all(torch.equal(reference[k], state[k]) for k in state)


def test_lazy_examples_stream_like_eager_ones_and_skip_what_truncation_drops(bundle_data):
    cfg, bundle, _ = bundle_data()
    tok = bundle.tokenizer
    records = generate(["add", "reverse"], 15, seed=0)
    eager, lazy = tokenize_records(records, tok, 64), LazyExamples(records, tok, 64)
    a, b = iter_batches(eager, 4, tok.pad_token_id, seed=3), iter_batches(lazy, 4, tok.pad_token_id, seed=3)
    for _ in range(10):  # several epochs
        assert torch.equal(next(a)["input_ids"], next(b)["input_ids"])
    assert lazy.dropped == 0
    long = {"instruction": "word " * 100, "input": "", "output": "x", "category": ""}
    with_long = LazyExamples([long, *records[:5], long], tok, 40)
    stream = iter_batches(with_long, 2, tok.pad_token_id, seed=0)
    rows = [row for _ in range(5) for row in next(stream)["input_ids"].tolist()]
    allowed = tokenize_records(records[:5], tok, 40).input_ids
    pad = tok.pad_token_id
    assert with_long.dropped == 2 and all((r[: r.index(pad)] if pad in r else r) in allowed for r in rows)
    # A later round starts where the earlier one stopped, dropped records included.
    resumed = iter_batches(with_long, 2, tok.pad_token_id, seed=0, start=3)
    assert next(resumed)["input_ids"].tolist() == rows[6:8]
    with pytest.raises(ValueError, match="drops every record"):
        next(iter_batches(LazyExamples([long, long], tok, 40), 2, tok.pad_token_id, seed=0))


def test_a_client_tokenizes_only_what_it_draws(bundle_data):
    from fedllm_flwr.client import _DATA

    cfg, bundle, _ = bundle_data("dataset.synthetic.train_per_task=200")
    _DATA.clear()
    local_train(cfg, get_adapter_state(bundle.model), 1, 0, 1)
    (data,) = _DATA.values()
    assert len(data.train) == 720 and len(data.train._cache) == cfg.train.local_steps * cfg.train.batch_size
    assert "holdout" not in vars(data)  # the held-out split is tokenized when first evaluated
