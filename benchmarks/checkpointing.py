"""What gradient checkpointing costs a client's step, and where the time goes.

    python benchmarks/checkpointing.py --out DIR [--data ../shared/data] [--steps 6] [--profile]

One client's step of job P (SmolLM2-135M-Instruct, LoRA r=8 q,v, Stanford Alpaca,
batch 4, max 256 tokens, 1 thread), the same drawn batches for every variant, each
variant in a fresh process so that its peak RSS is its own:

- `ours`: our trainer (`train.train_steps`) with `train.gradient_checkpointing` off,
  and on at each `train.checkpoint_every` in --every (1 = every decoder layer);
- `bare`: the bare PyTorch + peft loop (benchmarks/bare_loop.py) without and with
  checkpointing as a user enables it (`gradient_checkpointing_enable()` and
  `enable_input_require_grads()`, the Hugging Face defaults).

Reports seconds per step (median over the steps after the first), peak RSS, and each
variant's time against the same loop without checkpointing. With --profile, the top
operators by CPU time of one step without and with checkpointing (torch.profiler), to
see what the recomputation adds. Writes DIR/checkpointing.json and prints it. Not a
test: ~5 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]


def job(data: Path, every: int | None) -> list[str]:
    from efficiency_loops import job_p

    lean = ["train.gradient_checkpointing=false"] if every is None else [
        "train.gradient_checkpointing=true", f"train.checkpoint_every={every}"]  # fmt: skip
    return [*job_p(data), "train.local_steps=1", *lean]


def run_variant(loop: str, every: int | None, data: Path, steps: int, batches_file: Path, profile: bool) -> dict:
    """One variant in this process: `steps` steps over the saved batches; one JSON line."""
    import torch

    from fedllm_flwr import quiet_third_party_output
    from fedllm_flwr.config import load_cfg

    quiet_third_party_output()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_cfg(job(data, every))
    batches = torch.load(batches_file)[:steps]
    times = []
    if loop == "ours":
        from fedllm_flwr.model import build_model
        from fedllm_flwr.train import train_steps

        bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)

        def step(batch):
            train_steps(bundle.model, iter([batch]), cfg.train, compute_dtype=bundle.dtype)
    else:
        import bare_loop
        from efficiency_loops import lora_settings

        from fedllm_flwr.model_files import resolve_model

        model = bare_loop.load_lora_model(resolve_model(cfg.model), lora_settings(cfg))
        if every is not None:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()

        def step(batch):
            bare_loop.train(model, [batch], cfg.train.lr)

    for batch in batches:
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    result = {
        "loop": loop,
        "checkpoint_every": every,
        "step_seconds": [round(t, 3) for t in times],
        "median_step_seconds": round(statistics.median(times[1:] or times), 3),
        "tokens_per_step": round(sum(int(b["attention_mask"].sum()) for b in batches) / len(batches), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batches[-1])
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        result["profile"] = table
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--steps", type=int, default=6, help="steps per variant (the first is a warm-up)")
    parser.add_argument("--every", default="1,2", help="train.checkpoint_every values to measure")
    parser.add_argument("--profile", action="store_true", help="profile one step per variant")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: LOOP:EVERY in a child process
    parser.add_argument("--batches", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        loop, every = args.variant.split(":")
        result = run_variant(loop, int(every) if every else None, args.data, args.steps, args.batches, args.profile)
        print(json.dumps(result), flush=True)
        return

    import torch
    from efficiency_loops import drawn_batches

    from fedllm_flwr.config import load_cfg

    args.out.mkdir(parents=True, exist_ok=True)
    cfg = load_cfg(job(args.data, None))
    _, batches = drawn_batches(cfg, 0, 2, rounds=args.steps)  # one step a round in this job
    everies = [int(e) for e in args.every.split(",") if e]
    variants = [("ours", None), *[("ours", e) for e in everies], ("bare", None), ("bare", 1)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        batches_file = Path(tmp) / "batches.pt"
        torch.save(batches[: args.steps], batches_file)
        for loop, every in variants:
            command = [
                sys.executable,
                __file__,
                "--out",
                str(args.out),
                "--data",
                str(args.data),
                "--steps",
                str(args.steps),
                "--variant",
                f"{loop}:{every or ''}",
                "--batches",
                str(batches_file),
            ]
            if args.profile and (every is None or every == 1):
                command.append("--profile")
            print(f"[checkpointing] {loop}, checkpoint_every={every}", file=sys.stderr, flush=True)
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{loop} checkpoint_every={every} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for r in results:
        base = next(b for b in results if b["loop"] == r["loop"] and b["checkpoint_every"] is None)
        r["time_vs_no_checkpointing"] = round(r["median_step_seconds"] / base["median_step_seconds"], 3)
        r["rss_vs_no_checkpointing"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 3)
    report = {"job": "job P, one client's step, 1 thread", "variants": results}
    (args.out / "checkpointing.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items()}, indent=1))


if __name__ == "__main__":
    main()
