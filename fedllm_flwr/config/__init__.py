"""Typed config: one module per family of groups, the whole schema, and the Hydra bridge.

- `model`: `model.*`, `peft.*`, `init.*`;  `data`: `dataset.*`;
  `training`: `train.*`, `eval.*`, `task.*`, `reward_loss.*`, `dpo_loss.*`, `grpo.*`;
  `federation`: `strategy.*`, `personalize.*`, `algorithm.*`, `scenario.*`;
  `messages`: `compression.*`, `privacy.*`;  `run`: `run.*`, `sweep.*`;
- `schema`: `Config`, every group together; `rules`: what each plug-in declares it cannot
  serve, gathered (the plug-ins' names and kinds are theirs: `fedllm_flwr.<family>.compat`);
- `compose`: `load_cfg`, the only way the apps and the CLI obtain a config.
"""

from fedllm_flwr.config.compose import (
    OVERRIDES_KEY,
    cfg_to_yaml,
    compose_cfg,
    conf_dir,
    config_changes,
    flatten,
    load_cfg,
    parse_overrides,
    to_config,
)
from fedllm_flwr.config.data import METRICS, DatasetConfig, FieldsConfig, PartitionConfig, SyntheticConfig
from fedllm_flwr.config.federation import (
    AlgorithmConfig,
    PersonalizeConfig,
    ScenarioConfig,
    StrategyConfig,
)
from fedllm_flwr.config.messages import CompressionConfig, PrivacyConfig
from fedllm_flwr.config.model import (
    AdapterConfig,
    InitConfig,
    ModelConfig,
)
from fedllm_flwr.config.run import LogConfig, RunConfig, SweepConfig
from fedllm_flwr.config.schema import Config
from fedllm_flwr.config.training import (
    DPO_LOSSES,
    REWARD_LOSSES,
    DpoLossConfig,
    EvalConfig,
    GrpoConfig,
    RewardLossConfig,
    TaskConfig,
    TrainConfig,
)

__all__ = [
    "METRICS",
    "OVERRIDES_KEY",
    "REWARD_LOSSES",
    "DPO_LOSSES",
    "DpoLossConfig",
    "AdapterConfig",
    "AlgorithmConfig",
    "CompressionConfig",
    "Config",
    "DatasetConfig",
    "EvalConfig",
    "FieldsConfig",
    "GrpoConfig",
    "InitConfig",
    "ModelConfig",
    "PartitionConfig",
    "PersonalizeConfig",
    "PrivacyConfig",
    "RewardLossConfig",
    "LogConfig",
    "RunConfig",
    "ScenarioConfig",
    "StrategyConfig",
    "SweepConfig",
    "SyntheticConfig",
    "TaskConfig",
    "TrainConfig",
    "cfg_to_yaml",
    "config_changes",
    "flatten",
    "compose_cfg",
    "conf_dir",
    "load_cfg",
    "parse_overrides",
    "to_config",
]
