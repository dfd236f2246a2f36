"""Instruction records from the built-in generator, local files or the hub.

Every source yields records with the same four fields (instruction, input,
output, category) after the field mapping, or for preference pairs (task=reward)
instruction, input, chosen, rejected, category; every problem is reported with
the file, line and field it concerns.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import zlib
from pathlib import Path

from datasets import Dataset

from fedllm_flwr.config import DatasetConfig, FieldsConfig
from fedllm_flwr.config.data import SITE_KEY, is_local_path
from fedllm_flwr.data import synthetic
from fedllm_flwr.errors import UserError

COLUMNS = ("instruction", "input", "output", "category")
PAIR_COLUMNS = ("instruction", "input", "chosen", "rejected", "category")


def _unreadable(path: Path, cause: str) -> UserError:
    return UserError(f"{path}: cannot read the data file: {cause}")


def _check_regular_file(path: Path, key: str) -> None:
    """A missing path, a directory or a special file (FIFO, device) as a UserError."""
    if path.is_file():
        return
    if not path.exists():
        hint = "" if path.is_absolute() else f" (relative to {Path.cwd()}: give an absolute path)"
        raise UserError(f"{key}: data file {path} does not exist{hint}")
    kind = "a directory" if path.is_dir() else "not a regular file (a FIFO, socket or device)"
    raise _unreadable(path, f"it is {kind}; give the path of a .json, .jsonl or .jsonl.gz file")


def _read_text(path: Path, key: str) -> str:
    """The whole text of a data file (gunzipped for .gz), decoded as UTF-8.

    Every way the file can be unreadable (not a regular file, no permission, a
    truncated or corrupt .gz, bytes that are not UTF-8) is one UserError naming
    the file and the cause.
    """
    _check_regular_file(path, key)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except PermissionError:
        raise _unreadable(path, "permission denied (the process may not read it)") from None
    except OSError as exc:
        raise _unreadable(path, exc.strerror or type(exc).__name__) from None
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except EOFError:
            raise _unreadable(path, "the gzip file is truncated (it ends before its end-of-stream marker)") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise _unreadable(path, f"not a valid gzip file ({exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _unreadable(
            path,
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): a binary file, or text in "
            "another encoding such as latin-1 or UTF-16; save it as UTF-8 JSON",
        ) from None


def read_json_records(path: Path, limit: int = 0, key: str = "dataset.path") -> list[dict]:
    """Objects from a .json (array) or .jsonl[.gz] file, with line-precise errors."""
    text = _read_text(path, key)
    if path.name.endswith((".json", ".json.gz")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
        records = data[:limit] if limit else data
        for index, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise UserError(f"{path}: item {index} is a {type(rec).__name__}, not an object")
        return records
    records = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}, line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}, line {lineno}: expected a JSON object, got {type(rec).__name__}")
        rec["__line__"] = lineno
        records.append(rec)
        if limit and len(records) >= limit:
            break
    return records


def map_fields(records: list[dict], fields: FieldsConfig, origin: str, pairs: bool = False) -> list[dict[str, str]]:
    """Rename user fields to the standard ones; instruction and output are required
    (for `pairs`: chosen and rejected; the prompt may be empty)."""
    columns, required = (PAIR_COLUMNS, ("chosen", "rejected")) if pairs else (COLUMNS, ("instruction", "output"))
    out = []
    for index, rec in enumerate(records):
        where = f"{origin}, line {rec['__line__']}" if "__line__" in rec else f"{origin}, record {index}"
        row = {}
        for column in columns:
            source = getattr(fields, column)
            value = rec.get(source)
            if value is None:
                if column in required:
                    present = ", ".join(k for k in rec if k != "__line__")
                    raise UserError(
                        f"{where}: missing field {source!r} (dataset.fields.{column}); the record has: {present}"
                    )
                value = ""
            row[column] = value if isinstance(value, str) else json.dumps(value) if column != "category" else str(value)
        out.append(row)
    return out


def _load_hub(path: str, subset: str, split: str, limit: int) -> list[dict]:
    from datasets import load_dataset

    try:
        ds = load_dataset(path, subset or None, split=split)
    except Exception as exc:  # the hub client raises many types; all mean "not loadable"
        raise UserError(
            f"dataset.path={path!r} is not a local file, and loading it from the "
            f"Hugging Face hub failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(rec) for rec in ds]


_CALCULATOR = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")


def gsm8k_rewrite(answer: str) -> str:
    """GSM8K's worked answer as chain-of-thought text: calculator annotations
    `<<48/2=24>>` removed and the final `#### 72` line turned into "The answer is 72."."""
    text = _CALCULATOR.sub("", answer)
    match = _GSM8K_FINAL.search(text)
    if not match:
        return text
    return f"{text[: match.start()].rstrip()}\nThe answer is {match.group(1).rstrip('.')}."


def read_records(
    cfg: DatasetConfig, path: str, split: str, limit: int, key: str = "dataset.path", pairs: bool = False
) -> list[dict[str, str]]:
    """Records of one local file or hub split, mapped to the standard fields and transformed."""
    if is_local_path(path):
        file = Path(path).expanduser()
        raw, origin = read_json_records(file, limit, key), str(file)
    else:
        raw, origin = _load_hub(path, cfg.subset, split, limit), path
    records = map_fields(raw, cfg.fields, origin, pairs)
    if cfg.transform == "gsm8k" and not pairs:
        for rec in records:
            rec["output"] = gsm8k_rewrite(rec["output"])
    return records


def load_records(
    cfg: DatasetConfig, seed: int, pairs: bool = False
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test) records for a dataset config, deterministic for `seed`;
    preference pairs (task=reward) with `pairs`."""
    if cfg.source == "synthetic":
        try:
            train, test = synthetic.generate_splits(
                list(cfg.synthetic.tasks), cfg.synthetic.train_per_task, cfg.synthetic.test_per_task, seed
            )
            return (synthetic.to_pairs(train, seed), synthetic.to_pairs(test, seed + 1)) if pairs else (train, test)
        except ValueError as exc:
            raise UserError(f"dataset.synthetic: {exc}") from None
    if cfg.source == "sites":
        # A site's own file (dataset.path, set from its node config) is all training
        # data; the server has no training data, only its test file.
        train = read_records(cfg, cfg.path, cfg.split, cfg.limit, SITE_KEY, pairs) if cfg.path else []
        test_split = cfg.test_split or "test"
        test = [] if cfg.path else read_records(cfg, cfg.test_path, test_split, 0, "dataset.test_path", pairs)
        if not train and not test:
            raise UserError(f"{cfg.path or cfg.test_path}: holds no records")
        return train, test
    records = read_records(cfg, cfg.path, cfg.split, cfg.limit, pairs=pairs)
    if cfg.test_path or cfg.test_split:
        if not cfg.test_path and is_local_path(cfg.path):
            raise UserError(
                f"dataset.test_split={cfg.test_split!r} names a hub split, but dataset.path={cfg.path!r} is a "
                "local file: give the test file with dataset.test_path=<file>, or dataset.test_split='' to hold "
                "out dataset.test_fraction of the training file"
            )
        key = "dataset.test_path" if cfg.test_path else "dataset.path"
        test = read_records(cfg, cfg.test_path or cfg.path, cfg.test_split or "test", 0, key, pairs)
        if not records or not test:
            raise UserError(f"{cfg.path}: needs training and test records, found {len(records)} and {len(test)}")
        return records, test
    if len(records) < 2:
        raise UserError(f"{cfg.path}: needs at least 2 records, found {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(records) * cfg.test_fraction))
    test = [records[i] for i in sorted(order[:n_test])]
    train = [records[i] for i in sorted(order[n_test:])]
    return train, test


def to_dataset(records: list[dict[str, str]]) -> Dataset:
    columns = PAIR_COLUMNS if records and "chosen" in records[0] else COLUMNS
    return Dataset.from_dict({c: [r[c] for r in records] for c in columns})
