"""The task registry: each `task.name` to its `Task` (`compat.TASKS`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedllm_flwr.tasks.base import Task
from fedllm_flwr.tasks.compat import TASKS as NAMES
from fedllm_flwr.tasks.dpo import DpoTask
from fedllm_flwr.tasks.grpo.task import GrpoTask
from fedllm_flwr.tasks.lm import LmTask
from fedllm_flwr.tasks.reward import RewardTask

if TYPE_CHECKING:
    from fedllm_flwr.config import Config

_CLASSES = {kind.__name__: kind for kind in (LmTask, RewardTask, DpoTask, GrpoTask)}
#: Every task by its `task.name`.
TASKS: dict[str, Task] = {name: _CLASSES[kind]() for name, kind in NAMES.items()}


def task_of(cfg: Config) -> Task:
    """The configured task (`cfg.task.name`, checked by the config against `compat.TASKS`)."""
    return TASKS[cfg.task.name]
