"""The tasks (`cfg.task`): one module each, behind one interface (`base.Task`).

    lm      the adapter learns to write responses (causal LM loss on response tokens)
    reward  a reward model: a scalar head scores prompt + response, trained on pairs
    dpo     direct preference optimisation of the language model on the same pairs

- `compat`: the names, the records each reads and what each cannot serve (read by the
  config and the data layer without loading the tasks);
- `registry`: each name to its task (`task_of`).

Adding a task costs a module here with its `Task` subclass, its name and records in
`compat`, a YAML in conf/task/ and a row in tests/test_tasks.py. No Flower here;
nothing is imported here.
"""
