"""One builder per PEFT method, from our `AdapterConfig` to peft's config (the names and
kinds are declared in `compat`). Whatever the method, the federated state is the set
of trainable parameters (see `model.get_adapter_state`).
"""

from __future__ import annotations

from collections.abc import Callable

from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
)

from fedllm_flwr.config import AdapterConfig


def _layers(cfg: AdapterConfig) -> list[int] | None:
    """peft's `layers_to_transform`: None (every layer) unless `peft.layers` names some."""
    return list(cfg.layers) or None


def _lora(cfg: AdapterConfig, base_path: str) -> PeftConfig:
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        layers_to_transform=_layers(cfg),
    )  # fmt: skip


def _dora(cfg: AdapterConfig, base_path: str) -> PeftConfig:
    # DoRA (Liu et al. 2024): the weight's direction gets LoRA's update, its norm a
    # trained magnitude per output feature; the magnitudes federate with A and B.
    config = _lora(cfg, base_path)
    config.use_dora = True
    return config


def _adalora(cfg: AdapterConfig, base_path: str) -> PeftConfig:
    # total_step is a placeholder that passes peft's checks: train_steps sets the
    # real schedule length before it trains (it is only known per round).
    return AdaLoraConfig(
        init_r=cfg.r, target_r=cfg.target_r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules), layers_to_transform=_layers(cfg), total_step=1000,
    )  # fmt: skip


def _loha(cfg: AdapterConfig, base_path: str) -> PeftConfig:
    return LoHaConfig(
        r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        layers_to_transform=_layers(cfg),
    )  # fmt: skip


def _ia3(cfg: AdapterConfig, base_path: str) -> PeftConfig:
    return IA3Config(target_modules=list(cfg.target_modules), feedforward_modules=list(cfg.feedforward_modules))


def _prompt_tuning(cfg: AdapterConfig, base_path: str) -> PeftConfig:
    if cfg.init_text:
        return PromptTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=cfg.init_text,
            tokenizer_name_or_path=base_path,
        )
    return PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens)


def _p_tuning(cfg: AdapterConfig, base_path: str) -> PeftConfig:
    return PromptEncoderConfig(num_virtual_tokens=cfg.num_virtual_tokens, encoder_hidden_size=cfg.encoder_hidden_size)


def _prefix_tuning(cfg: AdapterConfig, base_path: str) -> PeftConfig:
    return PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens)


BUILDERS: dict[str, Callable[[AdapterConfig, str], PeftConfig]] = {
    "lora": _lora,
    "dora": _dora,
    "adalora": _adalora,
    "loha": _loha,
    "ia3": _ia3,
    "prompt_tuning": _prompt_tuning,
    "p_tuning": _p_tuning,
    "prefix_tuning": _prefix_tuning,
}


def peft_config(cfg: AdapterConfig, base_path: str, task_type: str = "CAUSAL_LM") -> PeftConfig:
    """peft's config for `cfg.method` and peft's `task_type` (a task's `peft_task_type`);
    `base_path` serves text initialisation. A SEQ_CLS adapter also trains and saves the
    classification head (`score` on Llama models) through peft's modules_to_save."""
    config = BUILDERS[cfg.method](cfg, base_path)
    config.task_type = task_type
    return config
