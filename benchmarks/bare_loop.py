"""The reference the efficiency suite measures against: a bare PyTorch + peft loop.

    python benchmarks/bare_loop.py SPEC.json

What a user would write without Flower and without this project's trainer:
load the model with transformers, wrap it with peft's LoRA, and run AdamW steps
on the model's own loss under bf16 autocast (gradients clipped to 1.0, as our
trainer does). SPEC names the model folder, the LoRA settings and a JSONL file
of the exact examples to train on, in order (the ones our client draws, already
tokenized: input ids and labels with the prompt masked), so both sides see the
same batches. Prints one JSON line: steps, tokens, seconds (steps only) and the
process's peak RSS. Imports nothing from Flower or from fedllm_flwr.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def batches_of(examples: list[dict], batch_size: int, pad_id: int) -> list[dict]:
    """Right-padded batches; padding is masked out of attention and loss."""
    import torch

    out = []
    for start in range(0, len(examples) - batch_size + 1, batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def load_lora_model(path: str, lora: dict):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, config)


def train(model, batches: list[dict], lr: float) -> dict:
    """AdamW steps over `batches`; returns steps, tokens and seconds."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    tokens, t0 = 0, time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    return {"steps": len(batches), "tokens": tokens, "seconds": time.perf_counter() - t0}


def main(spec_path: str) -> None:
    started = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec.get("seed", 0))
    model = load_lora_model(spec["model"], spec["lora"])
    examples = [json.loads(line) for line in Path(spec["examples"]).read_text().splitlines()]
    result = train(model, batches_of(examples, spec["batch_size"], spec["pad_id"]), spec["lr"])
    result["main-seconds"] = time.perf_counter() - started  # after the interpreter started
    result["peak-rss-mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
