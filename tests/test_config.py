import json

import pytest
from conftest import TINY_OVERRIDES

from fedllm_flwr.config import conf_dir, load_cfg
from fedllm_flwr.data import client_data, records
from fedllm_flwr.errors import UserError
from fedllm_flwr.model import build_model, clear_model_cache

SHIPPED = sorted(
    (group.name, option.stem) for group in conf_dir().iterdir() if group.is_dir() for option in group.glob("*.yaml")
)


def needs(group: str, option: str, tmp_path) -> list[str]:
    """Extra overrides a shipped option requires from the user."""
    if (group, option) == ("peft", "adalora"):
        return ["scenario=local"]  # refused for federated averaging
    if group == "dataset" and option != "synthetic":
        # Presets default to hub ids; the test writes a small file in the preset's own field names.
        fields = load_cfg([f"dataset={option}", "dataset.path=any.jsonl"]).dataset.fields
        rows = [
            {fields.instruction: f"q{i}", fields.output: f"a {i}\n#### {i}", fields.category: f"c{i % 3}"}
            for i in range(20)
        ]
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return [f"dataset.path={path}", f"dataset.test_path={path}"]
    return []


def test_every_group_has_a_default_that_exists():
    defaults = (conf_dir() / "config.yaml").read_text()
    for group in {g for g, _ in SHIPPED}:
        assert f"- {group}: " in defaults


@pytest.mark.parametrize("group, option", SHIPPED, ids=[f"{g}/{o}" for g, o in SHIPPED])
def test_every_shipped_config_builds_on_the_tiny_model(group, option, tiny_model_dir, tmp_path):
    overrides = [f"{group}={option}", *needs(group, option, tmp_path)]
    if group != "model":
        overrides.append(f"model.name={tiny_model_dir}")
    cfg = load_cfg([*overrides, *TINY_OVERRIDES] if group != "model" else overrides)
    if group == "model":
        # Model presets name real base models; check they resolve to a loadable name.
        assert cfg.model.name
        return
    clear_model_cache()
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    train, test = records(cfg)
    assert train and test
    data = client_data(cfg, bundle.tokenizer, 0, 2)
    assert len(data.train) > 0


def test_defaults_match_the_documented_job():
    cfg = load_cfg()
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.peft.method == "lora" and cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.dataset.source == "synthetic" and cfg.dataset.partition.method == "natural"


def test_run_config_string_reaches_hydra():
    cfg = load_cfg({"overrides": "train.lr=3e-4 train.local_steps=5 run.name=x"})
    assert cfg.train.lr == 3e-4 and cfg.train.local_steps == 5 and cfg.run.name == "x"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", r"'train\.lrr=1'.*\nvalid keys under train: train\.lr, "),
        ("train.lr=fast", r"train\.lr=fast.*could not be converted to Float"),
        ("trian.lr=1", r"valid top-level keys: seed, num_rounds, model, peft, dataset"),
        ("dataset=nope", r"options for dataset: alpaca, codealpaca, dolly, dolly_dirichlet, file, gsm8k, synthetic"),
        ("train.precision=fp8", r"train\.precision must be auto, bf16, fp16 or fp32"),
        ("num_rounds=0", r"num_rounds must be >= 1"),
        ("dataset=file", r"dataset\.source=file needs dataset\.path"),
        ("sweep.client_cpus=0", r"sweep\.client_cpus must be > 0"),
    ],
)
def test_bad_overrides_name_the_key_and_the_valid_ones(override, message):
    with pytest.raises(UserError, match=message):
        load_cfg([override])


def test_unparsable_overrides_string():
    with pytest.raises(UserError, match="cannot be parsed"):
        load_cfg({"overrides": 'train.lr="3e-4'})
