"""A global adapter that starts from a saved one (`init.adapter`): read, checked against
the configured adapter, and returned as the adapter state that federates. No Flower.

The folder is peft's format (`adapter_config.json`, `adapter_model.safetensors`), as
`save_pretrained` writes it and a run's `adapter/final` holds. peft's own
`get_peft_model_state_dict` names what such a file must hold for the model in hand and
`set_peft_model_state_dict` puts it in place, so every method's naming is peft's; the
model's own adapter is put back afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from fedllm_flwr.errors import UserError
from fedllm_flwr.model import get_adapter_state, set_adapter_state

KEY = "init.adapter"


def read_adapter(model: PeftModel, folder: str) -> dict[str, torch.Tensor]:
    """The adapter state of `model` with the saved adapter in `folder` in place (fp32 CPU
    copies); UserError in one line naming `init.adapter` when the folder is missing,
    unreadable, or holds another method, other tensors or other shapes."""
    path = Path(folder).expanduser()
    weights, config = path / "adapter_model.safetensors", path / "adapter_config.json"
    if not weights.is_file() or not config.is_file():
        raise UserError(f"{KEY}={folder}: no adapter_model.safetensors and adapter_config.json there (peft's format)")
    try:
        saved_type = json.loads(config.read_text()).get("peft_type", "")
        from safetensors.torch import load_file

        tensors = load_file(str(weights))
    except (OSError, ValueError) as error:
        raise UserError(f"{KEY}={folder}: cannot be read ({error})") from None
    ours = model.peft_config["default"]
    if str(saved_type).upper() != str(ours.peft_type.value).upper():
        raise UserError(f"{KEY}={folder}: a {saved_type} adapter, and this run trains {ours.peft_type.value}")
    expected = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(model).items()}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        example = (missing or extra)[0]
        raise UserError(f"{KEY}={folder}: {len(missing)} tensors missing and {len(extra)} unexpected for this "
                        f"run's adapter (e.g. {example}); its target modules or layers differ")  # fmt: skip
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{KEY}={folder}: {name} has shape {tuple(tensors[name].shape)}, this run's {shape} "
                            f"(another rank?)")  # fmt: skip
    before = get_adapter_state(model)
    try:
        set_peft_model_state_dict(model, tensors)
        return get_adapter_state(model)
    finally:
        set_adapter_state(model, before)
