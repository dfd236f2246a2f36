"""The efficiency suite: every saving measured against a baseline in the same invocation.

    python benchmarks/efficiency.py --out ~/fedllm-flwr/efficiency [--data ../shared/data] [--parts a,b]

Parts (each a ratio against a baseline run here, now, on this machine):
1. `throughput`: tokens/s of our ClientApp's training function (`client.local_train`)
   against a bare PyTorch + peft loop (benchmarks/bare_loop.py) on the same batches,
   one process, 1 thread (a client's share of job P) and 2 threads;
2. `overhead`: wall time of a `flwr run .` simulation (2 SuperNodes, 1 CPU each,
   no server-side evaluation) against two bare loops doing the same steps side by
   side, on job P and on the default config, with the peak memory of all
   processes (RSS and PSS sums) and a breakdown of where the federated run's time went;
3. `compression`: bytes per client per round and final eval loss after N rounds
   of the default job for each codec, against fp16;
4. `memory`: peak memory of one simulation worker serving 1, 2, 4 and 8 clients,
   with a shared base model and with a model per client;
5. `quantization`: 8-bit and 4-bit base against bf16 on the default job: step
   time, peak memory per client, eval loss after N rounds;
6. `checkpointing`: a job P client step with gradient checkpointing (every layer,
   every 2nd) against none, ours and a bare loop with the same checkpointing, one
   process per variant (benchmarks/checkpointing.py);
7. `sweep`: a `fedllm-flwr sweep` of job P over four learning rates (2 rounds x 5
   steps, no evaluation): each job's wall time minus its clients' training time,
   the first job (which starts the sweep's SuperLink and Ray) and the others.

The loops of parts 1 and 2 and job P's overrides are in efficiency_loops.py.

Job P, the reference job peers can run too: SmolLM2-135M-Instruct, LoRA r=8
alpha=16 on q_proj,v_proj, Stanford Alpaca (`--data`/alpaca/) split IID over 2
clients, 3 rounds x 10 local steps, batch 4, max sequence length 256, 1 CPU per
client, both clients training at once.

Writes OUT/<part>.json as each part finishes (a part already there is reused;
`--fresh` reruns it), then OUT/results.json and OUT/summary.md, and prints the
results as one JSON object. Progress goes to stderr. Not a test: ~1 h on
2 CPU cores. Every SuperLink, SuperNode and Ray process it starts is on
127.0.0.1 and stopped by PID when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procmem  # noqa: E402
from efficiency_loops import DEFAULT_JOB, bare_loops, job_p, throughput  # noqa: E402
from efficiency_report import check_targets, summary  # noqa: E402

from fedllm_flwr.metrics import read_metrics  # noqa: E402
from fedllm_tools.simulation import LocalSimulation, stop_on_sigterm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("throughput", "overhead", "compression", "memory", "quantization", "checkpointing", "sweep")
TRAIN_ONLY = ["eval.every=0", "strategy.fraction_evaluate=0"]


def log(message: str) -> None:
    print(f"[efficiency] {message}", file=sys.stderr, flush=True)


# -- 2. federated overhead ----------------------------------------------------


def flwr_job(sim: LocalSimulation, name: str, overrides: list[str], out: Path, nodes: int = 2, cpus: int = 1,
             memory: bool = False) -> dict:  # fmt: skip
    """One `flwr run .` of `overrides` into OUT/runs/<name>; timed, optionally memory-sampled."""
    runs = out / "runs"
    full = [*overrides, f"run.output_dir={runs}", f"run.name={name}"]
    log(f"flwr run . ({nodes} SuperNodes x {cpus} CPU): {' '.join(overrides)}")
    sampler = procmem.ProcessMemory(lambda: [p for p in procmem.descendants() if procmem.label(p) != "bare loop"])
    if memory:
        sampler.__enter__()
    started = time.time()
    t0 = time.perf_counter()
    try:
        result = sim.run(ROOT, overrides=" ".join(full), num_supernodes=nodes, timeout=5400, cpus=cpus)
    finally:
        if memory:
            sampler.__exit__()
    seconds = time.perf_counter() - t0
    run = runs / name
    if result.returncode != 0 or not (run / "summary.json").is_file():
        raise RuntimeError(f"flwr run {name} failed:\n{result.stdout[-3000:]}")
    rows = read_metrics(run)
    report = {"seconds": round(seconds, 2), "rows": rows, "summary": json.loads((run / "summary.json").read_text())}
    report["timeline"] = timeline(started, started + seconds, rows)
    if memory:
        report["peak_memory_mb"] = sampler.peak()
    return report


def timeline(start: float, end: float, rows: list[dict]) -> dict:
    """Where a run's wall time went: before round 1, each round (and the clients'
    own training time in it), and after the last round."""
    stamps = [r["time"] for r in rows]
    rounds = []
    for previous, row in zip(stamps, rows[1:], strict=False):
        train = row.get("train-seconds") or 0.0
        rounds.append({"round": row["round"], "seconds": round(row["time"] - previous, 2),
                       "client_train_seconds": round(train, 2),
                       "client_model_load_seconds": round(row.get("model-load-seconds") or 0.0, 2)})  # fmt: skip
    return {
        "before_round_1": round(stamps[0] - start, 2),
        "rounds": rounds,
        "after_last_round": round(end - stamps[-1], 2),
    }


def overhead(sim: LocalSimulation, name: str, job: list[str], out: Path, loops: dict | None = None) -> dict:
    """`flwr run` of `job` against two clients' loops side by side (run now, unless
    `loops` gives those of the same steps measured earlier in this invocation)."""
    from fedllm_flwr.config import load_cfg

    cfg = load_cfg(job)
    if loops is None:
        with tempfile.TemporaryDirectory(prefix="fedllm-bare-") as tmp:
            log(f"{name}: two clients' loops side by side ({cfg.num_rounds} x {cfg.train.local_steps} steps each)")
            loops = bare_loops(cfg, job, Path(tmp))
    fed = flwr_job(sim, f"overhead-{name}", [*job, *TRAIN_ONLY], out, memory=True)
    per_client = [
        {"down": r["bytes-down"] / r["clients-sampled"], "up": r["bytes-up"] / r["clients-ok"]} for r in fed["rows"][1:]
    ]
    return {
        "job": job,
        **loops,
        "flwr": {k: v for k, v in fed.items() if k not in ("rows", "summary")},
        "ratio": round(fed["seconds"] / loops["bare"]["seconds"], 3),
        "ratio_to_our_trainer_without_flower": round(fed["seconds"] / loops["trainer"]["seconds"], 3),
        "bytes_per_client_per_round": per_client[0],
    }


# -- 3. compression, 4. shared base model, 5. quantized base -------------------------


def final(report: dict) -> dict:
    last = report["rows"][-1]
    return {"eval_loss": last.get("eval-loss"), "accuracy": last.get("accuracy")}


def compression(sim: LocalSimulation, out: Path, rounds: int) -> dict:
    modes = {
        "fp16": ["compression=fp16"],
        "fp32": ["compression=fp32"],
        "int8": ["compression=int8"],
        "int8_row": ["compression=int8", "compression.int8_scale=row"],
        "topk": ["compression=topk"],
        "topk_no_feedback": ["compression=topk", "compression.error_feedback=false"],
    }
    results = {}
    for mode, overrides in modes.items():
        report = flwr_job(sim, f"compression-{mode}", [*DEFAULT_JOB, f"num_rounds={rounds}", f"eval.every={rounds}",
                                                       *overrides], out)  # fmt: skip
        rows = report["rows"][1:]
        results[mode] = {
            "bytes_down_per_client_per_round": sum(r["bytes-down"] / r["clients-sampled"] for r in rows) / len(rows),
            "bytes_up_per_client_per_round": sum(r["bytes-up"] / r["clients-ok"] for r in rows) / len(rows),
            **final(report),
            "seconds": report["seconds"],
        }
    base = results["fp16"]
    for values in results.values():
        for key in ("bytes_down_per_client_per_round", "bytes_up_per_client_per_round", "eval_loss"):
            values[key.replace("per_client_per_round", "ratio").replace("eval_loss", "eval_loss_ratio")] = round(
                values[key] / base[key], 4
            )
    return {"rounds": rounds, "modes": results}


def memory(sim: LocalSimulation, out: Path) -> dict:
    results = []
    for clients in (1, 2, 4, 8):
        for share in (True, False) if clients > 1 else (True,):
            nodes = [f"strategy.min_available_nodes={clients}", f"strategy.min_train_nodes={clients}",
                     f"strategy.min_evaluate_nodes={clients}"]  # fmt: skip
            job = [*DEFAULT_JOB, *TRAIN_ONLY, *nodes, "num_rounds=2", "train.local_steps=2",
                   f"model.share_base={str(share).lower()}"]  # fmt: skip
            report = flwr_job(sim, f"memory-{clients}-{'shared' if share else 'own'}", job, out, nodes=clients, cpus=2)
            rows = report["rows"][1:]
            results.append(
                {
                    "clients_per_worker": clients,
                    "shared_base": share,
                    "worker_peak_rss_mb": max(r["peak-memory-mb"] for r in rows),
                    "model_load_seconds_max": max(r.get("model-load-seconds") or 0.0 for r in rows),
                    "seconds": report["seconds"],
                }
            )
    one = next(r for r in results if r["clients_per_worker"] == 1)["worker_peak_rss_mb"]
    for r in results:
        r["vs_1_client"] = round(r["worker_peak_rss_mb"] / one, 3)
    return {"workers": 1, "runs": results}


def quantization(sim: LocalSimulation, out: Path, rounds: int) -> dict:
    from fedllm_flwr.config import load_cfg

    results = {}
    for quant in ("none", "8bit", "4bit"):
        job = [*DEFAULT_JOB, f"num_rounds={rounds}", f"eval.every={rounds}", f"model.quantization={quant}"]
        report = flwr_job(sim, f"quantization-{quant}", job, out)
        rows = report["rows"][1:]
        steps = load_cfg(job).train.local_steps
        results["bf16" if quant == "none" else quant] = {
            "step_seconds": round(sum(r["train-seconds"] for r in rows) / len(rows) / steps, 3),
            "client_peak_rss_mb": max(r["peak-memory-mb"] for r in rows),
            **final(report),
            "seconds": report["seconds"],
        }
    base = results["bf16"]
    for values in results.values():
        values["step_seconds_ratio"] = round(values["step_seconds"] / base["step_seconds"], 3)
        values["peak_memory_ratio"] = round(values["client_peak_rss_mb"] / base["client_peak_rss_mb"], 3)
        values["eval_loss_ratio"] = round(values["eval_loss"] / base["eval_loss"], 4)
    return {"rounds": rounds, "bases": results}


# -- 7. a sweep's cost per job ---------------------------------------------------------

SWEEP_LRS = "1e-4,3e-4,1e-3,3e-3"


def sweep_overhead(out: Path, data: Path) -> dict:
    """A four-job learning-rate sweep of (a shorter) job P: per job, wall time as the
    sweep measured it, the clients' training time (each round's slowest client) and
    the difference, which is what a job costs beyond training."""
    import shutil

    folder = out / "sweep"
    shutil.rmtree(folder, ignore_errors=True)
    job = [*job_p(data), "num_rounds=2", "train.local_steps=5", *TRAIN_ONLY]
    command = [str(Path(sys.executable).parent / "fedllm-flwr"), "sweep", "-m", f"train.lr={SWEEP_LRS}", *job,
               f"hydra.sweep.dir={folder}"]  # fmt: skip
    log(f"fedllm-flwr sweep of {SWEEP_LRS.count(',') + 1} jobs: {' '.join(job)}")
    t0 = time.perf_counter()
    with open(out / "sweep.log", "wb") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    total = time.perf_counter() - t0
    jobs = []
    for n in range(SWEEP_LRS.count(",") + 1):
        run = folder / f"job_{n}"
        record = json.loads((run / "job.json").read_text())
        if record["status"] != "completed":
            raise RuntimeError(f"sweep job {n} failed: {record['error']}")
        rows = read_metrics(run)
        train = sum(r.get("train-seconds") or 0.0 for r in rows[1:])
        jobs.append({"job": n, "seconds": record["seconds"], "client_train_seconds": round(train, 2),
                     "overhead_seconds": round(record["seconds"] - train, 2),
                     "timeline": timeline(rows[0]["time"], rows[-1]["time"], rows)["rounds"]})  # fmt: skip
    later = [j["overhead_seconds"] for j in jobs[1:]]
    return {
        "job": job,
        "learning_rates": SWEEP_LRS.split(","),
        "sweep_seconds": round(total, 1),
        "jobs": jobs,
        "first_job_overhead_seconds": jobs[0]["overhead_seconds"],
        "later_jobs_overhead_seconds_max": max(later),
        "later_jobs_overhead_seconds_mean": round(sum(later) / len(later), 2),
    }


# -- the suite ----------------------------------------------------------------------


def machine() -> dict:
    import torch

    return {
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the compression and quantization runs")
    parser.add_argument("--fresh", action="store_true", help="rerun parts whose results are already in --out")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions of the overhead part (the median is shown)")
    args = parser.parse_args()
    if args.out is None:
        parser.error("--out is required")
    out, data = args.out.expanduser().resolve(), args.data.expanduser().resolve()
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; use {', '.join(PARTS)}")
    alpaca = data / "alpaca" / "alpaca_data.jsonl.gz"
    if {"throughput", "overhead", "checkpointing", "sweep"} & set(parts) and not alpaca.is_file():
        parser.error(f"job P needs Stanford Alpaca at {alpaca} (--data names the folder holding alpaca/)")
    out.mkdir(parents=True, exist_ok=True)
    from fedllm_flwr import quiet_third_party_output

    quiet_third_party_output()
    results = {"machine": machine()}
    for part in PARTS:
        path = out / f"{part}.json"
        if part in parts and (args.fresh or not path.is_file()):
            log(f"part {part}")
            results[part] = run_part(part, out, data, args.rounds, args.repeat)
            path.write_text(json.dumps(results[part], indent=1))
        elif path.is_file():
            results[part] = json.loads(path.read_text())
    results["targets"] = check_targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(summary(results))
    log(f"wrote {out / 'results.json'} and {out / 'summary.md'}")
    print(json.dumps(results))
    return 0


def median_rep(reps: list[dict]) -> dict:
    """The repetition with the median ratio, with every repetition's ratios beside it."""
    chosen = sorted(reps, key=lambda r: r["ratio"])[(len(reps) - 1) // 2]
    keys = ("ratio", "ratio_to_our_trainer_without_flower")
    summary = [{**{k: r[k] for k in keys}, "flwr_seconds": r["flwr"]["seconds"], "bare_seconds": r["bare"]["seconds"],
                "trainer_seconds": r["trainer"]["seconds"]} for r in reps]  # fmt: skip
    return {**chosen, "repetitions": summary}


def run_part(part: str, out: Path, data: Path, rounds: int, repeat: int = 1) -> dict:
    if part == "checkpointing":
        command = [
            sys.executable,
            str(ROOT / "benchmarks" / "checkpointing.py"),
            "--out",
            str(out),
            "--data",
            str(data),
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return json.loads((out / "checkpointing.json").read_text())
    if part == "sweep":
        return sweep_overhead(out, data)
    if part == "throughput":
        return {
            "job_p": [throughput(job_p(data), threads) for threads in (1, 2)],
            "default": [throughput(DEFAULT_JOB, threads) for threads in (1, 2)],
        }
    with tempfile.TemporaryDirectory(prefix="fedllm-eff-") as tmp, LocalSimulation(Path(tmp)) as sim:
        if part == "overhead":
            reps = []
            for rep in range(repeat):
                p = overhead(sim, f"job_p-{rep}", job_p(data), out)
                # The same job with gradient checkpointing: memory for compute, against the same loops.
                lean = [*job_p(data), "train.gradient_checkpointing=true"]
                loops = {k: p[k] for k in ("bare", "trainer")}
                reps.append({
                    "job_p": p,
                    "job_p_checkpointing": overhead(sim, f"job_p_checkpointing-{rep}", lean, out, loops),
                    "default": overhead(sim, f"default-{rep}", DEFAULT_JOB, out),
                })  # fmt: skip
            return {name: median_rep([r[name] for r in reps]) for name in reps[0]}
        if part == "compression":
            return compression(sim, out, rounds)
        if part == "memory":
            return memory(sim, out)
        return quantization(sim, out, rounds)


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
