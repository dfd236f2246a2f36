"""Which rounds' broadcasts each node holds: for strategies whose nodes keep what
every round sent (stacking's parts, zeroth-order seed lists), so that a message
carries only what its node lacks and a node that missed rounds catches up. Under
stacking a compaction is a part of the round that made it, in place of the older
rounds' parts of its module: a node that lacks those rounds gets the compaction."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, RecordDict

from fedllm_flwr.keys import ROUNDS_HELD_KEY


class CatchUp:
    """Per node, the last round it confirmed (by answering a message that carried it)."""

    def __init__(self) -> None:
        self.known: dict[int, int] = {}
        self._carried: dict[int, int] = {}

    def missing(self, node: int, rounds: Iterable[int]) -> list[int]:
        """The `rounds` `node` lacks, in order; remembered as carried by its next message."""
        lacking = sorted(t for t in rounds if t > self.known.get(node, 0))
        if lacking:
            self._carried[node] = lacking[-1]
        return lacking

    def confirm(self, node: int) -> None:
        """`node` answered: it holds what its last message carried."""
        self.known[node] = max(self.known.get(node, 0), self._carried.get(node, 0))

    def confirm_answered(self, replies: Iterable[Message]) -> None:
        """Confirm every node whose reply is not an error."""
        for message in replies:
            if not message.has_error():
                self.confirm(message.metadata.src_node_id)

    def forget(self) -> None:
        """A restarted run: node ids are new, every node gets every round."""
        self.known, self._carried = {}, {}


def with_count(content: RecordDict, rounds: int, **extra) -> None:
    """Put the number of rounds the global model holds (and `extra` keys) into the
    message's "config" record, a copy of it: the node checks it holds as many."""
    config = content.config_records.get("config")
    content["config"] = ConfigRecord({**(dict(config.items()) if config else {}), ROUNDS_HELD_KEY: rounds, **extra})
