"""How a client trains and how results are scored: `train.*`, `eval.*`, `task.*`, `reward_loss.*`,
`dpo_loss.*`, `grpo.*`."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedllm_flwr.tasks.compat import TASK_RECORDS


@dataclass
class TrainConfig:
    lr: float = 1e-3
    """Peak AdamW learning rate of the adapter."""
    lr_schedule: str = "cosine"
    """`constant` or `cosine` decay to 10% over all rounds' local steps."""
    warmup_steps: int = 0
    """Steps of linear warm-up to `lr` at the start of the run's schedule (0: none)."""
    local_steps: int = 10
    """Optimizer steps per client per round."""
    batch_size: int = 8
    """Examples per micro-batch (per optimizer step with `grad_accum` = 1)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: 8 x 1 x ~70 tokens = ~560 tokens a step
    on the default task. Each micro-batch's loss is weighted by its share of the
    step's response tokens, so the step's gradient is that of one batch of
    batch_size x grad_accum examples."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay on the adapter."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    precision: str = "auto"
    """`auto` (bf16 on GPUs that support it, else fp16; on CPU bf16 where it has AVX-512 or
    Arm BF16, else fp32, as emulated bf16 is many times slower), `bf16`, `fp16` (CUDA only, with a
    GradScaler) or `fp32`. Adapter weights always stay fp32."""
    threads: int = 0
    """torch threads per client process (0 = torch's default; while training under
    scenario=global, where one node trains alone, every core)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead
    of keeping them: a step's peak memory drops for more compute (measured on
    SmolLM2-135M: the Efficiency results page)."""
    checkpoint_every: int = 1
    """With gradient_checkpointing: recompute one decoder layer in N (1: every
    layer). N = 2 keeps half the layers' activations for half the recompute
    (transformers' `every_n_layers`)."""
    response_logits: bool = True
    """Apply the LM head only where a response token is predicted (the loss is
    the same): faster steps and no full-vocabulary logits in memory (measured:
    the Efficiency results page, from benchmarks/results/response_logits.json).
    false computes every position's logits, as transformers does."""

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
    """Evaluation after round 0 (before training), every N rounds, and after the
    last round: the server scores the test set, the clients their held-out splits
    (not at round 0). 0: neither ever evaluates (train only; score the saved
    adapters later with `fedllm-flwr evaluate`)."""
    initial: bool = True
    """Also evaluate at round 0, before any training (false: the first row holds no
    scores; worth it where runs share a starting point already scored elsewhere)."""
    batch_size: int = 16
    """Examples per batch when scoring (loss) and generating (the metric)."""
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

    def due(self, server_round: int, last_round: int) -> bool:
        """Whether round `server_round` of a run ending at `last_round` is evaluated."""
        if self.every <= 0:
            return False
        if server_round == 0:
            return self.initial
        return server_round == last_round or server_round % self.every == 0

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError("eval.every must be >= 0 (0: no evaluation)")
        if self.code_prompt not in ("raw", "instruct", "chat"):
            raise ValueError(f"eval.code_prompt={self.code_prompt!r}: use raw, instruct or chat")
        if not 0 <= self.shots <= 8:
            raise ValueError(f"eval.shots must be in 0..8, got {self.shots}")


@dataclass
class TaskConfig:
    name: str = "lm"
    """`lm`: the adapter learns to write responses (causal LM loss on response
    tokens). `reward`: a reward model. A scalar head on the base model scores a
    whole sequence (the last non-padding token's hidden state); the head trains
    with the adapter and travels with it. Trained on (prompt, chosen, rejected)
    pairs with `reward_loss`; scored by preference accuracy (r_chosen >
    r_rejected) and mean margin on held-out pairs. `dpo`: direct preference
    optimisation of the language model itself on the same pairs, with `dpo_loss`;
    the reference policy is the base with the adapter switched off (no second model
    held). Scored by implicit-reward accuracy and margin, and at the end by how often
    greedy answers are closer to the chosen than to the rejected response. `grpo`:
    reinforcement learning from rewards each site computes on its own (`grpo.*`):
    per prompt a group of sampled answers, each rewarded by the site's reward
    functions, pushed toward those above their group's mean; scored as `lm` is."""

    def __post_init__(self) -> None:
        if self.name not in TASK_RECORDS:
            raise ValueError(f"task.name={self.name!r}: use {', '.join(TASK_RECORDS)}")

    @property
    def pairs(self) -> bool:
        """Whether the task reads preference pairs rather than instruction records (`TASK_RECORDS`)."""
        return self.records == "pairs"

    @property
    def records(self) -> str:
        """The records the task reads (`TASK_RECORDS`): prompts, pairs or questions."""
        return TASK_RECORDS[self.name]


#: Pairwise reward losses (conf/reward_loss/; fedllm_flwr/tasks/reward.py).
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


#: Preference-optimisation losses (conf/dpo_loss/; fedllm_flwr/tasks/dpo.py).
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust")


@dataclass
class DpoLossConfig:
    """The loss of task=dpo on h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)),
    the log-probabilities summed over response tokens (TRL's definitions)."""

    name: str = "sigmoid"
    """`sigmoid`: -log sigmoid(beta h) (DPO); with `label_smoothing` e,
    -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h), conservative DPO (cDPO).
    `hinge`: max(0, 1 - beta h) (SLiC). `ipo`: (h_avg - 1 / (2 beta))^2 with h_avg
    the log-ratios averaged over each response's tokens (IPO, normalised as TRL
    does). `robust`: (-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e),
    unbiased under labels flipped with probability e (rDPO)."""
    beta: float = 0.1
    """How far from the reference the policy may move (IPO's tau): the scale of the
    implicit reward beta (log pi - log ref)."""
    label_smoothing: float = 0.0
    """sigmoid and robust: e, the assumed chance that a pair's preference is flipped."""

    def __post_init__(self) -> None:
        if self.name not in DPO_LOSSES:
            raise ValueError(f"dpo_loss.name={self.name!r}: use one of {', '.join(DPO_LOSSES)}")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
            raise ValueError("dpo_loss: beta > 0 and label_smoothing in [0, 0.5) are required")
        if self.label_smoothing and self.name not in ("sigmoid", "robust"):
            raise ValueError(f"dpo_loss.label_smoothing applies to sigmoid and robust, not {self.name}")


#: GRPO's loss normalisations and reward scalings (fedllm_flwr/tasks/grpo/losses.py).
GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo")
GRPO_SCALES = ("group", "batch", "none")


@dataclass
class GrpoConfig:
    """task=grpo: group-relative policy optimisation with rewards computed at each site
    (TRL 1.16's `GRPOConfig` names and defaults where one exists)."""

    group_size: int = 4
    """Answers sampled per prompt, G (TRL's `num_generations`). A step trains on
    `train.batch_size` prompts x G answers."""
    temperature: float = 1.0
    """Sampling temperature of the answers."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p (1: all)."""
    max_new_tokens: int = 16
    """Longest answer sampled, in tokens (TRL's `max_completion_length`); `dr_grpo`
    divides by it."""
    beta: float = 0.04
    """Weight of the KL term to the reference (the base with the adapter off); 0 drops
    the term and the reference's forward pass (TRL's default is 0)."""
    epsilon: float = 0.2
    """The policy ratio is clipped to [1 - epsilon, 1 + epsilon_high]."""
    epsilon_high: float = 0.0
    """The clip's upper side (DAPO's clip-higher); 0 means `epsilon`."""
    loss_type: str = "dapo"
    """How token losses are averaged: `grpo` (per answer, then over answers),
    `bnpo` (over the batch's tokens), `dr_grpo` (over answers x max_new_tokens),
    `dapo` (over the step's tokens; TRL's default)."""
    scale_rewards: str = "group"
    """Advantages are rewards minus their group's mean, divided by the group's std
    (`group`), by the batch's (`batch`), or not divided (`none`, Dr. GRPO)."""
    rewards: list[str] = field(default_factory=lambda: ["exact_match"])
    """Reward functions, summed: built-in names (`exact_match`, `gsm8k`, `humaneval`,
    `format`, `brevity`) or a callable by dotted path, `package.module:function`
    (fedllm_flwr/tasks/grpo/rewards.py says what it receives)."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per reward function (empty: all 1)."""
    client_rewards: list[str] = field(default_factory=list)
    """Per site, by partition id: its own reward functions, separated by `+` or commas
    (`[exact_match, exact_match+brevity]`); a SuperNode's `--node-config
    grpo-rewards=...` takes precedence. Empty: every site uses `rewards`."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"grpo.group_size must be >= 2 (a group needs answers to compare), got {self.group_size}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError("grpo: temperature > 0, top_p in (0, 1] and max_new_tokens >= 1 are required")
        if self.beta < 0 or not 0 <= self.epsilon < 1 or self.epsilon_high < 0:
            raise ValueError("grpo: beta >= 0, epsilon in [0, 1) and epsilon_high >= 0 are required")
        if self.loss_type not in GRPO_LOSSES:
            raise ValueError(f"grpo.loss_type={self.loss_type!r}: use one of {', '.join(GRPO_LOSSES)}")
        if self.scale_rewards not in GRPO_SCALES:
            raise ValueError(f"grpo.scale_rewards={self.scale_rewards!r}: use one of {', '.join(GRPO_SCALES)}")
        if not self.rewards:
            raise ValueError("grpo.rewards must name at least one reward function")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ValueError(
                f"grpo.reward_weights has {len(self.reward_weights)} weights for {len(self.rewards)} reward functions"
            )

    @property
    def clip_high(self) -> float:
        return self.epsilon_high or self.epsilon
