"""The server's side of a run (the ServerApp calls `run.run_server`).

- `run`: the story of a run: check everything that can fail on user input, then
  federate, evaluate, save;
- `evaluation`: each round's evaluation, its metrics row, the saved adapters and
  the checkpoint;
- `nodes`: who is connected and what each node holds;
- `personalize`: FedAvg + FT after the last round (the client's side is
  `fedllm_flwr.client.personalize`);
- `resume`: reopening an interrupted run at its last checkpoint.

What an algorithm adds on the server (FedOT's emulator and full model, zeroth-order's
seed lists) is its plug-in's (`fedllm_flwr.algorithms`).
"""
