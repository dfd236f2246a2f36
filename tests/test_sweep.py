"""FedHPO sweeps: statistics and summary on fake job folders, and a real multirun."""

import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, TINY_OVERRIDES, docs_hooks

from fedllm_flwr.errors import UserError
from fedllm_flwr.metrics import read_metrics
from fedllm_tools.sweep import JobRunner, first_error
from fedllm_tools.sweep_summary import keep_best, ranks, read_sweep, screening_audit, spearman, summarize


def fake_job(root, name, lr, scores, losses, method="lora", stage="full", status="completed", held_out=None):
    """A job folder as the sweep writes it; `scores[r]` is the metric after round r,
    `held_out[r]` (if given) the clients' mean held-out loss."""
    folder = root / name
    folder.mkdir(parents=True)
    overrides = [f"train.lr={lr}", f"peft={method}"]
    (folder / "job.json").write_text(
        json.dumps({"name": name, "overrides": overrides, "status": status, "stage": stage, "seconds": 10.0})
    )
    (folder / "config.yaml").write_text(
        f"train:\n  lr: {lr}\npeft:\n  method: {method}\ndataset:\n  metric: exact_match\n"
    )
    if status != "completed":
        return
    rows = [
        {"round": r, "accuracy": s, "eval-loss": loss, "bytes-down": 100, "bytes-up": 100, "clients-ok": 2}
        for r, (s, loss) in enumerate(zip(scores, losses, strict=True))
    ]
    for row, value in zip(rows, held_out or [], strict=False):
        row["client-eval-loss"] = value
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"status": "completed", "metric": "accuracy", "score-final": scores[-1], "eval-loss-final": losses[-1]}
    summary["scenario"], summary["method"] = "fed", method
    summary["rounds"] = len(scores) - 1
    (folder / "summary.json").write_text(json.dumps(summary))


def test_ranks_and_spearman_against_hand_values():
    assert ranks([10, 30, 20]) == [1, 3, 2]
    assert ranks([5, 5, 1, 7]) == [2.5, 2.5, 1, 4]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # rank differences d = (0, -2, 1, 1): rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 36 / 60 = 0.4
    assert spearman([1, 2, 3, 4], [1, 4, 2, 3]) == pytest.approx(0.4)
    assert spearman([1, 2], [2, 1]) is None and spearman([1, 2, 3], [5, 5, 5]) is None


def test_summary_table_best_correlation_audit_and_plot(tmp_path):
    # Round 1 ranks job_2 first, but job_1 is best after the last round.
    fake_job(tmp_path, "job_0", 1e-4, [0.0, 0.10, 0.20], [3.0, 2.0, 1.5], held_out=[None, 2.0, 0.6])
    fake_job(tmp_path, "job_1", 1e-3, [0.0, 0.20, 0.60], [3.0, 1.5, 0.9], held_out=[None, 2.0, 0.5])
    fake_job(tmp_path, "job_2", 1e-2, [0.0, 0.30, 0.40], [3.0, 1.2, 1.2], held_out=[None, 2.0, 0.4])
    fake_job(tmp_path, "job_3", 1e-1, [], [], status="failed")
    fake_job(tmp_path, "job_4", 1e-3, [0.0, 0.5, 0.5], [3.0, 1.0, 1.0], method="prompt_tuning", held_out=[None, 1, 0.3])
    summary = summarize(tmp_path, keep=0.34)
    assert summary["jobs"] == 5 and summary["completed"] == 4 and summary["failed"] == ["job_3"]
    assert summary["best"]["lora"]["job"] == "job_1" and summary["best"]["prompt_tuning"]["job"] == "job_4"
    # loss vs accuracy over the 4 completed jobs: (1.5, .2) (0.9, .6) (1.2, .4) (1.0, .5): perfectly inverse
    assert summary["spearman-eval-loss-vs-score"] == pytest.approx(-1.0)
    # the clients' held-out losses (0.6, 0.5, 0.4, 0.3) rank them otherwise: 1 - 6 * 14 / (4 * 15)
    assert summary["spearman-held-out-loss-vs-score"] == pytest.approx(-0.4)
    audit = summary["screening-audit"]
    assert audit == [
        {
            "method": "lora",
            "screen round": 1,
            "jobs": 3,
            "kept": 1,
            "best at full budget": "job_1",
            "kept the best": False,
        }
    ]
    markdown = (tmp_path / "summary.md").read_text()
    assert "| job_1 | full | completed | lora | 0.001 | 0.9000 | 0.600 |" in markdown
    assert "failed" in markdown and "Spearman" in markdown
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith("job,stage,status,method,lr")
    assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_screen_keeps_a_share_and_breaks_ties_by_loss(tmp_path):
    for i, (score, loss) in enumerate([(0.0, 2.0), (0.0, 1.0), (0.5, 3.0), (0.1, 1.0), (0.0, 0.5), (0.2, 2.0)]):
        fake_job(tmp_path, f"job_{i}", 10.0**-i, [0.0, score], [3.0, loss])
    records = read_sweep(tmp_path)
    kept = keep_best(records, {r.name: (r.score, -r.eval_loss) for r in records}, 0.34)
    assert [r.name for r in kept] == ["job_2", "job_5"]  # round(0.34 * 6) = 2
    kept = keep_best(records[:2], {r.name: (r.score, -r.eval_loss) for r in records[:2]}, 0.1)
    assert [r.name for r in kept] == ["job_1"]  # at least one; the tie goes to the lower loss
    assert screening_audit(records, 0.34) == []  # a single round: nothing to screen on


def failing_runner(sweep_dir, monkeypatch):
    """A JobRunner whose simulation records each run's overrides (the list returned) and
    fails it, as a job whose ServerApp errors does."""
    started = []

    class Simulation:
        def run(self, app_dir, overrides, num_supernodes, timeout):
            started.append(overrides)
            return SimpleNamespace(stdout="ERROR: boom")

    runner = JobRunner(sweep_dir, supernodes=2, timeout=60)
    monkeypatch.setattr(runner, "_simulation", Simulation)
    return runner, started


def test_a_sweep_run_again_into_its_folder_keeps_completed_jobs_and_reruns_the_rest(tmp_path, monkeypatch):
    fake_job(tmp_path, "job_0", 0.001, [0.0, 0.5], [3.0, 1.0])
    fake_job(tmp_path, "job_1", 0.01, [], [], status="failed")
    runner, started = failing_runner(tmp_path, monkeypatch)
    kept = runner.run("job_0", ["train.lr=0.001", "peft=lora"])
    assert kept.status == "completed" and started == [] and (tmp_path / "job_0" / "summary.json").is_file()
    again = runner.run("job_1", ["train.lr=0.01", "peft=lora"])
    assert again.status == "failed" and len(started) == 1
    other = runner.run("job_0", ["train.lr=0.003", "peft=lora"])  # the folder held other overrides
    assert other.status == "failed" and len(started) == 2 and not (tmp_path / "job_0" / "summary.json").exists()
    assert json.loads((tmp_path / "job_0" / "job.json").read_text())["overrides"][0] == "train.lr=0.003"


def test_an_interrupted_job_resumes_at_its_checkpoint_and_counts_each_round_once(tmp_path, monkeypatch):
    """A job folder left with a checkpoint after round 2 (rows to round 3) by an attempt
    of the same config goes on with resume=; one of other overrides, without a
    checkpoint, or with every round checkpointed starts again."""
    import numpy as np

    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.run_dir import RunDir

    runner, started = failing_runner(tmp_path, monkeypatch)
    overrides = ["train.lr=0.001", "num_rounds=4"]

    def left_behind(name, checkpoint_round, lr=0.001):
        sweep_args = [f"run.output_dir={tmp_path}", f"run.name={name}", f"log.experiment={tmp_path.name}"]
        run_dir = RunDir.create(load_cfg([f"train.lr={lr}", "num_rounds=4", *sweep_args]))
        rows = [{"round": r, "seconds": 5.0 * 2**r} for r in range(4)]  # 5, 10, 20, 40
        (run_dir.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if checkpoint_round is not None:
            run_dir.write_checkpoint(checkpoint_round, {"w": np.zeros(3, dtype=np.float32)}, {})
        return run_dir.path

    folder = left_behind("job_0", 2)
    job = runner.run("job_0", overrides)
    assert started[-1].endswith(f"resume={folder}") and job.resumed_after == 2
    assert 35.0 <= job.seconds < 35.0 + 30  # rounds 0-2 of the first attempt (5+10+20), then this one
    assert json.loads((folder / "job.json").read_text())["resumed_after"] == 2
    assert (folder / "metrics.jsonl").is_file()  # kept for the run to rewind

    for name, checkpoint_round, lr in [("job_1", None, 0.001), ("job_2", 4, 0.001), ("job_3", 2, 0.003)]:
        left_behind(name, checkpoint_round, lr)
        job = runner.run(name, overrides)
        assert "resume=" not in started[-1] and job.resumed_after is None, name
        assert not (tmp_path / name / "metrics.jsonl").exists(), name  # started again from nothing
    # What refuses job_3, said to a user who resumes by hand: the key that differs.
    left_behind("job_4", 2, 0.003)
    with pytest.raises(UserError, match=r"differs from the run being resumed in train\.lr; "):
        RunDir.reopen(
            load_cfg(
                ["train.lr=0.001", "num_rounds=4", f"log.experiment={tmp_path.name}", f"resume={tmp_path / 'job_4'}"]
            )
        )


def load_script(name: str = "method_study"):
    """scripts/<name>.py as a module (the scripts folder is not a package)."""
    path = Path(__file__).parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rate_sweep_extends_past_the_grid_while_the_best_rate_is_at_its_end(tmp_path):
    """LoRA peaks at 1e-2, past FS-LLM's grid: the sweep adds 1e-2 (now the best, again at
    the end), then 3e-2 (worse), and stops with one extension to spare. P-tuning peaks
    inside its grid: nothing is added. Run again, the study starts nothing new."""
    study = load_script()
    peaks = {"lora": 1e-2, "p_tuning": 1e-3}
    started = []

    class Runner:  # writes each job as finished, its score falling with the distance from the peak
        sweep_dir = tmp_path

        def run(self, name, overrides, stage):
            if (tmp_path / name).exists():
                return
            started.append(name)
            options = dict(o.split("=", 1) for o in overrides)
            method, lr = options["peft"], float(options["train.lr"])
            score = max(0.0, 1.0 - abs(math.log10(lr / peaks[method])) / 4)
            fake_job(tmp_path, name, lr, [0.0, score], [3.0, 2.0 - score], method=method, stage=stage)

    study.lr_stage(Runner(), ["lora", "p_tuning"], [], screen=1, keep=0.34, extend=3)
    lora = [n for n in started if "lora" in n]
    assert lora[-4:] == ["screen_lora_0.01", "full_lora_0.01", "screen_lora_0.03", "full_lora_0.03"]
    assert [n for n in started if n.startswith("full_lora")] == ["full_lora_0.005", "full_lora_0.003", *lora[-3::2]]
    assert sorted(n for n in started if n.startswith("full_p_tuning")) == [
        "full_p_tuning_0.0005", "full_p_tuning_0.001", "full_p_tuning_0.003"
    ]  # fmt: skip
    assert not any(n.startswith("screen_p_tuning") and float(n.rsplit("_", 1)[1]) > 0.1 for n in started)
    n = len(started)
    study.lr_stage(Runner(), ["lora", "p_tuning"], [], screen=1, keep=0.34, extend=3)
    assert len(started) == n
    assert (study.beyond(5e-3, up=True), study.beyond(1e-1, up=True), study.beyond(1e-4, up=False)) == (1e-2, 0.3, 3e-5)


def test_a_study_stopped_between_an_extensions_screen_and_its_full_run_finishes_it_when_resumed(tmp_path):
    """Stopped right after the screen at 1e-2 (past LoRA's grid), the resumed sweep runs
    1e-2 in full and goes on to 3e-2: the jobs an unbroken sweep runs, none skipped."""
    study = load_script()
    started = []

    class Stopped(Exception):
        pass

    class Runner:
        sweep_dir = tmp_path
        stop_at = "full_lora_0.01"

        def run(self, name, overrides, stage):
            if (tmp_path / name).exists():
                return
            if name == self.stop_at:
                raise Stopped(name)
            started.append(name)
            lr = float(dict(o.split("=", 1) for o in overrides)["train.lr"])
            score = max(0.0, 1.0 - abs(math.log10(lr / 1e-2)) / 4)
            fake_job(tmp_path, name, lr, [0.0, score], [3.0, 2.0 - score], stage=stage)

    with pytest.raises(Stopped):
        study.lr_stage(Runner(), ["lora"], [], screen=1, keep=0.34, extend=3)
    assert started[-1] == "screen_lora_0.01"
    resumed = Runner()
    resumed.stop_at = None
    n = len(started)
    study.lr_stage(resumed, ["lora"], [], screen=1, keep=0.34, extend=3)
    assert started[n:] == ["full_lora_0.01", "screen_lora_0.03", "full_lora_0.03"]


def test_finding_4_ranks_and_picks_rates_by_the_clients_held_out_loss_and_by_the_test_loss(tmp_path):
    """LoRA: the metric and the test loss pick 5e-3, the clients' held-out loss 1e-2. A job
    whose clients never evaluated (P-tuning here) has no held-out pick."""
    findings = load_script("method_study_findings")
    for lr, score, test, held in [(3e-3, 0.70, 0.30, 0.40), (5e-3, 0.81, 0.15, 0.25), (1e-2, 0.77, 0.20, 0.20)]:
        fake_job(tmp_path, f"full_lora_{lr:g}", lr, [0.0, score], [2.0, test], held_out=[None, held])
    fake_job(tmp_path, "full_p_tuning_0.01", 1e-2, [0.0, 0.3], [2.0, 0.7], method="p_tuning")
    for lr in (3e-3, 1e-2):
        fake_job(tmp_path, f"screen_lora_{lr:g}", lr, [0.0, 0.1], [2.0, 0.9], stage="screen", held_out=[None, 0.8])
    guide = findings.loss_guide(read_sweep(tmp_path))
    assert guide["spearman-test-full"] == pytest.approx(-1.0)  # loss ranks (3, 1, 2) against metric ranks (1, 3, 2)
    assert guide["spearman-held-out-full"] == pytest.approx(-0.5)  # (3, 2, 1): 1 - 6 * 6 / (3 * 8)
    assert guide["spearman-test-screen"] is None  # two screen jobs: too few to rank
    lora, p_tuning = guide["picks"]
    assert (lora["lr by metric"], lora["lr by test loss"], lora["lr by held-out loss"]) == (5e-3, 5e-3, 1e-2)
    assert lora["score at the held-out pick"] == 0.77 and lora["at the grid's edge"] is False  # inside 3e-3..1e-2
    assert p_tuning["lr by held-out loss"] is None and p_tuning["lr by test loss"] == 1e-2


def test_the_rounds_check_runs_each_method_longer_and_tabulates_every_budget(tmp_path, monkeypatch):
    """Per method, the fed runs at its rate on three budgets (the sweep's 5 rounds, the
    grid's 10, the check's 20, scored every 2): final metric and late gain of each."""
    study, findings = load_script(), load_script("method_study_findings")
    assert findings.late_gain({0: 0.0, 1: 0.5, 4: 0.7, 5: 0.72}) == pytest.approx(0.02)  # from round 4
    assert findings.late_gain({r: r / 20 for r in range(0, 21, 2)}) == pytest.approx(0.2)  # from round 16
    started = []

    class Runner:
        sweep_dir = tmp_path / "smollm2" / "rounds"

        def run(self, name, overrides):
            started.append((name, overrides))
            fake_job(self.sweep_dir, name, 0.005, [0.1 * r / 20 + 0.8 for r in range(21)], [1.0] * 21)

    study.rounds_stage(Runner(), {"lora": 5e-3}, 0, ["num_rounds=20"], 20, 2)
    ((name, overrides),) = started
    assert name == "fed-lora-s0-r20"
    assert {"peft=lora", "train.lr=0.005", "scenario=fed", "seed=0", "num_rounds=20", "eval.every=2"} == set(overrides)
    fake_job(tmp_path / "smollm2" / "lr", "full_lora_0.005", 0.005, [0.0, 0.3, 0.5, 0.6, 0.7, 0.75], [1.0] * 6)
    fake_job(tmp_path / "smollm2" / "grid", "fed-lora-s0", 0.005, [0.0, *[0.9] * 10], [1.0] * 11)
    (row,) = findings.rounds_findings(tmp_path, "smollm2", {"lora": 5e-3, "p_tuning": 1e-2}, 0)  # no p_tuning runs
    assert [b["rounds"] for b in row["budgets"]] == [5, 10, 20]
    assert [b["final"] for b in row["budgets"]] == pytest.approx([0.75, 0.9, 0.9])
    assert [b["late gain"] for b in row["budgets"]] == pytest.approx([0.05, 0.0, 0.02])
    assert row["runs"][-1] == "smollm2/rounds/fed-lora-s0-r20"
    drawn = {}  # rounds.png: one colour per method, the longest budget solid
    monkeypatch.setattr("fedllm_flwr.plot.plot_runs", lambda paths, out, names, styles: drawn.update(n=names, s=styles))
    findings.plot_rounds(tmp_path, [row], tmp_path / "rounds.png")
    assert drawn["n"] == ["lora, 20 rounds", "lora, 10 rounds", "lora, 5 rounds"]
    assert drawn["s"] == [("C0", "-"), ("C0", "--"), ("C0", ":")]


def test_each_grid_job_that_runs_says_where_the_stage_stands_and_how_long_the_rest_takes(tmp_path, capsys):
    """Six cells (2 seeds x 3 scenarios), the first finished before (60 s): every other
    cell is announced with its number and the time left at the finished cells' pace."""
    study = load_script()
    grid = tmp_path / "smollm2" / "grid"

    class Runner:
        sweep_dir = grid

        def run(self, name, overrides):  # a job finishes in 60 s (seed 0) or two hours (seed 1)
            folder = self.sweep_dir / name
            if folder.exists():
                return  # kept, as JobRunner keeps a finished job
            folder.mkdir(parents=True)
            job = {"name": name, "overrides": overrides, "status": "completed", "seconds": 60 if "s0" in name else 7200}
            (folder / "job.json").write_text(json.dumps(job))
            (folder / "summary.json").write_text(json.dumps({"status": "completed", "scenario": "fed"}))
            (folder / "metrics.jsonl").write_text("")

    first = ["peft=lora", "train.lr=0.005", "scenario=global", "seed=0", "num_rounds=10", "eval.every=10",
             "eval.initial=false"]  # fmt: skip
    Runner().run("global-lora-s0", first)
    study.grid_stage(Runner(), {"lora": 5e-3}, [0, 1], ["num_rounds=10"], tmp_path / "lr", 10)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[study] smollm2 grid")]
    assert lines[0] == "[study] smollm2 grid: job 2 of 6, ~5 min left at the pace of the 1 finished"
    assert lines[1] == "[study] smollm2 grid: job 3 of 6, ~4 min left at the pace of the 2 finished"
    # Then seed 1's cells take two hours each: (3 x 60 + 7200) / 4 s a cell, for 2 cells.
    assert lines[3] == "[study] smollm2 grid: job 5 of 6, ~1.0 h left at the pace of the 4 finished"
    assert lines[4] == "[study] smollm2 grid: job 6 of 6, ~49 min left at the pace of the 5 finished"
    assert len(lines) == 5
    study.grid_stage(Runner(), {"lora": 5e-3}, [0, 1], ["num_rounds=10"], tmp_path / "lr", 10)
    assert "job" not in capsys.readouterr().out  # all finished: nothing announced


def test_the_sweep_driver_resumes_and_summarizes_run_folders_without_the_ml_stack(tmp_path):
    """A sweep's own process only starts jobs and reads their folders: importing torch,
    transformers and peft there would cost every sweep (and each test that runs one) seconds
    of CPU before its first job."""
    code = f"""
import sys
import numpy as np
from fedllm_flwr.config import load_cfg
from fedllm_flwr.run_dir import RunDir
from fedllm_tools.sweep import JobRunner, _register_resolver
from fedllm_tools.sweep_summary import job_record
_register_resolver()
overrides = ["num_rounds=2", "run.output_dir={tmp_path}", "run.name=job_0"]
run = RunDir.create(load_cfg(overrides))
run.write_checkpoint(1, {{"a": np.zeros(2, np.float32)}}, {{}})
assert JobRunner.resume_point(run.path, overrides) == (1, 0.0)
job_record(run.path)
heavy = {{"torch", "transformers", "peft", "datasets"}} & set(sys.modules)
assert not heavy, sorted(heavy)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_summary_of_a_folder_without_jobs_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no sweep jobs"):
        summarize(tmp_path)


def test_a_failed_jobs_reason_is_the_message_inside_flowers_error_panel():
    log = (
        "Using SuperLink: sim (127.0.0.1:5)\n"
        "╭─ Error ─────────────────╮\n"
        "│ 'float' object cannot be │\n"
        "│ interpreted as an integer │\n"
        "╰─────────────────────────╯\n"
    )
    assert first_error(log) == "'float' object cannot be interpreted as an integer"
    assert first_error("ok\nERROR: the run failed\nlater Error") == "ERROR: the run failed"
    assert first_error("no clue here") == "no clue here"


#: A sweep's processes (server, Ray's ClientApp worker) on the tiny model: one torch thread
#: each, as the test workers beside them share the machine's cores.
SWEEP_ENV = {"OMP_NUM_THREADS": "1"}


def sweep(*args: str) -> subprocess.CompletedProcess:
    """`fedllm-flwr sweep ARGS` in its own process, as a user runs it (Hydra configures
    logging and global state for the whole process)."""
    cmd = [sys.executable, "-m", "fedllm_tools.cli", "sweep", *args]
    env = {**os.environ, **SWEEP_ENV}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False, env=env)


@pytest.fixture
def one_sweep_at_a_time(tmp_path_factory):
    """The real sweeps of this session (on every test worker) run one after another.

    Known problem, not yet explained: when two sweeps start on one machine at the same
    moment, the first job of one of them may end without a line from its ServerApp (the
    SuperLink, whose log the failed job keeps, says only that the run's logs ended);
    later jobs run. Until it is found, the suite does not start two at once."""
    import fcntl

    with open(tmp_path_factory.getbasetemp().parent / "real-sweeps.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.mark.slow
@pytest.mark.usefixtures("one_sweep_at_a_time")
def test_a_screened_learning_rate_sweep_with_a_failing_job(tiny_model_dir, tmp_path):
    """Three rates, one of them invalid: the two valid jobs run 1 of 2 rounds, the better
    half goes on from its screen's checkpoint to the full budget, and the failed job is
    recorded, not fatal."""
    sweep_dir = tmp_path / "sweep"
    tracked = ["log.mlflow=true"] if importlib.util.find_spec("mlflow") else []
    job = [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=2", "sweep.client_cpus=2"]
    args = ["-m", "train.lr=1e-4,1e-2,-1", *job, "sweep.screen_rounds=1", "sweep.keep=0.5",
            f"hydra.sweep.dir={sweep_dir}", *tracked]  # fmt: skip
    done = sweep(*args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    errors = {name: json.loads((sweep_dir / name / "job.json").read_text())["error"] for name in summary["failed"]}
    assert summary["failed"] == ["job_2"], errors
    job_2 = json.loads((sweep_dir / "job_2" / "job.json").read_text())
    assert "train.lr must be > 0" in job_2["error"]
    screened = [json.loads((sweep_dir / f"job_{n}" / "summary.json").read_text()) for n in range(2)]
    for n, (lr, s) in enumerate(zip([1e-4, 1e-2], screened, strict=True)):
        assert f"lr: {lr}" in (sweep_dir / f"job_{n}" / "config.yaml").read_text()
        assert s["rounds"] == 1 and s["num-rounds"] == 2
    full = [p for p in sweep_dir.iterdir() if p.name.startswith("full_")]
    assert len(full) == 1 and json.loads((full[0] / "summary.json").read_text())["rounds"] == 2
    assert (full[0] / "adapter" / "final" / "adapter_config.json").is_file()
    # The promoted job went on from its screen: round 0 and 1 are the screen's, round 2 its own.
    screen = sweep_dir / f"job_{full[0].name.rpartition('_')[2]}"
    assert json.loads((full[0] / "job.json").read_text())["resumed_after"] == 1
    assert f"going on from {screen.name}'s checkpoint" in done.stdout
    rows, screen_rows = read_metrics(full[0]), read_metrics(screen)
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[:2] == screen_rows
    assert f"name: {full[0].name}" in (full[0] / "config.yaml").read_text()
    assert "stop_after: 0" in (full[0] / "config.yaml").read_text()
    # 2 x 1 screening rounds + the promoted job's 1 more, against 2 runnable jobs x 2; the failed job ran none.
    assert summary["screening"] == {"rounds": 1, "screened": 3, "promoted": 1, "rounds-run": 3, "rounds-full-grid": 4}
    assert summary["jobs"] == 4 and summary["completed"] == 3
    assert summary["best"]["lora"]["job"] == full[0].name
    assert (sweep_dir / "lr.png").is_file() and "Best configuration per method" in done.stdout
    if tracked:  # one MLflow experiment named after the sweep, a finished run per job that ran
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{sweep_dir / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
        assert sorted(r.info.run_name for r in runs) == sorted(["job_0", "job_1", full[0].name])
        assert {r.info.status for r in runs} == {"FINISHED"}
        (promoted,) = [r for r in runs if r.info.run_name == full[0].name]
        steps = sorted(m.step for m in client.get_metric_history(promoted.info.run_id, "round/eval-loss"))
        assert steps == [0, 1, 2]  # the screen's rounds, then its own
    # The same command again resumes: the completed jobs are kept, nothing trains again.
    again = sweep(*args)
    assert again.returncode == 0 and again.stdout.count("completed before, kept") == 3, again.stdout[-3000:]
    assert json.loads((sweep_dir / "summary.json").read_text())["completed"] == 3
    # The promoted job ends with the adapter its config ends with when run whole, unscreened.
    from safetensors.torch import load_file

    lr = ["1e-4", "1e-2"][int(screen.name.removeprefix("job_"))]
    whole = sweep("-m", f"train.lr={lr}", *job, f"hydra.sweep.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    final = "adapter/final/adapter_model.safetensors"
    adapters = [load_file(folder / final) for folder in (full[0], tmp_path / "whole" / "job_0")]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(bool((adapters[0][k] == adapters[1][k]).all()) for k in adapters[0])


def _sweep_processes(mark: str, ray_prefix: str) -> dict[int, str]:
    """Live processes of a sweep, with their command lines: those whose environment
    holds `mark` (KEY=VALUE), and those with a file open under `ray_prefix` (Ray's
    agents, started with an environment of Ray's making, keep their logs there)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            marked = mark.encode() in (proc / "environ").read_bytes().split(b"\0")
            marked = marked or any(os.readlink(fd).startswith(ray_prefix) for fd in (proc / "fd").iterdir())
            if marked:
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the sweep's processes through /proc")
@pytest.mark.usefixtures("one_sweep_at_a_time")
def test_sigterm_mid_job_stops_the_sweeps_superlink_and_ray(tiny_model_dir, tmp_path):
    mark = uuid.uuid4().hex
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "fedllm_tools.cli", "sweep", "-m", "train.lr=1e-4,1e-3",
           f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "num_rounds=50", "sweep.client_cpus=2",
           f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    log_path = tmp_path / "sweep.log"
    with open(log_path, "w") as log:
        env = {**os.environ, **SWEEP_ENV, "FEDLLM_TEST_MARK": mark}
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    ray_prefix = f"{os.environ.get('FEDLLM_RAY_TMP', '/tmp')}/ray-{proc.pid}-"  # LocalSimulation's Ray temp dir
    try:
        deadline = time.monotonic() + 300
        while not (sweep_dir / "job_0" / "metrics.jsonl").is_file():  # round 0 evaluated, Ray's workers up
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        running = _sweep_processes(f"FEDLLM_TEST_MARK={mark}", ray_prefix)
        assert any("superlink" in c for c in running.values()) and any("ray" in c for c in running.values()), running
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = _sweep_processes(f"FEDLLM_TEST_MARK={mark}", ray_prefix)
    for pid in left:  # leave nothing behind, whatever the verdict
        with contextlib.suppress(ProcessLookupError):  # it may have exited since the scan
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not left, left


def test_the_study_counts_its_hours_and_names_every_round_in_which_a_client_failed(tmp_path):
    findings = load_script("method_study_findings")
    fake_job(tmp_path / "grid", "fed-lora-s0", 3e-3, [0.0, 0.5, 0.6], [3.0, 2.0, 1.5])
    fake_job(tmp_path / "grid", "fed-lora-s1", 3e-3, [0.0, 0.4, 0.7], [3.0, 2.0, 1.4])
    fake_job(tmp_path / "grid", "fed-lora-s2", 3e-3, [0.0], [3.0], status="failed")
    metrics = tmp_path / "grid" / "fed-lora-s1" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows[1].update({"clients-ok": 0, "clients-failed": 2})
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    grid = findings.compute_time(tmp_path)["grid"]
    assert grid == {
        "jobs": 2,
        "failed": 1,
        "hours": round(20 / 3600, 2),
        "rounds with a failed client": ["fed-lora-s1 round 1"],
    }


def test_a_failed_jobs_log_carries_what_the_superlink_wrote_during_that_job(tmp_path):
    """A ServerApp that dies before it streams a line leaves its trace only in the
    SuperLink's log: the job's own log gets that job's part of it."""
    from types import SimpleNamespace

    from fedllm_tools.sweep import JobRunner

    superlink = tmp_path / "superlink.log"
    superlink.write_text("an earlier job's lines\n")
    start = superlink.stat().st_size
    superlink.write_text("an earlier job's lines\nError: the simulation process could not reach Ray\n")
    runner = JobRunner(tmp_path, supernodes=2, timeout=10)
    runner._sim = SimpleNamespace(log_path=superlink)
    part = runner._superlink_log(start)
    assert "could not reach Ray" in part and "earlier job" not in part
    runner._sim = None
    assert runner._superlink_log(0) == ""


def test_the_docs_table_of_what_a_sweep_job_restarts_is_the_benchmarks_results():
    """The figures live in benchmarks/results/sweep_floor.json; the docs ask for the table
    by name and the build writes it from that file (sweep_floor.table)."""
    spec = importlib.util.spec_from_file_location("sweep_floor", ROOT / "benchmarks" / "sweep_floor.py")
    sweep_floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep_floor)
    assert {"server", "client", "actor-with-pool"} <= set(json.loads(sweep_floor.RESULTS.read_text()))
    page = (ROOT / "docs" / "results" / "efficiency.md").read_text()
    assert "<!-- generated: sweep-floor -->" in page, "docs/results/efficiency.md no longer asks for the table"
    assert docs_hooks().render(page).count(sweep_floor.table()) == 1
