"""MkDocs hooks: the generated parts of the site, written while `mkdocs build` runs.

A page asks for a generated part with a marker on a line of its own:

    <!-- generated: NAME -->              one of GENERATED below
    <!-- include: PATH[#SECTION] -->      a Markdown results file (or its `## SECTION`), PATH from the
                                          repository root

so the reference pages come from the code (fedllm_tools/reference.py), the table of what
does not combine from the plug-ins' declarations (fedllm_flwr/config/rules.py), and every
measured table from the results file its benchmark wrote. The images those benchmarks
drew are served from benchmarks/results/ as they are (`results-files/...` on the site).
Nothing generated is committed, so nothing generated can go stale.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: Where benchmarks/results/ appears on the site, for the images the benchmarks drew.
RESULTS_URI = "results-files"
MARKER = re.compile(r"^<!-- (generated|include): (\S+) -->$", re.M)

if str(ROOT) not in sys.path:  # the project's own modules, from this checkout
    sys.path.insert(0, str(ROOT))


def _benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def combinations() -> str:
    from fedllm_flwr.config import rules

    return rules.markdown_table()


def site_worker() -> str:
    """Deployed rounds with and without site workers, and in simulation."""
    return _benchmark("client_startup").table()


def sweep_floor() -> str:
    """What every sweep job starts anew under Flower's simulation (benchmarks/sweep_floor.py)."""
    return _benchmark("sweep_floor").table()


def cuda_precision() -> str:
    """benchmarks/cuda_precision.py's results: the default job at each precision on a GPU."""
    data = json.loads((RESULTS / "cuda_precision.json").read_text())
    rows = []
    for name, v in data["variants"].items():
        label = {"fp16": "fp16 + GradScaler", "4bit": "4-bit NF4 base, bf16 compute"}.get(name, name)
        rows.append([label, f"{v['train-seconds-per-round']:.2f}", f"{v['peak-memory-mb']:.0f} MB", v["skipped-steps"],
                     f"{v['final-eval-loss']:.3f}", f"{v['final-accuracy']:.2f}"])  # fmt: skip
    header = ["variant", "train s / round, both clients (rounds 2-3)", "peak CUDA memory", "skipped steps",
              "eval loss after 3 rounds", "exact match"]  # fmt: skip
    v = data["variants"]
    ratio = {k: v[k]["peak-memory-mb"] / v["fp32"]["peak-memory-mb"] for k in v}
    summary = (
        f"Against fp32: bf16 in {ratio['bf16']:.2f}x the memory at eval loss {v['bf16']['final-eval-loss']:.3f} "
        f"({v['fp32']['final-eval-loss']:.3f}); fp16 skipped {v['fp16']['skipped-steps']} steps and ended at "
        f"{v['fp16']['final-eval-loss'] / v['fp32']['final-eval-loss'] - 1:+.1%} eval loss. The 4-bit base against "
        f"bf16: {v['4bit']['train-seconds-per-round'] / v['bf16']['train-seconds-per-round']:.2f}x the time, "
        f"{v['4bit']['peak-memory-mb'] / v['bf16']['peak-memory-mb']:.2f}x the peak memory, "
        f"{v['4bit']['final-eval-loss'] / v['bf16']['final-eval-loss'] - 1:+.0%} eval loss. bf16's round 2 still paid "
        "warm-up: "
        + " against ".join(f"{r['train-seconds']:.1f} s in round {r['round']}" for r in v["bf16"]["rounds"][2:4])
        + "."
    )
    head = f"{data['device']}, torch {data['torch']}, bitsandbytes {data['bitsandbytes']}.\n\n"
    return head + _table(header, rows) + "\n" + summary + "\n"


def response_logits() -> str:
    """benchmarks/response_logits.py's results: one step with the LM head at response positions only."""
    data = json.loads((RESULTS / "response_logits.json").read_text())
    rows = [[r["model"], r["method"], f"{r['step-seconds-all-logits']:.2f}", f"{r['step-seconds-response-logits']:.2f}",
             f"{r['speedup']:.2f}x", f"{r['response-positions-per-row']} of {r['positions-per-row']}"]
            for r in data["rows"]]  # fmt: skip
    header = ["model", "method", "step s, head at every position", "step s, response positions only", "faster",
              "response positions per row"]  # fmt: skip
    note = f"{data['threads']} thread, {data['steps']} steps each, fp32."
    by_model: dict[str, list[float]] = {}
    for r in data["rows"]:
        by_model.setdefault(r["model"], []).append(r["speedup"])
    spans = "; ".join(f"{m} {min(v):.2f}-{max(v):.2f}x" for m, v in by_model.items())
    return note + "\n\n" + _table(header, rows) + f"\nFaster by method: {spans}.\n"


def zo_draws() -> str:
    """benchmarks/zo_draws.py's results: what drawing z costs, and whether the kernels agree."""
    data = json.loads((RESULTS / "zo_draws.json").read_text())
    rows = []
    for part in ("adapter", "full"):
        v = data[part]
        rows.append([part, f"{v['values']:,}", f"{v['perturb-seconds-torch-float32']:.4f}",
                     f"{v['perturb-seconds-numpy-float64']:.4f}", f"{v['perturb-seconds-torch-float64']:.4f}",
                     f"{v['fingerprint-seconds']:.4f}"])  # fmt: skip
    agree = data["agreement"]
    same = ", ".join(f"{k.removesuffix('-agrees')}: {'the same bits' if v else 'other bits'}"
                     for k, v in agree.items() if k.endswith("-agrees"))  # fmt: skip
    capabilities = " and ".join(v["capability"] for v in agree.values() if isinstance(v, dict))
    header = ["tuned", "values", "perturb s, torch float32", "perturb s, numpy float64 (used)",
              "perturb s, torch float64", "fingerprint s"]  # fmt: skip
    return (f"{data['processor']} ({data['machine']}, {data['cpu-capability']}), torch {data['torch']}, numpy "
            f"{data['numpy']}, {data['threads']} thread.\n\n" + _table(header, rows)
            + f"\nThe same steps under torch's {capabilities} kernels: {same}.\n")  # fmt: skip


def wire_bytes() -> str:
    """Bytes a fed LoRA round moves per client, against the adapter's own fp16 size, from the
    method study's SmolLM2 report (scripts/method_study.py, `fedllm-flwr report`)."""
    import csv

    path = RESULTS / "method_study" / "smollm2" / "report" / "efficiency.csv"
    row = next(r for r in csv.DictReader(path.open()) if r["scenario"] == "fed" and r["method"] == "lora")
    params, down, up = (float(row[k]) for k in ("trainable parameters", "bytes down per client per round",
                                                "bytes up per client per round"))  # fmt: skip
    payload = 2 * params  # fp16: two bytes a value
    return (
        f"The {payload:,.0f}-byte fp16 LoRA adapter ({params:,.0f} values) travels in {down:,.0f} bytes down and "
        f"{up:,.0f} up per client per round (fed, the method study's SmolLM2 grid): Flower's framing, the "
        f"manifest and the round's config and metrics add {down / payload - 1:.1%} and {up / payload - 1:.1%}.\n"
    )


def grpo() -> str:
    """benchmarks/grpo.py's results: GRPO against continued SFT, and two sites' own rewards."""
    return _benchmark("grpo").markdown(json.loads((RESULTS / "grpo.json").read_text()))


def privacy() -> str:
    """benchmarks/privacy.py's results: client-level DP and SecAgg+ against record-level DP-SGD."""
    return _benchmark("privacy").report(json.loads((RESULTS / "privacy" / "results.json").read_text()))


def privacy_summary() -> str:
    """The README's short table of benchmarks/privacy.py's results."""
    return _benchmark("privacy").summary(json.loads((RESULTS / "privacy" / "results.json").read_text()))


def default_job() -> str:
    """benchmarks/default_job.py's results: the default job round by round."""
    return _benchmark("default_job").markdown(json.loads((RESULTS / "default_job" / "results.json").read_text()))


def test_suite() -> str:
    """benchmarks/test_suite.py's results: how long `make test` and `make test-fast` take.
    (The suite builds this site, so its first measurement runs before the file exists.)"""
    path = RESULTS / "test_suite.json"
    if not path.is_file():
        return f"No measurement kept yet: run `python benchmarks/test_suite.py --out {path.relative_to(ROOT)}`.\n"
    return _benchmark("test_suite").markdown(json.loads(path.read_text()))


def config_reference() -> str:
    from fedllm_tools.reference import config_reference

    return config_reference()


def cli_reference() -> str:
    from fedllm_tools.reference import cli_reference

    return cli_reference()


def layout() -> str:
    from fedllm_tools.reference import layout

    return layout()


GENERATED: dict[str, Callable[[], str]] = {
    "combinations": combinations,
    "site-worker": site_worker,
    "sweep-floor": sweep_floor,
    "cuda-precision": cuda_precision,
    "response-logits": response_logits,
    "zo-draws": zo_draws,
    "wire-bytes": wire_bytes,
    "grpo": grpo,
    "privacy": privacy,
    "privacy-summary": privacy_summary,
    "default-job": default_job,
    "test-suite": test_suite,
    "config-reference": config_reference,
    "cli-reference": cli_reference,
    "layout": layout,
}


def include(path: str, page_uri: str = "") -> str:
    """A Markdown results file, or with `#NAME` its `## NAME...` section, its headings moved
    below the page's (## becomes ####) and its relative links pointed at where the site
    serves that folder (`results-files/...`) from the page at `page_uri`."""
    path, _, section = path.partition("#")
    file = (ROOT / path).resolve()
    if RESULTS not in file.parents or file.suffix != ".md":
        raise ValueError(f"include: {path} is not a Markdown file under benchmarks/results/")
    text = file.read_text()
    if section:
        found = re.search(rf"^## {re.escape(section)}\b.*?(?=^## |\Z)", text, flags=re.M | re.S)
        if found is None:
            raise ValueError(f"include: {path} has no section '## {section}'")
        text = found[0]
    up = "../" * page_uri.count("/")
    folder = file.parent.relative_to(RESULTS).as_posix()
    text = re.sub(r"\]\((?!https?:|#|/)([^)]+)\)", lambda m: f"]({up}{RESULTS_URI}/{folder}/{m[1]})", text)
    return re.sub(r"^(#+) ", lambda m: "#" * min(len(m[1]) + 2, 6) + " ", text, flags=re.M)


def render(markdown: str, page_uri: str = "") -> str:
    """`markdown`, of the page at `page_uri` (docs/-relative), with every marker replaced by
    what it names."""

    def fill(match: re.Match) -> str:
        kind, name = match[1], match[2]
        if kind == "include":
            return include(name, page_uri)
        if name not in GENERATED:
            raise KeyError(f"<!-- generated: {name} -->: no such generated part (docs/hooks.py GENERATED)")
        return GENERATED[name]()

    return MARKER.sub(fill, markdown)


#: The README's generated blocks: between `<!-- generated: NAME -->` and `<!-- end: NAME -->`
#: (GitHub shows the README as it is, so the block is written into it, and a test checks it).
README_BLOCK = re.compile(r"(<!-- generated: (\S+) -->\n)(.*?)(<!-- end: \2 -->)", re.S)


def readme(text: str) -> str:
    """The README `text` with each generated block written anew."""
    return README_BLOCK.sub(lambda m: m[1] + "\n" + GENERATED[m[2]]() + "\n" + m[4], text)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001
    return render(markdown, page.file.src_uri)


def on_files(files, config):  # noqa: ANN001, ANN201 (MkDocs' hook signature)
    """Serve the images the benchmarks drew, from benchmarks/results/, as `results-files/...`."""
    from mkdocs.structure.files import File  # here, so the tests can render pages without MkDocs

    # the plots the studies drew (a run folder's own curves.png, deeper down, is not kept in git)
    for image in sorted(p for depth in ("", "*/", "*/*/", "*/*/*/") for p in RESULTS.glob(f"{depth}*.png")):
        uri = f"{RESULTS_URI}/{image.relative_to(RESULTS).as_posix()}"
        files.append(File.generated(config, uri, abs_src_path=str(image)))
    return files


if __name__ == "__main__":  # python docs/hooks.py readme: write the README's generated blocks
    if sys.argv[1:] != ["readme"]:
        sys.exit("usage: python docs/hooks.py readme")
    path = ROOT / "README.md"
    path.write_text(readme(path.read_text()))
