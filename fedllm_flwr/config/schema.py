"""The whole config: every group, and the rules that span groups.

`conf/config.yaml` starts from the `fedllm_schema` node registered here, so every
key and type is checked by OmegaConf while Hydra composes; each group's
`__post_init__` and `Config.__post_init__` then reject combinations that cannot work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from fedllm_flwr.config import rules
from fedllm_flwr.config.data import DatasetConfig
from fedllm_flwr.config.federation import (
    AlgorithmConfig,
    PersonalizeConfig,
    ScenarioConfig,
    StrategyConfig,
    ZoConfig,
)
from fedllm_flwr.config.messages import CompressionConfig, PrivacyConfig
from fedllm_flwr.config.model import AdapterConfig, InitConfig, ModelConfig
from fedllm_flwr.config.run import LogConfig, RunConfig, SweepConfig
from fedllm_flwr.config.training import (
    DpoLossConfig,
    EvalConfig,
    GrpoConfig,
    RewardLossConfig,
    TaskConfig,
    TrainConfig,
)


@dataclass
class Config:
    seed: int = 0
    """Seeds data generation, partitioning, data order and adapter init."""
    num_rounds: int = 3
    """Federated rounds: each samples clients, trains, aggregates and (per `eval.every`) evaluates."""
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
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    init: InitConfig = field(default_factory=InitConfig)
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
        rules.check(self)  # every pair of settings a plug-in declares it cannot serve (config/rules.py)
        if self.algorithm.name == "zo":
            self.zo.resolve()
            if self.zo.params == "full":
                self.train.precision = "fp32"  # what `auto` means here (ZoConfig.params)

    @property
    def personalized_stays_on_nodes(self) -> bool:
        """FedAvg + FT: whether each node keeps its personalized adapter instead of
        sending it to the server: when part of it is private (`personalize.private`)
        or what leaves a node is protected (`privacy`: a personalized adapter could be
        neither masked into a sum nor noised)."""
        return bool(self.personalize.private) or self.privacy.name != "none"

    @property
    def rounds_to_run(self) -> int:
        """Rounds this run executes: `run.stop_after`, else `num_rounds`."""
        return self.run.stop_after or self.num_rounds


ConfigStore.instance().store(name="fedllm_schema", node=Config)
