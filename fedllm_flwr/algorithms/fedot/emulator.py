"""FedOT (offsite tuning, `algorithm=fedot`): clients tune an adapter against a lossy emulator and
never hold the full model.

The model owner splits the base model's decoder layers into an *adapter* (the
first and last `k` layers, where the trainable PEFT modules go) and the
*middle*. The emulator is the adapter layers around a uniform-stride subset of
the middle (layer dropping at `drop_rate`), optionally distilled so its output
matches the full middle's. Clients receive the emulator once, as a model folder;
every round afterwards exchanges only the adapter's trainable tensors, named in
the emulator's layer numbering. The server renumbers them to plug the adapter
into the full model.

No Flower here: the strategy ships `package()` bytes, the ClientApp calls
`install()`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fedllm_flwr.config import Config
from fedllm_flwr.data.prompts import iter_batches, tokenize_records
from fedllm_flwr.data.sources import read_records
from fedllm_flwr.data.synthetic import TASKS, generate
from fedllm_flwr.errors import UserError
from fedllm_flwr.files import file_lock, publish, temp_folder
from fedllm_flwr.model import ModelBundle, build_model, default_device, load_base_model, load_tokenizer, resolve_dtype
from fedllm_flwr.model_files import model_cache_dir, resolve_model

log = logging.getLogger(__name__)

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class EmulatorPlan:
    """Which of the full model's decoder layers the emulator keeps, in order."""

    num_layers: int
    bottom: tuple[int, ...]
    middle: tuple[int, ...]
    """The kept middle layers (full-model indices)."""
    top: tuple[int, ...]

    @property
    def emulator_layers(self) -> tuple[int, ...]:
        """Full-model index of each emulator layer."""
        return self.bottom + self.middle + self.top

    @property
    def dropped(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.emulator_layers)

    @property
    def adapter_full(self) -> list[int]:
        """Adapter layers in the full model's numbering."""
        return [*self.bottom, *self.top]

    @property
    def adapter_emulator(self) -> list[int]:
        """Adapter layers in the emulator's numbering."""
        n = len(self.emulator_layers)
        return [*range(len(self.bottom)), *range(n - len(self.top), n)]

    def to_full(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename an adapter state from emulator to full-model layer numbers."""
        return {_renumber(k, self.emulator_layers): v for k, v in state.items()}


def adapter_positions(num_layers: int, adapter_layers: int) -> list[int]:
    """The first and last `adapter_layers` layer indices of a `num_layers` stack."""
    return [*range(adapter_layers), *range(num_layers - adapter_layers, num_layers)]


def _renumber(key: str, mapping: tuple[int, ...]) -> str:
    match = _LAYER.search(key)
    if match is None:
        raise ValueError(f"{key}: adapter tensor outside the decoder layers cannot be placed in the full model")
    return f"{key[: match.start(1)]}{mapping[int(match.group(1))]}{key[match.end(1) :]}"


def make_plan(num_layers: int, adapter_layers: int, drop_rate: float) -> EmulatorPlan:
    """Keep round(m * (1 - drop_rate)) of the m middle layers at a uniform stride
    (the first and last middle layers included when two or more are kept)."""
    if adapter_layers < 1 or 2 * adapter_layers >= num_layers:
        raise ValueError(
            f"algorithm.adapter_layers={adapter_layers}: the model has {num_layers} layers, so use 1.."
            f"{(num_layers - 1) // 2} (the first and last k layers are the adapter, the rest the emulator)"
        )
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"algorithm.drop_rate must be in [0, 1), got {drop_rate}")
    middle = list(range(adapter_layers, num_layers - adapter_layers))
    keep = max(1, round(len(middle) * (1.0 - drop_rate)))
    if keep == 1:
        kept = [middle[len(middle) // 2]]
    else:
        kept = sorted({middle[round(i * (len(middle) - 1) / (keep - 1))] for i in range(keep)})
    return EmulatorPlan(
        num_layers,
        tuple(range(adapter_layers)),
        tuple(kept),
        tuple(range(num_layers - adapter_layers, num_layers)),
    )


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's layer list of a Hugging Face causal LM (Llama-style `model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"algorithm=fedot needs a decoder with `model.layers` (Llama, Mistral, Qwen, SmolLM...); "
            f"{type(model).__name__} has none"
        )
    return layers


def build_emulator(model: torch.nn.Module, plan: EmulatorPlan) -> torch.nn.Module:
    """A copy of `model` holding only the plan's layers (the full model is untouched)."""
    layers = decoder_layers(model)
    if len(layers) != plan.num_layers:
        raise ValueError(f"the plan is for {plan.num_layers} layers, the model has {len(layers)}")
    # Copy the model without its layers, then only the kept layers: the dropped
    # ones are never duplicated.
    inner = model.model
    saved, inner.layers = inner.layers, torch.nn.ModuleList()
    try:
        emulator = copy.deepcopy(model)
    finally:
        inner.layers = saved
    emulator.model.layers = torch.nn.ModuleList(copy.deepcopy(layers[i]) for i in plan.emulator_layers)
    for position, layer in enumerate(emulator.model.layers):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = position  # the KV cache is indexed by position
    config = emulator.config
    config.num_hidden_layers = len(plan.emulator_layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in plan.emulator_layers]
    return emulator


def distill_emulator(
    full: torch.nn.Module,
    emulator: torch.nn.Module,
    plan: EmulatorPlan,
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
) -> list[float]:
    """Align the emulator's middle to the full model's on the hidden state that
    enters the top adapter layers: the squared error relative to the full model's
    state, per token, averaged over non-padding tokens. (Relative, because a few
    hidden dimensions of models like SmolLM2 carry values in the thousands and
    would otherwise be all a plain MSE sees.)

    The bottom adapter layers are shared and frozen, so both see the same input;
    only the kept middle layers train, in fp32 (the emulator returns to its dtype
    afterwards). Returns the loss per step.
    """
    k, m = len(plan.bottom), len(plan.middle)
    middle = [emulator.model.layers[i] for i in range(k, k + m)]
    dtype = next(emulator.parameters()).dtype
    emulator.float()
    for param in emulator.parameters():
        param.requires_grad_(False)
    params = [p for layer in middle for p in layer.parameters()]
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses: list[float] = []
    emulator.train()
    try:
        for _ in range(steps):
            batch = next(batches)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            mask = batch["attention_mask"].float()
            with torch.no_grad():
                target = full(**inputs, output_hidden_states=True).hidden_states[plan.num_layers - len(plan.top)]
            hidden = emulator(**inputs, output_hidden_states=True).hidden_states[k + m]
            error = ((hidden - target.float()) ** 2).sum(-1) / (target.float() ** 2).sum(-1).clamp_min(1e-6)
            loss = (error * mask).sum() / mask.sum()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        emulator.eval()
        for param in params:
            param.requires_grad_(False)
        emulator.to(dtype)
    return losses


def emulator_fingerprint(folder: Path) -> str:
    """SHA-256 over the folder's file names and contents."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _write_emulator(cache_dir: Path, fill, fingerprint: str | None = None) -> tuple[Path, str]:
    """Fill a temporary folder under `cache_dir/emulators/` with `fill(folder)`,
    hash it (checking `fingerprint` when given), and rename it to its hash under a
    lock, so other processes never see a half-written emulator."""
    root = cache_dir / "emulators"
    with temp_folder(root, "emulator") as tmp:
        fill(tmp)
        got = emulator_fingerprint(tmp)
        if fingerprint is not None and got != fingerprint:
            raise ValueError(f"received emulator does not match its fingerprint ({got[:16]} != {fingerprint[:16]})")
        target = root / got[:16]
        with file_lock(root / f".{target.name}.lock"):
            if not (target / "config.json").is_file():
                publish(tmp, target)
    return target, got


def save_emulator(emulator: torch.nn.Module, tokenizer, cache_dir: Path) -> tuple[Path, str]:
    """Write the emulator (and tokenizer) as a model folder named by its content
    hash under `cache_dir/emulators/`; returns (folder, fingerprint)."""

    def fill(folder: Path) -> None:
        emulator.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return _write_emulator(cache_dir, fill)


def package(folder: Path) -> dict[str, bytes]:
    """The emulator folder's files, as sent to clients."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def installed(fingerprint: str, cache_dir: Path) -> Path | None:
    """The emulator folder for `fingerprint` if this machine has it."""
    folder = cache_dir / "emulators" / fingerprint[:16]
    return folder if (folder / "config.json").is_file() else None


def install(files: dict[str, bytes], fingerprint: str, cache_dir: Path) -> Path:
    """Write a received emulator into the cache (once per machine), after
    checking that its content hash is the one announced."""
    found = installed(fingerprint, cache_dir)
    if found is not None:
        return found
    for name in files:
        if "/" in name or name.startswith("."):
            raise ValueError(f"emulator file name {name!r} is not a plain file name")

    def fill(folder: Path) -> None:
        for name, data in files.items():
            (folder / name).write_bytes(data)

    return _write_emulator(cache_dir, fill, fingerprint)[0]


@dataclass
class FedotSetup:
    """What the server holds for a FedOT run."""

    plan: EmulatorPlan
    full: ModelBundle
    """The full model with the adapter in its first and last layers (evaluation, saving)."""
    emulator: ModelBundle
    """The emulator as clients load it; its adapter state is what travels."""
    folder: Path
    fingerprint: str
    distill_losses: list[float]

    @property
    def emulator_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())


def distill_records(cfg: Config) -> list[dict[str, str]]:
    """Public records for distillation: `algorithm.distill_path`, else generated
    examples of the built-in task families the clients' data does not use."""
    if cfg.algorithm.distill_path:
        return read_records(cfg.dataset, cfg.algorithm.distill_path, "train", 0, key="algorithm.distill_path")
    used = set(cfg.dataset.synthetic.tasks) if cfg.dataset.source == "synthetic" else set()
    families = [t for t in TASKS if t not in used] or list(TASKS)
    return generate(families, 100, seed=cfg.seed + 1)


def prepare(cfg: Config) -> FedotSetup:
    """Split the base model, build (and optionally distill) the emulator, cache it
    as a model folder, and build the full and emulator PEFT models."""
    algo = cfg.algorithm
    device = default_device()
    dtype = resolve_dtype(cfg.train.precision, device)
    base_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(base_path)
    raw = load_base_model(base_path, dtype, device)
    try:
        plan = make_plan(len(decoder_layers(raw)), algo.adapter_layers, algo.drop_rate)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    emulator = build_emulator(raw, plan)
    losses: list[float] = []
    if algo.distill_steps:
        data = tokenize_records(distill_records(cfg), tokenizer, cfg.dataset.max_seq_len)
        batches = iter_batches(data, algo.distill_batch_size, tokenizer.pad_token_id, seed=cfg.seed)
        log.info("Distilling the emulator: %s steps", algo.distill_steps)
        losses = distill_emulator(raw, emulator, plan, batches, algo.distill_steps, algo.distill_lr)
    del raw
    folder, fingerprint = save_emulator(emulator, tokenizer, model_cache_dir(cfg.model))
    del emulator
    full_peft = dataclasses.replace(cfg.peft, layers=plan.adapter_full)
    full = build_model(cfg.model, full_peft, cfg.train.precision, cfg.seed)
    client_cfg = client_config(cfg, folder)
    emu = build_model(client_cfg.model, client_cfg.peft, cfg.train.precision, cfg.seed)
    mapped, expected = set(plan.to_full(emu.initial)), set(full.initial)
    if mapped != expected:
        raise RuntimeError(f"emulator and full adapters differ: {sorted(mapped ^ expected)[:3]}")
    return FedotSetup(plan, full, emu, folder, fingerprint, losses)


def client_config(cfg: Config, folder: Path) -> Config:
    """The config a FedOT client runs with: the emulator folder as its base model
    and the adapter on the emulator's first and last `adapter_layers` layers."""
    num_layers = int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])
    layers = adapter_positions(num_layers, cfg.algorithm.adapter_layers)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name=str(folder)),
        peft=dataclasses.replace(cfg.peft, layers=layers),
    )
