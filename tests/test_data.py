import gzip
import json
import os

import pytest
from tiny import build_tokenizer

from fedllm_flwr.config import DatasetConfig, FieldsConfig
from fedllm_flwr.data import synthetic
from fedllm_flwr.data.prompts import IGNORE_INDEX, format_prompt, iter_batches, tokenize_records
from fedllm_flwr.data.sources import load_records, read_json_records
from fedllm_flwr.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_synthetic_is_deterministic_and_answers_are_right():
    a = synthetic.generate(list(synthetic.TASKS), 30, seed=3)
    assert a == synthetic.generate(list(synthetic.TASKS), 30, seed=3)
    assert a != synthetic.generate(list(synthetic.TASKS), 30, seed=4)
    for rec in a:
        q, ans = rec["instruction"], rec["output"]
        if rec["category"] == "add":
            x, y = q.removeprefix("What is ").rstrip("?").split(" + ")
            assert int(ans) == int(x) + int(y)
        elif rec["category"] == "reverse":
            assert ans.split() == q.split(": ")[1].split()[::-1]
        elif rec["category"] == "sort":
            assert ans.split() == sorted(q.split(": ")[1].split())
        elif rec["category"] == "uppercase":
            assert ans == q.split(": ")[1].upper()
        elif rec["category"] == "count_letters":
            assert int(ans) == len(q.rstrip("?").split()[-1])


def test_synthetic_splits_are_disjoint_and_sized():
    train, test = synthetic.generate_splits(["add", "reverse"], 50, 10, seed=0)
    assert len(train) == 100 and len(test) == 20
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    with pytest.raises(ValueError, match="unknown synthetic task"):
        synthetic.generate(["nope"], 1, 0)


def test_prompt_masks_prompt_tokens_and_ends_with_eos(tok):
    rec = {"instruction": "What is 2 + 2?", "input": "", "output": "4", "category": "add"}
    data = tokenize_records([rec], tok, max_seq_len=256)
    ids, labels = data.input_ids[0], data.labels[0]
    n_prompt = len(tok.encode(format_prompt(rec["instruction"]), add_special_tokens=False))
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:-1]) == "4" and ids[-1] == tok.eos_token_id
    assert "### Input:" in format_prompt("x", "context") and "### Input:" not in format_prompt("x", " ")


def test_truncation_never_yields_zero_target_tokens(tok):
    recs = [
        {"instruction": "short", "input": "", "output": "a long answer " * 20, "category": ""},
        {"instruction": "word " * 200, "input": "", "output": "x", "category": ""},
    ]
    data = tokenize_records(recs, tok, max_seq_len=40)
    assert len(data) == 1 and data.dropped == 1
    assert len(data.input_ids[0]) == 40
    assert any(label != IGNORE_INDEX for label in data.labels[0])


def test_batches_continue_across_rounds_instead_of_restarting(tok):
    recs = synthetic.generate(["add"], 10, seed=0)
    data = tokenize_records(recs, tok, 64)
    first = iter_batches(data, 3, tok.pad_token_id, seed=1)
    seen = [next(first)["input_ids"] for _ in range(5)]
    resumed = iter_batches(data, 3, tok.pad_token_id, seed=1, start=2)
    assert all(next(resumed)["input_ids"].tolist() == seen[k].tolist() for k in (2, 3, 4))
    assert seen[0].tolist() != seen[2].tolist()  # a later round does not replay the first batch
    batch = seen[0]
    assert batch.shape[0] == 3


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def test_file_formats_json_jsonl_gz(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(jsonl.read_text())
    for name in ("d.jsonl", "d.json", "d.jsonl.gz"):
        cfg = DatasetConfig(name="file", source="file", path=str(tmp_path / name), test_fraction=0.2)
        train, test = load_records(cfg, seed=0)
        assert len(train) == 8 and len(test) == 2
        assert {r["instruction"] for r in train + test} == {f"q{i}" for i in range(10)}
        assert all(r["input"] == "" and r["category"] == "" for r in train)


def test_field_mapping(tmp_path):
    rows = [{"question": "q", "context": "c", "answer": "a", "kind": "k"}] * 4
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    fields = FieldsConfig(instruction="question", input="context", output="answer", category="kind")
    train, _ = load_records(DatasetConfig(source="file", path=str(path), fields=fields), 0)
    assert train[0] == {"instruction": "q", "input": "c", "output": "a", "category": "k"}


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}] * 2, ['{"instruction": oops}'])
    with pytest.raises(UserError, match=r"bad\.jsonl, line 3: invalid JSON"):
        read_json_records(path)


def test_missing_field_names_line_field_and_config_key(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "response": "b"}]
    )
    cfg = DatasetConfig(source="file", path=str(path))
    with pytest.raises(UserError, match=r"d\.jsonl, line 2: missing field 'output' \(dataset\.fields\.output\)"):
        load_records(cfg, 0)


def test_missing_file_and_non_object_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_records(DatasetConfig(source="file", path=str(tmp_path / "none.jsonl")), 0)
    path = write_jsonl(tmp_path / "d.jsonl", [], ["[1, 2]"])
    with pytest.raises(UserError, match="line 1: expected a JSON object"):
        read_json_records(path)


def test_reads_shared_mini_dolly_with_field_mapping(shared_mini):
    fields = FieldsConfig(input="context", output="response")
    cfg = DatasetConfig(source="file", path=str(shared_mini / "databricks-dolly-15k.jsonl"), fields=fields)
    train, test = load_records(cfg, 0)
    assert len(train) + len(test) == 200
    assert len({r["category"] for r in train}) > 3


def test_eval_subset_keeps_every_category():
    from fedllm_flwr.data import spread_subset

    recs = synthetic.generate(["add", "reverse", "uppercase", "km_to_m"], 25, seed=0)
    subset = spread_subset(recs, 40)
    assert len(subset) == 40
    assert {c: sum(r["category"] == c for r in subset) for c in ("add", "reverse", "uppercase", "km_to_m")} == {
        "add": 10, "reverse": 10, "uppercase": 10, "km_to_m": 10,
    }  # fmt: skip


def _write(data: bytes):
    """A case writer: put these bytes in the file."""
    return lambda path: path.write_bytes(data)


def _deny_read(monkeypatch):
    """Opening any data file fails as it does without read permission (works as root too)."""
    from fedllm_flwr.data import sources

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sources, "open", refuse, raising=False)


def _gzip_bytes(text: str) -> bytes:
    return gzip.compress(text.encode())


UNREADABLE = [
    ("latin1.jsonl", _write('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1")), "not UTF-8 text"),
    ("utf16.json", _write('[{"instruction": "q", "output": "a"}]'.encode("utf-16")), "not UTF-8 text"),
    ("image.jsonl", _write(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"), "not UTF-8 text"),
    ("cut.jsonl.gz", _write(_gzip_bytes('{"instruction": "q", "output": "a"}\n' * 50)[:-12]), "truncated"),
    ("junk.jsonl.gz", _write(b"this is not gzip at all\n"), "not a valid gzip file"),
    ("folder.jsonl", lambda path: path.mkdir(), "is a directory"),
    ("pipe.jsonl", lambda path: os.mkfifo(path), "not a regular file"),
    ("locked.jsonl", _write(b'{"instruction": "q", "output": "a"}\n'), "permission denied"),
]


@pytest.mark.parametrize(("name", "make", "cause"), UNREADABLE, ids=[case[0] for case in UNREADABLE])
def test_unreadable_file_is_one_user_error_naming_file_and_cause(tmp_path, monkeypatch, name, make, cause):
    path = tmp_path / name
    make(path)
    if name == "locked.jsonl":
        _deny_read(monkeypatch)
    cfg = DatasetConfig(source="file", path=str(path))
    with pytest.raises(UserError) as info:
        load_records(cfg, 0)
    message = str(info.value)
    assert str(path) in message and cause in message
    assert "\n" not in message and "does not exist" not in message
