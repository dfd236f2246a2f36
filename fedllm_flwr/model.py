"""Load and wrap the base model; get and set the adapter state.

One function builds the PEFT model for the server and for every client
(`build_model`), so the adapter keys and shapes cannot drift apart. The frozen
base model is loaded once per process and reused across rounds, clients and
the LoRA ranks of sites that differ only in their adapter.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from peft import PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from fedllm_flwr.config import AdapterConfig, ModelConfig
from fedllm_flwr.errors import UserError
from fedllm_flwr.model_files import resolve_model, weights_in
from fedllm_flwr.peft_methods.builders import peft_config
from fedllm_flwr.peft_methods.compat import LORA_METHODS, TARGETED_METHODS

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls on this CPU with vector units made for them
    (AVX-512 on x86, BF16 on Arm). Without them, bf16 is emulated: on an AVX2-only
    core a bf16 matmul ran 47x slower than fp32 (0.9 against 43 GFLOP/s). torch has
    no public query for this; its private one is read, and False if it is gone."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Compute dtype of the frozen base model for `train.precision`.

    `auto` is bf16 on GPUs that compute in it (compute capability 8.0 and up, and
    ROCm; no loss scaling needed), fp16 (trained with a GradScaler) on older GPUs
    such as the T4 and V100, where bf16 would only be emulated
    (`is_bf16_supported()` counts emulation unless told not to); on CPU bf16 where
    the CPU computes in it (`cpu_has_bf16`), else fp32.
    """
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs CUDA (loss scaling); use bf16 or fp32 on CPU")
    return DTYPES[precision]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_TOKENIZERS: dict[str, PreTrainedTokenizerBase] = {}


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a resolved model, cached per process, with a pad token."""
    if path not in _TOKENIZERS:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as exc:
            raise UserError(f"model.name: cannot load a tokenizer from {path!r}: {str(exc).splitlines()[0]}") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Batches are padded on the right (generation switches to the left itself);
        # Gemma's GGUF tokenizer defaults to the left.
        tokenizer.padding_side = "right"
        _TOKENIZERS[path] = tokenizer
    return _TOKENIZERS[path]


def quantization_config(quantization: str, dtype: torch.dtype):
    """bitsandbytes settings for `model.quantization` (None for `none`)."""
    if quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"model.quantization={quantization} needs bitsandbytes: pip install 'bitsandbytes>=0.46.1'")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
    )


def load_base_model(
    path: str,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str = "none",
    task_type: str = "CAUSAL_LM",
    pad_token_id: int | None = None,
) -> torch.nn.Module:
    """Load the frozen base model (callers cache the wrapped result).

    A quantized base is loaded straight onto `device` by bitsandbytes and made
    ready for adapter training by peft's k-bit preparation. For peft's task type
    SEQ_CLS (task=reward) the causal LM's head is replaced by a one-output scoring
    head (new, so initialised from the global seed), which reads the last token
    that is not `pad_token_id`.
    """
    quant = quantization_config(quantization, dtype)
    kwargs = {"quantization_config": quant, "device_map": {"": device}} if quant is not None else {}
    scorer = task_type == "SEQ_CLS"
    if scorer:
        kwargs["num_labels"] = 1
    loader = AutoModelForSequenceClassification if scorer else AutoModelForCausalLM
    try:
        model = loader.from_pretrained(weights_in(path, dtype) if quant is None else path, dtype=dtype, **kwargs)
    except OSError as exc:
        raise UserError(f"model.name: cannot load {path!r}: {str(exc).splitlines()[0]}") from None
    if quant is None:
        model.to(device)
    else:
        from peft import prepare_model_for_kbit_training

        # Checkpointing is switched per training call (train.gradient_checkpointing).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for param in model.parameters():
        param.requires_grad_(False)
    if scorer:
        model.config.pad_token_id = pad_token_id
    head = model.get_output_embeddings() if not scorer else None
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    return model


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple | None:
    """Hand the LM head a contiguous input. Generation passes it the last position of
    each row, a strided view, and torch's CPU linear then multiplies row by row with a
    copy of the weight: 0.9 s instead of 0.03 s a token on Gemma 3's 262k-row head."""
    x = args[0]
    if isinstance(x, torch.Tensor) and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def _check_targets(model: torch.nn.Module, cfg: AdapterConfig) -> None:
    linear_names = sorted(
        {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    )
    missing = [t for t in cfg.target_modules if t not in linear_names]
    if missing:
        raise UserError(
            f"peft.target_modules: {', '.join(missing)} not found in the model; "
            f"its linear layers are: {', '.join(linear_names)}"
        )
    if cfg.method in LORA_METHODS:
        module, limit = rank_limit(model, cfg.target_modules)
        if cfg.r > limit:
            raise UserError(f"peft.r={cfg.r} is larger than LoRA allows on {module} (min(in, out) = {limit})")


def rank_limit(model: torch.nn.Module, targets: list[str]) -> tuple[str, int]:
    """(module name, the largest LoRA rank it allows: min(in, out)) of the smallest
    targeted linear layer. A larger rank adds parameters and no expressiveness."""
    sizes = [
        (min(mod.in_features, mod.out_features), name.rsplit(".", 1)[-1])
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    limit, module = min(sizes)
    return module, limit


def model_rank_limit(model_cfg: ModelConfig, targets: list[str]) -> tuple[str, int]:
    """`rank_limit` of the base model, from its config alone (built on the meta
    device: no weights are read)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(model_cfg))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return rank_limit(skeleton, targets)


@dataclass
class ModelBundle:
    """A PEFT-wrapped model with its tokenizer and where its base came from."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    base_path: str
    device: torch.device
    dtype: torch.dtype
    initial: dict[str, torch.Tensor] = field(default_factory=dict)
    """The adapter as initialised from the seed (the same on every node)."""

    def complete(self, state: dict[str, torch.Tensor], *rest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full adapter state: `initial`, overridden by `state` and then `rest` in order
        (partial sharing sends part of the adapter; the rest is local or initial)."""
        full = dict(self.initial)
        for part in (state, *rest):
            full.update(part)
        return full


_BASES: dict[tuple, torch.nn.Module] = {}
"""Loaded base models, never wrapped: each bundle wraps a `sharing_copy` of one."""
_BUNDLES: dict[tuple, ModelBundle] = {}


def sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model`'s module tree that holds `model`'s own parameters and buffers:
    no weight is copied. get_peft_model injects its layers into the copy in place and
    leaves `model`, and every other copy, as they are.

    Each tensor is its own copy in deepcopy's memo, so only the modules (and small
    objects such as the config) are new; a tied weight stays tied (one tensor, two
    names), and a quantized weight keeps its quantization state (attributes of the
    same parameter object)."""
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in model.named_buffers(remove_duplicate=False)]
    # A quantized weight's own tensors (bitsandbytes' int8 CB and SCB), which its
    # layer's state may also point to.
    tensors += [v for t in tensors for v in vars(t).values() if isinstance(v, torch.Tensor)]
    return copy.deepcopy(model, memo={id(t): t for t in tensors})


def build_model(
    model_cfg: ModelConfig,
    adapter_cfg: AdapterConfig,
    precision: str = "auto",
    seed: int = 0,
    owner: int | None = None,
    task_type: str = "CAUSAL_LM",
) -> ModelBundle:
    """The PEFT model used everywhere, cached per process.

    The adapter is initialised from `seed`, so the server's initial adapter is
    reproducible; clients overwrite it with the state the server sends. Every
    caller shares one model per configuration, and models that differ only in
    their adapter (sites of unequal LoRA ranks served by one worker) share one
    frozen base: each is a `sharing_copy` of the loaded base, so a 7B base is held
    once however many ranks a worker serves. An `owner` (a client, under
    `model.share_base=false`) gets a base and a model of its own. `task_type` is peft's:
    CAUSAL_LM (task=lm, task=dpo) or SEQ_CLS (task=reward: a sequence scorer whose head
    trains with the adapter), the task's `peft_task_type`.

    The frozen weights are shared, so nothing may change them in place but
    zo.params=full, which runs one adapter configuration per process.
    """
    device = default_device()
    dtype = resolve_dtype(precision, device)
    base_path = resolve_model(model_cfg)
    base_key = (base_path, dtype, str(device), model_cfg.quantization, seed, owner, task_type)
    key = (*base_key, repr(adapter_cfg))
    if key not in _BUNDLES:
        tokenizer = load_tokenizer(base_path)
        if base_key not in _BASES:
            torch.manual_seed(seed)  # a reward model's new head is drawn here
            _BASES[base_key] = load_base_model(
                base_path, dtype, device, model_cfg.quantization, task_type, tokenizer.pad_token_id
            )
        base = sharing_copy(_BASES[base_key])
        if adapter_cfg.method in TARGETED_METHODS:
            _check_targets(base, adapter_cfg)
        torch.manual_seed(seed)
        # Adapter weights are created fp32 (peft's autocast_adapter_dtype) even on
        # a bf16/fp16 base, so the optimizer updates full-precision weights.
        model = get_peft_model(base, peft_config(adapter_cfg, base_path, task_type), autocast_adapter_dtype=True)
        for name, param in model.named_parameters():
            # AdaLoRA's constant rank divisor (peft leaves it trainable); FFA-LoRA's A, kept as seeded.
            if ".ranknum." in name or (adapter_cfg.freeze_a and ".lora_A." in name):
                param.requires_grad_(False)
            elif param.requires_grad and param.dtype != torch.float32:  # prompt encoders, heads: base dtype
                param.data = param.data.float()
        _feed_heads_their_dtype(model)
        model.eval()  # dropout only inside train_steps
        # What `save_pretrained` writes into adapter_config.json: a folder or hub id
        # that loads offline, so AutoPeftModelForCausalLM works on the saved adapter.
        model.peft_config["default"].base_model_name_or_path = base_path
        _BUNDLES[key] = ModelBundle(model, tokenizer, base_path, device, dtype, get_adapter_state(model))
    return _BUNDLES[key]


def _cast_to_weight_dtype(module: torch.nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    if x.is_floating_point() and x.dtype != module.weight.dtype:
        return (x.to(module.weight.dtype), *args[1:])
    return None


def _feed_heads_their_dtype(model: PeftModel) -> None:
    """A trained head (peft's modules_to_save, e.g. a reward model's score) keeps
    fp32 weights on a bf16/fp16 base: cast what reaches it to its own dtype (so
    rewards come out in fp32). peft does this for its adapter layers, not for these."""
    for name, module in model.named_modules():
        if ".modules_to_save." in f".{name}." and isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(_cast_to_weight_dtype)


def get_adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (detached fp32 CPU copies).

    This, not peft's save format, is what federates: for P-tuning peft saves only
    the prompt encoder's output, which cannot be trained further, while the
    trainable parameters are the encoder itself.
    """
    return {n: p.detach().to("cpu", torch.float32).clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def set_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the trainable parameters; names and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        missing = sorted(set(params) - set(state))[:3]
        extra = sorted(set(state) - set(params))[:3]
        raise ValueError(f"adapter state does not match the model: missing {missing}, unexpected {extra}")
    for name, param in params.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise ValueError(f"{name}: shape {tuple(state[name].shape)}, expected {tuple(param.shape)}")
        param.copy_(state[name])


@contextlib.contextmanager
def adapter_off(model: PeftModel) -> Iterator[None]:
    """The base model alone (peft's `disable_adapter`: task=dpo's reference), with every
    parameter trainable or frozen as before afterwards: on the way out peft marks every
    tensor of the adapter trainable again, frozen ones included (FFA-LoRA's A, AdaLoRA's
    rank divisor), which would change what the adapter state holds."""
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        with model.disable_adapter():
            yield
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(trainable.get(name, param.requires_grad))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def clear_model_cache() -> None:
    """Forget cached models and tokenizers (tests; a process switching models)."""
    _BUNDLES.clear()
    _BASES.clear()
    _TOKENIZERS.clear()
