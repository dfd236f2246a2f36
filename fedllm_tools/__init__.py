"""The tooling around federated runs: the `fedllm-flwr` command, the harnesses that
start `flwr run` on this machine (simulation, local deployment), sweeps, reports
and tables.

It stays on the machine that drives the runs: a FAB carries the two apps and the
`fedllm_flwr` core only (pyproject's `fab-include`), and no core module imports
this package (tests/test_layout.py).
"""
