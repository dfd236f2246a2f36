"""What privacy costs: per-client DP and SecAgg+ against per-record DP-SGD on the same task.

    python benchmarks/privacy.py --out benchmarks/results/privacy [--epsilons 1,3,8]
        [--only NAME,...] [--zo-rounds 10] [--zo-steps 50] [-- OVERRIDES]

The default job (SmolLM2-135M-Instruct, LoRA r=8, the built-in offline task over 2
simulated SuperNodes, 3 rounds of 10 steps at batch 8), each setting one `flwr run .` on a
private SuperLink stopped by PID when it ends; a job whose run folder already holds a
summary is read, not run again, so an interrupted study resumes:

- `plain`: FedAvg, nothing private; `secagg`: SecAgg+ (`privacy=secagg`); `dp-z1`:
  client-level DP-FedAvg at noise multiplier 1 (`privacy=dp`), the rows the toolkit had
  before per-record DP;
- `lora-dpsgd-eps<e>`, `ffa_lora-dpsgd-eps<e>` (and the non-private `ffa_lora`): per-record
  DP-SGD at each site (`privacy=dp_sgd`) with `privacy.target_epsilon=<e>` at delta 1e-5,
  so each site sets its noise to spend exactly e over the run's 30 steps;
- `zo`, `zo-dp-eps<e>`: zeroth-order federation (seed-only messages, `algorithm=zo`,
  `--zo-rounds` rounds of `--zo-steps` MeZO steps, lr 5e-4, eps 1e-2: the rates of
  benchmarks/zo.py) without and with per-record DP on each step's scalar, each record's
  difference clipped to C = 10 (`ZO_CLIP`), and once at C = 1 (`zo-dp-c1-eps<e>`);
- `large`, `large-dpsgd-eps<largest e>`: LoRA on sites ten times larger (3,600 records
  each, of the families add, reverse, uppercase and sort, which have that many distinct
  records) with an expected batch of 64 (`train.grad_accum=8`), without and with DP-SGD:
  the noise on a step's mean is z C / qN per coordinate, so larger sites and batches
  leave more of the signal.

Reports per setting: final exact-match accuracy and eval loss on the server's test set,
each site's epsilon, the noise multiplier the sites chose, mean training seconds per
step and the clients' peak memory (against the non-private job of the same kind), and
bytes up per client per round. Writes OUT/results.json and OUT/results.md and prints the
results as one JSON object. Not a test: about 90 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

from fedllm_flwr.metrics import read_metrics
from fedllm_tools.simulation import LocalSimulation, stop_on_sigterm
from fedllm_tools.tables import cell

ROOT = Path(__file__).resolve().parents[1]
ZO_RATES = ["zo.lr=5e-4", "zo.eps=1e-2"]
#: A record's two-point difference along z on the default task is about 1 to 16 at the
#: start (one batch of 8, three draws of z): C = 1 clips nearly every one, C = 10 few.
ZO_CLIP = 10.0
#: Sites ten times larger (3,600 records each: families with that many distinct records)
#: and an expected batch of 64: what DP-SGD's noise on the mean (z C / qN) asks for.
LARGE = ["dataset.synthetic.tasks=[add,reverse,uppercase,sort]", "dataset.synthetic.train_per_task=2000",
         "train.grad_accum=8"]  # fmt: skip


def settings(epsilons: list[float], zo_rounds: int, zo_steps: int) -> dict[str, list[str]]:
    """Setting name -> its overrides, in the order they run."""
    out: dict[str, list[str]] = {"plain": [], "secagg": ["privacy=secagg"],
                                 "dp-z1": ["privacy=dp", "privacy.noise_multiplier=1.0"],
                                 "ffa_lora": ["peft=ffa_lora"]}  # fmt: skip
    for method in ("lora", "ffa_lora"):
        for eps in epsilons:
            out[f"{method}-dpsgd-eps{eps:g}"] = [f"peft={method}", "privacy=dp_sgd", f"privacy.target_epsilon={eps}"]
    zo = ["algorithm=zo", f"num_rounds={zo_rounds}", f"train.local_steps={zo_steps}", f"eval.every={zo_rounds}",
          *ZO_RATES]  # fmt: skip
    out["zo"] = zo
    for eps in epsilons:
        out[f"zo-dp-eps{eps:g}"] = [
            *zo,
            "privacy=dp_sgd",
            f"privacy.target_epsilon={eps}",
            f"privacy.clipping_norm={ZO_CLIP}",
        ]
    out[f"zo-dp-c1-eps{max(epsilons):g}"] = [*zo, "privacy=dp_sgd", f"privacy.target_epsilon={max(epsilons)}"]
    out["large"] = LARGE
    out[f"large-dpsgd-eps{max(epsilons):g}"] = [*LARGE, "privacy=dp_sgd", f"privacy.target_epsilon={max(epsilons)}"]
    return out


def baseline_of(name: str) -> str:
    """The non-private job a setting's costs are compared with."""
    for kind in ("zo", "ffa_lora", "large"):
        if name.startswith(kind):
            return kind
    return "plain"


def run_job(sim: LocalSimulation, name: str, overrides: list[str], runs: Path) -> dict:
    folder = sim.run_once(ROOT, runs, name, overrides, num_supernodes=2, timeout=5400)
    rows = read_metrics(folder)
    summary = json.loads((folder / "summary.json").read_text())
    privacy = summary.get("privacy") or {}
    trained = [r for r in rows[1:] if r.get("clients-ok")]
    steps = int(yaml.safe_load((folder / "config.yaml").read_text())["train"]["local_steps"])
    return {
        "accuracy": rows[-1].get("accuracy"),
        "accuracy_round_0": rows[0].get("accuracy"),
        "eval_loss": rows[-1].get("eval-loss"),
        "eval_loss_round_0": rows[0].get("eval-loss"),
        "rounds": len(rows) - 1,
        "steps_per_round": steps,
        "seconds_per_step": round(sum(r["train-seconds"] for r in trained) / len(trained) / steps, 3),
        "peak_memory_mb": max(r["peak-memory-mb"] for r in trained),
        "bytes_up_per_client_per_round": round(sum(r["bytes-up"] / r["clients-ok"] for r in trained) / len(trained)),
        "level": "record" if privacy.get("level") == "record" else "client" if privacy.get("name") == "dp" else None,
        "epsilon": privacy.get("epsilon"),
        "site_epsilon": privacy.get("site-epsilon"),
        "target_epsilon": privacy.get("target-epsilon"),
        "noise_multiplier": privacy.get("noise-multiplier"),
        "delta": privacy.get("delta"),
        "seconds": summary.get("seconds"),
    }


def with_ratios(results: dict) -> dict:
    """Each setting's seconds per step and peak memory over its non-private baseline's."""
    for name, r in results.items():
        base = results.get(baseline_of(name))
        if base:
            r["step_time_ratio"] = round(r["seconds_per_step"] / base["seconds_per_step"], 2)
            r["memory_ratio"] = round(r["peak_memory_mb"] / base["peak_memory_mb"], 2)
            if base["accuracy"]:
                r["accuracy_share"] = round(r["accuracy"] / base["accuracy"], 2)
    return results


def markdown(results: dict) -> str:
    lines = ["| setting | DP level | epsilon (delta 1e-5) | noise z | exact match | of non-private | eval loss "
             "| s / step (x non-private) | peak memory MB (x) | bytes up / client / round |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['level'] or '-'} | {cell(r['epsilon'], '.3g', '-')} "
            f"| {cell(r['noise_multiplier'], '.3g', '-')} | {cell(r['accuracy'], '.3f', '-')} "
            f"| {cell(r.get('accuracy_share'), '.2f', '-')} | {cell(r['eval_loss'], '.4f', '-')} "
            f"| {r['seconds_per_step']:.2f} ({cell(r.get('step_time_ratio'), '.2f', '-')}) "
            f"| {r['peak_memory_mb']:,.0f} ({cell(r.get('memory_ratio'), '.2f', '-')}) "
            f"| {r['bytes_up_per_client_per_round']:,} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


#: Each family of private settings (their name's start) and the job without DP it is compared with.
FAMILIES = {"lora-dpsgd": ("LoRA with DP-SGD", "plain"), "ffa_lora-dpsgd": ("FFA-LoRA with DP-SGD", "ffa_lora"),
            "zo-dp": ("Zeroth-order with DP on each step's scalar, C = 10", "zo"),
            "zo-dp-c1": ("Zeroth-order with DP on each step's scalar, C = 1", "zo"),
            "large-dpsgd": ("LoRA with DP-SGD on the ten-times-larger sites, batch 64", "large")}  # fmt: skip


def report(results: dict) -> str:
    """The table and what it shows, every figure read from `results` (docs/hooks.py)."""
    lines = []
    for prefix, (label, base_name) in FAMILIES.items():
        rows = {n: r for n, r in results.items() if n.startswith(prefix + "-eps")}
        base = results.get(base_name)
        if not rows or not base:
            continue
        eps = "/".join(cell(r["epsilon"], ".2g", "-") for r in rows.values())
        accuracy = "/".join(cell(r["accuracy"], ".2f", "-") for r in rows.values())
        loss = "/".join(cell(r["eval_loss"], ".2f", "-") for r in rows.values())
        times = [r["step_time_ratio"] for r in rows.values() if "step_time_ratio" in r]
        memory = [r["memory_ratio"] for r in rows.values() if "memory_ratio" in r]
        lines.append(
            f"- **{label}**: exact match {accuracy} and eval loss {loss} at epsilon {eps}, against "
            f"{cell(base['accuracy'], '.2f', '-')} and {cell(base['eval_loss'], '.2f', '-')} without DP (eval loss "
            f"{cell(base.get('eval_loss_round_0', results['plain'].get('eval_loss_round_0')), '.2f', '-')} before "
            f"training); a step took {min(times):.2f}-{max(times):.2f}x the time and "
            f"{min(memory):.2f}-{max(memory):.2f}x the peak memory of one without DP."
        )
    client = results.get("dp-z1")
    if client:
        lines.append(
            f"- **Client-level DP** at z = 1 (epsilon {cell(client['epsilon'], '.2g', '-')} for all a site holds): "
            f"exact match {cell(client['accuracy'], '.2f', '-')}, eval loss {cell(client['eval_loss'], '.2f', '-')}."
        )
    return markdown(results) + "\n" + "\n".join(lines) + "\n"


def summary(results: dict) -> str:
    """The README's short table: each setting's epsilon and exact match against its non-private job."""
    lines = ["| setting | DP level | epsilon (delta 1e-5) | exact match | of non-private |", "|---|---|---|---|---|"]
    for name, r in results.items():
        share = cell(r.get("accuracy_share"), ".2f", "-")
        lines.append(f"| {name} | {r['level'] or '-'} | {cell(r['epsilon'], '.3g', '-')} "
                     f"| {cell(r['accuracy'], '.3f', '-')} | {share} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epsilons", default="1,3,8", help="comma-separated record-level epsilons")
    parser.add_argument("--only", default="", help="comma-separated settings to run (default: all)")
    parser.add_argument("--zo-rounds", type=int, default=10)
    parser.add_argument("--zo-steps", type=int, default=50)
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to every job")
    args = parser.parse_args()
    try:
        epsilons = [float(e) for e in args.epsilons.split(",") if e]
    except ValueError:
        parser.error(f"--epsilons {args.epsilons!r}: give numbers separated by commas")
    jobs = settings(epsilons, args.zo_rounds, args.zo_steps)
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in jobs]
    if unknown:
        parser.error(f"--only: no setting {unknown[0]!r}; the settings are {', '.join(jobs)}")
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="fedllm-privacy-") as tmp, LocalSimulation(Path(tmp)) as sim:
        for name, overrides in jobs.items():
            if only and name not in only:
                continue
            results[name] = run_job(sim, name, ["train.threads=1", *overrides, *args.extra], out / "runs")
            results = with_ratios({n: results[n] for n in jobs if n in results})
            results_file.write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
