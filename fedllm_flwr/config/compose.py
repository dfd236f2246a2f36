"""The Hydra bridge: compose `conf/config.yaml` with overrides into a checked `Config`."""

from __future__ import annotations

import functools
import os
import re
import shlex
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedllm_flwr.config.schema import Config
from fedllm_flwr.errors import UserError

#: Run-config key (pyproject `[tool.flwr.app.config]`) carrying Hydra overrides.
OVERRIDES_KEY = "overrides"


def conf_dir() -> Path:
    """The folder holding `config.yaml`: `$FEDLLM_FLWR_CONF` or `<project>/conf`."""
    env = os.environ.get("FEDLLM_FLWR_CONF")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
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


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """A config tree (as config.yaml holds it) as dotted keys and string values:
    MLflow's params, and what tells runs apart in a plot's legend."""
    if not isinstance(tree, dict):
        return {prefix: str(tree)}
    out: dict[str, str] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(
    before: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...] = ("run", "resume")
) -> list[str]:
    """Dotted keys whose values differ between two config trees (as config.yaml holds
    them), leaving out the top-level groups in `ignore`."""
    a, b = flatten(before), flatten(now)
    return sorted(k for k in set(a) | set(b) if k.split(".")[0] not in ignore and a.get(k) != b.get(k))
