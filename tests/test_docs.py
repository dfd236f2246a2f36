"""The documentation site: it builds in strict mode (no broken link or anchor, no page
missing from or left out of the navigation), its generated parts come from the code and
the results files, and every command on the getting-started page still parses, so a
renamed flag or config key breaks the suite rather than the reader's first try."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, docs_hooks

from fedllm_tools import reference

GETTING_STARTED = ROOT / "docs" / "getting-started.md"


def test_the_site_builds_in_strict_mode(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed: pip install -e '.[docs]' (make test does)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    html = (site / "reference" / "configuration" / "index.html").read_text()
    assert "<td><code>train.lr</code></td>" in html  # the generated reference is in the built page
    assert not list(site.rglob("hooks.py")), "docs/hooks.py was published as a page asset"


# --- generated parts ----------------------------------------------------------------


def config_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(factory):
            keys += config_keys(factory, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_the_configuration_reference_has_every_key_with_its_docstring_and_every_group():
    from fedllm_flwr.config.schema import Config

    page = reference.config_reference()
    for key in config_keys(Config):
        row = next((line for line in page.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{key} is missing from the configuration reference"
        assert not row.endswith("|  |"), f"{key} has no docstring: document it under its field in fedllm_flwr/config/"
    row = next(line for line in page.splitlines() if line.startswith("| `model.quantization` |"))
    assert "NF4 with double quantization" in row and "**Valid:** `none`, `4bit`, `8bit`" in row
    groups = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir())
    assert f"composes {len(groups)} Hydra groups" in page
    for group in groups:
        assert f"(`{group}=<preset>`, `conf/{group}/`)" in page, f"no presets listed for {group}"


def test_a_check_in_post_init_shows_as_what_the_reference_says_is_valid():
    @dataclasses.dataclass
    class Probe:
        mode: str = "a"
        """How to probe."""
        size: int = 1

        def __post_init__(self) -> None:
            if self.mode not in ("a", "b"):
                raise ValueError(f"probe.mode={self.mode!r}: use a or b")
            if self.size < 1:
                raise ValueError(f"probe.size must be >= 1, got {self.size}")

    members, messages = reference.checks(Probe)
    assert members == {"mode": ["a", "b"]}
    assert messages == {"size": ["probe.size must be >= 1"]}
    assert reference.attribute_docs(Probe) == {"mode": "How to probe."}


def test_the_cli_reference_has_every_subcommand_and_argument():
    from fedllm_tools.cli import build_parser

    page = reference.cli_reference()
    for name, (_, sub) in reference.subcommands(build_parser()).items():
        assert f"## `fedllm-flwr {name}`" in page
        for action in sub._actions:
            if action.option_strings and action.help != "==SUPPRESS==" and "-h" not in action.option_strings:
                assert f"`{', '.join(action.option_strings)}" in page, f"{name} {action.option_strings}"
    for name in ("serve", "list", "stop"):
        assert f"## `fedllm-flwr site-worker {name}`" in page
    assert "`--idle-timeout`" in page


def test_the_layout_lists_every_module_and_benchmark():
    page = reference.layout()
    for path in [*ROOT.glob("fedllm_flwr/**/*.py"), *ROOT.glob("fedllm_tools/*.py"), *ROOT.glob("benchmarks/*.py")]:
        assert f"| `{path.relative_to(ROOT)}` |" in page


def test_the_pages_tables_are_written_from_the_rules_and_the_results_files():
    """The table of what does not combine and the deployed rounds' tables are the
    generators' output (rules.markdown_table, client_startup.table), asked for by name."""
    from fedllm_flwr.config import rules

    docs = docs_hooks()
    assert "<!-- generated: combinations -->" in (ROOT / "docs" / "concepts.md").read_text()
    assert docs.render("<!-- generated: combinations -->\n") == rules.markdown_table() + "\n"
    assert "<!-- generated: site-worker -->" in (ROOT / "docs" / "results" / "deployment.md").read_text()
    with pytest.raises(KeyError, match="no-such-part"):
        docs.render("<!-- generated: no-such-part -->")
    section = docs.include("benchmarks/results/method_study/findings.md#gemma3")
    assert section.startswith("#### gemma3") and "smollm2" not in section


def test_no_page_retypes_a_table_the_site_generates():
    """A retyped copy of a generated table would drift from its source: no page holds
    the header row of one."""
    docs = docs_hooks()
    names = ("combinations", "site-worker", "cuda-precision", "response-logits", "zo-draws")
    headers = {}
    for name in names:
        headers[name] = next(line for line in docs.GENERATED[name]().splitlines() if line.startswith("| "))
    for page in (ROOT / "docs").rglob("*.md"):
        text = page.read_text()
        for name, header in headers.items():
            assert header not in text, f"{page.relative_to(ROOT)} retypes the {name} table"
    readme = (ROOT / "README.md").read_text()
    assert not [h for h in headers.values() if h in readme]


# --- the getting-started commands ---------------------------------------------------


def shell_commands(markdown: str) -> list[list[str]]:
    """Each command of the page's bash blocks, split as the shell would (comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def check_overrides(overrides: list[str]) -> None:
    from fedllm_flwr.config import load_cfg

    load_cfg(list(overrides))  # composes and checks them, as a run would: a UserError names the key


def check_flwr_run(args: list[str]) -> None:
    """Flower's own parser for `flwr run`, then our overrides from its run config."""
    import typer
    from flwr.cli.app import app
    from flwr.common.config import parse_config_args

    group = typer.main.get_command(app)
    ctx = group.make_context("flwr", ["run", *args])
    run = group.get_command(ctx, "run")
    params = run.make_context("run", args, parent=ctx).params
    run_config = parse_config_args(list(params.get("run_config_overrides") or []))
    check_overrides(shlex.split(str(run_config.get("overrides", ""))))


def check_command(words: list[str]) -> None:
    """Parse one command without running it; fail for a command nobody checks."""
    head, args = words[0], words[1:]
    if head == "make":
        done = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    elif head == "source":
        # the venv `make install` creates: VENV ?= .venv, `python -m venv` writes bin/activate
        assert args == [".venv/bin/activate"] and "VENV ?= .venv" in (ROOT / "Makefile").read_text()
    elif head == "fedllm-flwr":
        from fedllm_tools.cli import build_parser

        parsed = build_parser().parse_args(args)
        check_overrides(getattr(parsed, "overrides", []))
    elif head == "flwr" and args[:1] == ["run"]:
        check_flwr_run(args[1:])
    elif head == "scripts/run_local.sh":
        assert 'flwr run . --stream "$@"' in (ROOT / head).read_text()
        check_flwr_run([".", "--stream", *args])
    elif head == "python" and args[0].startswith("scripts/"):
        script = runpy.run_path(str(ROOT / args[0]), run_name="docs_check")
        parsed = reference.parser_of(script["main"]).parse_args(args[1:])
        check_overrides(getattr(parsed, "overrides", []))
    else:
        raise AssertionError(f"no check for this command: {shlex.join(words)} (add one to tests/test_docs.py)")


def test_every_command_on_the_getting_started_page_parses():
    commands = shell_commands(GETTING_STARTED.read_text())
    heads = {c[0] for c in commands}
    assert {"make", "fedllm-flwr", "flwr", "python"} <= heads
    for words in commands:
        try:
            check_command(words)
        except SystemExit as exc:  # argparse's way of refusing a flag
            raise AssertionError(f"{shlex.join(words)}: refused by its parser") from exc
        except Exception as exc:
            raise AssertionError(f"{shlex.join(words)}: {exc}") from exc


def test_every_fedllm_flwr_and_flwr_run_command_anywhere_in_the_docs_parses():
    """Beyond the getting-started page: each page's `fedllm-flwr` commands name a real
    subcommand and flags it takes (usage brackets and `...` read as optional parts), and
    each `flwr run` takes its flags and composes its overrides (but for those that hold
    a shell variable)."""
    from fedllm_tools.cli import build_parser

    subcommands = reference.subcommands(build_parser())
    pages = [*(ROOT / "docs").rglob("*.md"), ROOT / "README.md"]
    seen = 0
    for page in pages:
        for words in shell_commands(page.read_text()):
            if words[:2] == ["flwr", "run"] and "$" not in " ".join(words):
                check_flwr_run(words[2:])
            if words[0] != "fedllm-flwr":
                continue
            args = [w.strip("[]") for w in words[1:] if w.strip("[]") not in ("", "...")]
            assert args[0] in subcommands, f"{page.name}: {shlex.join(words)}: no such subcommand"
            if args[0] not in ("sweep", "site-worker"):  # Hydra and the site worker parse these
                try:
                    build_parser().parse_args(args)
                except SystemExit as exc:
                    raise AssertionError(f"{page.name}: {shlex.join(words)}: refused by its parser") from exc
            seen += 1
    assert seen >= 10


@pytest.mark.parametrize(
    "command",
    [
        "fedllm-flwr check --no-such-flag",
        "fedllm-flwr config train.lrr=1",
        "flwr run . --streem",
        "flwr run . --run-config 'overrides=\"num_roundz=2\"'",
        "python scripts/deploy_local.py --workers 2",
        "make no-such-target",
    ],
)
def test_a_renamed_flag_or_key_fails_the_check(command):
    from click.exceptions import ClickException

    from fedllm_flwr.errors import UserError

    with pytest.raises((AssertionError, SystemExit, UserError, ClickException)):
        check_command(shlex.split(command))
