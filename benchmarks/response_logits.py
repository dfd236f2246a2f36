"""What `train.response_logits` saves: one training step with the LM head at the
response positions only, against the model's own loss (the head at every position).

    python benchmarks/response_logits.py [--models smollm2,gemma3] [--steps 4] [--threads 1]
        [--out benchmarks/results/response_logits.json]

Per model and PEFT method: the default task's batches (batch 8, fp32), one warm-up
step, then the median wall time of `--steps` forward + backward passes with each
setting, alternated so that a busy machine slows both alike; and the loss of the
first batch both ways (they must agree). LoRA slices the head row by row after the
decoder; prompt-learning methods pass `logits_to_keep` through PeftModel's forward.
A model whose extra is missing (gemma3) is skipped. Prints one JSON object. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

METHODS = ("lora", "prompt_tuning", "p_tuning", "prefix_tuning")


def measure(model_name: str, method: str, steps: int) -> dict:
    import torch

    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.data import client_data
    from fedllm_flwr.data.prompts import iter_batches
    from fedllm_flwr.lm_loss import lm_loss
    from fedllm_flwr.model import build_model, clear_model_cache

    clear_model_cache()
    cfg = load_cfg([f"model={model_name}", f"peft={method}", "train.precision=fp32"])
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    data = client_data(cfg, bundle.tokenizer, 0, 2)
    batches = iter_batches(data.train, cfg.train.batch_size, bundle.tokenizer.pad_token_id, seed=0)
    model = bundle.model
    model.train()

    def step(batch: dict, sliced: bool) -> float:
        t0 = time.perf_counter()
        loss = lm_loss(model, batch, response_logits=sliced)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    first = next(batches)
    with torch.no_grad():
        losses = {s: lm_loss(model, first, response_logits=s).item() for s in (True, False)}
    step(first, True), step(first, False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(steps):
        batch = next(batches)
        for sliced in (True, False):
            times[sliced].append(step(batch, sliced))
    fast, full = statistics.median(times[True]), statistics.median(times[False])
    labels = first["labels"][:, 1:] != -100
    return {
        "model": model_name, "method": method, "step-seconds-response-logits": round(fast, 3),
        "step-seconds-all-logits": round(full, 3), "speedup": round(full / fast, 2),
        "loss-response-logits": losses[True], "loss-all-logits": losses[False],
        "positions-per-row": first["input_ids"].shape[1],
        "response-positions-per-row": round(labels.sum(1).float().mean().item(), 1),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/response_logits.json"))
    args = parser.parse_args()
    import torch

    from fedllm_flwr.errors import UserError

    torch.set_num_threads(args.threads)
    rows, skipped = [], {}
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            try:
                rows.append(measure(model_name, method, args.steps))
            except UserError as err:  # e.g. the model's optional extra is not installed
                skipped[model_name] = str(err)
                break
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {"threads": args.threads, "steps": args.steps, "rows": rows, "skipped": skipped}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
