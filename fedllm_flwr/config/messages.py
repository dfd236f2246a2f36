"""What travels and what the server may learn: `compression.*`, `privacy.*`."""

from __future__ import annotations

from dataclasses import dataclass

from fedllm_flwr.compression import CODECS, DENSE_CODECS, LOSSY_CODECS


def _either(names: tuple[str, ...]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1]


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
        if self.down not in DENSE_CODECS:
            raise ValueError(
                f"compression.down={self.down!r}: use {_either(DENSE_CODECS)} (top-k applies to updates, and the "
                "server sends the adapter itself)"
            )
        if self.up not in CODECS:
            raise ValueError(f"compression.up={self.up!r}: use {_either(CODECS)}")
        if self.int8_scale not in ("tensor", "row"):
            raise ValueError(f"compression.int8_scale={self.int8_scale!r}: use tensor or row")
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ValueError(f"compression.topk_ratio must be in (0, 1], got {self.topk_ratio}")

    @property
    def lossy_feedback(self) -> bool:
        """Whether clients keep an error-feedback residual."""
        return self.error_feedback and self.up in LOSSY_CODECS


PRIVACY_MODES = ("none", "dp", "dp_sgd", "secagg")


@dataclass
class PrivacyConfig:
    """What the server may learn (conf/privacy/; fedllm_flwr/privacy/)."""

    name: str = "none"
    """`none`; `dp`: differential privacy per client, every client clips its update to
    `clipping_norm` and the server adds Gaussian noise to their mean (Flower's
    client-side fixed-clipping wrapper around our strategy), logging the budget
    spent each round; `dp_sgd`: differential privacy per record, each site runs
    DP-SGD on its own records (per-record clipping, Gaussian noise, Poisson sampling)
    and accounts its own epsilon (fedllm_flwr/privacy/dp_sgd.py); `secagg`: secure
    aggregation with Flower's SecAgg+ protocol, so the server only learns the
    weighted mean of the updates."""
    noise_multiplier: float = 1.0
    """dp: z, the noise's standard deviation over the clipping norm. The server adds
    N(0, (z C / n)^2) to the mean of n clipped updates. dp_sgd: the noise each site
    adds to a step's sum of clipped record gradients is N(0, (z C)^2) (ignored when
    `target_epsilon` is set)."""
    clipping_norm: float = 1.0
    """dp: C, the L2 norm each client's update (all shared adapter tensors as one
    vector) is scaled down to. On the default task a round's LoRA update (10 steps
    at lr 1e-3) is several times larger, so 1.0 clips every one of them (the
    Privacy study on the Feature studies page). dp_sgd: the L2 norm each record's
    gradient (every trainable tensor as one vector) is scaled down to; under
    algorithm=zo, the bound on each record's directional derivative (a scalar)."""
    delta: float = 1e-5
    """dp, dp_sgd: the delta at which epsilon is reported (well below 1 / number of
    clients for dp, below 1 / records at a site for dp_sgd)."""
    target_epsilon: float = 0.0
    """dp_sgd: each site's budget. When set (> 0), a site picks the noise multiplier
    that spends exactly this epsilon over the run's planned steps (`num_rounds` rounds
    of the steps its first round asks for) at its own sampling rate, and sits out
    (counted by the server) any round that would take it past the budget."""
    max_epsilon: float = 0.0
    """dp_sgd: the most a site will spend (0: `target_epsilon`, if set). A site trains with
    the run's noise and sits out (counted by the server) any round that would take it
    past this; a SuperNode sets its own with `--node-config dp-max-epsilon=<eps>`."""
    secagg: bool = False
    """dp_sgd: mask each site's (already private) update with SecAgg+ as well, so the
    server learns only their sum (the `secagg` keys below set the protocol)."""
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
        if self.name not in PRIVACY_MODES:
            raise ValueError(f"privacy.name={self.name!r}: use {_either(PRIVACY_MODES)}")
        if self.target_epsilon < 0 or self.max_epsilon < 0:
            raise ValueError("privacy.target_epsilon and privacy.max_epsilon must be >= 0 (0: not set)")
        if self.noise_multiplier < 0 or self.clipping_norm <= 0 or not 0 < self.delta < 1:
            raise ValueError("privacy: noise_multiplier >= 0, clipping_norm > 0 and delta in (0, 1) are required")
        if self.num_shares <= 0 or self.reconstruction_threshold <= 0 or self.clipping_range <= 0:
            raise ValueError("privacy: num_shares, reconstruction_threshold and clipping_range must be > 0")
        if self.quantization_range < 2 or self.max_weight <= 0 or self.timeout <= 0:
            raise ValueError("privacy: quantization_range >= 2, max_weight > 0 and timeout > 0 are required")

    @property
    def masked(self) -> bool:
        """Whether updates travel under SecAgg+ (`secagg`, or `dp_sgd` with `secagg` on top)."""
        return self.name == "secagg" or (self.name == "dp_sgd" and self.secagg)

    @property
    def budget(self) -> float:
        """dp_sgd: the epsilon a site never passes (0: none)."""
        return self.max_epsilon or self.target_epsilon

    @property
    def record_level(self) -> bool:
        """Whether each site privatizes its own training records (DP-SGD) before anything leaves it."""
        return self.name == "dp_sgd"


#: Training algorithms beyond plain adapter tuning (conf/algorithm/).
