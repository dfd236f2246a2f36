"""Message compression: codecs, their bytes on the wire, error feedback, and validation."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedllm_flwr.compression import Codec, ErrorFeedback, sizes_of
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg
from fedllm_flwr.transport import (
    ARRAYS_KEY,
    PACKED_KEY,
    is_relative,
    manifest_of,
    message_bytes,
    pack,
    unpack,
    unpack_state,
    update_between,
)

INT8, INT8_ROW, TOPK = Codec("int8"), Codec("int8", int8_scale="row"), Codec("topk", topk_ratio=0.1)


def smollm2_lora(seed=0, scale=0.02) -> dict[str, np.ndarray]:
    """Random tensors with the shapes of SmolLM2-135M's LoRA r=8 on q_proj, v_proj."""
    rng = np.random.default_rng(seed)
    shapes = {
        "q_proj.lora_A": (8, 576),
        "q_proj.lora_B": (576, 8),
        "v_proj.lora_A": (8, 576),
        "v_proj.lora_B": (192, 8),
    }
    return {
        f"layers.{i}.{name}.weight": (rng.standard_normal(shape) * scale).astype(np.float32)
        for i in range(30)
        for name, shape in shapes.items()
    }


def flat(state):
    return np.concatenate([v.reshape(-1) for v in state.values()])


def test_dense_codecs_round_trip():
    state = smollm2_lora()
    assert all(np.array_equal(unpack(pack(state, Codec("fp32")))[k], v) for k, v in state.items())
    back = unpack(pack(state, Codec("fp16")))
    assert all(np.array_equal(back[k], v.astype(np.float16).astype(np.float32)) for k, v in state.items())


@pytest.mark.parametrize("codec", [INT8, INT8_ROW], ids=["per-tensor", "per-row"])
def test_int8_error_is_at_most_half_a_step_of_its_scale(codec):
    state = smollm2_lora()
    back = unpack(pack(state, codec))
    for name, value in state.items():
        rows = value.reshape(value.shape[0], -1) if codec.int8_scale == "row" else value.reshape(1, -1)
        step = np.abs(rows).max(axis=1, keepdims=True) / 127
        error = np.abs(back[name].reshape(rows.shape) - rows)
        assert (error <= step / 2 + 1e-7).all(), name
        assert error.max() > 0  # it is lossy
    # Per-row scales are finer: less error overall.
    if codec is INT8_ROW:
        coarse = unpack(pack(state, INT8))
        assert np.abs(flat(back) - flat(state)).mean() < np.abs(flat(coarse) - flat(state)).mean()


def test_topk_keeps_the_largest_share_of_every_tensor_and_zeros_the_rest():
    state = smollm2_lora()
    back = unpack(pack(state, TOPK))
    for name, value in state.items():
        kept = back[name] != 0
        assert kept.sum() == int(np.ceil(0.1 * value.size)), name
        assert np.abs(value[kept]).min() >= np.abs(value[~kept]).max()
        np.testing.assert_allclose(back[name][kept], value[kept], rtol=1e-3)


def test_bytes_on_the_wire_shrink_as_documented():
    state = smollm2_lora()
    fp16 = message_bytes(pack(state, Codec("fp16")))
    assert 921_600 < fp16 < 1.02 * 921_600
    ratios = {c.name + c.int8_scale: message_bytes(pack(state, c)) / fp16 for c in (INT8, INT8_ROW, TOPK)}
    assert 0.49 < ratios["int8tensor"] < 0.51
    assert 0.59 < ratios["int8row"] < 0.61  # 23,520 fp32 row scales on top
    assert 0.29 < ratios["topktensor"] < 0.31  # 10% of the values at 6 bytes each
    assert message_bytes(pack(state, Codec("fp32"))) / fp16 > 1.99


@pytest.mark.parametrize("codec", [INT8, TOPK], ids=["int8", "topk"])
def test_error_feedback_sends_everything_eventually(codec):
    manifest = manifest_of(smollm2_lora())
    update = flat(smollm2_lora(seed=1, scale=1e-3))
    feedback, sent = ErrorFeedback(codec), np.zeros_like(update)
    for _ in range(20):
        sent += codec.decode(feedback.compress(update, manifest), manifest)
    # What was sent plus what is still held is exactly what was produced.
    np.testing.assert_allclose(sent + feedback.residual, 20 * update, rtol=1e-4, atol=1e-7)
    # What is held back stays bounded. Without feedback, top-k would send the same
    # 10% of a constant update's coordinates every time; with it, the rest build up
    # until they are sent too (the smallest last).
    assert np.abs(feedback.residual).max() <= 10 * np.abs(update).max()
    if codec is TOPK:
        plain = codec.decode(codec.encode(update, manifest), manifest)
        assert (plain != 0).mean() < 0.101 and (sent != 0).mean() > 0.6


def corrupted(codec, change):
    content = pack(smollm2_lora(), codec, relative=True)
    arrays = content[ARRAYS_KEY]
    if change == "indices_out_of_order":
        idx = arrays["indices"].numpy().copy()
        idx[[0, 1]] = idx[[1, 0]]
        arrays["indices"] = Array(idx)
    elif change == "index_out_of_range":
        idx = arrays["indices"].numpy().copy()
        idx[-1] = 10**7
        arrays["indices"] = Array(idx)
    elif change == "too_few_values":
        arrays[PACKED_KEY] = Array(arrays[PACKED_KEY].numpy()[:-1].copy())
    elif change == "negative_scale":
        scales = arrays["scales"].numpy().copy()
        scales[3] = -1.0
        arrays["scales"] = Array(scales)
    elif change == "int8_minus_128":
        values = arrays[PACKED_KEY].numpy().copy()
        values[0] = -128
        arrays[PACKED_KEY] = Array(values)
    elif change == "float_values_for_int8":
        arrays[PACKED_KEY] = Array(arrays[PACKED_KEY].numpy().astype(np.float16))
    elif change == "missing_scales":
        del arrays["scales"]
    elif change == "nan_topk_value":
        values = arrays[PACKED_KEY].numpy().copy()
        values[2] = np.nan
        arrays[PACKED_KEY] = Array(values)
    return content


@pytest.mark.parametrize(
    ("codec", "change", "message"),
    [
        (TOPK, "indices_out_of_order", "increasing"),
        (TOPK, "index_out_of_range", "within"),
        (TOPK, "too_few_values", "expected 46110 indices and values"),
        (TOPK, "nan_topk_value", "non-finite"),
        (INT8, "negative_scale", "non-negative"),
        (INT8, "int8_minus_128", "-128"),
        (INT8, "float_values_for_int8", "dtype float16"),
        (INT8, "missing_scales", "expects arrays"),
    ],
)
def test_malformed_compressed_replies_are_refused_with_a_reason(codec, change, message):
    content = corrupted(codec, change)
    with pytest.raises(ValueError, match=message):
        unpack(content, manifest_of(smollm2_lora()), codec)


def test_a_reply_in_another_codec_than_the_runs_is_refused():
    content = pack(smollm2_lora(), INT8, relative=True)
    with pytest.raises(ValueError, match="this run uses"):
        unpack(content, codec=TOPK)
    with pytest.raises(ValueError, match="unknown codec"):
        content["adapter-manifest"]["codec"] = "zip"
        unpack(content)


@pytest.fixture
def strategy(task_identity):
    """An AdapterFedAvg that sent node 7 an int8-encoded adapter this round."""
    global_state = {k: v[:2] for k, v in list(smollm2_lora().items())[:8]}
    strat = AdapterFedAvg(down=INT8, up=TOPK)
    strat._expected = manifest_of(global_state)
    strat.sent[7] = unpack(pack(global_state, INT8))
    return strat, global_state


def reply(node, content, n=10):
    content["metrics"] = MetricRecord({"num-examples": n, "train-loss": 1.0})
    sent = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content, reply_to=sent)


def test_the_server_adds_a_relative_reply_to_what_it_sent_that_node(strategy):
    strat, global_state = strategy
    received = {k: torch.from_numpy(v) for k, v in strat.sent[7].items()}
    trained = {k: v + 0.01 * torch.sign(v) for k, v in received.items()}
    content = pack(update_between(trained, received), TOPK, relative=True)
    assert is_relative(content)
    arrays, _ = strat.aggregate_train(1, [reply(7, content)])
    update = unpack(content)
    for key, value in arrays.items():
        np.testing.assert_allclose(value.numpy(), strat.sent[7][key] + update[key], rtol=1e-6)
        # The top-10% of the update came through; the rest of the adapter is what was sent.
        changed = value.numpy() != strat.sent[7][key]
        assert changed.sum() == TOPK.kept(changed.size)
    assert strat.ledger.pop(1)["clients-ok"] == 1


def test_a_relative_reply_from_a_node_that_was_sent_nothing_is_dropped(strategy):
    strat, global_state = strategy
    content = pack({k: np.zeros_like(v) for k, v in global_state.items()}, TOPK, relative=True)
    arrays, _ = strat.aggregate_train(1, [reply(8, content)])
    assert arrays is None
    assert strat.ledger.pop(1)["clients-dropped"] == 1


def test_client_app_keeps_its_error_feedback_across_rounds(tiny_cfg, tiny_model_dir, task_identity):
    import client_app
    from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state

    clear_model_cache()
    cfg = tiny_cfg("compression=topk")
    state = get_adapter_state(build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed).model)
    overrides = " ".join([f"model.name={tiny_model_dir}", "dataset.synthetic.train_per_task=20",
                          "train.local_steps=2", "train.batch_size=4", "compression=topk"])  # fmt: skip
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={"overrides": overrides})  # fmt: skip
    residuals = []
    for server_round in (1, 2):
        content = pack(state)
        content["config"] = ConfigRecord({"server-round": server_round, "num-rounds": 2})
        out = client_app.train(Message(content, dst_node_id=5, message_type=MessageType.TRAIN), context)
        assert is_relative(out.content)
        update = unpack_state(out.content, manifest_of(state), TOPK)
        sizes = sizes_of(manifest_of(state))
        assert sum(int((v != 0).sum()) for v in update.values()) <= sum(TOPK.kept(s) for s in sizes)
        residuals.append(context.state.array_records["error-feedback"]["residual"].numpy().copy())
    assert residuals[0].shape == (sum(sizes),) and np.abs(residuals[0]).max() > 0
    assert not np.array_equal(residuals[0], residuals[1])


def test_an_int8_reply_whose_scaled_values_overflow_is_dropped_and_the_mean_stays_finite(task_identity, caplog):
    """Finite int8 values times finite scales can still leave fp32 (127 x 3e38 = inf):
    the codec checks the decoded values, not only the scales."""
    global_state = {k: v[:2] for k, v in list(smollm2_lora().items())[:8]}
    strat = AdapterFedAvg(down=INT8, up=INT8)
    strat._expected = manifest_of(global_state)
    for node in (7, 8):
        strat.sent[node] = unpack(pack(global_state, INT8))
    update = {k: np.full_like(v, 0.01) for k, v in global_state.items()}
    sound, huge = pack(update, INT8, relative=True), pack(update, INT8, relative=True)
    scales = huge[ARRAYS_KEY]["scales"].numpy().copy()
    scales[0] = 3e38  # finite and non-negative: it passes the scale check
    huge[ARRAYS_KEY]["scales"] = Array(scales)
    with caplog.at_level("WARNING", logger="flwr"):
        arrays, _ = strat.aggregate_train(1, [reply(7, sound), reply(8, huge)])
    assert all(np.isfinite(value.numpy()).all() for value in arrays.values())
    row = strat.ledger.pop(1)
    assert row["clients-ok"] == 1 and row["clients-dropped"] == 1 and row["failed-nodes"] == "8"
    assert "reply from node 8 dropped" in caplog.text and "non-finite" in caplog.text


def _spoiled(content, codec_name: str):
    """`content` with one value that decodes to a non-finite number, as a faulty or
    hostile client could send it in each codec's own arrays."""
    arrays = content[ARRAYS_KEY]
    if codec_name == "int8":
        scales = arrays["scales"].numpy().copy()
        scales[0] = 3e38  # finite, but 127 x 3e38 is not
        arrays["scales"] = Array(scales)
        return content
    values = arrays[PACKED_KEY].numpy().copy()
    values[0] = np.inf if codec_name != "fp32" else np.nan
    arrays[PACKED_KEY] = Array(values)
    return content


@pytest.mark.parametrize("codec_name", ["fp32", "fp16", "int8", "topk"])
def test_no_codec_lets_a_non_finite_value_into_the_mean(codec_name, task_identity):
    """Whatever the uplink codec, a reply that decodes to a NaN or Inf anywhere is dropped
    and the mean of the others stays finite."""
    codec = Codec(codec_name)
    global_state = {k: v[:2] for k, v in list(smollm2_lora().items())[:8]}
    strat = AdapterFedAvg(down=Codec("fp16"), up=codec)
    strat._expected = manifest_of(global_state)
    for node in (7, 8):
        strat.sent[node] = unpack(pack(global_state, Codec("fp16")))
    update = {k: np.full_like(v, 0.01) for k, v in global_state.items()}
    bad = _spoiled(pack(update, codec, relative=True), codec_name)
    arrays, _ = strat.aggregate_train(1, [reply(7, pack(update, codec, relative=True)), reply(8, bad)])
    assert all(np.isfinite(value.numpy()).all() for value in arrays.values())
    assert strat.ledger.pop(1)["failed-nodes"] == "8"
