import yaml

from fedllm_flwr.cli import main


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
