"""The `fedllm-flwr` command.

    fedllm-flwr config [OVERRIDE ...]   print the resolved config (YAML)
    fedllm-flwr check  [OVERRIDE ...]   the folders, tracking server and data files the
                                        run would use (one line each), then resolve the
                                        model (converting a GGUF once), load and tokenize
                                        the data, build the adapter: everything a run
                                        checks before it starts
    fedllm-flwr report RUN_DIR ... [--out DIR]
                                        effectiveness and efficiency tables over runs
                                        (markdown on stdout; report.md and CSVs in DIR)
    fedllm-flwr plot RUN_DIR ... [--out FILE.png]
                                        the curves of finished runs on one figure
                                        (default: RUN_DIR/curves.png for one run,
                                        ./curves.png for several)
    fedllm-flwr sweep -m train.lr=1e-4,3e-4,1e-3 [peft=lora,prompt_tuning] [OVERRIDE ...]
                                        Hydra multirun: one `flwr run` per job, then
                                        summary.md/.csv and lr.png in the sweep folder
    fedllm-flwr sweep-summary SWEEP_DIR [--keep F]
                                        (re)write the summary of a sweep folder
    fedllm-flwr credentials DIR --nodes N [--hosts HOST,...]
                                        a local CA, the SuperLink's TLS certificate and
                                        one key pair per SuperNode (existing files kept)
    fedllm-flwr site-worker serve|list|stop [--dir DIR] ...
                                        a deployed SuperNode's warm workers: started by
                                        its first message, or by the site (serve)
    fedllm-flwr evaluate --benchmark {gsm8k,humaneval,rouge,exact_match,loss,preference}
        [--adapter DIR] [--data FILE] [--limit N] [--out FILE.json] [OVERRIDE ...]
                                        score an adapter (or the base model without
                                        --adapter); the result is the last stdout line (JSON)

Overrides are the same Hydra overrides `flwr run` takes in its `overrides`
run-config key. Problems with the input print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedllm_flwr.errors import UserError


def _config(args: argparse.Namespace) -> int:
    from fedllm_flwr.config import cfg_to_yaml, load_cfg

    print(cfg_to_yaml(load_cfg(args.overrides)), end="")
    return 0


def _check(args: argparse.Namespace) -> int:
    from fedllm_flwr import quiet_third_party_output
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.data import records, server_data
    from fedllm_flwr.model import build_model, count_parameters
    from fedllm_flwr.preflight import run_checks
    from fedllm_flwr.run_dir import resolve_run_path
    from fedllm_flwr.tracking import check_installed

    quiet_third_party_output()
    cfg = load_cfg(args.overrides)
    check_installed(cfg)
    checks = run_checks(cfg)
    for check in checks:
        print(f"{'ok' if check.ok else 'problem':8}{check.line()}", flush=True)
    problems = [check for check in checks if not check.ok]
    if problems:  # the model and data are not loaded: a run would stop here too
        raise UserError(problems[0].line() + (f" (and {len(problems) - 1} more above)" if len(problems) > 1 else ""))
    train, test = records(cfg)
    t0 = time.perf_counter()
    print(f"model: resolving {cfg.model.name} ...", file=sys.stderr, flush=True)
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    trainable, total = count_parameters(bundle.model)
    _, test_set = server_data(cfg, bundle.tokenizer)
    print(
        f"base model: {bundle.base_path} ({str(bundle.dtype).replace('torch.', '')}, {time.perf_counter() - t0:.1f} s)"
    )
    size = f"{2 * trainable / 1e6:.2f} MB in fp16"
    print(f"adapter: {cfg.peft.method}, {trainable:,} trainable of {total:,} parameters ({size})")
    print(f"data: {len(train)} train / {len(test)} test records; {test_set.dropped} test samples dropped by truncation")
    print(f"run folder would be: {resolve_run_path(cfg)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedllm_tools.report import write_report

    markdown, _ = write_report([Path(p) for p in args.runs], Path(args.out))
    print(markdown, end="")
    print(f"written: {Path(args.out) / 'report.md'}, effectiveness.csv, efficiency.csv", file=sys.stderr)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from fedllm_flwr.plot import plot_runs

    runs = [Path(p).expanduser() for p in args.runs]
    out = Path(args.out).expanduser() if args.out else runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png")
    if out.suffix.lower() != ".png":
        raise UserError(f"plot: --out {out} must name a .png file")
    print(f"written: {plot_runs(runs, out)}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from fedllm_tools.evaluate import EvalRequest, evaluate_command

    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        raise UserError(f"--k {args.k!r}: give comma-separated integers, e.g. 1,10") from None
    if not args.benchmark:
        raise UserError("evaluate: --benchmark is required")
    if args.samples > 1 and args.temperature <= 0:
        raise UserError("--samples > 1 needs --temperature > 0 (greedy decoding gives one answer)")
    req = EvalRequest(
        benchmark=args.benchmark,
        adapter=Path(args.adapter).expanduser() if args.adapter else None,
        data=Path(args.data).expanduser() if args.data else None,
        limit=args.limit,
        out=Path(args.out).expanduser() if args.out else None,
        overrides=args.overrides,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_samples=args.samples,
        temperature=args.temperature,
        ks=ks,
        timeout=args.timeout,
    )
    result = evaluate_command(req)
    print(json.dumps(result))
    return 0


def _sweep_summary(args: argparse.Namespace) -> int:
    from fedllm_tools.sweep_summary import summarize

    summary = summarize(Path(args.sweep_dir), args.keep)
    print((Path(args.sweep_dir) / "summary.md").read_text(), end="")
    return 0 if not summary["failed"] else 1


def _credentials(args: argparse.Namespace) -> int:
    from fedllm_tools.deploy import make_credentials

    hosts = tuple(h.strip() for h in args.hosts.split(",") if h.strip())
    if args.nodes < 1 or not hosts:
        raise UserError("credentials: --nodes must be >= 1 and --hosts must name at least one host")
    creds = make_credentials(Path(args.folder).expanduser(), args.nodes, hosts)
    print(f"SuperLink: {creds.ca_cert} (give to every site), {creds.server_cert}, {creds.server_key}")
    for i in range(args.nodes):
        print(f"SuperNode {i}: {creds.node_key(i)} (private: that site only), {creds.node_public_key(i)} (register it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["site-worker"]:  # the site's own command, shipped with the core
        from fedllm_flwr.site_worker.__main__ import main as site_worker_main

        return site_worker_main(argv[1:], prog="fedllm-flwr site-worker")
    if argv[:1] == ["sweep"]:  # Hydra parses the rest of the command line itself
        from fedllm_tools.sweep import sweep_main

        try:
            return sweep_main(argv[1:])
        except UserError as exc:
            print(f"fedllm-flwr: error: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"fedllm-flwr: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand's arguments, defined once: `main` parses with it, and the docs'
    CLI reference and the check of the getting-started commands read it
    (fedllm_tools/reference.py). `site-worker` and `sweep` are parsed by their own
    code (the site worker's module, Hydra); here they only have their help line."""
    parser = argparse.ArgumentParser(prog="fedllm-flwr", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("config", _config, "print the resolved config"),
        ("check", _check, "check folders, tracking server, data, model and adapter for a config without training"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.lr=3e-4")
        cmd.set_defaults(func=func)
    report = sub.add_parser("report", help="compare finished runs (scenario x method, over seeds)")
    report.add_argument("runs", nargs="+", help="run folders, or folders holding run folders")
    report.add_argument("--out", default="report", help="folder for report.md and the CSVs (default: ./report)")
    report.set_defaults(func=_report)
    plot = sub.add_parser("plot", help="the curves of finished runs (eval loss, task metric, bytes) as a PNG")
    plot.add_argument("runs", nargs="+", help="run folders")
    plot.add_argument("--out", default="", help="the PNG (default: RUN_DIR/curves.png, or ./curves.png for several)")
    plot.set_defaults(func=_plot)
    sub.add_parser("site-worker", help="start, list or stop a SuperNode's warm site workers (serve|list|stop)")
    sub.add_parser("sweep", help="Hydra multirun of federated jobs (fedllm-flwr sweep --help for Hydra's options)")
    summ = sub.add_parser("sweep-summary", help="write summary.md/.csv and lr.png for a sweep folder")
    summ.add_argument("sweep_dir")
    summ.add_argument("--keep", type=float, default=0.34, help="screening audit: share kept per method")
    summ.set_defaults(func=_sweep_summary)
    cred = sub.add_parser("credentials", help="TLS certificate and SuperNode keys for a deployment")
    cred.add_argument("folder")
    cred.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to have (default 2)")
    cred.add_argument("--hosts", default="127.0.0.1,localhost", help="names the SuperLink is reached by")
    cred.set_defaults(func=_credentials)
    ev = sub.add_parser(
        "evaluate",
        help="score an adapter or the base model on GSM8K, HumanEval, ROUGE-L, loss, or a "
        "reward model's preference accuracy",
    )
    benchmarks = ("gsm8k", "humaneval", "rouge", "exact_match", "loss", "preference")
    ev.add_argument("--benchmark", choices=benchmarks, help="what to score (required)")
    # --task: the flag's name before `task` came to mean only the config group (lm, reward, dpo).
    ev.add_argument("--task", dest="benchmark", choices=benchmarks, help=argparse.SUPPRESS)
    ev.add_argument("--adapter", help="a saved adapter folder (adapter/final); omit for the base model")
    ev.add_argument("--data", help="evaluate every record of this file (default: the dataset's test split)")
    ev.add_argument("--limit", type=int, default=0, help="score the first N examples only (0 = all)")
    ev.add_argument("--out", help="result JSON (default: eval_<benchmark>.json next to the adapter)")
    ev.add_argument("--batch-size", type=int, default=0, help="generation batch (default: eval.batch_size)")
    ev.add_argument("--max-new-tokens", type=int, default=0, help="default: the benchmark's own length")
    ev.add_argument("--samples", type=int, default=1, help="humaneval: completions per problem (n)")
    ev.add_argument("--k", default="1", help="humaneval: comma-separated k for pass@k (each <= --samples)")
    ev.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (top-p 0.95)")
    ev.add_argument("--timeout", type=float, default=5.0, help="humaneval: seconds per program")
    ev.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=dolly dataset.path=FILE")
    ev.set_defaults(func=_evaluate)
    return parser


if __name__ == "__main__":
    sys.exit(main())
