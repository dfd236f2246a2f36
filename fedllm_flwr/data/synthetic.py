"""A seeded generator of short instruction tasks with checkable answers.

Each task family is one `category`, so a natural split gives every client a
different skill: the default federated task is non-IID by construction and needs
no download. Answers are short strings judged by exact match.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "window",
    "pencil",
    "rabbit",
    "forest",
    "candle",
    "mirror",
    "basket",
    "ladder",
    "orange",
    "silver",
    "planet",
    "bottle",
    "castle",
    "dragon",
    "feather",
    "guitar",
    "island",
    "jacket",
    "kettle",
    "lemon",
    "marble",
    "needle",
    "ocean",
    "pepper",
    "rocket",
    "saddle",
    "tiger",
    "violin",
    "wagon",
    "yellow",
    "anchor",
    "bridge",
    "cactus",
    "donkey",
    "engine",
    "falcon",
    "ginger",
    "hammer",
    "igloo",
    "jungle",
    "koala",
    "lantern",
    "meadow",
    "nickel",
    "oyster",
    "puzzle",
]

UNITS = {"kilometers": ("meters", 1000), "kilograms": ("grams", 1000), "meters": ("centimeters", 100)}


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    return f"What is {a} - {b}?", str(a - b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 3)
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _sort(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 3)
    return f"Sort these words alphabetically: {' '.join(words)}", " ".join(sorted(words))


def _uppercase(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 2)
    return f"Write in capital letters: {' '.join(words)}", " ".join(words).upper()


def _km_to_m(rng: random.Random) -> tuple[str, str]:
    unit = rng.choice(sorted(UNITS))
    target, factor = UNITS[unit]
    value = rng.randint(2, 199)
    return f"Convert {value} {unit} to {target}.", str(value * factor)


def _count_letters(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"How many letters are in the word {word}?", str(len(word))


def _last_word(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 4)
    return f"What is the last word of: {' '.join(words)}", words[-1]


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "subtract": _subtract,
    "reverse": _reverse,
    "sort": _sort,
    "uppercase": _uppercase,
    "km_to_m": _km_to_m,
    "count_letters": _count_letters,
    "last_word": _last_word,
}


def generate(tasks: list[str], per_task: int, seed: int) -> list[dict[str, str]]:
    """`per_task` records per family, deterministic for a given seed.

    Records have the instruction-data fields (instruction, input, output,
    category); `input` is always empty.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; available: {', '.join(TASKS)}")
    records = []
    for index, name in enumerate(tasks):
        rng = random.Random(f"{seed}:{index}:{name}")
        for _ in range(per_task):
            instruction, answer = TASKS[name](rng)
            records.append({"instruction": instruction, "input": "", "output": answer, "category": name})
    return records


def generate_splits(
    tasks: list[str], train_per_task: int, test_per_task: int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Disjoint train and test records: test instructions never occur in train."""
    pool = generate(tasks, 4 * (train_per_task + test_per_task), seed)
    train: list[dict[str, str]] = []
    test: list[dict[str, str]] = []
    seen: set[str] = set()
    counts: dict[tuple[str, str], int] = {}
    for rec in pool:
        if rec["instruction"] in seen:
            continue
        seen.add(rec["instruction"])
        split, limit = (
            ("test", test_per_task)
            if counts.get(("test", rec["category"]), 0) < test_per_task
            else ("train", train_per_task)
        )
        if counts.get((split, rec["category"]), 0) >= limit:
            continue
        counts[(split, rec["category"])] = counts.get((split, rec["category"]), 0) + 1
        (test if split == "test" else train).append(rec)
    short = [t for t in tasks if counts.get(("train", t), 0) < train_per_task]
    if short:
        raise ValueError(
            f"synthetic task(s) {short} have too few distinct examples for train_per_task={train_per_task}"
        )
    return train, test


def _off_by(answer: str, rng: random.Random, spread: int) -> str:
    return str(int(answer) + rng.choice([d for d in range(-spread, spread + 1) if d]))


def _words(instruction: str) -> list[str]:
    return instruction.split(": ", 1)[1].split()


def _other_order(words: list[str], wrong_of: list[str], rng: random.Random) -> str:
    orders = [p for p in itertools.permutations(words) if list(p) != wrong_of]
    return " ".join(rng.choice(orders))


def wrong_answer(record: dict[str, str], rng: random.Random) -> str:
    """A plausible wrong answer to a generated record: the mistake a model
    learning that family would make (an off-by-a-few sum, the words in the
    wrong order, a unit off by a factor of ten, ...). Never the right answer."""
    family, answer, instruction = record["category"], record["output"], record["instruction"]
    if family in ("add", "subtract"):
        return _off_by(answer, rng, 10)
    if family == "count_letters":
        return _off_by(answer, rng, 2)
    if family == "km_to_m":
        return str(int(answer) // 10) if rng.random() < 0.5 else str(int(answer) * 10)
    words = _words(instruction)
    if family in ("reverse", "sort"):
        return _other_order(words, answer.split(), rng)
    if family == "uppercase":
        return " ".join(words) if rng.random() < 0.5 else " ".join([words[0].upper(), *words[1:]])
    if family == "last_word":
        return rng.choice(words[:-1])
    raise ValueError(f"no wrong answers for task family {family!r}")


def to_pairs(records: list[dict[str, str]], seed: int) -> list[dict[str, str]]:
    """Preference pairs: chosen = the record's answer, rejected = a plausible wrong one."""
    rng = random.Random(f"pairs:{seed}")
    return [
        {"instruction": r["instruction"], "input": r["input"], "chosen": r["output"],
         "rejected": wrong_answer(r, rng), "category": r["category"]}
        for r in records
    ]  # fmt: skip
