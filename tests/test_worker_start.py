"""Warming the nodes up while the server starts."""

import subprocess
import sys

from conftest import ROOT
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedllm_flwr.keys import WARM_UP_KEY
from fedllm_flwr.model import _BUNDLES, clear_model_cache
from fedllm_flwr.worker_start import MAX_NODES, await_warm_up, is_warm_up, send_warm_up


class Recorder:
    def __init__(self, nodes):
        self.nodes, self.pushed = nodes, []

    def get_node_ids(self):
        return self.nodes

    def push_messages(self, messages):
        self.pushed.extend(messages)
        return [str(i) for i, _ in enumerate(messages)]


class InMemoryGrid(Recorder):  # the name Flower's simulation grid has
    pass


def test_warm_up_goes_to_every_deployed_node_and_to_a_few_simulated_ones(task_identity):
    deployed = Recorder(list(range(1, 2 + MAX_NODES)))
    assert len(send_warm_up(deployed)) == 1 + MAX_NODES  # each SuperNode has its own site worker to start
    assert all(is_warm_up(m) for m in deployed.pushed)
    simulated = InMemoryGrid(list(range(100, 100 + 3 * MAX_NODES)))
    assert len(send_warm_up(simulated)) == MAX_NODES
    assert all(m.metadata.message_type == MessageType.QUERY for m in simulated.pushed)
    assert all(m.content["config"][WARM_UP_KEY] == 1 and is_warm_up(m) for m in simulated.pushed)
    assert send_warm_up(InMemoryGrid([]), wait=0.1) == []
    query = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type=MessageType.QUERY)
    assert not is_warm_up(query)


class SlowReplies(Recorder):
    """A simulation grid that answers one pending warm-up per pull."""

    def pull_messages(self, message_ids):
        self.pulls = getattr(self, "pulls", 0) + 1
        first = sorted(message_ids)[:1]
        return [Message(RecordDict(), reply_to=m) for m in self.pushed if m.metadata.message_id in first]


def test_the_first_round_waits_until_every_warm_up_was_answered(task_identity):
    grid = type("InMemoryGrid", (SlowReplies,), {})([1, 2, 3])
    ids = send_warm_up(grid)
    for i, m in zip(ids, grid.pushed, strict=True):
        m.metadata.__dict__["_message_id"] = i
    assert await_warm_up(grid, ids, timeout=5, poll=0) == 3 and grid.pulls == 3
    grid.pulls = 0
    assert await_warm_up(InMemoryGrid([1]), [], timeout=5) == 0  # nothing sent, nothing to wait for
    unanswered = InMemoryGrid([1])
    unanswered.pull_messages = lambda ids: []
    assert await_warm_up(unanswered, ["a", "b"], timeout=0.2, poll=0.05) == 0  # a lost warm-up does not hang the run
    deployed = SlowReplies([1, 2])
    ids = send_warm_up(deployed)
    # a SuperNode runs its messages one at a time, in order: nothing to wait for, nothing pulled
    assert await_warm_up(deployed, ids, timeout=5, poll=0) == 0 and not hasattr(deployed, "pulls")


def query(overrides: str, node_config=None):
    import client_app

    content = RecordDict({"config": ConfigRecord({WARM_UP_KEY: 1})})
    context = Context(run_id=1, node_id=3, node_config=node_config or {"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={"overrides": overrides})  # fmt: skip
    reply = client_app.query(Message(content, dst_node_id=3, message_type=MessageType.QUERY), context)
    return dict(reply.content["info"].items())


def test_a_warm_up_loads_the_model_and_the_data_and_never_fails_the_run(tiny_model_dir, task_identity):
    from fedllm_flwr.client import _DATA

    clear_model_cache()
    _DATA.clear()
    assert query(f"model.name={tiny_model_dir}") == {"warm": 1}
    assert len(_BUNDLES) == 1 and len(_DATA) == 1
    # FedOT clients never load the full model: they get the emulator with the first round.
    clear_model_cache()
    assert query(f"model.name={tiny_model_dir} algorithm=fedot") == {"warm": 1} and not _BUNDLES
    # A problem is reported in the reply; the server's own checks tell the user.
    bad = query(f"model.name={tiny_model_dir}", node_config={"partition-id": 0})
    assert bad["warm"] == 0 and "partition-id and num-partitions" in bad["reason"]


def test_the_apps_import_without_the_ml_stack():
    # Flower's simulation imports the ClientApp in its own process before it starts any
    # worker; the ServerApp sends the warm-up before importing the stack.
    code = "import sys, client_app, server_app; print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
