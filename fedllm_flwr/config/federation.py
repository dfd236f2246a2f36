"""How the server federates: `strategy.*`, `personalize.*`, `algorithm.*`, `scenario.*`."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedllm_flwr.algorithms.compat import ALGORITHMS
from fedllm_flwr.strategy.compat import RANKED_STRATEGIES, SCENARIOS, STRATEGIES


@dataclass
class StrategyConfig:
    name: str = "fedavg"
    """fedavg, fedprox (proximal term in the clients' loss), fedavgm / fedadam /
    fedyogi (server optimizers on the averaged update), mifa (remembers every
    client's latest update), median / trimmed_mean (coordinate-wise, unweighted);
    for LoRA of unequal ranks per site: zero_padding (HetLoRA: pad to the largest
    rank, average with HetLoRA's sparsity weights, per LoRA module each client's
    ||B_k A_k||_F over their sum, not its example count; a rank slot no reply holds
    keeps its values; truncate to each site's rank), stacking (FLoRA: the clients'
    factors stacked, so the sum of their B A is exact; nodes merge it and train a
    fresh adapter) or svd (FlexLoRA: the weighted sum of the clients' B A,
    truncated SVD to each site's rank)."""
    proximal_mu: float = 0.01
    """fedprox: weight mu of mu/2 * ||w - w_global||^2 over the adapter weights."""
    server_lr: float = 1.0
    """fedavgm / fedadam / fedyogi: server step size on the pseudo-gradient."""
    server_momentum: float = 0.9
    """fedavgm: momentum; fedadam / fedyogi: beta1."""
    beta2: float = 0.99
    """fedadam / fedyogi: second-moment decay."""
    tau: float = 1e-3
    """fedadam / fedyogi: adaptivity (added to sqrt(v); Flower's classes start v at 0)."""
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
    """uniform: the chance each client answers a round; category: the chance for categories
    `available_per_category` does not list."""
    available_per_client: list[float] = field(default_factory=list)
    """per_client: the chance partition i answers a round, e.g. [1.0,0.2]."""
    available_per_category: list[str] = field(default_factory=list)
    """e.g. [add:0.2,reverse:0.9]; categories not listed use `available_p`."""

    # What the clients need to know of the strategy, read here rather than from the server's
    # strategy classes (fedllm_flwr.strategy.registry, whose class attributes of the same names
    # agree: tests/test_strategy_registry.py).
    @property
    def ranked(self) -> bool:
        """Whether the strategy combines LoRA adapters of unequal ranks."""
        return self.name in RANKED_STRATEGIES

    @property
    def merges_stacks(self) -> bool:
        """Whether nodes merge the stacked delta under a fresh adapter (stacking)."""
        return self.name == "stacking"

    @property
    def client_proximal_mu(self) -> float:
        """The proximal term's weight in the clients' loss: fedprox's `proximal_mu`, else 0."""
        return self.proximal_mu if self.name == "fedprox" else 0.0

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
    """Share of the connected nodes sampled to train each round (Flower's FedAvg samples
    max(int(N fraction_train), min_train_nodes) of N)."""
    fraction_evaluate: float = 1.0
    """Share of nodes asked to evaluate on their held-out split (0 = none)."""
    min_train_nodes: int = 2
    """The fewest nodes sampled to train in a round."""
    min_evaluate_nodes: int = 2
    """The fewest nodes sampled to evaluate in a round."""
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
    `train.lr`), and is evaluated on its held-out split before and after. 0: off.
    With `private` tensors or `privacy` on, each node keeps its personalized adapter
    (saved in its own run folder) and sends only the scores."""

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
class AlgorithmConfig:
    name: str = "none"
    """`none`: clients tune the adapter on the full base model. `fedot`: offsite
    tuning; clients tune the adapter layers against a lossy emulator of the
    base model and never receive its dropped layers (fedllm_flwr/algorithms/fedot/)."""
    drop_rate: float = 0.2
    """fedot: share of the middle layers the emulator drops (uniform stride)."""
    adapter_layers: int = 2
    """fedot: the first and the last this many decoder layers form the adapter
    (where the `peft` method's modules go); the layers between are emulated."""
    distill_steps: int = 0
    """fedot: server-side distillation steps aligning the emulator's middle to the
    full model's hidden states before the first round (0: layer dropping only)."""
    distill_lr: float = 1e-4
    """fedot: AdamW learning rate of the emulator's distillation."""
    distill_path: str = ""
    """fedot: public records for distillation (a local JSON/JSONL file read with
    `dataset.fields`). Empty: the built-in generator's task families that the
    clients' data does not use, so no client data reaches the server."""
    distill_batch_size: int = 4
    """fedot: records per distillation step."""
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

    @property
    def one_holder(self) -> bool:
        """Whether one node trains on every partition's data (global)."""
        return self.name == "global"

    def __post_init__(self) -> None:
        if self.name not in SCENARIOS:
            raise ValueError(f"scenario.name={self.name!r}: use {', '.join(SCENARIOS)}")


@dataclass
class ZoConfig:
    """algorithm=zo: MeZO steps (two forward passes, no backward, no optimizer state)
    along directions drawn from a pool of seeds fixed by the run's seed; a message is
    a list of (seed index, coefficient) pairs, never weights (FedKSeed)."""

    params: str = "adapter"
    """What the steps tune: `adapter`, the `peft` adapter's parameters (they stay on
    the nodes; every node applies the same seed lists to the same initial adapter), or
    `full`, every weight of the base model in fp32 (`train.precision=auto` means fp32
    here: a step of lr * g ~ 1e-7 is below half a bf16 unit of nearly every weight and
    would round away). With `full`, peft=lora's adapter stays at its zero initial
    delta, the run saves `model/final` (a transformers model) and each node keeps its
    copy of the weights in a file of `store_dir`, not in memory between messages."""
    num_seeds: int = 4096
    """K, the pool of candidate seeds; each step draws one of them uniformly."""
    eps: float | None = None
    """Perturbation scale: the loss is taken at w + eps z and w - eps z. Unset: 1e-2
    for `adapter`, 1e-3 for `full`."""
    lr: float | None = None
    """Step size (constant): w <- w - lr g z, g the two-point estimate. z moves every
    tuned weight at once, so rates are far below AdamW's. Unset: 5e-4 for `adapter`
    (LoRA r=8; 1e-3 diverged within 200 steps on the default task), 1e-5 for `full`."""
    store_dir: str = ""
    """zo.params=full: the folder of the nodes' weight files (at most two per node of a
    run, each the size of the base in fp32, left behind when a run ends); empty:
    `zo-weights` in `model.cache_dir`."""

    def resolve(self) -> None:
        """Fill an unset `eps` and `lr` with the default of `params` (Config does, once
        every key is known: a structured config's defaults are built before overrides)."""
        full = self.params == "full"
        self.eps = self.eps if self.eps is not None else (1e-3 if full else 1e-2)
        self.lr = self.lr if self.lr is not None else (1e-5 if full else 5e-4)

    def __post_init__(self) -> None:
        if self.params not in ("adapter", "full"):
            raise ValueError(f"zo.params={self.params!r}: use adapter or full")
        if self.num_seeds < 1 or (self.eps is not None and self.eps <= 0) or (self.lr is not None and self.lr <= 0):
            raise ValueError("zo: num_seeds >= 1, eps > 0 and lr > 0 are required")
