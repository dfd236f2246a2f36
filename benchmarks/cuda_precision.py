"""The default job on a CUDA GPU at each precision: fp32, bf16, fp16 with the GradScaler,
and a 4-bit (NF4) base through bitsandbytes.

    python benchmarks/cuda_precision.py [--variants fp32,bf16,fp16,4bit] [--out FILE] [-- OVERRIDES]

Each variant runs the default job (conf/config.yaml: SmolLM2-135M, LoRA, the synthetic
task, 2 clients, fed, 3 rounds) in this one process: every round both clients train
from the global adapter with the ClientApp's own function (`client.local_train`), the
server averages their replies weighted by their example counts (FedAvg), and scores
the result as the ServerApp does (test-set loss, exact match). Adapters cross the
"wire" as fp16, the default codec. Flower and Ray are left out, so the script runs
on a GPU host that has only torch and Hugging Face's packages; in a `flwr run` the
same functions run in the ClientApp and ServerApp.

Per variant: per round the mean training loss, eval loss and exact match; training
seconds and tokens/s (both clients, steps only; the summary leaves out the first
round, which pays CUDA's warm-up); steps the fp16 loss scaler skipped; the CUDA
allocator's peak over the variant. Prints one JSON object (and writes it to
`--out`). Needs CUDA (fp16 and a quantized base are refused or emulated on CPU); not
a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedllm_flwr.client import local_train  # noqa: E402
from fedllm_flwr.config.compose import load_cfg  # noqa: E402
from fedllm_flwr.data import server_data  # noqa: E402
from fedllm_flwr.evaluate.benchmarks import run_benchmark  # noqa: E402
from fedllm_flwr.evaluate.loss import evaluate_loss  # noqa: E402
from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state, set_adapter_state  # noqa: E402

VARIANTS = {  # name -> (train.precision, model.quantization)
    "fp32": ("fp32", "none"),
    "bf16": ("bf16", "none"),
    "fp16": ("fp16", "none"),
    "4bit": ("bf16", "4bit"),
}
CLIENTS = 2


def wire(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp16 codec's round trip (fedllm_flwr.transport packs Flower records, absent here)."""
    return {k: v.detach().to(torch.float16).to(torch.float32).cpu() for k, v in state.items()}


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted mean, as AdapterFedAvg's (which lives in the Flower strategy)."""
    total = sum(weights)
    return {k: sum(w / total * s[k] for s, w in zip(states, weights, strict=True)) for k in states[0]}


def score(cfg, bundle, test, test_set) -> dict[str, float]:
    t0 = time.perf_counter()
    loss = evaluate_loss(bundle.model, test_set, bundle.tokenizer.pad_token_id, cfg.eval.batch_size)
    scores, _ = run_benchmark(cfg.dataset.metric, bundle.model, bundle.tokenizer, test, cfg.eval, seed=cfg.seed)
    return {"eval-loss": round(loss["loss"], 4), "accuracy": scores["accuracy"],
            "eval-seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip


def run_variant(name: str, overrides: list[str]) -> dict:
    precision, quantization = VARIANTS[name]
    cfg = load_cfg([*overrides, f"train.precision={precision}", f"model.quantization={quantization}"])
    clear_model_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)  # the clients' shared base too
    load_seconds = time.perf_counter() - t0
    test, test_set = server_data(cfg, bundle.tokenizer)
    state = wire(get_adapter_state(bundle.model))
    rounds = [{"round": 0, **score(cfg, bundle, test, test_set)}]
    print(f"[{name}] round 0: {rounds[-1]}", file=sys.stderr, flush=True)
    for rnd in range(1, cfg.num_rounds + 1):
        replies = [local_train(cfg, state, rnd, pid, CLIENTS) for pid in range(CLIENTS)]
        state = fedavg([wire(s) for s, _ in replies], [m["num-examples"] for _, m in replies])
        set_adapter_state(bundle.model, state)
        seconds, tokens = sum(m["seconds"] for _, m in replies), sum(m["tokens"] for _, m in replies)
        rounds.append({
            "round": rnd, "train-loss": round(sum(m["train-loss"] for _, m in replies) / CLIENTS, 4),
            "train-seconds": round(seconds, 2), "tokens-per-second": round(tokens / seconds, 1),
            "skipped-steps": sum(int(m["skipped-steps"]) for _, m in replies),
            **score(cfg, bundle, test, test_set),
        })  # fmt: skip
        print(f"[{name}] round {rnd}: {rounds[-1]}", file=sys.stderr, flush=True)
    return {
        "precision": precision, "quantization": quantization, "compute-dtype": str(bundle.dtype).removeprefix("torch."),
        "model-load-seconds": round(load_seconds, 2), **summary(rounds),
        "peak-memory-mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "rounds": rounds,
    }  # fmt: skip


def summary(rounds: list[dict]) -> dict:
    """Speed over the rounds after the first (whose steps also pay CUDA's warm-up: kernel
    selection, allocator growth), and the figures after the last round."""
    trained = rounds[1:]
    steady = trained[1:] or trained
    return {
        "train-seconds-per-round": round(sum(r["train-seconds"] for r in steady) / len(steady), 2),
        "tokens-per-second": round(sum(r["tokens-per-second"] for r in steady) / len(steady), 1),
        "first-round-train-seconds": trained[0]["train-seconds"],
        "skipped-steps": sum(r["skipped-steps"] for r in trained),
        "final-eval-loss": trained[-1]["eval-loss"], "final-accuracy": trained[-1]["accuracy"],
    }  # fmt: skip


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every variant")
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        print(f"--variants: unknown {', '.join(unknown)}; use {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": _version("transformers"), "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"), "overrides": args.overrides, "variants": {},
    }  # fmt: skip
    for name in args.variants.split(","):
        try:
            result["variants"][name] = run_variant(name, args.overrides)
        except Exception as exc:  # one variant failing (a missing kernel, say) must not lose the others
            result["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"[{name}] failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 1 if any("error" in v for v in result["variants"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
