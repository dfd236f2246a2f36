"""Reward functions for the GRPO tests, named by dotted path as a site names its own
(`grpo.rewards=[grpo_rewards:parity]`; tests/ is on sys.path)."""

import math


def parity(completion_ids, **_):
    """1 for an answer whose first token id is even: a reward an untrained tiny model's
    samples earn about half the time, so every group has a signal."""
    return [float(ids[0] % 2 == 0) for ids in completion_ids]


def flaky(completions, **_):
    """parity's rule on the text, except NaN for the first answer and None for the second."""
    values = [float(len(c) % 2 == 0) for c in completions]
    if len(values) > 1:
        values[0], values[1] = math.nan, None
    return values


def raises_on_long(completions, **_):
    """Raises for a batch holding an answer longer than 3 characters."""
    if any(len(c) > 3 for c in completions):
        raise RuntimeError("too long")
    return [1.0] * len(completions)


NOT_CALLABLE = 3
