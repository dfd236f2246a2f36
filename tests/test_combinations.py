"""Every pair of settings either refused when the config is built, in one line naming
both keys, or driven through a federation for two rounds with every guarantee checked.

The groups and their values are in tests/combinations.py; the rows that hold every pair
the config accepts are in tests/combination_rows.json (`python tests/combinations.py`
writes them; `test_every_pair_is_refused_in_one_line_naming_both_keys_or_held_by_a_row` says when they must be
written again). Each row runs on two in-process nodes (tests/federation.py) with the
checks of tests/invariants.py after every round; a row with `resume=yes` also runs
stopped after round 1 and resumed, and must end bit for bit where the whole run did.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from combinations import (
    GROUPS,
    ROWS_FILE,
    compatible_pairs,
    conflicts,
    overrides,
    pair_refusals,
    pairs_of,
    refused_groups,
)
from conftest import ROOT, TINY_OVERRIDES, docs_hooks
from federation import run_federation
from invariants import check_end, check_resume, check_round

from fedllm_flwr.client import client_bundle
from fedllm_flwr.config import cfg_to_yaml, load_cfg, rules

ROWS = json.loads(ROWS_FILE.read_text())
#: Small enough for a row to take about a second: 2 nodes, 2 rounds of 1 step of 2 examples, 4 test records.
MATRIX = ["num_rounds=2", "train.local_steps=1", "train.batch_size=2", "log.curves=false",
          "run.save_every_round=false", "dataset.synthetic.test_per_task=1", "dataset.synthetic.train_per_task=12",
          "eval.batch_size=4"]  # fmt: skip


def test_every_pair_is_refused_in_one_line_naming_both_keys_or_held_by_a_row():
    """A pair set on its own (every other group at its default) either builds or is
    refused by a rule: one line, `<key>=<value> cannot be combined with <key>=<value>:
    <reason>`. A pair refused for a third group's default is no conflict of its own
    (another value of that group may serve it). Every pair some whole config can hold
    is in a row of the matrix, and no row holds a pair the config refuses."""
    for pair, message in pair_refusals().items():
        groups = refused_groups(message)
        assert groups is not None, f"{sorted(pair)}: not a rule's one line: {message!r}"
        assert set(groups) & {g for g, _ in pair}, f"{sorted(pair)} refused for {groups}: {message}"
    held = set().union(*(pairs_of(row) for row in ROWS))
    missing = sorted(sorted(p) for p in compatible_pairs() - held)
    assert not missing, f"{len(missing)} pairs in no row, e.g. {missing[:3]}: run `python tests/combinations.py`"
    clashing = [row for row in ROWS if pairs_of(row) & conflicts()]
    assert not clashing, f"rows the config refuses: {clashing[:2]}; run `python tests/combinations.py`"


def test_the_docs_table_of_what_does_not_combine_is_the_rules():
    """The docs ask for the table by name; the build writes it from the rules."""
    hooks = docs_hooks()
    page = (ROOT / "docs" / "concepts.md").read_text()
    assert "<!-- generated: combinations -->" in page, "docs/concepts.md no longer asks for the generated table"
    assert hooks.render(page).count(rules.markdown_table()) == 1


def _name(row: dict[str, str]) -> str:
    return "-".join(value for group, value in row.items() if value != next(iter(GROUPS[group])))


@pytest.fixture(scope="session")
def matrix_model_dir(tmp_path_factory) -> Path:
    """The tiny model with 3 decoder layers: FedOT's emulator keeps the first and the
    last (algorithm.adapter_layers=1) and drops from the one between."""
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("matrix") / "model", layers=3)


def saved_adapter(cfg, folder: Path) -> Path:
    """The adapter `cfg` trains, every tensor moved by a seeded 0.01 x N(0, 1), saved in
    peft's format (the model's own adapter put back)."""
    import torch

    from fedllm_flwr.model import get_adapter_state, set_adapter_state

    bundle = client_bundle(cfg, 0)
    before = get_adapter_state(bundle.model)
    g = torch.Generator().manual_seed(1)
    set_adapter_state(bundle.model, {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in before.items()})
    bundle.model.save_pretrained(folder)
    set_adapter_state(bundle.model, before)
    return folder


@pytest.mark.parametrize("row", ROWS, ids=[_name(r) or "defaults" for r in ROWS])
def test_a_row_of_the_matrix_keeps_every_guarantee(row, monkeypatch, matrix_model_dir, task_identity, tmp_path):
    base = [f"model.name={matrix_model_dir}", *TINY_OVERRIDES, *MATRIX]
    items = [o for o in overrides(row) if not o.startswith(("resume=", "init.adapter="))]
    if row["init"] == "adapter":  # a saved adapter of this row's kind, moved off the seeded one
        items.append(f"init.adapter={saved_adapter(load_cfg([*base, *items]), tmp_path / 'start')}")
    whole = run_federation(monkeypatch, [*base, *items], nodes=2, after_round=check_round)
    check_end(whole)
    if row["init"] == "adapter":  # round 0 is the saved adapter, not the seeded one
        from fedllm_flwr.init_adapter import read_adapter

        start = read_adapter(client_bundle(whole.cfg, 0).model, whole.cfg.init.adapter)
        held = whole.arrays[0]
        assert all(np.array_equal(np.asarray(held[k]), start[k].numpy()) for k in held), "round 0 is not the file"
    assert cfg_to_yaml(whole.cfg) == cfg_to_yaml(load_cfg([*base, *items, "run.warm_up=false"]))
    rows = whole.rows()
    assert [r["round"] for r in rows] == [0, 1, 2]
    # Every round aggregates what its clients sent; SecAgg+ needs two (one client's
    # "sum" would be its update: the protocol halts, and the round moves nothing).
    fewest = 2 if whole.cfg.privacy.masked else 1
    idle = [r["round"] for r in rows[1:] if r["clients-sampled"] >= fewest and not r["clients-ok"]]
    assert not idle, f"rounds {idle} aggregated nothing"
    if row["resume"] == "yes":
        first = run_federation(monkeypatch, [*base, *items, "run.stop_after=1"], nodes=2, after_round=check_round)
        resumed = run_federation(monkeypatch, [*base, *items, f"resume={first.path}"], nodes=2,
                                 after_round=check_round)  # fmt: skip
        check_end(first)
        check_end(resumed)
        check_resume(whole, first, resumed)
