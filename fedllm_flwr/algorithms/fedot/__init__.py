"""FedOT, offsite tuning (`algorithm=fedot`): clients tune an adapter in the first and
last decoder layers against a lossy emulator of the base model (its middle layers
dropped at a stride, optionally distilled), and never receive the dropped layers.

- `emulator`: the split, the emulator (built, distilled, saved, packaged, installed)
  and the configs of the server's full model and the clients' emulator; no Flower;
- `emulator_files`: the emulator's files as message records, sent once to each node;
- `server`: the server's full model, its views and the run's FedOT figures.

The clients' step is plain backprop on the emulator (`fedllm_flwr.client.local_train`):
only the model a node trains differs (`Fedot.node_config`).

- `algorithm`: the plug-in (`Fedot`), which imports the modules above when a method needs them;
- `compat`: what it cannot serve (read by the config).

Nothing is imported here.
"""
