"""Every task (`cfg.task`) through its interface, one row per task, on the tiny model; and
the rule that only the tasks package and the config check look at a task's name."""

import ast
import math

import pytest
import torch
from conftest import ROOT

from fedllm_flwr.client import _setup, local_evaluate
from fedllm_flwr.config import conf_dir
from fedllm_flwr.data import server_data
from fedllm_flwr.data.prompts import iter_batches
from fedllm_flwr.model import clear_model_cache, get_adapter_state
from fedllm_flwr.tasks.compat import TASK_RECORDS
from fedllm_flwr.tasks.registry import TASKS, task_of

# (conf/task preset, peft's task type, the client's held-out metric, the server's primary metric,
# overrides: answers an untrained tiny model samples never match, so GRPO's row rewards a token's parity)
ROWS = [
    ("lm", "CAUSAL_LM", "eval-ppl", "accuracy", ()),
    ("reward", "SEQ_CLS", "eval-preference-accuracy", "preference-accuracy", ()),
    ("dpo", "CAUSAL_LM", "eval-preference-accuracy", "preference-accuracy", ()),
    ("grpo", "CAUSAL_LM", "eval-ppl", "accuracy", ("grpo.rewards=[grpo_rewards:parity]",)),
]


def test_every_task_has_a_module_a_preset_a_record_kind_and_a_row():
    assert set(TASKS) == set(TASK_RECORDS) == {name for name, *_ in ROWS}
    assert {p.stem for p in (conf_dir() / "task").glob("*.yaml")} == set(TASKS)
    assert len({type(task) for task in TASKS.values()}) == len(TASKS), "two names share one task class"
    assert set(TASK_RECORDS.values()) <= {"prompts", "pairs", "questions"}


@pytest.mark.parametrize("name, task_type, client_metric, primary, overrides", ROWS, ids=[r[0] for r in ROWS])
def test_task_trains_a_batch_and_evaluates_on_client_and_server(
    name, task_type, client_metric, primary, overrides, tiny_cfg
):  # fmt: skip
    clear_model_cache()
    cfg = tiny_cfg(f"task={name}", "train.precision=fp32", *overrides)
    task = task_of(cfg)
    assert task is TASKS[name] and task.peft_task_type == task_type
    bundle, data = _setup(cfg, 0, 1)
    assert bundle.model.peft_config["default"].task_type == task_type

    # One batch of the task's own collate: a finite loss with a gradient, counted in items.
    batch = next(iter_batches(data.train, 4, bundle.tokenizer.pad_token_id, seed=0, collate_fn=task.collate))
    loss = task.loss_fn(cfg, bundle)(bundle.model, batch)
    loss.backward()
    assert torch.isfinite(loss) and 0 < task.items(batch) <= batch["input_ids"].numel()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bundle.model.parameters() if p.requires_grad)
    bundle.model.zero_grad(set_to_none=True)

    # The client's held-out figures come from the task, weighted by the held-out size.
    metrics = local_evaluate(cfg, get_adapter_state(bundle.model), 0, 1)
    assert math.isfinite(metrics["eval-loss"]) and math.isfinite(metrics[client_metric])
    assert metrics["num-examples"] == len(data.holdout) > 0

    # The server's: the task's primary metric, on its own test set and answer records.
    assert task.primary(cfg) == primary
    test, test_set = server_data(cfg, bundle.tokenizer)
    scores = task.server_evaluate(cfg, bundle, test_set, task.generation_records(cfg, test), False)
    assert math.isfinite(scores["eval-loss"]) and 0.0 <= scores[primary] <= 1.0


def task_name_comparisons(tree: ast.AST) -> list[int]:
    """Lines where `<something>.task.name` is compared (==, !=, in, not in, ...)."""

    def is_task_name(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Attribute)
            and node.attr == "name"
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "task"
        )

    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare) and any(is_task_name(n) for n in [node.left, *node.comparators])
    ]


def test_the_finder_sees_every_kind_of_comparison():
    code = 'a = cfg.task.name == "dpo"\nb = "lm" != self.cfg.task.name\nc = cfg.task.name in ("x",)\nd = cfg.task.name'
    assert task_name_comparisons(ast.parse(code)) == [1, 2, 3]


def test_only_the_tasks_package_and_the_config_check_compare_the_task_name():
    """Core code asks the task (`fedllm_flwr.tasks.registry.task_of`) instead of testing its name."""
    allowed = (ROOT / "fedllm_flwr" / "tasks", ROOT / "fedllm_flwr" / "config")
    files = [*(ROOT / "fedllm_flwr").rglob("*.py"), ROOT / "client_app.py", ROOT / "server_app.py"]
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in files
        if not any(path.is_relative_to(folder) for folder in allowed)
        for line in task_name_comparisons(ast.parse(path.read_text()))
    ]
    assert not found, found
