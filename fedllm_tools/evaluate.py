"""`fedllm-flwr evaluate`: score a saved adapter, or the base model, on one benchmark.

The config comes from the run that saved the adapter (its `config.yaml`), so the
held-out split and the base model are those the adapter was trained with;
without an adapter it comes from the Hydra overrides, as for `flwr run`.
Results go to a JSON file next to the adapter (or `--out`), with the
per-example completions in a JSONL file beside it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedllm_flwr.config import Config, load_cfg, to_config
from fedllm_flwr.errors import UserError
from fedllm_flwr.files import write_text_atomically

#: What `--benchmark` scores: a generation benchmark (`evaluate/benchmarks.py`), the held-out
#: loss, or a reward model's preference accuracy (`preference`).
BENCHMARKS = ("gsm8k", "humaneval", "rouge", "exact_match", "loss", "preference")
#: The dataset preset a benchmark reads when neither a run config nor `dataset=` names one.
BENCHMARK_DATASET = {"gsm8k": "gsm8k", "rouge": "dolly"}


@dataclass
class EvalRequest:
    benchmark: str
    adapter: Path | None = None
    data: Path | None = None
    limit: int = 0
    out: Path | None = None
    overrides: list[str] = field(default_factory=list)
    batch_size: int = 0
    max_new_tokens: int = 0
    num_samples: int = 1
    temperature: float = 0.0
    ks: tuple[int, ...] = (1,)
    timeout: float = 5.0


def run_config_of(adapter: Path) -> Path | None:
    """The `config.yaml` of the run folder an adapter folder sits in, if any."""
    for parent in list(adapter.resolve().parents)[:4]:
        if (parent / "config.yaml").is_file() and (parent / "adapter").is_dir():
            return parent / "config.yaml"
    return None


def resolve_config(req: EvalRequest) -> Config:
    """The run's saved config (with dotted overrides on top), or a composed one."""
    saved = run_config_of(req.adapter) if req.adapter else None
    if saved is None:
        overrides = list(req.overrides)
        if req.benchmark in BENCHMARK_DATASET and not any(o.startswith("dataset=") for o in overrides):
            overrides.insert(0, f"dataset={BENCHMARK_DATASET[req.benchmark]}")
        cfg = load_cfg(overrides)
    else:
        groups = [o for o in req.overrides if "=" in o and "." not in o.split("=", 1)[0]]
        if groups:
            raise UserError(
                f"{', '.join(groups)}: the adapter's run config ({saved}) fixes the config groups; "
                "override single keys (e.g. dataset.path=...) instead"
            )
        try:
            merged = OmegaConf.merge(
                OmegaConf.structured(Config), OmegaConf.load(saved), OmegaConf.from_dotlist(list(req.overrides))
            )
        except OmegaConfBaseException as exc:
            raise UserError(f"{saved}: {str(exc).splitlines()[0]}") from None
        cfg = to_config(merged)
    if req.data is not None:
        cfg = replace(cfg, dataset=replace(cfg.dataset, path=str(req.data), test_path="", test_split=""))
    eval_cfg = replace(
        cfg.eval,
        batch_size=req.batch_size or cfg.eval.batch_size,
        max_new_tokens=req.max_new_tokens or cfg.eval.max_new_tokens,
        limit=req.limit,
    )
    return replace(cfg, eval=eval_cfg)


def evaluation_records(req: EvalRequest, cfg: Config) -> list[dict]:
    """The examples to score: all of `--data`, or the configured dataset's test
    split; HumanEval's problems for `humaneval` (or `--data` in its format)."""
    from fedllm_flwr.data import spread_subset
    from fedllm_flwr.data.sources import load_records, read_records

    if req.benchmark == "humaneval":
        from fedllm_flwr.evaluate.humaneval import load_problems

        return load_problems(req.data, limit=req.limit)
    pairs = req.benchmark == "preference"
    if req.data is not None:
        records = read_records(cfg.dataset, str(req.data), cfg.dataset.split, 0, key="--data", pairs=pairs)
    else:
        if cfg.dataset.source != "file" and req.benchmark in ("gsm8k", "rouge"):
            raise UserError(
                f"--benchmark {req.benchmark} needs data: give --data FILE or a dataset preset (e.g. dataset=dolly)"
            )
        _, records = load_records(cfg.dataset, cfg.seed, pairs)
    return spread_subset(records, req.limit) if req.limit else records


def load_for_eval(cfg: Config, adapter: Path | None):
    """(model, tokenizer, base path): the base model, with the adapter loaded if given."""
    from peft import PeftModel

    from fedllm_flwr.model import default_device, load_base_model, load_tokenizer, resolve_dtype
    from fedllm_flwr.model_files import resolve_model
    from fedllm_flwr.tasks.registry import task_of

    device = default_device()
    base_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(base_path)
    dtype = resolve_dtype(cfg.train.precision, device)
    task_type = task_of(cfg).peft_task_type
    model = load_base_model(base_path, dtype, device, cfg.model.quantization, task_type, tokenizer.pad_token_id)
    if adapter is not None:
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"--adapter {adapter}: no adapter_config.json there (point at adapter/final or a round)")
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model, tokenizer, base_path


def default_out(req: EvalRequest) -> Path | None:
    if req.out is not None:
        return req.out
    if req.adapter is not None:
        return req.adapter / f"eval_{req.benchmark}.json"
    return None


def evaluate_command(req: EvalRequest) -> dict[str, Any]:
    """Run one evaluation; returns the result written to JSON."""
    from fedllm_flwr import quiet_third_party_output
    from fedllm_flwr.evaluate.benchmarks import run_benchmark
    from fedllm_flwr.tasks.registry import task_of

    if req.benchmark not in BENCHMARKS:
        raise UserError(f"--benchmark {req.benchmark!r}: use one of {', '.join(BENCHMARKS)}")
    if req.adapter is not None and not req.adapter.is_dir():
        raise UserError(f"--adapter {req.adapter} is not a folder")
    quiet_third_party_output()
    cfg = resolve_config(req)
    if (req.benchmark == "preference") != (task_of(cfg).peft_task_type == "SEQ_CLS"):
        raise UserError(
            f"--benchmark {req.benchmark} does not fit task={cfg.task.name}: --benchmark preference scores reward "
            "models (task=reward), the other benchmarks score language models"
        )
    records = evaluation_records(req, cfg)
    if not records:
        raise UserError("no examples to evaluate")
    t0 = time.perf_counter()
    model, tokenizer, base_path = load_for_eval(cfg, req.adapter)
    load_seconds = time.perf_counter() - t0
    print(f"[fedllm-flwr] {req.benchmark}: {len(records)} examples, base {base_path}, "
          f"adapter {req.adapter or 'none'}", file=sys.stderr, flush=True)  # fmt: skip
    t0 = time.perf_counter()
    if req.benchmark == "preference":
        from fedllm_flwr.data.pairs import PairSet
        from fedllm_flwr.tasks.reward import evaluate_preferences

        data = PairSet(records, tokenizer, cfg.dataset.max_seq_len)
        metrics = evaluate_preferences(model, data, tokenizer.pad_token_id, cfg.eval.batch_size)
        metrics["dropped"] = data.dropped
        samples: list[dict] = []
    elif req.benchmark == "loss":
        from fedllm_flwr.data.prompts import tokenize_records
        from fedllm_flwr.evaluate.loss import evaluate_loss

        data = tokenize_records(records, tokenizer, cfg.dataset.max_seq_len)
        metrics = evaluate_loss(model, data, tokenizer.pad_token_id, cfg.eval.batch_size)
        metrics.update({"num-examples": len(data), "dropped": data.dropped})
        samples = []
    else:
        metrics, samples = run_benchmark(
            req.benchmark, model, tokenizer, records, cfg.eval, desc=req.benchmark, num_samples=req.num_samples,
            temperature=req.temperature, ks=req.ks, timeout=req.timeout, seed=cfg.seed,
        )  # fmt: skip
    result = {
        "benchmark": req.benchmark,
        "adapter": str(req.adapter) if req.adapter else None,
        "base-model": base_path,
        "data": str(req.data) if req.data else (cfg.dataset.path or cfg.dataset.name),
        "limit": req.limit,
        "metrics": metrics,
        "seconds": round(time.perf_counter() - t0, 2),
        "load-seconds": round(load_seconds, 2),
        "settings": {
            "batch_size": cfg.eval.batch_size,
            "max_new_tokens": cfg.eval.max_new_tokens or None,
            "shots": cfg.eval.shots if req.benchmark == "gsm8k" else None,
            "num_samples": req.num_samples if req.benchmark == "humaneval" else None,
            "temperature": req.temperature,
        },
    }
    out = default_out(req)
    if out is not None:
        _write(out, result, samples)
        result["written"] = str(out)
    return result


def _write(out: Path, result: dict[str, Any], samples: list[dict]) -> None:
    """The JSON result and a JSONL of samples beside it, each via a rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if samples:
        side = out.with_name(out.stem + "_samples.jsonl")
        write_text_atomically(side, "".join(json.dumps(s) + "\n" for s in samples))
        result["samples"] = str(side)
    write_text_atomically(out, json.dumps(result, indent=2) + "\n")
