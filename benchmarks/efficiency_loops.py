"""The loops the efficiency suite measures against, and job P's definition.

`throughput` times our ClientApp's training function against the bare PyTorch +
peft loop (bare_loop.py) on the batches a client draws; `bare_loops` runs two
clients' steps side by side, bare and with our trainer but no Flower, the
baseline `efficiency.py overhead` compares a `flwr run .` with.
checkpointing.py shares job P and the drawn batches.

    python benchmarks/efficiency_loops.py --trainer-loop PARTITION [OVERRIDES...]

runs one client's rounds with our trainer and prints {"seconds", "tokens"}
(the subprocess `bare_loops` starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procmem  # noqa: E402

HERE = Path(__file__).resolve().parent


def job_p(data: Path) -> list[str]:
    return [
        "dataset=alpaca", f"dataset.path={data / 'alpaca' / 'alpaca_data.jsonl.gz'}", "dataset.partition.method=iid",
        "dataset.max_seq_len=256", "peft=lora", "peft.r=8", "peft.alpha=16", "peft.target_modules=[q_proj,v_proj]",
        "num_rounds=3", "train.local_steps=10", "train.batch_size=4", "train.threads=1",
    ]  # fmt: skip


DEFAULT_JOB = ["train.threads=1"]  # the default config, 2 clients at 1 CPU (thread) each


# -- the examples a client draws, for the bare loop ----------------------------


def drawn_batches(cfg, partition: int, num_partitions: int, rounds: int):
    """(tokenizer, batches) client `partition` trains on over `rounds` rounds, in order."""
    from fedllm_flwr.data import client_data
    from fedllm_flwr.data.prompts import iter_batches
    from fedllm_flwr.model import load_tokenizer
    from fedllm_flwr.model_files import resolve_model

    tokenizer = load_tokenizer(resolve_model(cfg.model))
    data = client_data(cfg, tokenizer, partition, num_partitions)
    stream = iter_batches(data.train, cfg.train.batch_size, tokenizer.pad_token_id, seed=cfg.seed * 1000 + partition)
    return tokenizer, [next(stream) for _ in range(rounds * cfg.train.local_steps * cfg.train.grad_accum)]


def write_examples(batches, path: Path) -> Path:
    with open(path, "w") as handle:
        for batch in batches:
            for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
                keep = mask.bool()
                handle.write(json.dumps({"input_ids": ids[keep].tolist(), "labels": labels[keep].tolist()}) + "\n")
    return path


def lora_settings(cfg) -> dict:
    p = cfg.peft
    return {"r": p.r, "alpha": p.alpha, "dropout": p.dropout, "target_modules": list(p.target_modules)}


def bare_spec(cfg, examples: Path, pad_id: int, threads: int) -> dict:
    from fedllm_flwr.model_files import resolve_model

    return {
        "model": resolve_model(cfg.model), "examples": str(examples), "batch_size": cfg.train.batch_size,
        "pad_id": pad_id, "lr": cfg.train.lr, "threads": threads, "seed": cfg.seed, "lora": lora_settings(cfg),
    }  # fmt: skip


# -- the throughput part -------------------------------------------------------


def throughput(job: list[str], threads: int, reps: int = 2) -> dict:
    """Tokens/s of `local_train` and of the bare loop on the same round-1 batches, alternating."""
    import bare_loop
    import torch

    from fedllm_flwr.client import local_train
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state

    torch.set_num_threads(threads)
    cfg = load_cfg([*job, f"train.threads={threads}"])
    _, batches = drawn_batches(cfg, 0, 2, rounds=1)
    clear_model_cache()
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    start = get_adapter_state(bundle.model)
    bare = bare_loop.load_lora_model(bundle.base_path, lora_settings(cfg))
    ours, theirs = [], []
    for rep in range(reps + 1):  # the first pair warms up both
        _, metrics = local_train(cfg, start, 1, 0, 2)
        result = bare_loop.train(bare, batches, cfg.train.lr)
        if rep:
            ours.append(metrics["tokens"] / metrics["seconds"])
            theirs.append(result["tokens"] / result["seconds"])
    del bare
    clear_model_cache()
    return {
        "threads": threads,
        "steps": cfg.train.local_steps,
        "batch_size": cfg.train.batch_size,
        "tokens_per_step": metrics["tokens"] / cfg.train.local_steps,
        "ours_tokens_per_second": max(ours),
        "bare_tokens_per_second": max(theirs),
        "ratio": round(max(ours) / max(theirs), 3),
        "all_ours": [round(x, 1) for x in ours],
        "all_bare": [round(x, 1) for x in theirs],
    }


# -- the overhead part's loops, side by side ------------------------------------


def side_by_side(commands: list[list[str]], threads: int, label: str) -> tuple[float, list[dict], dict]:
    """Run `commands` at once (one client each); (wall seconds, their JSON results, peak memory)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def processes():
        return [p for p in procmem.descendants() if procmem.label(p) == label]

    with procmem.ProcessMemory(processes) as memory:
        t0 = time.perf_counter()
        procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, text=True) for c in commands]
        outputs = [p.communicate()[0] for p in procs]
        seconds = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a {label} process failed")
    return seconds, [json.loads(o.strip().splitlines()[-1]) for o in outputs], memory.peak()


def bare_loops(cfg, job: list[str], tmp: Path) -> dict:
    """Two clients' steps of all rounds, side by side: in bare PyTorch + peft loops,
    then with our training function (`client.local_train`) and no Flower."""
    threads = cfg.train.threads or 1
    bare, ours = [], []
    for partition in (0, 1):
        tokenizer, batches = drawn_batches(cfg, partition, 2, cfg.num_rounds)
        examples = write_examples(batches, tmp / f"examples-{partition}.jsonl")
        spec = tmp / f"bare-{partition}.json"
        spec.write_text(json.dumps(bare_spec(cfg, examples, tokenizer.pad_token_id, threads)))
        bare.append([sys.executable, str(HERE / "bare_loop.py"), str(spec)])
        ours.append([sys.executable, __file__, "--trainer-loop", str(partition), *job])
    out = {}
    for name, commands, label in (("bare", bare, "bare loop"), ("trainer", ours, "trainer loop")):
        seconds, results, peak = side_by_side(commands, threads, label)
        out[name] = {
            "seconds": round(seconds, 2),
            "step_seconds": [round(r["seconds"], 2) for r in results],
            "tokens": [r["tokens"] for r in results],
            "peak_memory_mb": peak,
        }
    return out


def trainer_loop(partition: int, job: list[str]) -> None:
    """One client's rounds with our ClientApp's training function and no Flower (a subprocess)."""
    import torch

    from fedllm_flwr import quiet_third_party_output
    from fedllm_flwr.client import local_train
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.model import build_model, get_adapter_state

    quiet_third_party_output()
    cfg = load_cfg(job)
    torch.set_num_threads(cfg.train.threads or 1)
    state = get_adapter_state(build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed).model)
    seconds, tokens = 0.0, 0
    for server_round in range(1, cfg.num_rounds + 1):
        state, metrics = local_train(cfg, state, server_round, partition, 2)
        seconds, tokens = seconds + metrics["seconds"], tokens + metrics["tokens"]
    print(json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--trainer-loop":
        sys.exit(f"usage: {sys.argv[0]} --trainer-loop PARTITION [OVERRIDES...]")
    trainer_loop(int(sys.argv[2]), sys.argv[3:])
