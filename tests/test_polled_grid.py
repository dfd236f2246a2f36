"""The server's wait for replies on a deployed grid (`fedllm_flwr.server.grid`)."""

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedllm_flwr.server.grid import PolledGrid, polled


class SlowGrid:
    """A deployed grid whose replies arrive one per pull; counts pushes and pulls."""

    def __init__(self, answered_per_pull: int = 1) -> None:
        self.sent, self.pulls, self.answered_per_pull = [], 0, answered_per_pull

    def push_messages(self, messages):
        self.sent = [m for m in messages]
        for i, m in enumerate(self.sent):
            m.metadata.__dict__["_message_id"] = f"m{i}"
        return [m.metadata.message_id for m in self.sent]

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = sorted(message_ids)[: self.answered_per_pull]
        return [Message(RecordDict(), reply_to=m) for m in self.sent if m.metadata.message_id in ready]

    def get_node_ids(self):
        return [1, 2, 3]


Grid.register(SlowGrid)  # it keeps Flower's Grid contract for what the server uses


def messages(n: int) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=i + 1, message_type=MessageType.QUERY) for i in range(n)]


def test_the_server_asks_for_replies_until_all_came_or_the_timeout(task_identity):
    grid = SlowGrid()
    replies = PolledGrid(grid, seconds=0.01).send_and_receive(messages(3))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"] and grid.pulls == 3
    late = SlowGrid(answered_per_pull=0)
    assert PolledGrid(late, seconds=0.05).send_and_receive(messages(2), timeout=0.2) == []
    assert 2 <= late.pulls <= 6  # asked every 0.05 s until the 0.2 s were up, then returned
    assert PolledGrid(grid, seconds=0.01).get_node_ids() == [1, 2, 3]  # the rest is the grid's own


def test_only_a_deployed_grid_is_wrapped(task_identity):
    in_memory = type("InMemoryGrid", (SlowGrid,), {})()  # simulation's grid already asks every 0.1 s
    assert polled(in_memory, 0.2) is in_memory
    deployed = SlowGrid()
    assert polled(deployed, 0) is deployed  # 0: Flower's own wait
    wrapped = polled(deployed, 0.2)
    assert isinstance(wrapped, PolledGrid) and polled(wrapped, 0.2) is wrapped
    in_process = object()  # no Flower Grid (no push and pull): as it is
    assert polled(in_process, 0.2) is in_process
