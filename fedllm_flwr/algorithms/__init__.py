"""The federated algorithms (`cfg.algorithm.name`), one plug-in each, found by name.

- `none` (`backprop`): nodes train the adapter a message carries with backprop;
- `fedot`: offsite tuning, nodes train against an emulator of the base model;
- `zo`: zeroth-order steps, messages of seed indices and coefficients.

The core asks `registry.algorithm_for(cfg)` (an `Algorithm`, `base.py`) what to do and
never tests the name. Adding an algorithm costs a package here (its plug-in class and
its `compat` declarations), its name in `compat.ALGORITHMS`, a YAML in conf/algorithm/
and a row in tests/combinations.py (tests/test_algorithms.py keeps them in step).
Nothing is imported here, so the config reads `compat` without loading any plug-in.
"""
