"""Server-side aggregation: the only place where client replies are combined.

- `compat`: the strategies' and scenarios' names and what each cannot serve (read by
  the config without loading any of the code below);
- `registry`: each name to its class, and `build_strategy`;
- `adapter_fedavg`: `AdapterFedAvg`, the base of every strategy (validated replies,
  codecs, availability, the round's ledger); `replies`: what a valid reply is;
- `aggregators`: Flower's server optimizers and robust rules, and MIFA;
- `ranked`, `lora_products`, `stacking`: LoRA of unequal ranks per site;
- `scenarios`: the global and local scenarios; `availability`, `catch_up`, `round_setup`:
  who answers a round, a returning node's catch-up, what the server knows before round 1.

Nothing is imported here.
"""
