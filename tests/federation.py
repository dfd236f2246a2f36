"""A whole federation in this process, for tests: the ServerApp's `run_server` and
every node's ClientApp (its SecAgg+ mod included), wired by a Grid that hands each
message to its node as a SuperNode would, with no Flower start-up.

What travels is serialized as Flower serializes it for the wire (every message, both
ways, and each node's `context.state` between its messages), so a record that would
not survive the wire fails here too. Every exchange is kept in `traffic`, and a hook
runs after each round's evaluation (`ServerEvaluator`, the last step of every round),
so a test checks its invariants round by round (tests/invariants.py).
"""

from __future__ import annotations

import contextlib
import itertools
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto


def over_the_wire(content: RecordDict) -> RecordDict:
    """`content` as the receiver gets it: serialized and parsed again."""
    return recorddict_from_proto(recorddict_to_proto(content))


@dataclass
class Exchange:
    """One message and the reply its node sent (an error reply when it failed)."""

    message: Message
    reply: Message

    @property
    def node(self) -> int:
        return self.message.metadata.dst_node_id

    @property
    def kind(self) -> str:
        return self.message.metadata.message_type


_RUN_IDS = itertools.count(1)


@contextlib.contextmanager
def worker_process(caches: dict[str, dict]) -> Iterator[None]:
    """Model caches of their own while nodes run, as a simulation worker process has:
    the server's model (whose weights algorithm=zo with zo.params=full moves) is not the
    one the nodes train, exactly as with Flower's separate ServerApp process."""
    import fedllm_flwr.model as model

    server = {name: getattr(model, name) for name in caches}
    for name, cache in caches.items():
        setattr(model, name, cache)
    try:
        yield
    finally:
        for name, cache in server.items():
            setattr(model, name, cache)


class InProcessGrid:
    """Flower's Grid for nodes that run in this process, one `Context` per node."""

    def __init__(self, run_config: dict[str, Any], node_configs: list[dict[str, Any]],
                 fail: Callable[[Message], str | None] | None = None,
                 tamper: Callable[[Message, RecordDict], RecordDict] | None = None,
                 app: ClientApp | None = None) -> None:  # fmt: skip
        self.run_config = run_config
        run_id = next(_RUN_IDS)  # Flower's run id: every run its own, a resumed one too
        self.contexts = {
            101 + i: Context(run_id=run_id, node_id=101 + i, node_config=dict(config), state=RecordDict(),
                             run_config=dict(run_config))
            for i, config in enumerate(node_configs)
        }  # fmt: skip
        self.fail = fail
        """message -> a reason to fail it (as a node that left), or None to deliver it."""
        self.tamper = tamper
        """(message, reply content) -> the content a misbehaving node sends instead."""
        self.app = app
        """The ClientApp every node runs (None: the shipped `client_app.app`)."""
        self.traffic: list[Exchange] = []
        self.caches: dict[str, dict] = {"_BUNDLES": {}, "_BASES": {}}
        """The nodes' model caches (one worker process serves every node)."""

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:  # noqa: ANN001
        import client_app

        app = self.app or client_app.app
        replies = []
        for message in messages:
            meta = message.metadata
            received = Message(over_the_wire(message.content), dst_node_id=meta.dst_node_id,
                               message_type=meta.message_type, group_id=meta.group_id)  # fmt: skip
            context = self.contexts[meta.dst_node_id]
            reason = self.fail(received) if self.fail else None
            if reason is not None:
                reply = Message(Error(code=0, reason=reason), reply_to=received)
            else:
                try:
                    with worker_process(self.caches):
                        answer = app(received, context).content
                    if self.tamper is not None:
                        answer = self.tamper(received, answer)
                    reply = Message(over_the_wire(answer), reply_to=received)
                except Exception as exc:  # a ClientApp that raises answers with an error, as in Flower
                    reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=received)
                context.state = over_the_wire(context.state)  # what Flower keeps between messages
            self.traffic.append(Exchange(received, reply))
            replies.append(reply)
        return replies

    def node_states(self) -> dict[int, RecordDict]:
        return {node: context.state for node, context in self.contexts.items()}


@dataclass
class Run:
    """What a run left: its folder, the strategy that ran it, every exchange, and each
    round's global arrays as the server evaluated them."""

    cfg: Any
    path: Path
    strategy: Any
    grid: InProcessGrid
    arrays: dict[int, dict] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        from fedllm_flwr.metrics import read_metrics

        return read_metrics(self.path)


def run_federation(
    monkeypatch,  # noqa: ANN001 - pytest's fixture
    overrides: list[str],
    nodes: int = 3,
    node_configs: list[dict[str, Any]] | None = None,
    after_round: Callable[[Run, int], None] | None = None,
    fail: Callable[[Message], str | None] | None = None,
    tamper: Callable[[Message, RecordDict], RecordDict] | None = None,
    app: ClientApp | None = None,
) -> Run:
    """Run the job `overrides` describes on `nodes` in-process nodes, calling
    `after_round(run, round)` after each round's evaluation (round 0 included).
    `app`: the ClientApp the nodes run, when not the shipped one (a misbehaving node's)."""
    import numpy as np

    import fedllm_flwr.server.run as server_run
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.server.evaluation import ServerEvaluator

    overrides = [*overrides, "run.warm_up=false"]
    cfg = load_cfg(overrides)
    configs = node_configs or [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)]
    grid = InProcessGrid({"overrides": shlex.join(overrides)}, configs, fail, tamper, app)
    run = Run(cfg, Path(), None, grid)
    build = server_run.private_strategy

    def keep_strategy(cfg, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        run.strategy = build(cfg, *args, **kwargs)
        return run.strategy

    class Watched(ServerEvaluator):
        def __call__(self, server_round, arrays):  # noqa: ANN001
            out = super().__call__(server_round, arrays)
            run.path = self.run_dir.path
            run.arrays[server_round] = {k: np.array(v.numpy(), copy=True) for k, v in arrays.items()}
            if after_round is not None:
                after_round(run, server_round)
            return out

    monkeypatch.setattr(server_run, "private_strategy", keep_strategy)
    monkeypatch.setattr(server_run, "ServerEvaluator", Watched)
    run_dir = server_run.run_server(grid, cfg)
    run.path = run_dir.path
    return run
