"""A frozen LoRA delta on top of the base model: what stacking (FLoRA) merges.

Under strategy=stacking every round's clients' products are merged into each
node's model, and each round trains a fresh adapter on top. Adding the delta to
the base weights would round it away in bf16 (a LoRA update is far below a bf16
weight's last bit), so it stays factored: `set_merged` adds
scaling * x A^T B^T, in fp32, to the output of each LoRA layer, the product of all
rounds' stacked factors, placed on the layer's device once, with no gradient to them. `save_merged` writes that delta
as a peft LoRA adapter of the stacked rank (alpha scaled alike), which
`PeftModel.from_pretrained` loads as it is. No Flower.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel

from fedllm_flwr.files import publish, temp_folder

#: Module path -> (A: R x in, B: out x R), the delta being scaling * B A.
Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]

_HOOKS = "_fedllm_merged_hooks"
_EXPORT = "merged"


def module_of(key: str) -> str:
    """The LoRA layer's module path of an adapter tensor name (`...q_proj.lora_A.weight`)."""
    return key.split(".lora_A.")[0].split(".lora_B.")[0]


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
    """Write the delta of `factors` as a peft LoRA adapter folder at `target`: rank
    the stacked rank, alpha scaled with it (the same alpha / r as `model`'s adapter),
    and the base model `model`'s adapter names. Atomic, like every adapter we save."""
    rank = next(iter(factors.values()))[0].shape[0]
    config = copy.deepcopy(model.peft_config["default"])
    config.lora_alpha = config.lora_alpha * rank / config.r
    config.r = rank
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


def stacked(parts: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rounds' stacks (round -> adapter tensor name -> A or B, weights folded into B)
    as one pair of factors per module: A's stacked along the rank (rows), B's along
    its columns, rounds in order. Their product is the sum of the rounds' products."""
    out: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for _, tensors in sorted(parts.items()):
        for key, value in tensors.items():
            a_list, b_list = out.setdefault(module_of(key), ([], []))
            (a_list if ".lora_A." in key else b_list).append(value)
    return {path: (torch.cat(a, dim=0), torch.cat(b, dim=1)) for path, (a, b) in out.items()}
