"""The base weights of a PEFT-wrapped model as a tuned state (`zo.params=full`): by
their transformers names, reset from the base checkpoint, kept by a node between its
messages, and saved as a model transformers loads. No Flower.

peft leaves the base's parameters where they were and renames them
(`base_model.model.` in front, `.base_layer.` inside a wrapped layer); `hf_name`
undoes that. Tied weights (SmolLM2's embedding and head) are one parameter, tuned once.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedllm_flwr.files import publish, temp_folder, write_atomically

log = logging.getLogger(__name__)


def hf_name(name: str) -> str:
    """A base parameter's name in the wrapped model -> its name in the base checkpoint."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def base_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every base parameter (not the adapter's, frozen ones such as FFA-LoRA's A
    included), by its transformers name, in the model's own order (the order z is drawn in)."""
    adapters = [f".{name}." for name in getattr(model, "peft_config", {})]
    return {
        hf_name(n): p for n, p in model.named_parameters()
        if not p.requires_grad and not any(a in f"{n}." for a in adapters)
    }  # fmt: skip


@torch.no_grad()
def reset_to(weights: dict[str, torch.nn.Parameter], source: dict[str, torch.Tensor]) -> None:
    """Copy `source` (same names) into `weights` in place."""
    missing = sorted(set(weights) - set(source))
    if missing:
        raise ValueError(f"the stored weights lack {len(missing)} tensors, e.g. {missing[0]}")
    for name, param in weights.items():
        param.copy_(source[name])


def pristine(base_path: str) -> dict[str, torch.Tensor]:
    """The base checkpoint's weights in fp32, as transformers loads them (a whole
    second model in memory while it lasts: `reset_to_base` avoids that)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    return {n: p.detach() for n, p in model.named_parameters()}


@torch.no_grad()
def reset_to_base(weights: dict[str, torch.nn.Parameter], base_path: str) -> None:
    """Copy the base checkpoint's weights into `weights`, one tensor at a time from its
    safetensors files where they hold every one (a converted GGUF's do), else through
    `pristine`."""
    from safetensors import safe_open

    files = sorted(Path(base_path).glob("*.safetensors")) if Path(base_path).is_dir() else []
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {name: h for h in handles for name in h.keys()}  # noqa: SIM118 (not a dict)
    if not set(weights) <= set(where):
        reset_to(weights, pristine(base_path))
        return
    for name, param in weights.items():
        param.copy_(where[name].get_tensor(name))


def chain(previous: str, server_round: int, indices: np.ndarray, coefficients: np.ndarray) -> str:
    """The fingerprint of a weight history: the previous one and a round's steps."""
    digest = hashlib.sha1(previous.encode())
    digest.update(np.int64(server_round).tobytes())
    digest.update(np.ascontiguousarray(indices, np.int64).tobytes())
    digest.update(np.ascontiguousarray(coefficients, np.float64).tobytes())
    return digest.hexdigest()[:20]


def store_folder(store_dir: str, model_cfg) -> Path:
    """`zo.store_dir`, else `zo-weights` in the model cache."""
    from fedllm_flwr.model_files import model_cache_dir

    return Path(store_dir).expanduser() if store_dir else model_cache_dir(model_cfg) / "zo-weights"


class WeightStore:
    """A node's copies of the global weights between messages, in `folder`: one
    safetensors file per weight history, `<node>-<history fingerprint>.safetensors`
    (`node`: which node of which run, `NodeState.identity`).

    Why a file: a deployed SuperNode starts a fresh ClientApp process for every
    message, and a Flower context state of full weights would be copied with each one.
    Why two: a message can fail after the node stored its new weights but before Flower
    saved its state; the retry starts again from the weights the saved state names.
    A save keeps those (`keep`) and the new ones and deletes the node's others, so a
    node holds at most two files (each the size of the base in fp32), however often a
    message is retried.
    """

    def __init__(self, folder: Path, node: str) -> None:
        if not node:
            raise ValueError("zo.params=full: a node needs an identity (Flower's run and node id) to name its files")
        self.folder, self.node = folder, node

    def path(self, fingerprint: str) -> Path:
        return self.folder / f"{self.node}-{fingerprint}.safetensors"

    def load(self, fingerprint: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        path = self.path(fingerprint)
        if not path.is_file():
            raise ValueError(f"this node's weights are gone from {path}; a restarted node catches up from round 0")
        with safe_open(str(path), framework="pt") as handle:
            stored = handle.metadata().get("fingerprint")
            if stored != fingerprint:
                raise ValueError(f"{path} holds weights {stored}, not this node's {fingerprint}")
            return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)

    def save(self, weights: dict[str, torch.Tensor], fingerprint: str, keep: str = "") -> None:
        """Store `weights` as those of history `fingerprint`; of this node's other files
        only `keep`'s (the weights its saved state names; "": none) stays."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        wanted = {self.path(fingerprint), self.path(keep) if keep else None}
        # Its other files, and what a process stopped while writing one left (`write_atomically`'s).
        for path in [*self.folder.glob(f"{self.node}-*.safetensors"), *self.folder.glob(f".{self.node}-*.tmp")]:
            if path not in wanted:
                path.unlink(missing_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in weights.items()}
        write_atomically(self.path(fingerprint),
                         lambda tmp: save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint}))  # fmt: skip


def save_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, weights: dict[str, torch.Tensor], target: Path
) -> Path:
    """`weights` (transformers names) as a model folder AutoModelForCausalLM loads,
    with the tokenizer, written whole or not at all."""
    base = model.get_base_model()
    with temp_folder(target.parent, target.name) as tmp:
        base.save_pretrained(tmp, state_dict={k: v.detach() for k, v in weights.items()})
        tokenizer.save_pretrained(tmp)
        publish(tmp, target, replace=True)
    return target
