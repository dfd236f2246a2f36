"""The tasks (`cfg.task`): one module each, behind one interface (`base.Task`).

    lm      the adapter learns to write responses (causal LM loss on response tokens)
    reward  a reward model: a scalar head scores prompt + response, trained on pairs
    dpo     direct preference optimisation of the language model on the same pairs

Adding a task costs a module here with its `Task` subclass, an entry in `TASKS`, a YAML
in conf/task/ (and its name, with the records it reads, in `config.training.TASK_RECORDS`),
and a row in tests/test_tasks.py. No Flower here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedllm_flwr.tasks.base import PairTask, Task
from fedllm_flwr.tasks.dpo import DpoTask
from fedllm_flwr.tasks.lm import LmTask
from fedllm_flwr.tasks.reward import RewardTask

if TYPE_CHECKING:
    from fedllm_flwr.config import Config

#: Every task by its `task.name`.
TASKS: dict[str, Task] = {task.name: task for task in (LmTask(), RewardTask(), DpoTask())}


def task_of(cfg: Config) -> Task:
    """The configured task (`cfg.task.name`, checked by the config against `TASK_RECORDS`)."""
    return TASKS[cfg.task.name]


__all__ = ["TASKS", "PairTask", "Task", "task_of"]
