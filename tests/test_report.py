import csv
import json

import pytest

from fedllm_flwr.errors import UserError
from fedllm_tools.cli import main
from fedllm_tools.report import write_report


def fake_run(root, name, scenario, method, seed, accuracy, spread=None, eval_seconds=None):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"seed: {seed}\n")
    rows = [
        {"round": 0, "accuracy": 0.0, "eval-loss": 3.0, "bytes-down": None, "seconds": 2.0},
        {
            "round": 1, "accuracy": accuracy, "eval-loss": 1.0 - accuracy, "client-eval-loss": 1.5,
            "bytes-down": 2000, "clients-sampled": 2, "bytes-up": 2200, "clients-ok": 2,
            "peak-memory-mb": 900.0, "seconds": 10.0 + (eval_seconds or 0.0), "accuracy-std": spread,
            **({"eval-seconds": eval_seconds} if eval_seconds else {}),
        },
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"status": "completed", "scenario": scenario, "method": method, "seed": seed, "trainable-parameters": 500}
    (run / "summary.json").write_text(json.dumps(summary))


def test_tables_average_over_seeds(tmp_path):
    fake_run(tmp_path, "a", "fed", "lora", 0, 0.4)
    fake_run(tmp_path, "b", "fed", "lora", 1, 0.6, eval_seconds=4.0)  # evaluated this round, a did not
    fake_run(tmp_path, "c", "local", "lora", 0, 0.2, spread=0.1)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.yaml").write_text("seed: 0\n")  # started, never completed
    markdown, failed = write_report([tmp_path], tmp_path / "out")
    assert failed == [tmp_path / "broken"]
    assert "| lora | fed | 2 | 0.500 ± 0.100 | 0.000 | 0.500 ± 0.100 |" in markdown
    assert "| lora | local | 1 | 0.200 ± 0.000 |" in markdown and "| 0.100 |" in markdown
    assert "| lora | fed | 500 | 1,000 | 1,100 | 900 | 10.0 |" in markdown  # seconds/round without evaluation
    rows = list(csv.DictReader((tmp_path / "out" / "effectiveness.csv").read_text().splitlines()))
    assert [(r["scenario"], r["seeds"]) for r in rows] == [("fed", "2"), ("local", "1")]
    assert (tmp_path / "out" / "efficiency.csv").is_file() and (tmp_path / "out" / "report.md").is_file()


def test_no_completed_runs_is_an_error(tmp_path, capsys):
    with pytest.raises(UserError, match="no completed runs"):
        write_report([tmp_path], tmp_path / "out")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_a_completed_run_with_a_line_that_is_not_json_is_one_line_naming_it(tmp_path, capsys):
    fake_run(tmp_path, "a", "fed", "lora", 0, 0.4)
    with open(tmp_path / "a" / "metrics.jsonl", "a") as handle:
        handle.write('{"round": 2, "accur\n')  # a run folder edited or cut short by hand
    out = tmp_path / "out"
    assert main(["report", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a' / 'metrics.jsonl'}, line 3 is not JSON" in err and err.count("\n") == 1
    assert not out.exists()
