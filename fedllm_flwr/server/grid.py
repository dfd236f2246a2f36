"""How often the server asks for replies while it waits for a round.

Flower 1.42's deployed grid (`flwr.superlink.grid.http_grid.HttpGrid.send_and_receive`)
pushes the messages and then asks the SuperLink for replies every 3 s, so every
exchange ends on average 1.5 s (up to 3 s) after its last reply arrived; a round
makes two exchanges (training, evaluation) and SecAgg+ four more. The simulation's
grid asks every 0.1 s. `PolledGrid` keeps Flower's grid and replaces only that wait,
asking every `run.poll_seconds`; it is a wrapper rather than a subclass because the
server is handed whichever grid its runtime built.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedllm_flwr.worker_start import is_simulation


class PolledGrid:
    """`grid` with a `send_and_receive` that asks for replies every `seconds`."""

    def __init__(self, grid: Grid, seconds: float) -> None:
        self.grid, self.seconds = grid, seconds

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Flower's contract: push `messages`, return the replies that came before
        `timeout` seconds passed (None: wait for all of them)."""
        pending = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {reply.metadata.reply_to_message_id for reply in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.seconds if deadline is None else max(0.0, min(self.seconds, deadline - time.monotonic())))
        return replies


def polled(grid: Grid, seconds: float) -> Grid:
    """The grid the server runs on: a deployed Flower grid that asks every `seconds`
    (0: Flower's own wait); any other as it is: simulation's (it already asks every
    0.1 s) and one that is no Flower `Grid`, with no push and pull to poll with (the
    tests' in-process nodes)."""
    if seconds <= 0 or not isinstance(grid, Grid) or is_simulation(grid):
        return grid
    return PolledGrid(grid, seconds)  # type: ignore[return-value]
