"""The whole config: every group, and the rules that span groups.

`conf/config.yaml` starts from the `fedllm_schema` node registered here, so every
key and type is checked by OmegaConf while Hydra composes; each group's
`__post_init__` and `Config.__post_init__` then reject combinations that cannot work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from fedllm_flwr.config.data import DatasetConfig
from fedllm_flwr.config.federation import (
    RANKED_STRATEGIES,
    AlgorithmConfig,
    PersonalizeConfig,
    ScenarioConfig,
    StrategyConfig,
    ZoConfig,
)
from fedllm_flwr.config.messages import CompressionConfig, PrivacyConfig
from fedllm_flwr.config.model import LAYERED_METHODS, LORA_METHODS, TARGETED_METHODS, AdapterConfig, ModelConfig
from fedllm_flwr.config.run import LogConfig, RunConfig, SweepConfig
from fedllm_flwr.config.training import DpoLossConfig, EvalConfig, RewardLossConfig, TaskConfig, TrainConfig


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
    zo: ZoConfig = field(default_factory=ZoConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    reward_loss: RewardLossConfig = field(default_factory=RewardLossConfig)
    dpo_loss: DpoLossConfig = field(default_factory=DpoLossConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)
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

        if self.strategy.name in RANKED_STRATEGIES or self.peft.client_ranks:
            self._check_ranks()
        if self.algorithm.name == "zo":
            self._check_zo()
        if self.task.name == "reward":
            self._check_reward()
        if self.task.name == "dpo":
            self._check_dpo()
        if self.privacy.name != "none":
            self._check_privacy()
        if self.resume and self.personalize.private:
            raise ValueError("resume cannot restore personalize.private tensors: they live on the clients only")
        if self.resume and self.compression.lossy_feedback:
            raise ValueError(
                "resume cannot restore the clients' error-feedback residuals (compression.error_feedback), which "
                "live on the clients only; resume with compression.error_feedback=false or restart the run"
            )

    def _check_ranks(self) -> None:
        s, ranks = self.strategy.name, list(self.peft.client_ranks)
        if s in RANKED_STRATEGIES and self.peft.method not in LORA_METHODS:
            raise ValueError(
                f"strategy={s} combines LoRA's factors B and A; peft={self.peft.method} has none. "
                f"Use peft={' or '.join(LORA_METHODS)}"
            )
        if s not in RANKED_STRATEGIES and len(set(ranks)) > 1:
            raise ValueError(
                f"peft.client_ranks={ranks} gives the sites unequal ranks, and strategy={s} averages tensors of "
                f"one shape; use strategy={' or '.join(RANKED_STRATEGIES)}"
            )
        if s in RANKED_STRATEGIES and self.peft.freeze_a:
            raise ValueError(
                f"peft.freeze_a keeps each site's A at its own seeded initialisation, which strategy={s} "
                "would replace; use strategy=fedavg with FFA-LoRA"
            )
        if s in RANKED_STRATEGIES and self.personalize.private:
            raise ValueError(f"personalize.private keeps tensors local; strategy={s} reshapes every tensor it sends")
        if s == "stacking" and self.peft.method != "lora":
            raise ValueError(
                f"strategy=stacking merges the clients' B A under a fresh adapter; peft={self.peft.method} normalises "
                "the merged weight itself (DoRA), so a delta added outside it is not what the clients trained. "
                "Use peft=lora"
            )
        if s == "stacking" and (self.personalize.ft_steps or self.task.name != "lm"):
            raise ValueError(
                "strategy=stacking exports the merged delta as a LoRA adapter; personalize.ft_steps and "
                "task=reward (a trained head beside it) need the adapter itself: use strategy=svd or zero_padding"
            )
        if s in RANKED_STRATEGIES and self.algorithm.name != "none":
            raise ValueError(f"strategy={s} needs algorithm=none (FedOT's emulator adapters are not combined here)")

    def _check_zo(self) -> None:
        self.zo.resolve()
        others = {
            "scenario": (self.scenario.name, "fed"), "strategy": (self.strategy.name, "fedavg"),
            "task": (self.task.name, "lm"), "privacy": (self.privacy.name, "none"),
            "compression.down": (self.compression.down, "fp16"), "compression.up": (self.compression.up, "fp16"),
        }  # fmt: skip
        for key, (value, needed) in others.items():
            if value != needed:
                raise ValueError(
                    f"algorithm=zo federates seed lists, not adapters: it runs with {key}={needed}, not {key}={value}"
                )
        if self.personalize.ft_steps or self.personalize.private:
            raise ValueError("algorithm=zo: personalize.* is not available with seed-only messages yet")
        if self.zo.params == "full":
            if self.peft.method != "lora":
                raise ValueError(
                    f"zo.params=full tunes the base weights under peft=lora's zero initial delta; "
                    f"peft={self.peft.method} would change the model it starts from"
                )
            if self.model.quantization != "none":
                raise ValueError("zo.params=full tunes the base weights themselves: use model.quantization=none")
            if self.train.precision in ("bf16", "fp16"):
                raise ValueError(
                    f"zo.params=full needs train.precision=fp32 (or auto): steps of ~1e-7 round away in "
                    f"{self.train.precision}"
                )
            self.train.precision = "fp32"  # what `auto` means here (ZoConfig.params)

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

    def _check_dpo(self) -> None:
        if self.algorithm.name != "none":
            raise ValueError(
                f"task=dpo takes its reference from the full base model with the adapter off; "
                f"algorithm={self.algorithm.name} trains elsewhere (use algorithm=none)"
            )
        if self.personalize.ft_steps or self.eval.client_metric:
            raise ValueError(
                "task=dpo: clients always report implicit-reward accuracy on their held-out pairs; "
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
