"""The FedOT plug-in (`Fedot`): what the core asks of `algorithm=fedot`. Light at
import: each method imports the modules it needs (see the package's docstring)."""

from __future__ import annotations

from typing import Any

from flwr.app import RecordDict

from fedllm_flwr.algorithms.base import Algorithm, ServerModel
from fedllm_flwr.keys import EMULATOR_ID_KEY


class Fedot(Algorithm):
    """Adapters both ways, trained on the emulator a node is sent once."""

    model_before_first_round = False  # the model is the emulator the first round brings: a warm-up loads data only
    server_writes_model_cache = True  # the emulators it builds and sends are kept there

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.setup = None
        """The server's full model and emulator (`emulator.FedotSetup`), once built."""

    def node_config(self, cfg: Any, content: RecordDict) -> Any:
        """The config that trains on the emulator the message names, installing it from
        the files it carries (a node's first message) or finding it installed."""
        from fedllm_flwr.algorithms.fedot import emulator
        from fedllm_flwr.algorithms.fedot.emulator_files import emulator_files
        from fedllm_flwr.model_files import model_cache_dir

        emulator_id = str(content["config"].get(EMULATOR_ID_KEY, ""))
        if not emulator_id:
            raise ValueError("algorithm=fedot, but the server's message names no emulator")
        files = emulator_files(content)
        cache = model_cache_dir(cfg.model)
        folder = emulator.install(files, emulator_id, cache) if files else emulator.installed(emulator_id, cache)
        if folder is None:
            raise ValueError(
                f"emulator {emulator_id[:16]} is not installed on this node and the message does not carry it"
            )
        return emulator.client_config(cfg, folder)

    def server_model(self) -> ServerModel:
        """The emulator's bundle (its adapter state travels), evaluated on the full model
        (and on the emulator, `emu-`); each node is sent the emulator with its first message."""
        from fedllm_flwr.algorithms.fedot.server import emulator_message, prepare_server

        self.setup, views = prepare_server(self.cfg)
        return ServerModel(self.setup.emulator, views, {EMULATOR_ID_KEY: self.setup.fingerprint},
                           emulator_message(self.setup))  # fmt: skip

    def summary(self, strategy: Any, first: dict, last: dict, primary: str | None) -> dict | None:
        from fedllm_flwr.algorithms.fedot.server import summary

        return summary(self.setup, strategy, first, last, primary) if self.setup is not None else None
