"""FS-LLM's PEFT comparison done fairly: every method at its own best learning rate,
on each base model, in the global, fed and local scenarios.

    python scripts/method_study.py --out ~/fedllm-flwr/study [--models smollm2,gemma3]
        [--methods lora,prompt_tuning,p_tuning,prefix_tuning] [--seeds 0,1,2]
        [--sweep-rounds 5] [--screen-rounds 1] [--keep 0.34] [--extend 2] [--rounds 10]
        [--check-rounds 20] [--check-every 2] [-- EXTRA HYDRA OVERRIDES]

Per model (a `conf/model/` preset), three stages, each job a `flwr run` of this app on
one simulation SuperLink and Ray instance that the script starts on 127.0.0.1 and
stops at the end:

1. `OUT/<model>/lr/`: a learning-rate sweep in the fed scenario (seed 0). LoRA takes
   FS-LLM's grid {1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 5e-3}; the prompt methods the same
   grid extended to {1e-2, 3e-2, 1e-1}. Every rate first runs `--screen-rounds` rounds
   (an exact prefix of the full run: the schedule spans `--sweep-rounds`), then the best
   `--keep` share per method (by the task metric after the screen, ties to the lower
   loss) runs to the end. While a method's best full run sits at an end of its rates,
   the next rate past it (1, 3, 10, 30, ... per decade) runs too, at most `--extend`
   times: an optimum at the grid's edge is not yet the method's best rate. The folder is
   a sweep folder (`fedllm-flwr sweep-summary`).
2. `OUT/<model>/grid/`: each method at its best rate (by the final task metric of
   stage 1) in every scenario and seed, for `--rounds` rounds; `OUT/<model>/report/`
   holds the tables of `fedllm-flwr report`. The fed cells of the first seed are
   evaluated after every round.
3. `OUT/<model>/rounds/`: each method at its rate in the fed scenario (first seed) for
   `--check-rounds` rounds, scored every `--check-every`: set beside the sweep's run and
   the grid's fed run at the same rate, they show whether the curves had flattened at
   the grid's budget and how far each method goes on a longer one
   (`OUT/<model>/rounds.png` draws all three).

At the end `OUT/findings.md` (and `.json`) checks FS-LLM's findings on each model (the
fourth with two losses: the clients' held-out loss and the server's test-set loss), and
`OUT/lr_curves.png` plots the task metric and test-set loss against the learning rate
(`method_study_findings.py`; `--report-only` writes them from the runs so far).
Finished jobs are kept and the job it stopped in goes on from its last checkpointed
round, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

from fedllm_tools.report import find_runs, write_report
from fedllm_tools.simulation import stop_on_sigterm
from fedllm_tools.sweep import Job, JobRunner, Progress
from fedllm_tools.sweep_summary import best_per_method, keep_best, read_sweep, summarize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from method_study_findings import plot_lr_curves, write_findings  # noqa: E402

FS_LLM_GRID = (1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 5e-3)
PROMPT_EXTRA = (1e-2, 3e-2, 1e-1)
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")
# fp32 on every machine: `train.precision=auto` is bf16 only on CPUs that compute in it,
# and the study's figures must not depend on which CPU ran them.
PINNED = ("train.precision=fp32",)


def lr_grid(method: str) -> tuple[float, ...]:
    return FS_LLM_GRID + (PROMPT_EXTRA if method in PROMPT_METHODS else ())


def beyond(lr: float, up: bool) -> float:
    """The next rate past `lr` on the ladder 1, 3, 10, 30, ... (5e-3 -> 1e-2, 1e-1 -> 3e-1)."""
    k = math.floor(math.log10(lr))
    ladder = [float(f"{m * 10.0**e:g}") for e in range(k - 2, k + 3) for m in (1, 3)]
    return min(x for x in ladder if x > 1.5 * lr) if up else max(x for x in ladder if x < lr / 1.5)


def lr_stage(
    runner: JobRunner, methods: list[str], common: list[str], screen: int, keep: float, lrs=None, extend: int = 2
) -> dict:
    """Screen every rate, run the kept ones to the end, summarise the sweep folder.
    A method whose best full run sits at an end of the rates swept is not yet at its best
    rate: up to `extend` times, the next rate past that end is screened and run in full."""

    def job(method: str, lr: float, stage: str, progress: Progress | None = None) -> None:
        overrides = [f"peft={method}", f"train.lr={lr:g}", "scenario=fed", "seed=0", *common]
        if stage == "screen":
            overrides.append(f"run.stop_after={screen}")
        if progress:
            progress.next(f"{stage}_{method}_{lr:g}", overrides)
        # A full run starts from scratch here, as when the committed figures were made;
        # `go_on_from` its screen would end at the same adapter and save the screen's rounds.
        runner.run(f"{stage}_{method}_{lr:g}", overrides, stage)

    model = runner.sweep_dir.parent.name
    grids = {m: [float(f"{lr:g}") for lr in lrs or lr_grid(m)] for m in methods}
    n_screens = sum(map(len, grids.values()))
    screens = Progress(f"[study] {model} rate sweep, screens", n_screens, runner.sweep_dir, "screen")
    for method in methods:
        for lr in grids[method]:
            job(method, lr, "screen", screens)
    records = [r for r in read_sweep(runner.sweep_dir) if r.stage == "screen" and r.status == "completed"]
    kept = []
    for method in methods:  # kept among the grid's rates only, so extensions never change the kept set
        group = [r for r in records if r.method == method and r.score is not None and r.lr in grids[method]]
        kept += keep_best(group, {r.name: (r.score, -(r.eval_loss or 0.0)) for r in group}, keep) if group else []
    full = Progress(f"[study] {model} rate sweep, full runs", len(kept), runner.sweep_dir)
    for r in kept:
        job(r.method, r.lr, "full", full)
    for method in methods:
        for _ in range(extend):
            done = [r for r in read_sweep(runner.sweep_dir) if r.method == method and r.status == "completed"]
            best = best_per_method(done).get(method)
            # The grid's rates and the extensions run in full: an extension stopped after its
            # screen is not yet swept, so a resumed study finishes it as an unbroken one would.
            rates = sorted(set(grids[method]) | {r.lr for r in done if r.stage == "full"})
            if best is None or rates[0] < best.lr < rates[-1]:
                break
            lr = beyond(best.lr, up=best.lr == rates[-1])
            print(f"[study] {method}: best rate {best.lr:g} is at the end of those swept; extending to {lr:g}")
            job(method, lr, "screen")
            job(method, lr, "full")
    return summarize(runner.sweep_dir, keep)


def grid_stage(
    runner: JobRunner, best: dict[str, float], seeds: list[int], common: list[str], lr_dir: Path, rounds: int
) -> None:
    """Each method at its rate in every scenario and seed. The server evaluates after the
    last round only, not at round 0 either: only final figures are compared; the fed
    cells of the first seed after every round and at round 0, for their curves."""
    progress = Progress(f"[study] {runner.sweep_dir.parent.name} grid", len(seeds) * len(best) * 3, runner.sweep_dir)
    for seed in seeds:
        for method, lr in best.items():
            for scenario in ("global", "fed", "local"):
                base = [f"peft={method}", f"train.lr={lr:g}", f"scenario={scenario}", f"seed={seed}", *common]
                overrides, as_swept = [*base, f"eval.every={rounds}", "eval.initial=false"], [*base, "eval.every=1"]
                name = f"{scenario}-{method}-s{seed}"
                if scenario == "fed" and seed == seeds[0]:
                    overrides = as_swept
                same = lr_dir / f"full_{method}_{lr:g}"  # the sweep's run, when it had these rounds
                if not (runner.sweep_dir / name).exists() and JobRunner.finished(same, Job(name, as_swept)):
                    shutil.copytree(same, runner.sweep_dir / name)
                    print(f"[study] {name}: the same run as {same.name} of the rate sweep, copied", flush=True)
                if JobRunner.finished(runner.sweep_dir / name, Job(name, as_swept)):
                    overrides = as_swept  # the same training, evaluated after every round as well
                progress.next(name, overrides)
                runner.run(name, overrides)


def rounds_stage(
    runner: JobRunner, best: dict[str, float], seed: int, common: list[str], rounds: int, every: int
) -> None:
    """Each method at its rate, fed, for `rounds` rounds (a longer budget than the grid's),
    scored every `every` rounds and after the last: had the grid's curves flattened?"""
    progress = Progress(f"[study] {runner.sweep_dir.parent.name} rounds check", len(best), runner.sweep_dir)
    for method, lr in best.items():
        overrides = [f"peft={method}", f"train.lr={lr:g}", "scenario=fed", f"seed={seed}", *common,
                     f"eval.every={every}"]  # fmt: skip
        progress.next(f"fed-{method}-s{seed}-r{rounds}", overrides)
        runner.run(f"fed-{method}-s{seed}-r{rounds}", overrides)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--methods", default="lora,prompt_tuning,p_tuning,prefix_tuning")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sweep-rounds", type=int, default=5, help="rounds of the rate sweep's runs")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the grid's runs")
    parser.add_argument("--check-rounds", type=int, default=20, help="rounds of the fed check runs (0: none)")
    parser.add_argument("--check-every", type=int, default=2, help="the check runs are scored every N rounds")
    parser.add_argument("--screen-rounds", type=int, default=1)
    parser.add_argument("--keep", type=float, default=0.34)
    parser.add_argument("--extend", type=int, default=2, help="rates added past an end of the grid, per method")
    parser.add_argument("--lrs", default="", help="rates to sweep for every method (default: the grids above)")
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--report-only", action="store_true", help="write the tables and findings from the runs so far")
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to every job")
    args = parser.parse_args()
    out = args.out.expanduser().resolve()
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    t_study = time.perf_counter()
    results = {}
    for model in args.models.split(","):
        common = [f"model={model}", f"num_rounds={args.rounds}", *PINNED, *args.extra]
        t0 = time.perf_counter()
        if args.report_only:
            if not (out / model / "grid").is_dir():
                continue
            best = {m: r.lr for m, r in best_per_method(read_sweep(out / model / "lr")).items() if m in methods}
            summary = summarize(out / model / "lr", args.keep)
            write_report([out / model / "grid"], out / model / "report")
            results[model] = {"best-lr": best, "lr-summary": summary}
            continue
        runner = JobRunner(out / model / "lr", args.supernodes, args.timeout)
        try:
            lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else None
            swept = [f"model={model}", f"num_rounds={args.sweep_rounds}", *PINNED, *args.extra, "eval.every=1"]
            summary = lr_stage(runner, methods, swept, args.screen_rounds, args.keep, lrs, args.extend)
            best = {m: r.lr for m, r in best_per_method(read_sweep(runner.sweep_dir)).items() if m in methods}
            print(f"[study] {model}: best rates {best}", flush=True)
            runner.sweep_dir = out / model / "grid"
            grid_stage(runner, best, seeds, common, out / model / "lr", args.rounds)
            if args.check_rounds:
                runner.sweep_dir = out / model / "rounds"
                longer = [f"model={model}", f"num_rounds={args.check_rounds}", *PINNED, *args.extra]
                rounds_stage(runner, best, seeds[0], longer, args.check_rounds, args.check_every)
        finally:
            runner.close()
        write_report([out / model / "grid"], out / model / "report")
        results[model] = {"best-lr": best, "lr-summary": summary, "minutes": (time.perf_counter() - t0) / 60}
    if not results:
        print(f"[study] {out}: no finished grid runs to report on", file=sys.stderr)
        return 1
    markdown = write_findings(out, results, seeds[0])
    plot_lr_curves(out, list(results), out / "lr_curves.png")
    print(markdown)
    print(f"[study] done in {(time.perf_counter() - t_study) / 60:.1f} min (this invocation); {out / 'findings.md'}")
    if not args.report_only:
        (out / "study.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    runs, failed = find_runs([out / m / "grid" for m in results])
    return 1 if failed else 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
