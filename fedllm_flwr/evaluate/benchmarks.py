"""One entry point per benchmark, shared by the server and `fedllm-flwr evaluate`.

    exact_match  first answer line equals the reference (the built-in data)
    gsm8k        chain-of-thought accuracy on GSM8K questions
    rouge        ROUGE-L F1 of responses (Dolly, Alpaca, any instruction data)
    humaneval    pass@k of code completions on HumanEval, run in a sandbox
    loss         held-out loss and perplexity on response tokens

Every generation benchmark returns (metrics, samples): a flat dict of floats and one
row per example (prompt, completion, verdict) for inspection.

Light at import: reports, plots and a sweep's driver read `PRIMARY` without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedllm_flwr.config import EvalConfig

if TYPE_CHECKING:
    import torch

#: The metric each generation benchmark is judged by (the one logged per round).
PRIMARY = {"exact_match": "accuracy", "gsm8k": "accuracy", "rouge": "rougeL", "humaneval": "pass@1"}
#: Generation length when `eval.max_new_tokens` is 0.
DEFAULT_MAX_NEW_TOKENS = {"exact_match": 16, "rouge": 128, "gsm8k": 256, "humaneval": 384}


def max_new_tokens(benchmark: str, eval_cfg: EvalConfig) -> int:
    return eval_cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[benchmark]


def run_benchmark(
    benchmark: str,
    model: torch.nn.Module,
    tokenizer,
    records: list[dict],
    eval_cfg: EvalConfig,
    *,
    desc: str = "",
    num_samples: int = 1,
    temperature: float = 0.0,
    ks: tuple[int, ...] = (1,),
    timeout: float = 5.0,
    seed: int = 0,
) -> tuple[dict[str, float], list[dict]]:
    """Score `model` on `records` (test records, or HumanEval problems for `humaneval`)."""
    length = max_new_tokens(benchmark, eval_cfg)
    if benchmark == "exact_match":
        from fedllm_flwr.evaluate.exact_match import exact_match

        return exact_match(model, tokenizer, records, eval_cfg.batch_size, length, desc=desc)
    if benchmark == "gsm8k":
        from fedllm_flwr.evaluate.gsm8k import gsm8k_accuracy

        return gsm8k_accuracy(
            model, tokenizer, records, shots=eval_cfg.shots, batch_size=eval_cfg.batch_size,
            max_new_tokens=length, desc=desc,
        )  # fmt: skip
    if benchmark == "rouge":
        from fedllm_flwr.evaluate.rouge import rouge_eval

        return rouge_eval(model, tokenizer, records, batch_size=eval_cfg.batch_size, max_new_tokens=length, desc=desc)
    if benchmark == "humaneval":
        from fedllm_flwr.evaluate.generation import generate
        from fedllm_flwr.evaluate.humaneval import STOP_SEQUENCES, code_prompt, extract_code, score

        style = eval_cfg.code_prompt
        stop = {"raw": STOP_SEQUENCES, "instruct": (*STOP_SEQUENCES, "\n```"), "chat": ()}[style]
        prompts = [code_prompt(p, style, tokenizer) for p in records]
        completions = generate(
            model, tokenizer, prompts, batch_size=eval_cfg.batch_size, max_new_tokens=length, stop=stop,
            num_samples=num_samples, temperature=temperature, seed=seed, desc=desc,
        )  # fmt: skip
        if style == "chat":
            completions = [[extract_code(c) for c in samples] for samples in completions]
        result = score(
            records, completions, ks=tuple(k for k in ks if k <= num_samples), timeout=timeout,
            progress=bool(desc), stops=stop,
        )  # fmt: skip
        metrics = {k: float(v) for k, v in result.items() if k.startswith("pass@")}
        metrics["num-examples"] = len(records)
        metrics["samples-per-problem"] = num_samples
        return metrics, result["results"]
    raise ValueError(f"unknown benchmark {benchmark!r}; use one of {', '.join(PRIMARY)}")
