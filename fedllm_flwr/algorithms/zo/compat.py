"""What zeroth-order federation cannot serve (`algorithm=zo`), read by the config: its
messages are seed lists, not adapters, and every node replays them on the whole model."""

from __future__ import annotations

from fedllm_flwr.compat import FT_STEPS, PRIVATE_TENSORS, Conflict, not_in, one_of
from fedllm_flwr.privacy.compat import SECAGG_ON_TOP, SERVER_SIDE

ZO = one_of("algorithm", "zo")
ZO_FULL = one_of("zo.params", "full")

CONFLICTS = (
    Conflict(ZO, not_in("scenario", "fed"), "zeroth-order federates seed lists in the fed scenario"),
    Conflict(ZO, not_in("strategy", "fedavg"), "the server averages seed lists; only fedavg does that"),
    Conflict(ZO, not_in("task", "lm"), "zeroth-order steps take the language-model loss"),
    Conflict(ZO, SERVER_SIDE, "seed lists are released as they are: the server can neither mask nor noise them "
             "(privacy=dp_sgd privatizes each step's scalar on the node)"),
    Conflict(ZO, SECAGG_ON_TOP, "SecAgg+ masks adapter updates, and seed lists are not one"),
    Conflict(ZO, not_in("compression.down", "fp16"), "no adapter travels, so there is nothing to compress"),
    Conflict(ZO, not_in("compression.up", "fp16"), "no adapter travels, so there is nothing to compress"),
    Conflict(ZO, FT_STEPS, "FedAvg + FT tunes an adapter a node is sent; seed-only messages send none"),
    Conflict(ZO, PRIVATE_TENSORS, "every node replays the same steps on the whole adapter; none of it can stay local"),
    Conflict(ZO_FULL, not_in("peft", "lora"),
             "the base weights are tuned under LoRA's zero initial delta; another method changes the model "
             "it starts from", only_if=ZO),
    Conflict(ZO_FULL, not_in("model.quantization", "none"),
             "the base weights themselves are tuned, so they must not be quantized", only_if=ZO),
    Conflict(ZO_FULL, one_of("train.precision", "bf16", "fp16"),
             "steps of ~1e-7 round away below fp32 (train.precision=auto means fp32 here)", only_if=ZO),
)  # fmt: skip
