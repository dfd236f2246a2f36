"""Zeroth-order federated tuning (`algorithm=zo`, knobs under `zo.*`): MeZO steps
along directions drawn from a seed pool fixed by the run's seed, and messages of
(seed index, coefficient) pairs, never weights (FedKSeed).

- `mezo`: the steps themselves (the seed pool, perturbations, the two-point
  estimate, a client's round); no Flower;
- `full_weights`: zo.params=full, the base weights as the tuned state (kept by a
  node in a file between messages, saved as a transformers model);
- `node`: a node's catch-up with the global model and its local round;
- `state`: what a node keeps between messages (`ZoState`, held by `NodeState`);
- `strategy`: the server's `SeedFederation`, which averages seed lists;
- `algorithm`: the plug-in (`Zo`), which imports the modules above when a method needs them;
- `compat`: what it cannot serve (read by the config).

Nothing is imported here.
"""
