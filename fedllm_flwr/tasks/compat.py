"""What the tasks are called, which records each reads, and what each cannot serve.

Read by the config (`task.name`'s values), the data layer (which records to load) and
the other plug-ins' declarations; `registry` maps each name to its task.
"""

from __future__ import annotations

from fedllm_flwr.compat import FT_STEPS, Conflict, is_set, not_in, one_of
from fedllm_flwr.peft_methods.compat import TARGETED_METHODS

#: task.name -> the name of its `Task` class (`registry.TASKS`).
TASKS = {"lm": "LmTask", "reward": "RewardTask", "dpo": "DpoTask", "grpo": "GrpoTask"}
#: The records each task reads: instruction records ("prompts"), (prompt, chosen,
#: rejected) pairs ("pairs"), or instruction records of which a client trains on the
#: prompt alone, keeping the record for its reward functions ("questions").
TASK_RECORDS = {"lm": "prompts", "reward": "pairs", "dpo": "pairs", "grpo": "questions"}

GRPO = one_of("task", "grpo")
PREFERENCE = one_of("task", *(name for name, records in TASK_RECORDS.items() if records == "pairs"))

CONFLICTS = (
    Conflict(one_of("task", "reward"), not_in("peft", *TARGETED_METHODS),
             "a reward model scores a sequence through the last hidden state, and this method adds virtual "
             "tokens"),
    Conflict(PREFERENCE, not_in("algorithm", "none"),
             "the task trains on the full base model (DPO takes its reference from it with the adapter off)"),
    Conflict(PREFERENCE, FT_STEPS,
             "clients report preference accuracy on their held-out pairs; FedAvg + FT tunes a language model"),
    Conflict(PREFERENCE, is_set("eval.client_metric"),
             "clients always report preference accuracy on their held-out pairs"),
    Conflict(GRPO, not_in("peft", *TARGETED_METHODS),
             "the reference policy is the base with the adapter switched off, and sampling through virtual tokens "
             "is not supported"),
    Conflict(GRPO, not_in("algorithm", "none"),
             "GRPO samples answers and follows the gradient of their log-probabilities; this algorithm trains "
             "another way"),
    Conflict(GRPO, FT_STEPS, "FedAvg + FT fine-tunes with the language-model loss, not with the sites' rewards"),
)  # fmt: skip
