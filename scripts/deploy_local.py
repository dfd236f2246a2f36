"""Run this app on the deployment runtime: a SuperLink and N SuperNodes on 127.0.0.1.

    python scripts/deploy_local.py --nodes 2 [-- HYDRA OVERRIDES]
    python scripts/deploy_local.py --data site_a.jsonl,site_b.jsonl -- dataset.test_path=/abs/test.jsonl

TLS and SuperNode authentication are on: the credentials (a local CA, the
SuperLink's certificate, one key pair per SuperNode) are created in
`--credentials` if missing, and every SuperNode's public key is registered
before it starts. `--insecure` turns both off. With `--data`, SuperNode i reads
only the i-th file (`dataset.source=sites`); otherwise each gets partition i of
N of the configured dataset. Every process is stopped by PID when the run ends,
fails, or this script is interrupted. Logs stay in `--workdir`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fedllm_flwr.run_dir import home_dir
from fedllm_tools.deploy import LocalDeployment, make_credentials
from fedllm_tools.simulation import stop_on_sigterm

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes to start (default 2)")
    parser.add_argument("--data", default="", help="comma-separated site files, one per SuperNode")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication")
    parser.add_argument("--credentials", type=Path, default=home_dir() / "deploy" / "credentials")
    parser.add_argument("--workdir", type=Path, default=None, help="logs and SuperLink state (default: a new folder)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the run")
    args = parser.parse_args()
    sites = [str(Path(p).expanduser().resolve()) for p in args.data.split(",") if p]
    for site in sites:
        if not Path(site).is_file():
            parser.error(f"--data: {site} does not exist")
    nodes = len(sites) or args.nodes
    if nodes < 1:
        parser.error("--nodes must be >= 1")
    workdir = args.workdir or home_dir() / "deploy" / time.strftime("%Y%m%d-%H%M%S")
    overrides = list(args.overrides)
    if sites:
        overrides.insert(0, "dataset.source=sites")
    if not any(o.startswith("strategy.min_available_nodes=") for o in overrides):
        overrides.append(f"strategy.min_available_nodes={nodes}")
    # Co-located SuperNodes share this machine's cores.
    threads = max(1, (os.cpu_count() or 1) // nodes)
    if not any(o.startswith("train.threads=") for o in overrides):
        overrides.append(f"train.threads={threads}")
    credentials = None if args.insecure else make_credentials(args.credentials.expanduser(), nodes)
    mode = "insecure" if credentials is None else f"TLS + SuperNode authentication ({credentials.folder})"
    print(f"[deploy] {nodes} SuperNodes, {mode}; logs in {workdir}", flush=True)
    t0 = time.perf_counter()
    with LocalDeployment(workdir, credentials, env={"OMP_NUM_THREADS": str(threads)}) as deployment:
        for i in range(nodes):
            if credentials is not None:
                deployment.register(i)
            config = {"data-path": sites[i]} if sites else {"partition-id": i, "num-partitions": nodes}
            node = deployment.start_node(i, config)
            print(f"[deploy] SuperNode {i} (PID {node.process.pid}): {config}", flush=True)
        t_run = time.perf_counter()
        result = deployment.run(ROOT, " ".join(overrides), timeout=args.timeout, echo=True)
        took = time.perf_counter() - t_run
    done = "[fedllm-flwr] done in" in result.stdout
    print(
        f"[deploy] run {'completed' if done else 'FAILED'} in {took:.1f} s "
        f"({time.perf_counter() - t0:.1f} s with start-up); every process stopped",
        flush=True,
    )
    return 0 if done else 1


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
