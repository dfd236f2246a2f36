import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedllm_flwr.keys import MANIFEST_KEY
from fedllm_flwr.transport import manifest_of, message_bytes, pack, unpack, unpack_state


def adapter(seed=0):
    g = torch.Generator().manual_seed(seed)
    names = [
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
        for i in range(3)
        for m in ("q_proj", "v_proj")
        for ab in "AB"
    ]
    return {n: torch.randn((4, 16) if n.endswith("A.weight") else (16, 4), generator=g) for n in names}


def test_pack_round_trip_is_fp16_exact():
    state = adapter()
    back = unpack_state(pack(state), manifest_of(state))
    for k, v in state.items():
        assert back[k].dtype == torch.float32
        assert torch.equal(back[k], v.half().float())


def test_wire_bytes_are_the_fp16_payload_plus_little_framing():
    state = {f"layers.{i}.lora_A.weight": torch.randn(8, 576) for i in range(60)}
    payload = 2 * sum(v.numel() for v in state.values())
    size = message_bytes(pack(state))
    assert payload < size < 1.02 * payload


def corrupt(content, **change):
    arrays = content["arrays"]
    manifest = content[MANIFEST_KEY]
    if "names" in change or "shapes" in change:
        content[MANIFEST_KEY] = ConfigRecord({**dict(manifest), **change})
    if "flat" in change:
        arrays["adapter"] = change["flat"]
    return content


@pytest.mark.parametrize(
    "change, message",
    [
        ("wrong_key", "missing"),
        ("wrong_shape", "shape"),
        ("nan", "non-finite"),
        ("bf16", "dtype bfloat16"),
        ("short", "holds"),
    ],
)
def test_bad_replies_are_refused_with_a_reason(change, message):
    state = adapter()
    expected = manifest_of(state)
    content = pack(state)
    names, shapes = list(content[MANIFEST_KEY]["names"]), list(content[MANIFEST_KEY]["shapes"])
    flat = content["arrays"]["adapter"].numpy()
    if change == "wrong_key":
        names[0] = "base_model.model.other.lora_A.weight"
        corrupt(content, names=names)
    elif change == "wrong_shape":
        shapes[0] = "16x4"
        corrupt(content, shapes=shapes)
    elif change == "nan":
        bad = flat.copy()
        bad[5] = np.nan
        corrupt(content, flat=Array(bad))
    elif change == "bf16":
        raw = torch.from_numpy(flat.astype(np.float32)).bfloat16().view(torch.int16).numpy().tobytes()
        corrupt(content, flat=Array(dtype="bfloat16", shape=tuple(flat.shape), stype="numpy.ndarray", data=raw))
    elif change == "short":
        corrupt(content, flat=Array(flat[:-3].copy()))
    with pytest.raises(ValueError, match=message):
        unpack(content, expected)


def test_a_reply_without_the_packed_array_is_refused():
    content = pack(adapter())
    content["arrays"] = ArrayRecord({"other": Array(np.zeros(3, dtype=np.float16))})
    with pytest.raises(ValueError, match="holding the packed array"):
        unpack(content)
