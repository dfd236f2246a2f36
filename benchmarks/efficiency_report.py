"""Targets and the markdown summary of benchmarks/efficiency.py's results."""

from __future__ import annotations

from fedllm_tools.tables import cell, markdown_table

TARGETS = {
    "overhead_ratio": 1.05,
    "job_p_peak_memory_gb": 3.5,
    "int8_bytes_ratio": 0.55,
    "int8_loss_within": 0.02,
    "shared_base_8_vs_1": 1.2,
    "sweep_job_overhead_seconds": 8.0,
}
#: Reported for Flower's own LLM example on job P on this machine kind (not measured here).
FLOWER_EXAMPLE_ON_JOB_P = {
    "seconds": "241-246",
    "overhead_ratio": "1.17-1.19",
    "bytes_per_client_per_round": "1.87 MB (fp32) each way",
    "peak_memory_all_processes_gb": "5.4-6.2",
}


def check_targets(results: dict) -> dict:
    checks = {}
    over = results.get("overhead")
    if over:
        for name in ("job_p", "default"):
            checks[f"overhead ratio {name} <= {TARGETS['overhead_ratio']}"] = (
                over[name]["ratio"] <= TARGETS["overhead_ratio"]
            )
        for name in ("job_p", "job_p_checkpointing"):
            if name not in over:
                continue
            peak = over[name]["flwr"]["peak_memory_mb"]
            for kind in ("pss", "rss"):
                gb = peak[f"{kind}-mb"] * 2**20 / 1e9
                checks[f"{name} peak memory ({kind.upper()} sum) <= {TARGETS['job_p_peak_memory_gb']} GB"] = (
                    gb <= TARGETS["job_p_peak_memory_gb"]
                )
    comp = results.get("compression")
    if comp:
        int8 = comp["modes"]["int8"]
        ratio = max(int8["bytes_down_ratio"], int8["bytes_up_ratio"])
        checks[f"int8 bytes <= {TARGETS['int8_bytes_ratio']}x fp16"] = ratio <= TARGETS["int8_bytes_ratio"]
        checks[f"int8 final eval loss within {TARGETS['int8_loss_within']:.0%} of fp16"] = (
            abs(int8["eval_loss_ratio"] - 1) <= TARGETS["int8_loss_within"]
        )
    mem = results.get("memory")
    if mem:
        eight = next(r for r in mem["runs"] if r["clients_per_worker"] == 8 and r["shared_base"])
        checks[f"shared base: 8 clients per worker <= {TARGETS['shared_base_8_vs_1']}x 1 client"] = (
            eight["vs_1_client"] <= TARGETS["shared_base_8_vs_1"]
        )
    sweep = results.get("sweep")
    if sweep:
        limit = TARGETS["sweep_job_overhead_seconds"]
        checks[f"sweep: each job after the first <= {limit:.0f} s beyond its clients' training"] = (
            sweep["later_jobs_overhead_seconds_max"] <= limit
        )
    return checks


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table; floats from 1,000 up as whole numbers, smaller ones to 4 significant digits."""

    def auto(value) -> str:
        if isinstance(value, float) and not isinstance(value, bool):
            return cell(value, ",.0f" if abs(value) >= 1000 else ".4g")
        return cell(value)

    return markdown_table(header, [[auto(v) for v in row] for row in rows]) + [""]


def summary(results: dict) -> str:
    m = results["machine"]
    lines = [f"# Efficiency suite ({m['device']}, {m['cpus']} CPUs, torch {m['torch']})", ""]
    if "throughput" in results:
        lines += ["## 1. Local step throughput: our training function vs a bare PyTorch + peft loop", ""]
        rows = [[job, r["threads"], r["tokens_per_step"], r["ours_tokens_per_second"], r["bare_tokens_per_second"],
                 r["ratio"]] for job, runs in results["throughput"].items() for r in runs]  # fmt: skip
        lines += table(["job", "threads", "tokens/step", "ours (tok/s)", "bare (tok/s)", "ratio"], rows)
    if "overhead" in results:
        over = results["overhead"]
        lines += [
            "## 2. Federated overhead: `flwr run .` vs two clients' loops side by side",
            "",
            "Baselines: bare PyTorch + peft loops (the target's), and our training function without Flower.",
            "",
        ]
        rows = []
        for job, r in over.items():
            rows.append([job, r["flwr"]["seconds"], r["bare"]["seconds"], r["ratio"], r["trainer"]["seconds"],
                         r["ratio_to_our_trainer_without_flower"], r["bytes_per_client_per_round"]["down"],
                         r["bytes_per_client_per_round"]["up"]])  # fmt: skip
        header = ["job", "flwr run (s)", "bare loops (s)", "ratio", "our trainer, no Flower (s)", "ratio",
                  "bytes down / client / round", "bytes up"]  # fmt: skip
        lines += table(header, rows)
        reps = [(job, r["repetitions"]) for job, r in over.items() if len(r.get("repetitions", [])) > 1]
        if reps:
            lines += ["The median of " + str(len(reps[0][1])) + " repetitions is shown; every repetition's ratio "
                      "to the bare loops (to our trainer without Flower):", ""]  # fmt: skip
            for job, runs in reps:
                ratios = (f"{x['ratio']:.3f} ({x['ratio_to_our_trainer_without_flower']:.3f})" for x in runs)
                lines.append(f"- {job}: " + ", ".join(ratios))
            lines.append("")
        lines += ["Peak memory of all processes, summed (MB; PSS splits shared pages among the processes sharing them, "
                  "RSS counts them in each):", ""]  # fmt: skip
        rows = [[job] + [r[k]["peak_memory_mb"][m] for k in ("flwr", "bare", "trainer") for m in ("pss-mb", "rss-mb")]
                for job, r in over.items()]  # fmt: skip
        header = ["job", "flwr run PSS", "flwr run RSS", "bare loops PSS", "bare loops RSS", "our trainer PSS",
                  "our trainer RSS"]  # fmt: skip
        lines += table(header, rows)
        lines += ["Where the federated run's time went (s); each round as wall / clients' own training:", ""]
        rows = []
        for job, r in over.items():
            t = r["flwr"]["timeline"]
            rounds = "; ".join(f"{x['seconds']:.1f} / {x['client_train_seconds']:.1f}" for x in t["rounds"])
            rows.append([job, t["before_round_1"], rounds, t["after_last_round"]])
        lines += table(["job", "before round 1", "rounds", "after the last round"], rows)
        lines += ["Memory by process at the PSS peak (MB):", ""]
        for job, r in over.items():
            parts = r["flwr"]["peak_memory_mb"]["pss-mb-by-process-at-peak"]
            lines.append(f"- {job}: " + ", ".join(f"{k} {v:.0f}" for k, v in parts.items()))
        reported = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in FLOWER_EXAMPLE_ON_JOB_P.items())
        lines += [
            "",
            f"Flower's LLM example on job P, as reported for this machine kind (not measured here): {reported}.",
            "",
        ]
    if "compression" in results:
        c = results["compression"]
        lines += [f"## 3. Message compression (default job, {c['rounds']} rounds)", ""]
        rows = [[mode, r["bytes_down_per_client_per_round"], r["bytes_down_ratio"], r["bytes_up_per_client_per_round"],
                 r["bytes_up_ratio"], r["eval_loss"], r["eval_loss_ratio"], r["accuracy"]]
                for mode, r in c["modes"].items()]  # fmt: skip
        header = ["codec", "bytes down / client / round", "vs fp16", "bytes up", "vs fp16", "final eval loss",
                  "vs fp16", "accuracy"]  # fmt: skip
        lines += table(header, rows)
    if "memory" in results:
        lines += ["## 4. One worker serving many clients: shared base model vs a model per client", ""]
        rows = [[r["clients_per_worker"], r["shared_base"], r["worker_peak_rss_mb"], r["vs_1_client"],
                 r["model_load_seconds_max"]] for r in results["memory"]["runs"]]  # fmt: skip
        lines += table(
            ["clients per worker", "shared base", "worker peak RSS (MB)", "vs 1 client", "model load (s)"], rows
        )
    if "quantization" in results:
        q = results["quantization"]
        lines += [f"## 5. Quantized base vs bf16 (default job, {q['rounds']} rounds)", ""]
        rows = [[name, r["step_seconds"], r["step_seconds_ratio"], r["client_peak_rss_mb"], r["peak_memory_ratio"],
                 r["eval_loss"], r["eval_loss_ratio"], r["accuracy"]] for name, r in q["bases"].items()]  # fmt: skip
        header = ["base", "step (s)", "vs bf16", "client peak RSS (MB)", "vs bf16", "final eval loss", "vs bf16",
                  "accuracy"]  # fmt: skip
        lines += table(header, rows)
    if "checkpointing" in results:
        lines += ["## 6. Gradient checkpointing: a job P client step (1 thread), ours and a bare loop", ""]
        variants = results["checkpointing"]["variants"]
        rows = [[r["loop"], r["checkpoint_every"] or "off", r["median_step_seconds"], r["time_vs_no_checkpointing"],
                 r["peak_rss_mb"], r["rss_vs_no_checkpointing"]] for r in variants]  # fmt: skip
        header = ["loop", "checkpoint every", "step (s)", "vs off", "peak RSS (MB)", "vs off"]
        lines += table(header, rows)
    if "sweep" in results:
        sw = results["sweep"]
        title = f"## 7. A sweep's cost per job ({len(sw['jobs'])} learning rates, {sw['sweep_seconds']:.0f} s in all)"
        lines += [title, "", "Job wall time as the sweep measured it, minus its clients' training time (the slowest "
                  "client's, each round):", ""]  # fmt: skip
        rows = [[j["job"], j["seconds"], j["client_train_seconds"], j["overhead_seconds"]] for j in sw["jobs"]]
        lines += table(["job", "wall (s)", "clients' training (s)", "beyond training (s)"], rows)
    lines += ["## Targets", ""] + [f"- {'met' if ok else 'missed'}: {name}" for name, ok in results["targets"].items()]
    return "\n".join(lines) + "\n"
