"""GSM8K accuracy with chain-of-thought prompting.

The prompt is up to eight worked "Q: ... A: ... The answer is N." exemplars (the
chain-of-thought exemplars of Wei et al. 2022, used for GSM8K by FS-LLM and
most evaluations since) followed by the test question. The predicted number is
read the way FS-LLM reads it: lower-case the completion; take the first number
after "the answer is" when the phrase occurs, else the last number; drop
commas and a trailing period. It is correct when it equals the gold number.
"""

from __future__ import annotations

import re

import torch

from fedllm_flwr.data.prompts import format_prompt
from fedllm_flwr.evaluate.generation import generate

EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
        "there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
        "After eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. "
        "How many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. "
        "So he gave Denny 20 - 12 = 8. The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. "
        "How many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
        "5 + 4 = 9. The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, "
        "from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. "
        "So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. "
        "How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. "
        "After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. "
        "So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8.",
    ),
)

TRIGGER = "the answer is"
#: Where a few-shot completion ends: the model starting the next exemplar.
STOP = ("\nQ:", "\n\nQ", "\n\n\n")
_NUMBER = re.compile(r"-?\d+\.?\d*")


def cot_prompt(question: str, shots: int = 8) -> str:
    """The few-shot chain-of-thought prompt; with `shots=0`, the training prompt."""
    if shots == 0:
        return format_prompt(question)
    demos = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in EXEMPLARS[:shots])
    return f"{demos}Q: {question}\nA:"


def extract_answer(text: str) -> str | None:
    """The predicted number in a completion, or None when it has no number."""
    text = text.lower()
    parts = text.split(TRIGGER)
    triggered = len(parts) > 1
    tail = parts[1] if triggered else parts[-1]
    numbers = _NUMBER.findall(tail.replace(",", ""))
    if not numbers:
        return None
    value = numbers[0] if triggered else numbers[-1]
    return value[:-1] if value.endswith(".") else value


def same_number(pred: str | None, gold: str | None) -> bool:
    """Exact match of two extracted numbers (as numbers, so "18.0" equals "18")."""
    if pred is None or gold is None:
        return False
    try:
        return float(pred) == float(gold)
    except ValueError:
        return pred == gold


def gsm8k_accuracy(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, str]],
    *,
    shots: int = 8,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    desc: str = "",
) -> tuple[dict[str, float], list[dict]]:
    """`accuracy` (and `answered`, the share of completions holding a number) on
    records whose `output` ends in "The answer is N." (or GSM8K's `#### N`)."""
    prompts = [cot_prompt(r["instruction"], shots) for r in records]
    stop = STOP if shots else ("\n\n\n", "### Instruction")
    completions = generate(
        model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, stop=stop, desc=desc
    )
    samples, correct, answered = [], 0, 0
    for rec, (text,) in zip(records, completions, strict=True):
        gold = extract_answer(rec["output"].replace("####", TRIGGER))
        pred = extract_answer(text)
        ok = same_number(pred, gold)
        correct += ok
        answered += pred is not None
        samples.append({"question": rec["instruction"], "completion": text, "pred": pred, "gold": gold, "correct": ok})
    n = max(1, len(records))
    return {"accuracy": correct / n, "answered": answered / n, "num-examples": len(records)}, samples
