"""Reward functions for task=grpo: the built-ins, a site's own by dotted path, and how a
batch of answers is scored. No Flower, no torch.

A reward function is called as TRL's reward functions are,

    fn(prompts=[...], completions=[...], completion_ids=[...], **columns) -> [float | None, ...]

one value per answer: `prompts` the prompt texts, `completions` the decoded answers (cut
at the end-of-sequence token), `completion_ids` their token ids, and every field of the
answers' records as a list of the same length (`output`: the reference answer,
`category`, HumanEval's `test` and `entry_point`, ...), plus `ended` (whether the answer
ended before `grpo.max_new_tokens`) and `max_new_tokens`. A function should accept
`**kwargs`, as TRL's do, so a site can reuse one written for TRL.

An answer any function scores None, NaN or infinite, or raises on, is dropped from its
group (no advantage, no loss) and counted with the reason; a function that raises for
the whole batch is asked again answer by answer, so one bad answer costs only itself.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedllm_flwr.errors import UserError

RewardFn = Callable[..., Sequence[float | None]]


def exact_match(completions: list[str], output: list[str], **_: Any) -> list[float]:
    """1 where the answer's first line equals the reference (`evaluate.exact_match.normalize`:
    the built-in task's own scoring), else 0."""
    from fedllm_flwr.evaluate.exact_match import normalize

    return [float(normalize(answer) == normalize(ref)) for answer, ref in zip(completions, output, strict=True)]


def gsm8k(completions: list[str], output: list[str], **_: Any) -> list[float]:
    """1 where the answer's final number equals the reference's (GSM8K's `#### N` or
    "The answer is N"), else 0: the GSM8K benchmark's own extraction."""
    from fedllm_flwr.evaluate.gsm8k import TRIGGER, extract_answer, same_number

    return [
        float(same_number(extract_answer(answer), extract_answer(ref.replace("####", TRIGGER))))
        for answer, ref in zip(completions, output, strict=True)
    ]


def humaneval(completions: list[str], prompt: list[str], test: list[str], entry_point: list[str], **_: Any):
    """1 where the completed function passes the record's tests in the sandbox
    (`evaluate.sandbox`, 5 s each), else 0; records need HumanEval's `prompt`, `test` and
    `entry_point` fields."""
    from fedllm_flwr.evaluate.humaneval import program, truncate_at_stop
    from fedllm_flwr.evaluate.sandbox import run_program

    scores = []
    for answer, head, tests, entry in zip(completions, prompt, test, entry_point, strict=True):
        problem = {"prompt": head, "test": tests, "entry_point": entry}
        scores.append(float(run_program(program(problem, truncate_at_stop(answer))).passed))
    return scores


def format_reward(completions: list[str], ended: list[bool], **_: Any) -> list[float]:
    """1 for an answer that ends by itself within `max_new_tokens` on one non-empty line
    (the built-in task's answers are one line), else 0."""
    return [
        float(done and bool(a.strip()) and "\n" not in a.strip()) for a, done in zip(completions, ended, strict=True)
    ]


def brevity(completion_ids: list[list[int]], max_new_tokens: int, **_: Any) -> list[float]:
    """1 - tokens / max_new_tokens: shorter answers score higher (0 at the limit)."""
    return [1.0 - min(len(ids), max_new_tokens) / max_new_tokens for ids in completion_ids]


#: The built-in reward functions by name (`grpo.rewards`).
BUILT_IN: dict[str, RewardFn] = {
    "exact_match": exact_match, "gsm8k": gsm8k, "humaneval": humaneval, "format": format_reward, "brevity": brevity,
}  # fmt: skip


def load_callable(spec: str, key: str = "grpo.rewards") -> RewardFn:
    """A built-in by name, or the callable at `package.module:function` (or
    `package.module.function`); UserError in one line, naming `key`, otherwise."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise UserError(f"{key}: {spec!r} is neither a built-in reward ({', '.join(BUILT_IN)}) nor a dotted path")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import failure is the user's module's: one line
        raise UserError(
            f"{key}: {spec!r}: module {module_name!r} does not import ({type(error).__name__}: {error})"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{key}: {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def resolve_rewards(specs: Sequence[str], key: str = "grpo.rewards") -> list[RewardFn]:
    """Every reward function of `specs` (see `load_callable`)."""
    return [load_callable(spec, key) for spec in specs]


def site_reward_specs(rewards: Sequence[str], client_rewards: Sequence[str], node_config: dict, partition_id: int):
    """(the reward functions this site uses, the key they come from): `--node-config
    grpo-rewards`, else its entry of `grpo.client_rewards`, else `grpo.rewards`."""
    if "grpo-rewards" in node_config:
        return split_specs(str(node_config["grpo-rewards"])), "--node-config grpo-rewards"
    if client_rewards:
        if partition_id >= len(client_rewards):
            raise UserError(f"grpo.client_rewards has {len(client_rewards)} entries: partition {partition_id} has none")
        return split_specs(client_rewards[partition_id]), "grpo.client_rewards"
    return list(rewards), "grpo.rewards"


def split_specs(text: str) -> list[str]:
    """The reward functions of one site's entry: names or dotted paths separated by commas
    or `+` (`exact_match+brevity` needs no quoting inside a Hydra list)."""
    specs = [part.strip() for part in text.replace("+", ",").split(",") if part.strip()]
    if not specs:
        raise UserError(f"no reward function named in {text!r}")
    return specs


@dataclass
class Scores:
    """A batch's rewards: their weighted sum per answer and which answers count."""

    rewards: list[float]
    """Weighted sum of the functions' values (0.0 for a dropped answer)."""
    keep: list[bool]
    """False for an answer some function could not score."""
    per_function: list[list[float]] = field(default_factory=list)
    """Each function's values (NaN where it could not score), one list per function."""
    reasons: dict[str, int] = field(default_factory=dict)
    """Why answers were dropped: '<function>: <reason>' -> count."""

    @property
    def dropped(self) -> int:
        return self.keep.count(False)


def _values(fn: RewardFn, kwargs: dict[str, Any], n: int) -> list[float | str]:
    """`fn`'s value for each of the n answers, or the reason it has none (a string)."""
    try:
        return _checked(fn(**kwargs), n)
    except Exception:  # a function that fails on the batch is asked answer by answer
        if n == 1:
            raise
    out: list[float | str] = []
    for i in range(n):
        one = {k: (v[i : i + 1] if isinstance(v, list) else v) for k, v in kwargs.items()}
        try:
            out.extend(_checked(fn(**one), 1))
        except Exception as error:
            out.append(f"raised {type(error).__name__}")
    return out


def _checked(values: Sequence[Any], n: int) -> list[float | str]:
    values = list(values)
    if len(values) != n:
        raise ValueError(f"returned {len(values)} values for {n} answers")
    out: list[float | str] = []
    for value in values:
        if value is None:
            out.append("returned None")
        elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
            out.append("returned a non-finite value" if isinstance(value, int | float) else f"returned {value!r}")
        else:
            out.append(float(value))
    return out


def score_answers(
    fns: Sequence[RewardFn], weights: Sequence[float], prompts: list[str], completions: list[str],
    completion_ids: list[list[int]], records: list[dict[str, Any]], ended: list[bool], max_new_tokens: int,
) -> Scores:  # fmt: skip
    """Score every answer with every function (see the module's docstring)."""
    n = len(completions)
    columns = {key: [record.get(key) for record in records] for key in dict.fromkeys(k for r in records for k in r)}
    kwargs = {**columns, "prompts": prompts, "completions": completions, "completion_ids": completion_ids,
              "ended": ended, "max_new_tokens": max_new_tokens}  # fmt: skip
    weights = list(weights) or [1.0] * len(fns)
    totals, keep, per_function, reasons = [0.0] * n, [True] * n, [], {}
    for fn, weight in zip(fns, weights, strict=True):
        name = getattr(fn, "__name__", type(fn).__name__)
        try:
            values = _values(fn, kwargs, n)
        except Exception as error:
            values = [f"raised {type(error).__name__}"] * n
        row = []
        for i, value in enumerate(values):
            if isinstance(value, str):
                keep[i] = False
                reasons[f"{name}: {value}"] = reasons.get(f"{name}: {value}", 0) + 1
                row.append(math.nan)
            else:
                totals[i] += weight * value
                row.append(value)
        per_function.append(row)
    return Scores([t if k else 0.0 for t, k in zip(totals, keep, strict=True)], keep, per_function, reasons)
