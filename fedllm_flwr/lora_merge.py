"""A frozen LoRA delta on top of the base model: what stacking (FLoRA) merges.

Under strategy=stacking every round's clients' products are merged into each
node's model, and each round trains a fresh adapter on top. Adding the delta to
the base weights would round it away in bf16 (a LoRA update is far below a bf16
weight's last bit), so it stays factored: `set_merged` adds
scaling * x A^T B^T, in fp32, to the output of each LoRA layer, with the factors
placed on the layer's device once and no gradient to them. `stacked` makes those
factors from the parts the server and the nodes hold (`fedllm_flwr.lora_stacks`).
`save_merged` writes the delta as a peft LoRA adapter of each module's merged rank
(alpha scaled alike), which `PeftModel.from_pretrained` loads as it is. No Flower.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel

from fedllm_flwr.files import publish, temp_folder
from fedllm_flwr.lora_stacks import HeldStacks, Parts

#: Module path -> (A: R x in, B: out x R), the delta being scaling * B A.
Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]

_HOOKS = "_fedllm_merged_hooks"
_EXPORT = "merged"


def set_merged(model: PeftModel, factors: Factors | None) -> None:
    """Make `factors` the frozen delta of `model`'s LoRA layers (None: none), in
    place of any set before."""
    for handle in getattr(model, _HOOKS, []):
        handle.remove()
    handles = []
    for path, (a, b) in (factors or {}).items():
        layer = model.get_submodule(path)
        scaling = float(layer.scaling["default"])
        device = next(layer.parameters()).device  # once here, not a copy in every forward
        a32, b32 = a.detach().to(device, torch.float32), b.detach().to(device, torch.float32)

        def add_delta(module, args, output, a32=a32, b32=b32, scaling=scaling):
            delta = (args[0].float() @ a32.T) @ b32.T
            return output + (scaling * delta).to(output.dtype)

        handles.append(layer.register_forward_hook(add_delta))
    setattr(model, _HOOKS, handles)


def save_merged(model: PeftModel, target: Path, factors: Factors) -> Path:
    """Write the delta of `factors` as a peft LoRA adapter folder at `target`: each
    module at its own rank (`r` the largest, `rank_pattern` for the modules below it),
    alpha scaled with the rank (the same alpha / r as `model`'s adapter), and the base
    model `model`'s adapter names. Atomic, like every adapter we save."""
    ranks = {path: a.shape[0] for path, (a, _) in factors.items()}
    config = copy.deepcopy(model.peft_config["default"])
    scale = config.lora_alpha / config.r
    config.r = max(ranks.values())
    config.lora_alpha = scale * config.r
    # peft matches a pattern against the end of a module's name in the base model.
    smaller = {re.escape(path.removeprefix("base_model.model.")): r for path, r in ranks.items() if r != config.r}
    config.rank_pattern = smaller
    config.alpha_pattern = {pattern: scale * r for pattern, r in smaller.items()}
    config.lora_dropout = 0.0
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    model.add_adapter(_EXPORT, config)
    try:
        with torch.no_grad():
            for path, (a, b) in factors.items():
                layer = model.get_submodule(path)
                layer.lora_A[_EXPORT].weight.copy_(a)
                layer.lora_B[_EXPORT].weight.copy_(b)
        target.parent.mkdir(parents=True, exist_ok=True)
        with temp_folder(target.parent, target.name) as tmp:
            model.save_pretrained(tmp, selected_adapters=[_EXPORT])  # peft writes it into tmp/merged/
            publish(tmp / _EXPORT, target, replace=True)
    finally:
        model.delete_adapter(_EXPORT)
        model.set_adapter("default")
        for name, param in model.named_parameters():  # as before: set_adapter marks every default tensor trainable
            param.requires_grad_(trainable.get(name, False))
    return target


def stacked(parts: Parts) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The held parts (round -> part, `fedllm_flwr.lora_stacks`) as one pair of fp32
    factors per module, (A, B diag(w)): the product is the merged delta. The same
    parts give the same bits on the server and on every node."""
    return {
        path: (torch.from_numpy(a), torch.from_numpy(b)) for path, (a, b) in HeldStacks(parts).merged_factors().items()
    }
