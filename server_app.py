"""Flower ServerApp: config -> federated adapter training -> run folder."""

from logging import ERROR

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedllm_flwr.config import load_cfg
from fedllm_flwr.errors import UserError
from fedllm_flwr.preflight import check_external
from fedllm_flwr.tracking import check_installed
from fedllm_flwr.worker_start import send_warm_up

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = load_cfg(context.run_config)
        check_installed(cfg)  # light checks first: a run that cannot start sends no message
        check_external(cfg)
        # Simulation workers start up while this process imports the ML stack.
        warm_ups = send_warm_up(grid) if cfg.run.warm_up else []
        from fedllm_flwr import quiet_third_party_output
        from fedllm_flwr.server.run import run_server

        quiet_third_party_output()
        run_server(grid, cfg, warm_ups)
    except UserError as exc:
        # One clear line in the run's log. Raising fails the run (`flwr ls` shows
        # it with this message); re-raised bare, the traceback stays short.
        log(ERROR, "[fedllm-flwr] %s", exc)
        raise UserError(str(exc)) from None
