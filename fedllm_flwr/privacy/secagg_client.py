"""The client's side of SecAgg+ (privacy=secagg): its reply, and Flower's client mod
that masks it. Light at import: the ClientApp installs the mod when it loads."""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, RecordDict


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001 - Flower's mod
    """Flower's SecAgg+ client mod, for the protocol's messages only."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, call_next)


def private_reply(cfg, update: dict[str, np.ndarray], metrics: dict) -> RecordDict | None:  # noqa: ANN001 - a Config
    """The reply `privacy=` has a node send in place of the plain one: under SecAgg+
    (`secagg`, or `dp_sgd` with `privacy.secagg`), the update flat for
    `secure_aggregation_mod` to mask; None: the plain reply (under dp, clipped to the
    norm Flower's wrapper sends, `fedllm_flwr.node.train`)."""
    return secagg_reply(update, metrics) if cfg.privacy.masked else None


def secagg_reply(update: dict[str, np.ndarray], metrics: dict) -> RecordDict:
    """A client's update as one flat fp32 vector in Flower's legacy FitRes layout,
    which `secure_aggregation_mod` quantizes and masks before it leaves."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    flat = np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in update.values()])
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([flat]), int(metrics["num-examples"]), dict(metrics))
    return compat.fitres_to_recorddict(fitres, keep_input=True)
