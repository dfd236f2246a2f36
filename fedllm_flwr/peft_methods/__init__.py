"""The PEFT methods (`peft.method`).

- `compat`: their names, the kinds the config and other plug-ins ask about (targeted,
  LoRA's factors, limited to some layers) and the settings a method cannot serve;
  imports nothing of ours, so the config reads it without loading peft;
- `builders`: one builder per method, from our `AdapterConfig` to peft's config.

Adding a method costs a builder, its name in `compat.PEFT_METHODS` (and its kinds),
a YAML in conf/peft/ and a row in tests/test_peft_methods.py (which keeps the four in
step). Nothing is imported here.
"""
