"""Benchmark datasets (Fed-Dolly, Fed-GSM8K-3, Fed-CodeAlpaca, Alpaca) and their evaluations."""

import json

import pytest

from fedllm_flwr.config import load_cfg
from fedllm_flwr.data import records
from fedllm_flwr.data.partition import partition_dataset
from fedllm_flwr.data.sources import gsm8k_rewrite, load_records, to_dataset
from fedllm_flwr.errors import UserError
from fedllm_flwr.evaluate.generation import cut_at_stop
from fedllm_flwr.evaluate.gsm8k import EXEMPLARS, cot_prompt, extract_answer, same_number
from fedllm_flwr.evaluate.rouge import rouge_l

DOLLY_CATEGORIES = (
    "open_qa", "general_qa", "classification", "closed_qa",
    "brainstorming", "information_extraction", "summarization", "creative_writing",
)  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def dolly_file(tmp_path):
    rows = [
        {"instruction": f"q{i}", "context": f"c{i}" if i % 2 else "", "response": f"r{i}", "category": cat}
        for i, cat in enumerate(DOLLY_CATEGORIES * 5)
    ]
    return write_jsonl(tmp_path / "dolly.jsonl", rows)


@pytest.fixture
def gsm8k_files(tmp_path):
    def row(i):
        return {"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}

    return write_jsonl(tmp_path / "train.jsonl", [row(i) for i in range(30)]), write_jsonl(
        tmp_path / "test.jsonl", [row(i) for i in range(100, 110)]
    )


def test_dolly_preset_maps_context_and_splits_by_its_eight_categories(dolly_file):
    cfg = load_cfg(["dataset=dolly", f"dataset.path={dolly_file}"])
    train, test = load_records(cfg.dataset, cfg.seed)
    assert len(train) + len(test) == 40 and cfg.dataset.metric == "rouge"
    odd = next(r for r in train + test if r["instruction"] == "q1")
    assert odd["input"] == "c1" and odd["output"] == "r1" and odd["category"] == "general_qa"
    ds = to_dataset(train)
    parts = [partition_dataset(ds, cfg.dataset.partition, p, 8, cfg.seed) for p in range(8)]
    assert sorted(len(set(p["category"])) for p in parts) == [1] * 8  # one category per client
    assert sorted({p["category"][0] for p in parts}) == sorted(DOLLY_CATEGORIES)


def test_dolly_dirichlet_variant_gives_three_skewed_clients(dolly_file):
    cfg = load_cfg(["dataset=dolly_dirichlet", f"dataset.path={dolly_file}"])
    assert cfg.dataset.partition.method == "dirichlet" and cfg.dataset.partition.alpha == 0.5
    assert cfg.dataset.fields.input == "context"  # inherited from the dolly preset
    train, _ = load_records(cfg.dataset, cfg.seed)
    parts = [partition_dataset(to_dataset(train), cfg.dataset.partition, p, 3, cfg.seed) for p in range(3)]
    assert sum(len(p) for p in parts) == len(train) and all(len(p) for p in parts)


def test_gsm8k_preset_rewrites_answers_and_uses_the_official_test_split(gsm8k_files):
    train_file, test_file = gsm8k_files
    cfg = load_cfg(["dataset=gsm8k", f"dataset.path={train_file}", f"dataset.test_path={test_file}"])
    train, test = load_records(cfg.dataset, cfg.seed)
    assert len(train) == 30 and len(test) == 10  # nothing of the train file held out
    assert train[3]["output"] == "3 + 3 = 6\nThe answer is 6."
    assert test[0]["instruction"] == "What is 100 + 100?"
    ds = to_dataset(train)
    sizes = [len(partition_dataset(ds, cfg.dataset.partition, p, 3, cfg.seed)) for p in range(3)]
    assert sizes == [10, 10, 10]


def test_gsm8k_local_file_without_test_file_is_refused_with_the_fix(gsm8k_files):
    cfg = load_cfg(["dataset=gsm8k", f"dataset.path={gsm8k_files[0]}"])
    with pytest.raises(UserError, match="dataset.test_path"):
        load_records(cfg.dataset, cfg.seed)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("a <<1+1=2>>2\n#### 2", "a 2\nThe answer is 2."),
        (
            "He pays 1,000 + 200 = $<<1000+200=1200>>1,200\n#### 1,200",
            "He pays 1,000 + 200 = $1,200\nThe answer is 1,200.",
        ),
        ("no final line", "no final line"),
    ],
)
def test_gsm8k_rewrite(answer, expected):
    assert gsm8k_rewrite(answer) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So 5 + 4 = 9. The answer is 9.", "9"),
        ("The answer is 1,234.", "1234"),
        ("THE ANSWER IS -3 apples, not 4", "-3"),
        ("the answer is 2.5.", "2.5"),
        ("We get 3, then 7, and finally 12.", "12"),  # no trigger: last number
        ("The answer is 6. Q: next has 99 The answer is 100", "6"),  # first trigger wins
        ("It costs $18.00 in total", "18.00"),
        ("I do not know.", None),
        ("the answer is unclear, maybe 4 or 5", "4"),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_numbers_match_as_numbers():
    assert same_number("18.00", "18") and same_number("-3", "-3")
    assert not same_number("18.5", "18") and not same_number(None, "1") and not same_number("7", None)


def test_cot_prompt_has_the_requested_exemplars_and_ends_at_the_answer():
    prompt = cot_prompt("How many?", shots=8)
    assert prompt.count("Q: ") == 9 and prompt.endswith("Q: How many?\nA:")
    assert all(extract_answer(a) is not None for _, a in EXEMPLARS)
    assert cot_prompt("How many?", shots=2).count("Q: ") == 3
    assert "### Instruction" in cot_prompt("How many?", shots=0)


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("x = 1\nQ: more\n\n\nQ", ("\n\n\n", "\nQ:")) == "x = 1"
    assert cut_at_stop("nothing to cut", ("\nQ:",)) == "nothing to cut"


def test_rouge_l_against_hand_values():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l(["dog"], ["the cat sat"]) == 0.0
    # LCS "the cat" = 2 tokens: precision 2/2, recall 2/3, F1 = 0.8
    assert rouge_l(["the cat"], ["the cat sat"]) == pytest.approx(0.8)
    assert rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)


def test_gsm8k_and_rouge_score_a_tiny_model_end_to_end(tiny_cfg, gsm8k_files, dolly_file):
    from fedllm_flwr.evaluate.benchmarks import run_benchmark
    from fedllm_flwr.model import build_model

    cfg = tiny_cfg("eval.max_new_tokens=6", "eval.shots=2")
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    gsm = load_cfg(["dataset=gsm8k", f"dataset.path={gsm8k_files[0]}", f"dataset.test_path={gsm8k_files[1]}"])
    _, test = load_records(gsm.dataset, 0)
    metrics, samples = run_benchmark("gsm8k", bundle.model, bundle.tokenizer, test[:4], cfg.eval)
    assert metrics["num-examples"] == 4 and 0.0 <= metrics["accuracy"] <= 1.0
    assert [s["gold"] for s in samples] == ["200", "202", "204", "206"]
    dolly = load_cfg(["dataset=dolly", f"dataset.path={dolly_file}"])
    _, test = load_records(dolly.dataset, 0)
    metrics, samples = run_benchmark("rouge", bundle.model, bundle.tokenizer, test, cfg.eval)
    assert 0.0 <= metrics["rougeL"] <= 1.0 and len(samples) == len(test)
    assert any(key.startswith("rougeL-") for key in metrics)


def test_presets_read_the_shared_mini_files(shared_mini):
    cases = {
        "dolly": ["dataset.path=" + str(shared_mini / "databricks-dolly-15k.jsonl")],
        "gsm8k": [
            "dataset.path=" + str(shared_mini / "gsm8k_train.jsonl"),
            "dataset.test_path=" + str(shared_mini / "gsm8k_test.jsonl"),
        ],
        "codealpaca": ["dataset.path=" + str(shared_mini / "code_alpaca_2k.jsonl")],
        "alpaca": ["dataset.path=" + str(shared_mini / "alpaca_data.jsonl")],
    }
    for preset, overrides in cases.items():
        cfg = load_cfg([f"dataset={preset}", *overrides])
        train, test = records(cfg)
        assert train and test and all(r["instruction"] and r["output"] for r in train + test), preset
    gsm = load_cfg(["dataset=gsm8k", *cases["gsm8k"]])
    train, test = records(gsm)
    assert len(train) == 200 and len(test) == 200
    assert all(
        r["output"].endswith(".") and "The answer is" in r["output"] and "####" not in r["output"] for r in train
    )


def test_code_prompt_styles_keep_the_completion_a_function_body():
    from fedllm_flwr.evaluate.humaneval import code_prompt, program

    problem = {"prompt": "def f(x):\n    \"\"\"Double x.\"\"\"\n", "test": "def check(c):\n    assert c(2) == 4\n",
               "entry_point": "f", "task_id": "t/0"}  # fmt: skip
    assert code_prompt(problem) == problem["prompt"]
    instruct = code_prompt(problem, "instruct")
    assert "### Instruction:" in instruct and instruct.endswith("```python\n" + problem["prompt"])
    assert program(problem, "    return 2 * x\n").startswith(problem["prompt"] + "    return 2 * x")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Sure:\n```python\ndef f(x):\n    return 2 * x\n```\nThis doubles x.", "\ndef f(x):\n    return 2 * x\n"),
        ("```\ndef f(x):\n    return x\n```", "\ndef f(x):\n    return x\n"),
        ("```py\n    return 1\n", "    return 1\n"),  # an unclosed block with a body only
        ("def f(x): return x", "\ndef f(x): return x"),  # no block: the whole reply
    ],
)
def test_extract_code_from_chat_replies(reply, expected):
    from fedllm_flwr.evaluate.humaneval import extract_code

    assert extract_code(reply) == expected


def test_a_complete_function_from_chat_redefines_the_prompt_stub():
    from fedllm_flwr.evaluate.humaneval import extract_code, program
    from fedllm_flwr.evaluate.sandbox import run_program

    problem = {"prompt": 'def f(x):\n    """Double x."""\n', "test": "def check(c):\n    assert c(2) == 4\n",
               "entry_point": "f", "task_id": "t/0"}  # fmt: skip
    code = extract_code("Here it is:\n```python\ndef f(x):\n    return 2 * x\n```")
    assert run_program(program(problem, code), timeout=10).passed
