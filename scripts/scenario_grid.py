"""FS-LLM's comparison on the default offline task: scenarios x PEFT methods x seeds.

    python scripts/scenario_grid.py --out ~/fedllm-flwr/grid [--seeds 0,1,2]
        [--scenarios global,fed,local] [--methods lora,prompt_tuning,p_tuning,prefix_tuning]
        [-- EXTRA HYDRA OVERRIDES]

Each cell is one `flwr run` of this app (2 simulated SuperNodes) on a SuperLink the
script starts on 127.0.0.1 and stops by PID. Finished cells are skipped, so an
interrupted grid resumes. At the end it writes OUT/report/ with
`fedllm-flwr report`'s effectiveness and efficiency tables.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fedllm_tools.report import load_run, write_report
from fedllm_tools.simulation import LocalSimulation, stop_on_sigterm

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--scenarios", default="global,fed,local")
    parser.add_argument("--methods", default="lora,prompt_tuning,p_tuning,prefix_tuning")
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to every cell")
    args = parser.parse_args()
    out = args.out.expanduser().resolve()
    cells = [
        (scenario, method, int(seed))
        for seed in args.seeds.split(",")
        for method in args.methods.split(",")
        for scenario in args.scenarios.split(",")
    ]
    t_grid = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedllm-grid-") as tmp, LocalSimulation(Path(tmp)) as sim:
        for index, (scenario, method, seed) in enumerate(cells, start=1):
            name = f"{scenario}-{method}-s{seed}"
            if load_run(out / name):
                print(f"[{index}/{len(cells)}] {name}: done already", flush=True)
                continue
            overrides = [f"scenario={scenario}", f"peft={method}", f"seed={seed}", *args.extra]
            overrides += [f"run.output_dir={out}", f"run.name={name}"]
            if (out / name).exists():  # an interrupted attempt: start the cell again
                shutil.rmtree(out / name)
            t0 = time.perf_counter()
            result = sim.run(ROOT, overrides=" ".join(overrides), num_supernodes=args.supernodes, timeout=3600)
            ok = load_run(out / name) is not None
            status = "ok" if ok else f"FAILED (log: {out / name}.log)"
            print(f"[{index}/{len(cells)}] {name}: {status} in {time.perf_counter() - t0:.0f} s", flush=True)
            if not ok:
                (out / f"{name}.log").write_text(result.stdout)
    markdown, failed = write_report([out], out / "report")
    print(markdown)
    print(f"grid: {len(cells)} cells in {(time.perf_counter() - t_grid) / 60:.1f} min; report in {out / 'report'}")
    return 1 if failed else 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
