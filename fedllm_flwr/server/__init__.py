"""The server's side of a run (the ServerApp calls `run.run_server`).

- `run`: the story of a run: check everything that can fail on user input, then
  federate, evaluate, save;
- `evaluation`: each round's evaluation, its metrics row, the saved adapters and
  the checkpoint;
- `nodes`: who is connected and what each node holds;
- `personalize`: FedAvg + FT after the last round (the client's side is
  `fedllm_flwr.client.personalize`);
- `fedot`: FedOT's emulator and full model on the server, and its summary;
- `resume`: reopening an interrupted run at its last checkpoint.
"""
