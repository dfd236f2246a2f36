"""What the clients and the server read: `dataset.*`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Where a site's data file is named (deployment with dataset.source=sites).
SITE_KEY = "the SuperNode's --node-config data-path"


def is_local_path(path: str) -> bool:
    """Whether a `dataset.path` / `test_path` names a local file rather than a hub id."""
    candidate = Path(path).expanduser()
    return candidate.exists() or candidate.suffix in (".json", ".jsonl", ".gz") or path.startswith((".", "/", "~"))


@dataclass
class FieldsConfig:
    """Which record fields hold each part of an instruction example."""

    instruction: str = "instruction"
    """The task a record asks for: the start of the prompt."""
    input: str = "input"
    """Optional context field; records without it get an empty input."""
    output: str = "output"
    """The reference response: what the loss covers and what the metric compares with."""
    category: str = "category"
    """Optional; used by the `natural` partition and per-category accuracy."""
    chosen: str = "chosen"
    """task=reward: the preferred response of a (prompt, chosen, rejected) pair;
    the prompt is `instruction` (+ `input`), and may be empty when the responses
    carry the whole conversation (as in Anthropic's HH)."""
    rejected: str = "rejected"
    """task=reward: the response that is not preferred."""


@dataclass
class PartitionConfig:
    method: str = "natural"
    """`iid`, `dirichlet` (skew by `by`, concentration `alpha`) or `natural`
    (one client per value of `by`; with fewer clients than values, values are
    dealt round-robin; with more, each value is shared by several clients)."""
    by: str = "category"
    """The record field (after the `fields` mapping) the `natural` and `dirichlet` splits go by."""
    alpha: float = 0.5
    """Dirichlet concentration: smaller means more skew."""
    holdout_fraction: float = 0.1
    """Share of each client's partition kept back for the client's evaluation."""

    def __post_init__(self) -> None:
        if self.method not in ("iid", "dirichlet", "natural"):
            raise ValueError(f"dataset.partition.method={self.method!r}: use iid, dirichlet or natural")
        if self.alpha <= 0:
            raise ValueError(f"dataset.partition.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError("dataset.partition.holdout_fraction must be in [0, 1)")


@dataclass
class SyntheticConfig:
    tasks: list[str] = field(default_factory=lambda: ["add", "reverse", "uppercase", "km_to_m"])
    """Task families of the built-in generator (see fedllm_flwr/data/synthetic.py)."""
    train_per_task: int = 200
    """Generated training records per task family, shared by the clients that hold it."""
    test_per_task: int = 25
    """Generated records per task family in the server's test set."""


#: Generation metrics the server can score on the test set (fedllm_flwr/evaluate/benchmarks.py).
METRICS = ("exact_match", "gsm8k", "rouge", "humaneval", "none")


@dataclass
class DatasetConfig:
    name: str = "synthetic"
    """Preset name, recorded in the run's config."""
    source: str = "synthetic"
    """`synthetic` (built-in generator, offline), `file` (a local JSON, JSONL
    or JSONL.gz file, or a Hugging Face hub dataset id, named by `path`), or
    `sites` (deployment: each SuperNode reads its own file, named by its
    `--node-config data-path=...`; the server reads only `test_path`)."""
    path: str = ""
    """`source=file`: a local JSON, JSONL or JSONL.gz file, or a Hugging Face hub dataset id."""
    subset: str = ""
    """Hub configuration name (`main` for openai/gsm8k); empty for none."""
    split: str = "train"
    """Hub split to read when `path` is a hub id."""
    test_path: str = ""
    """A separate file (or hub id) for the server's test set, e.g. GSM8K's
    official test.jsonl. Empty: `test_split` of a hub `path`, else a
    `test_fraction` share of `path`."""
    test_split: str = ""
    """Hub split of `path` (or `test_path`) used as the test set, e.g. `test`."""
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    transform: str = ""
    """Record rewrite after the field mapping: `gsm8k` turns the `#### N` line
    into "The answer is N." and drops `<<...>>` calculator annotations."""
    test_fraction: float = 0.1
    """Share of a file dataset held out as the server's test set (when no
    `test_path` / `test_split` names one)."""
    metric: str = "exact_match"
    """What the server generates and scores on the test set besides loss:
    `exact_match` (first line vs the reference), `gsm8k` (chain-of-thought
    accuracy), `rouge` (ROUGE-L F1), `humaneval` (pass@1 on HumanEval) or `none`."""
    max_seq_len: int = 256
    """Prompt + response tokens; longer samples are cut, and samples left with no
    response token are dropped and counted."""
    limit: int = 0
    """Use only the first N records of a file (0 = all)."""
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def local_files(self) -> list[tuple[str, Path]]:
        """(key, path) of each local file this config reads where the data is loaded
        (hub ids left out): a site's own file, or the server's test file, for `sites`."""
        if self.source == "synthetic":
            return []
        if self.source == "sites":
            named = [(SITE_KEY, self.path)] if self.path else [("dataset.test_path", self.test_path)]
        else:
            named = [("dataset.path", self.path)] + ([("dataset.test_path", self.test_path)] if self.test_path else [])
        return [(key, Path(path).expanduser()) for key, path in named if is_local_path(path)]

    def __post_init__(self) -> None:
        if self.source not in ("synthetic", "file", "sites"):
            raise ValueError(f"dataset.source={self.source!r}: use synthetic, file or sites")
        if self.source == "sites" and not self.test_path:
            raise ValueError("dataset.source=sites needs dataset.test_path=<the server's own test file>")
        if self.source == "file" and not self.path:
            raise ValueError("dataset.source=file needs dataset.path=<file or hub id>")
        if self.transform not in ("", "gsm8k"):
            raise ValueError(f"dataset.transform={self.transform!r}: use gsm8k or leave it empty")
        if self.metric not in METRICS:
            raise ValueError(f"dataset.metric={self.metric!r}: use one of {', '.join(METRICS)}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError("dataset.test_fraction must be in (0, 1)")
        if self.max_seq_len < 8:
            raise ValueError("dataset.max_seq_len must be >= 8")
