"""The docs' guarantees (docs/concepts.md) as checks on a federation run in this process
(tests/federation.py), made after every round (`check_round`) and on a resumed run
(`check_resume`). Each check names the promise it keeps; the docs' guarantees
section names the check.

A check reads only what a run leaves where anyone could see it: the messages and
replies that travelled (`run.grid.traffic`), each node's `context.state`, the global
arrays the server evaluated each round, the server strategy's own state, and the run
folder.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import RecordDict

from fedllm_flwr.keys import ARRAYS_KEY, MANIFEST_KEY, PERSONALIZE_KEY, SAT_OUT_KEY, SERVER_ROUND_KEY, ZO_REPLY_KEY
from fedllm_flwr.privacy.dp_sgd import RELEASED
from fedllm_flwr.strategy.lora_products import at_rank, multiplying_pairs, rank_of
from fedllm_flwr.transport import is_relative, pack, unpack


def check_round(run, server_round: int) -> None:  # noqa: ANN001 - a federation.Run
    """Every invariant that holds after each round (round 0 included)."""
    new = _unchecked(run)
    check_messages(run, new)
    updates_are_clipped_and_releases_noised_under_dp(run, new, server_round)
    nothing_non_finite_is_averaged_in(run, server_round)
    nodes_hold_the_servers_model(run, new, server_round)
    no_capacity_is_lost(run, server_round)


def check_end(run) -> None:  # noqa: ANN001
    """What holds of every message, for those after the last round (FedAvg + FT)."""
    check_messages(run, _unchecked(run))


def check_messages(run, new) -> None:  # noqa: ANN001
    no_node_fails(new)
    private_tensors_stay_home(run, new)
    nothing_unmasked_leaves_a_node_under_secagg(run, new)
    adapters_leave_a_node_only_as_clipped_updates_under_dp(run, new)
    nothing_read_from_a_record_leaves_a_site_under_dp_sgd(run, new)


def _unchecked(run) -> list:  # noqa: ANN001
    seen = getattr(run, "_checked", 0)
    run._checked = len(run.grid.traffic)
    return run.grid.traffic[seen:]


def _config(content: RecordDict) -> dict:
    record = content.config_records.get("config")
    return dict(record.items()) if record is not None else {}


def _round_of(exchange) -> int | None:  # noqa: ANN001
    value = _config(exchange.message.content).get(SERVER_ROUND_KEY)
    return int(value) if value is not None else None


def _answered(exchanges) -> list:  # noqa: ANN001
    return [x for x in exchanges if not x.reply.has_error()]


def no_node_fails(new) -> None:  # noqa: ANN001
    """In a federation whose config the server accepted, every node answers every message
    it is sent (a node that refuses says why, and that is a bug of the combination)."""
    failed = [(x.node, x.kind, x.reply.error.reason) for x in new if x.reply.has_error()]
    assert not failed, f"a node failed: {failed[0]}"


def private_tensors_stay_home(run, new) -> None:  # noqa: ANN001
    """`personalize.private`: no tensor marked private is in any reply a node sends
    (training, evaluation, FedAvg + FT), nor is a personalized adapter that holds one."""
    patterns = list(run.cfg.personalize.private)
    if not patterns:
        return
    for exchange in _answered(new):
        manifest = exchange.reply.content.config_records.get(MANIFEST_KEY)
        names = list(manifest.get("names", [])) if manifest is not None else []
        leaked = [n for n in names if any(p in n for p in patterns)]
        assert not leaked, f"node {exchange.node} sent private tensors {leaked[:2]}"


def nothing_unmasked_leaves_a_node_under_secagg(run, new) -> None:  # noqa: ANN001
    """Under SecAgg+ (privacy=secagg, or dp_sgd with privacy.secagg): no reply carries an
    adapter, an update or seed list in the clear: what a node trained leaves it only as
    SecAgg+'s masked vector (its metrics travel in the clear, as the docs say)."""
    if not run.cfg.privacy.masked:
        return
    for exchange in _answered(new):
        content = exchange.reply.content
        clear = [k for k in (ARRAYS_KEY, ZO_REPLY_KEY) if k in content.array_records]
        assert not clear, f"node {exchange.node} sent {clear} unmasked ({exchange.kind} message)"


def adapters_leave_a_node_only_as_clipped_updates_under_dp(run, new) -> None:  # noqa: ANN001
    """privacy=dp: whatever the message (training, FedAvg + FT), an adapter leaves a node
    only as an update within the clipping norm C (as it travels, up to the codec's
    rounding: the server re-clips it)."""
    if run.cfg.privacy.name != "dp":
        return
    for exchange in _answered(new):
        content = exchange.reply.content
        if ARRAYS_KEY not in content.array_records:
            continue
        assert is_relative(content), f"node {exchange.node} sent a whole adapter under privacy=dp ({exchange.kind})"
        update = unpack(content)
        norm = math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in update.values()))
        assert norm <= run.cfg.privacy.clipping_norm * 1.01, f"node {exchange.node}'s update has norm {norm} > C"


def nothing_read_from_a_record_leaves_a_site_under_dp_sgd(run, new) -> None:  # noqa: ANN001
    """privacy=dp_sgd: a training reply (FedAvg + FT's included) carries no figure read from
    a training record (its loss, its tokens, how many records were drawn): only those
    `dp_sgd.RELEASED` lists, the site's budget, and whether it sat out; every round's
    reply reports the site's epsilon."""
    if not run.cfg.privacy.record_level:
        return
    # "num_examples": num-examples again, where Flower's SecAgg+ reply layout (a FitRes) keeps it
    allowed = RELEASED | {"dp-epsilon", "dp-steps", "dp-noise-multiplier", "dp-sample-rate", SAT_OUT_KEY}
    allowed |= {"num_examples"}
    for exchange in _answered(new):
        if exchange.kind != "train":
            continue
        personalizing = bool(_config(exchange.message.content).get(PERSONALIZE_KEY))
        for record in exchange.reply.content.metric_records.values():
            scores = ("before-", "after-") if personalizing else ()  # FedAvg + FT's held-out scores
            read = {k for k in record if k not in allowed and not (scores and k.startswith(scores))}
            assert not read, f"node {exchange.node} released {sorted(read)} read from its records under dp_sgd"
            if not personalizing and "num-examples" in record:
                assert math.isfinite(float(record["dp-epsilon"])) and record["dp-steps"] > 0, dict(record)


def updates_are_clipped_and_releases_noised_under_dp(run, new, server_round: int) -> None:  # noqa: ANN001
    """privacy=dp: every release is noised for the number of clients really sent a
    training message that round (their updates are clipped: see the check above)."""
    if run.cfg.privacy.name != "dp" or server_round == 0:
        return
    p = run.cfg.privacy
    sent = [x for x in new if x.kind == "train" and _round_of(x) == server_round
            and not _config(x.message.content).get(PERSONALIZE_KEY)]  # fmt: skip
    row = next(r for r in run.rows() if r["round"] == server_round)
    if row.get("clients-ok"):
        assert row["dp-clients"] == len(sent), f"noise sized for {row['dp-clients']} clients, {len(sent)} were sent"
        assert math.isclose(row["noise-std"], p.noise_multiplier * p.clipping_norm / len(sent), rel_tol=1e-6)


def nothing_non_finite_is_averaged_in(run, server_round: int) -> None:  # noqa: ANN001
    """Whatever the codec, the global adapter the server holds after a round is finite."""
    bad = [k for k, v in run.arrays[server_round].items() if not np.isfinite(v).all()]
    assert not bad, f"round {server_round}: non-finite global tensors {bad[:2]}"


def nodes_hold_the_servers_model(run, new, server_round: int) -> None:  # noqa: ANN001
    """Where nodes keep the global model themselves (zeroth-order's adapter, stacking's
    merged factors) or are sent a reshaped copy (unequal ranks), what a node holds is
    the server's, bit for bit: the server evaluates and saves what the nodes train on."""
    from fedllm_flwr.node import NodeState

    states = run.grid.node_states()
    if run.cfg.algorithm.name == "zo" and run.cfg.zo.params == "adapter":
        for node, state in states.items():
            held = NodeState.load(state)
            if held.zo.adapter is None or held.zo.round != server_round:
                continue  # this node has not caught up to this round yet (it catches up when next asked)
            theirs = {k: v.numpy() for k, v in held.zo.adapter.items()}
            ours = run.arrays[server_round]
            assert set(theirs) == set(ours)
            differ = [k for k in ours if not np.array_equal(theirs[k], ours[k])]
            assert not differ, f"node {node}'s adapter differs from the server's in {len(differ)} tensors"
    if run.cfg.strategy.name == "stacking":
        from fedllm_flwr.lora_stacks import flat_of

        ours = flat_of(run.strategy.merged_parts())
        for node, state in states.items():
            held = NodeState.load(state).merged
            theirs = {k: v.numpy() for k, v in held.items()} if held is not None else {}
            if set(theirs) != set(ours):
                continue  # this node has not caught up to this round yet
            differ = [k for k in ours if not np.array_equal(theirs[k], ours[k])]
            assert not differ, f"node {node}'s merged factors differ from the server's in {differ[:2]}"
    if run.cfg.strategy.name in ("zero_padding", "svd") and server_round > 0:
        down = run.strategy.down
        sent = [x for x in new if x.kind == "train" and _round_of(x) == server_round + 1]
        for exchange in sent:  # the next round's messages: each node's truncation of this round's adapter
            rank = run.strategy.ranks.get(exchange.node, rank_of(run.arrays[server_round]))
            expected = unpack(pack(at_rank(run.arrays[server_round], rank), down))
            got = unpack(exchange.message.content)
            assert all(np.array_equal(got[k], expected[k]) for k in expected)


def no_capacity_is_lost(run, server_round: int) -> None:  # noqa: ANN001
    """No LoRA slot of the global adapter is dead (A's row and B's column both zero: no
    gradient can revive it), and no round counts that carried no step."""
    arrays = run.arrays[server_round]
    for a_key, b_key in multiplying_pairs(arrays):
        a, b = arrays[a_key], arrays[b_key]
        dead = np.flatnonzero(~np.any(a, axis=1) & ~np.any(b, axis=0))
        assert not len(dead), f"round {server_round}: LoRA slots {dead.tolist()} of {a_key} are dead"
    if server_round == 0:
        return
    row = next(r for r in run.rows() if r["round"] == server_round)
    if row.get("clients-ok"):
        steps = row.get("zo-seeds") if run.cfg.algorithm.name == "zo" else row.get("examples-seen")
        if run.cfg.privacy.record_level and run.cfg.algorithm.name != "zo":  # the drawn count stays on the site
            steps = row.get("dp-steps")
        assert steps, f"round {server_round} counted with no step taken ({row})"


#: Row keys that depend on time, memory or the process, not on what was computed.
UNTIMED = ("seconds", "time", "train-seconds", "eval-seconds", "aggregate-seconds", "peak-memory-mb",
           "model-load-seconds", "process-start-seconds", "catch-up-seconds", "torch-threads")  # fmt: skip


def check_resume(whole, first, resumed) -> None:  # noqa: ANN001 - federation.Run
    """A run stopped after round 1 and resumed equals the run that never stopped, bit for
    bit: the final global adapter (and what the strategy carries), and every figure of
    every round's row that does not measure time or memory."""
    from fedllm_flwr.run_dir import RunDir

    a_round, a_arrays, a_state = RunDir(whole.path).read_checkpoint()
    b_round, b_arrays, b_state = RunDir(resumed.path).read_checkpoint()
    assert a_round == b_round == whole.cfg.num_rounds
    for ours, theirs in ((a_arrays, b_arrays), (a_state, b_state)):
        assert set(ours) == set(theirs)
        differ = [k for k in ours if not np.array_equal(ours[k], theirs[k])]
        assert not differ, f"the resumed run differs in {len(differ)} tensors, e.g. {differ[0]}"
    for a, b in zip(whole.rows(), resumed.rows(), strict=True):
        # The round a run stopped at is its last: it also has what a run scores only at
        # its end (task=dpo's answers to the test prompts), which the whole run's lacks.
        keys = set(a) | set(b) if a["round"] != first.cfg.rounds_to_run else set(a)
        for key in sorted(keys):
            if key in UNTIMED or key.endswith(("-seconds", "-bytes")) or "bytes" in key:
                continue
            assert a.get(key) == b.get(key), f"round {a['round']}: {key} {a.get(key)} != {b.get(key)}"
