"""What the PEFT methods are called, what kind each is, and what a method cannot serve.

Read by the config (`peft.method`'s values, the keys a kind needs) and by the other
plug-ins' declarations; `builders.BUILDERS` has one builder per name
(tests/test_peft_methods.py keeps them in step).
"""

from __future__ import annotations

from fedllm_flwr.compat import Conflict, is_set, not_in, one_of

PEFT_METHODS = ("lora", "dora", "adalora", "loha", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")
#: The methods that insert modules into named linear layers (`target_modules`).
TARGETED_METHODS = ("lora", "dora", "adalora", "loha", "ia3")
#: The methods whose modules are LoRA's factors B A (ranks per site, FFA-LoRA).
LORA_METHODS = ("lora", "dora")
#: The targeted methods that can be limited to some decoder layers (`layers`; peft's
#: IA3Config has no `layers_to_transform`).
LAYERED_METHODS = ("lora", "dora", "adalora", "loha")
#: Prompt methods whose adapter is a single tensor: nothing to keep apart.
SINGLE_TENSOR_METHODS = ("prompt_tuning", "prefix_tuning")

NOT_LORA = not_in("peft", *LORA_METHODS)

CONFLICTS = (
    Conflict(one_of("peft", "adalora"), one_of("scenario", "fed"),
             "AdaLoRA's rank allocator zeroes different singular values on each client, so the mean of the "
             "clients' triplets is no model any client trained (use scenario=global or local, or peft=lora)"),
    Conflict(is_set("peft.client_ranks"), NOT_LORA, "sites get LoRA ranks, and this method has no rank of LoRA's"),
    Conflict(is_set("peft.freeze_a"), NOT_LORA, "FFA-LoRA freezes LoRA's A, which this method does not have"),
)  # fmt: skip
