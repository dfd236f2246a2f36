"""Warm sites: a long-lived worker per SuperNode that runs the node's functions.

A deployed SuperNode starts a fresh ClientApp process for every message, and each
one would import torch, transformers and peft again and load the base model again.
With a site worker, the ClientApp process stays a thin proxy (`proxy.forward`): it
sends the message and its context, as Flower's own protobufs, over a Unix socket
that only the SuperNode's user may use, to a worker (`server.serve`) that keeps the
stack, the model and the tokenized data loaded between messages, and it writes the
worker's new node state into `context.state`. The worker is a cache, never the
source of truth: one that dies, or is stale (other code, environment, model or
SuperNode), is replaced, and the message runs in the ClientApp process if that
fails too.

- `paths`: where a worker's files live and the key that names it;
- `protocol`: the handshake (peer uid + mutual HMAC) and the frames;
- `server`: the worker's loop;
- `proxy`: the ClientApp's side (`FEDLLM_SITE_WORKER=auto|on|off`);
- `python -m fedllm_flwr.site_worker serve|list|stop`: the command.

Nothing here imports torch: the proxy runs in every ClientApp process.
"""
