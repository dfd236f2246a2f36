"""Live trackers (TensorBoard, MLflow) read back with their own libraries, and plots of
finished runs. A real run with both switches on: tests/test_e2e.py."""

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import pytest

from fedllm_flwr import tracking
from fedllm_flwr.config import load_cfg
from fedllm_flwr.errors import UserError
from fedllm_flwr.metrics import read_metrics
from fedllm_flwr.plot import figure, plot_runs
from fedllm_flwr.tracking import MlflowTracker, TensorBoardTracker, check_installed, scalars
from fedllm_tools import cli

HAS_TB = importlib.util.find_spec("tensorboard") is not None
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None


@pytest.fixture(scope="module")
def migrated_store(tmp_path_factory) -> Path | None:
    """An empty MLflow SQLite store, migrated once for the module (creating one runs
    MLflow's schema migrations, ~10 s of CPU): each test starts from a copy of it."""
    if not HAS_MLFLOW:
        return None
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def fresh_store(migrated_store, tmp_path) -> None:
    """Where a run folder under `tmp_path / "outputs"` keeps its MLflow store (its default,
    beside the run folders): a copy of the migrated empty store."""
    if migrated_store is not None:
        (tmp_path / "outputs").mkdir()
        shutil.copyfile(migrated_store, tmp_path / "outputs" / "mlflow.db")


def rows(scale: float = 1.0) -> list[dict]:
    return [
        {"round": 0, "eval-loss": 3.0 * scale, "accuracy": 0.0, "bytes-up": None, "time": 1.0e9},
        {"round": 1, "eval-loss": 2.0 * scale, "accuracy": 0.25, "bytes-up": 4000, "bytes-down": 4100,
         "clients-ok": 2, "client_0-held-out-loss": 2.2, "client_1-held-out-loss": 2.4,
         "client-eval-loss": 2.3, "time": 1.0e9 + 60},
        {"round": 2, "eval-loss": 1.5 * scale, "accuracy": 0.5, "bytes-up": 4000, "bytes-down": 4100,
         "clients-ok": 2, "client_0-held-out-loss": 1.6, "client_1-held-out-loss": 1.9,
         "client-eval-loss": 1.75, "epsilon": float("inf"), "time": 1.0e9 + 120},
    ]  # fmt: skip


def fake_run(root: Path, name: str, lr: str, scale: float = 1.0) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(scale)))
    text = f"train:\n  lr: {lr}\n  batch_size: 8\nrun:\n  name: {name}\ndataset:\n  metric: exact_match\n"
    (folder / "config.yaml").write_text(text)
    return folder


def test_a_rows_curves_are_named_by_round_and_by_client():
    tags = scalars(rows()[2])
    assert tags["round/eval-loss"] == 1.5 and tags["round/bytes-up"] == 4000.0
    assert tags["client_0/held-out-loss"] == 1.6 and tags["client_1/held-out-loss"] == 1.9
    assert "round/round" not in tags and "round/time" not in tags
    assert "round/epsilon" not in tags  # not finite: no point to draw
    assert "round/bytes-up" not in scalars(rows()[0])  # None: no point either


@pytest.mark.parametrize("switch", ["tensorboard", "mlflow"])
def test_a_switch_without_its_package_is_one_line_naming_the_extra(monkeypatch, capsys, tiny_cfg, switch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == switch else real(name, *a))
    message = rf"log.{switch}=true needs the {switch} package: pip install -e '\.\[tracking\]'"
    with pytest.raises(UserError, match=message):
        check_installed(tiny_cfg(f"log.{switch}=true"))
    check_installed(tiny_cfg())  # both off: nothing needed
    cfg = tiny_cfg(f"log.{switch}=true")
    assert cli.main(["check", f"model.name={cfg.model.name}", f"log.{switch}=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "[tracking]" in err and "Traceback" not in err


@pytest.mark.skipif(not HAS_TB, reason="tensorboard is not installed (the tracking extra)")
def test_tensorboard_event_files_hold_every_rounds_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = TensorBoardTracker(load_cfg([]), tmp_path)
    for row in rows():
        tracker.log_row(row)
    tracker.finish(True, None)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = events.Scalars("round/eval-loss")
    assert [(e.step, e.value) for e in loss] == [(0, 3.0), (1, 2.0), (2, 1.5)]
    assert [e.wall_time for e in loss] == [1.0e9, 1.0e9 + 60, 1.0e9 + 120]
    client_1 = [(e.step, e.value) for e in events.Scalars("client_1/held-out-loss")]
    assert client_1 == [(1, pytest.approx(2.4)), (2, pytest.approx(1.9))]
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved config as text


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (the tracking extra)")
def test_mlflow_holds_params_metrics_and_the_adapter_and_a_resumed_run_continues(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_cfg(["train.lr=3e-4", "log.mlflow=true", "log.experiment=lr-sweep"])
    run = tmp_path / "outputs" / "job_0"
    run.mkdir(parents=True)
    adapter = run / "adapter" / "final"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    first = MlflowTracker(cfg, run)
    for row in rows()[:2]:
        first.log_row(row)
    first.finish(False, None)  # the server died after round 1
    again = MlflowTracker(cfg, run, rows()[:2])  # resumed after round 1: the same MLflow run
    assert again.run_id == first.run_id
    again.log_row(rows()[2])
    again.finish(True, adapter)

    uri, artifacts = tracking.mlflow_store(cfg, run)
    assert uri == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    assert artifacts == tmp_path / "outputs" / "mlartifacts"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lr-sweep")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "job_0" and found.info.status == "FINISHED"
    assert found.data.params["train.lr"] == "0.0003" and found.data.params["peft.method"] == "lora"
    history = client.get_metric_history(found.info.run_id, "round/eval-loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 3.0), (1, 2.0), (2, 1.5)]
    assert [a.path for a in client.list_artifacts(found.info.run_id, "adapter")] == ["adapter/adapter_config.json"]
    assert (artifacts / "lr-sweep").is_dir()


@pytest.mark.skipif(not (HAS_MLFLOW and HAS_TB), reason="mlflow or tensorboard is not installed (the tracking extra)")
def test_a_resumed_run_without_tracker_records_of_its_own_gives_new_ones_its_earlier_rows(tmp_path, monkeypatch):
    """A sweep job gone on from its screen's checkpoint keeps the screen's rows but none of
    its tracker records: the new MLflow run and TensorBoard folder start at round 0. A
    resume that kept its records gets no earlier row again."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_cfg(["log.mlflow=true", "log.tensorboard=true", "log.experiment=screened"])
    run = tmp_path / "outputs" / "full_0"
    run.mkdir(parents=True)
    for tracker in tracking.open_trackers(cfg, run, rows()[:2]):
        tracker.log_row(rows()[2])
        tracker.finish(True, None)
    client = MlflowClient(tracking_uri=tracking.mlflow_store(cfg, run)[0])
    (found,) = client.search_runs([client.get_experiment_by_name("screened").experiment_id])
    history = client.get_metric_history(found.info.run_id, "round/eval-loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 3.0), (1, 2.0), (2, 1.5)]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("round/eval-loss")] == [(0, 3.0), (1, 2.0), (2, 1.5)]

    logged = []
    for kind in (MlflowTracker, TensorBoardTracker):
        monkeypatch.setattr(kind, "log_row", lambda self, row, kind=kind: logged.append((kind.__name__, row["round"])))
    resumed = tracking.open_trackers(cfg, run, rows())
    assert len(resumed) == 2 and logged == []
    assert resumed[1].run_id == found.info.run_id


@pytest.mark.skipif(not (HAS_MLFLOW and HAS_TB), reason="mlflow or tensorboard is not installed (the tracking extra)")
def test_a_resumed_run_shows_each_round_it_trains_again_once(tmp_path, monkeypatch):
    """Killed after logging round 2, resumed from the checkpoint of round 1: round 2 is
    trained and logged again. TensorBoard discards the first round 2; MLflow, whose
    history cannot be edited, goes on in a new run holding rounds 0-1 and the new round 2,
    linked to the interrupted one, which is ended as failed."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_cfg(["log.mlflow=true", "log.tensorboard=true", "log.experiment=resumed"])
    run = tmp_path / "outputs" / "job"
    run.mkdir(parents=True)
    killed = tracking.open_trackers(cfg, run)
    for tracker in killed:
        for row in rows():
            tracker.log_row(row)
    killed[0].writer.close()  # the process ends; its MLflow run stays RUNNING
    again = {**rows()[2], "eval-loss": 1.25, "client_1-held-out-loss": 1.8}
    for tracker in tracking.open_trackers(cfg, run, rows()[:2]):  # RunDir.rewind kept rounds 0 and 1
        tracker.log_row(again)
        tracker.finish(True, None)

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("round/eval-loss")] == [(0, 3.0), (1, 2.0), (2, 1.25)]
    assert [(e.step, e.value) for e in events.Scalars("client_1/held-out-loss")] == [
        (1, pytest.approx(2.4)), (2, pytest.approx(1.8))]  # fmt: skip
    assert [e.step for e in events.Scalars("round/bytes-up")] == [1, 2]

    client = MlflowClient(tracking_uri=tracking.mlflow_store(cfg, run)[0])
    runs = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    new_id = (run / "mlflow-run-id").read_text().strip()
    (new,) = [r for r in runs if r.info.run_id == new_id]
    (old,) = [r for r in runs if r.info.run_id != new_id]
    history = client.get_metric_history(new_id, "round/eval-loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 3.0), (1, 2.0), (2, 1.25)]
    assert new.info.status == "FINISHED" and new.info.run_name == "job" and new.data.params["peft.method"] == "lora"
    assert new.data.tags["fedllm.resumed-from"] == old.info.run_id
    assert new.data.tags["fedllm.resumed-after-round"] == "1"
    assert old.info.status == "FAILED" and old.data.tags["fedllm.resumed-in"] == new_id
    assert "round 1" in old.data.tags["mlflow.note.content"]


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (the tracking extra)")
def test_a_tracker_dropped_mid_run_ends_its_mlflow_run_as_failed(tmp_path, monkeypatch, caplog):
    """Its server gone away, a tracker is dropped and the run goes on: its MLflow run is
    ended as failed then (best effort, one warning each), not left RUNNING, and gets no
    adapter when the run completes."""
    from mlflow import MlflowClient

    from fedllm_flwr.metrics import MetricsLog

    class Broken:
        def log_row(self, row):
            raise ConnectionError("no route to host")

        def finish(self, completed, adapter):
            raise ConnectionError("no route to host")

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_cfg(["log.mlflow=true", "log.experiment=dropped"])
    run = tmp_path / "outputs" / "job"
    (run / "adapter" / "final").mkdir(parents=True)
    (run / "adapter" / "final" / "adapter_config.json").write_text("{}")
    mlflow = MlflowTracker(cfg, run)
    log = MetricsLog(run / "metrics.jsonl")
    log.trackers = [mlflow, Broken()]
    log.write(rows()[0])
    monkeypatch.setattr(mlflow.client, "log_batch", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("gone")))
    with caplog.at_level("WARNING", logger="fedllm_flwr.metrics"):
        for row in rows()[1:]:
            log.write(row)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fedllm_flwr.metrics"]
    assert log.trackers == [] and len(warnings) == 2  # one per tracker dropped
    assert warnings[0].startswith("Broken") and warnings[1].startswith("MlflowTracker") and "gone" in warnings[1]
    log.close(True, run / "adapter" / "final")
    client = MlflowClient(tracking_uri=tracking.mlflow_store(cfg, run)[0])
    found = client.get_run(mlflow.run_id)
    assert found.info.status == "FAILED" and client.list_artifacts(mlflow.run_id) == []
    assert [(m.step, m.value) for m in client.get_metric_history(mlflow.run_id, "round/eval-loss")] == [(0, 3.0)]
    assert len(read_metrics(run)) == 3  # the run's own log goes on


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_of_two_runs_names_both_and_what_differs(tmp_path):
    a = fake_run(tmp_path, "run-a", "0.001")
    b = fake_run(tmp_path, "run-b", "0.01", scale=0.5)
    legend = [t.get_text() for t in figure([a, b]).legends[0].get_texts()]
    assert legend == ["run-a (train.lr=0.001)", "run-b (train.lr=0.01)"]
    out = plot_runs([a, b], tmp_path / "both.png")
    width, height = png_size(out)
    assert 1000 <= width <= 2000 and 300 <= height <= 600 and out.stat().st_size > 20_000
    assert cli.main(["plot", str(a), str(b), "--out", str(tmp_path / "cli.png")]) == 0
    assert png_size(tmp_path / "cli.png") == (width, height)
    assert cli.main(["plot", str(a)]) == 0 and (a / "curves.png").is_file()  # one run: into its folder
    # Twelve runs keep twelve colours; given names and styles replace them.
    many = [fake_run(tmp_path, f"run-{i}", f"0.00{i + 1}") for i in range(2, 12)]
    lines = figure([a, b, *many]).axes[0].get_lines()
    assert len({tuple(line.get_color()) for line in lines}) == 12
    styles = [("C3", ":"), ("C3", "-")]
    styled = figure([a, b], names=["a, 5 rounds", "b, 10 rounds"], styles=styles)
    assert [t.get_text() for t in styled.legends[0].get_texts()] == ["a, 5 rounds", "b, 10 rounds"]
    assert [(line.get_color(), line.get_linestyle()) for line in styled.axes[0].get_lines()] == styles


def test_plot_of_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "empty has no metrics.jsonl" in err and err.count("\n") == 0 and not (tmp_path / "x.png").exists()
    broken = fake_run(tmp_path, "broken", "0.001")
    with open(broken / "metrics.jsonl", "a") as handle:
        handle.write("{not json\n")
    assert cli.main(["plot", str(broken)]) == 2
    assert "metrics.jsonl, line 4 is not JSON" in capsys.readouterr().err
