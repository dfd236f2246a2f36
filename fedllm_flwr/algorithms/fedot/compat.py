"""What FedOT cannot serve (`algorithm=fedot`), read by the config."""

from __future__ import annotations

from fedllm_flwr.compat import Conflict, not_in, one_of
from fedllm_flwr.peft_methods.compat import LAYERED_METHODS

FEDOT = one_of("algorithm", "fedot")

CONFLICTS = (
    Conflict(FEDOT, not_in("model.quantization", "none"), "FedOT cuts its emulator from the full-precision base"),
    Conflict(FEDOT, not_in("peft", *LAYERED_METHODS),
             "FedOT puts the adapter into the first and last decoder layers, and this method cannot be "
             "limited to some layers"),
)  # fmt: skip
