"""The docs' reference pages, written from the code so they cannot go stale.

- `config_reference()`: every config group and key, from the dataclasses in
  `fedllm_flwr/config/` (type, the default a run gets, the values `__post_init__`
  accepts, and the attribute docstring under each field), with each Hydra group's
  presets and what each sets.
- `cli_reference()`: every `fedllm-flwr` subcommand and the site worker's command,
  from their argparse parsers.
- `layout()`: every module of the apps, the core, the tooling, the benchmarks and the
  scripts, with the first sentence of its docstring.

docs/hooks.py calls these while `mkdocs build` runs; nothing here is committed as text.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import inspect
import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cell(text: str) -> str:
    """`text` as one Markdown table cell: one line, pipes escaped, angle brackets
    outside code spans escaped (else `<run folder>` reads as an HTML tag)."""
    parts = " ".join(text.split()).split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|")


def code(value: Any) -> str:
    """A value as an inline code cell; '' and [] shown as such."""
    if isinstance(value, bool) or value is None:
        text = {True: "true", False: "false", None: "null"}[value]  # as YAML and overrides write them
    else:
        text = repr(value) if isinstance(value, str) and not value else str(value)
    return f"`{text}`".replace("|", "\\|")


# --- the configuration ------------------------------------------------------------


def attribute_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (PEP 257's attribute docstrings)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and documented:
            docs[node.target.id] = inspect.cleandoc(str(after.value.value))
    return docs


def _message(node: ast.expr) -> str:
    """A raise's message as the user reads it, with `…` where a value is filled in."""
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        text = "".join(_message(v) if isinstance(v, ast.Constant) else "…" for v in node.values)
        return re.sub(r", got …$", "", text)  # the value the user gave: nothing to say in a reference
    return ""


def checks(cls: type) -> tuple[dict[str, list[Any]], dict[str, list[str]]]:
    """What `cls.__post_init__` accepts, per field: the values of an `if self.x not in
    VALUES` test (evaluated in the class's module), and the message of every other check
    that reads the field."""
    method = cls.__dict__.get("__post_init__")
    if method is None:
        return {}, {}
    namespace = vars(importlib.import_module(cls.__module__))
    members: dict[str, list[Any]] = {}
    messages: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(method)))):
        if not isinstance(node, ast.If):
            continue
        test = node.test
        if (isinstance(test, ast.Compare) and isinstance(test.ops[0], ast.NotIn)
                and isinstance(test.left, ast.Attribute) and isinstance(test.left.value, ast.Name)
                and test.left.value.id == "self"):  # fmt: skip
            values = eval(compile(ast.Expression(test.comparators[0]), "<check>", "eval"), namespace)  # noqa: S307
            members[test.left.attr] = list(values)
            continue
        raised = [n for n in node.body if isinstance(n, ast.Raise) and isinstance(n.exc, ast.Call)]
        if not raised or not raised[0].exc.args:  # type: ignore[union-attr]
            continue
        text = _message(raised[0].exc.args[0])  # type: ignore[union-attr]
        read = {n.attr for n in ast.walk(test) if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name) and n.value.id == "self"}  # fmt: skip
        named = {name for name in read if re.search(rf"\b{name}\b", text)}
        for name in named or read:
            messages.setdefault(name, []).append(text)
    return members, messages


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _preset_tree(group: str, name: str) -> dict[str, Any]:
    """A preset's keys, after the presets of its own group it lists in `defaults`."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / group / f"{name}.yaml"))
    merged = OmegaConf.create()
    for entry in tree.pop("defaults", []) or []:
        if isinstance(entry, str) and entry != "_self_":
            merged = OmegaConf.merge(merged, _preset_tree(group, entry))
    return OmegaConf.to_container(OmegaConf.merge(merged, tree))


def _presets(group: str, composed: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Each preset of a Hydra group: its name, the comment it opens with, and the keys
    it sets to something other than what a run gets with no overrides."""
    out = []
    for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
        lines = path.read_text().splitlines()
        comment = " ".join(line.lstrip("# ") for line in lines[: next(
            (i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))])  # fmt: skip
        out.append((path.stem, comment, dict(_changes(composed[group], _preset_tree(group, path.stem)))))
    return out


def _changes(base: Any, tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _changes(base.get(key, {}), value, f"{prefix}{key}.")
        elif base.get(key) != value:
            yield f"{prefix}{key}", value


def _group_table(cls: type, prefix: str, composed: Any, lines: list[str], nested: list[tuple]) -> None:
    docs = attribute_docs(cls)
    members, messages = checks(cls)
    lines += ["| key | type | default | what it is |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            nested.append((f.default_factory, f"{key}."))
            lines.append(f"| `{key}` | group | | see [`{key}.*`](#{key.replace('.', '')}) |")
            continue
        text = docs.get(f.name, "")
        if f.name in members:
            text += " **Valid:** " + ", ".join(code(v) for v in members[f.name]) + "."
        for message in messages.get(f.name, []):
            text += f" **Checked:** {message.rstrip('.')}."
        default = _lookup(composed, key) if composed is not None else f.default
        lines.append(f"| `{key}` | `{f.type}` | {code(default)} | {cell(text)} |")


def config_reference() -> str:
    """The configuration reference page's body, from `fedllm_flwr.config.schema.Config`."""
    from omegaconf import OmegaConf

    from fedllm_flwr.config import compose_cfg
    from fedllm_flwr.config.schema import Config

    composed = OmegaConf.to_container(compose_cfg([]), resolve=True)
    groups = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir())
    lines = [
        f"`conf/config.yaml` composes {len(groups)} Hydra groups, each a folder of presets in `conf/`: "
        + ", ".join(f"[`{g}`](#{g})" for g in groups) + ". "
        "Every key below is a field of a dataclass in `fedllm_flwr/config/`; the text is the docstring "
        "under that field, the default is what a run gets with no overrides, and **Valid** / **Checked** "
        "are what the config refuses when it is built (`__post_init__`). Settings that cannot run together "
        "are in [What does not combine](../concepts.md#what-does-not-combine).",
        "",
        "## Top level",
        "",
    ]  # fmt: skip
    docs = attribute_docs(Config)
    _, top_checks = checks(Config)
    lines += ["| key | type | default | what it is |", "|---|---|---|---|"]
    sections = []
    for f in dataclasses.fields(Config):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            sections.append((f.name, f.default_factory))
            continue
        text = docs.get(f.name, "") + "".join(f" **Checked:** {m.rstrip('.')}." for m in top_checks.get(f.name, []))
        lines.append(f"| `{f.name}` | `{f.type}` | {code(composed[f.name])} | {cell(text)} |")
    for name, cls in sections:
        lines += ["", f"## {name}", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            lines += [cell(inspect.cleandoc(cls.__doc__)).replace("\\|", "|"), ""]
        lines += [f"`{cls.__module__}.{cls.__name__}`", ""]
        nested: list[tuple] = []
        _group_table(cls, f"{name}.", composed, lines, nested)
        for sub, prefix in nested:
            lines += ["", f"### {prefix[:-1]}", ""]
            _group_table(sub, prefix, composed, lines, [])
        if name in groups:
            lines += ["", f"**Presets** (`{name}=<preset>`, `conf/{name}/`):", "",
                      "| preset | sets | notes |", "|---|---|---|"]  # fmt: skip
            for preset, comment, sets in _presets(name, composed):
                shown = ", ".join(f"`{k}={v}`" for k, v in sets.items()) or "(the defaults)"
                lines.append(f"| `{preset}` | {cell(shown)} | {cell(comment)} |")
    return "\n".join(lines) + "\n"


# --- the command line -------------------------------------------------------------


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


@contextlib.contextmanager
def _parsers_caught() -> Iterator[None]:
    """While active, a parser's `parse_args` raises `_Parsed` carrying the parser."""
    original = argparse.ArgumentParser.parse_args

    def catch(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Parsed(self)

    argparse.ArgumentParser.parse_args = catch  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]


def parser_of(main: Callable[..., Any], *args: Any, **kwargs: Any) -> argparse.ArgumentParser:
    """The parser a command's `main` builds inside itself (the site worker's, the scripts'):
    caught as `main` hands it the command line, before anything runs."""
    with _parsers_caught():
        try:
            main(*args, **kwargs)
        except _Parsed as parsed:
            return parsed.parser
    raise RuntimeError(f"{main.__module__}.{main.__name__} parsed no arguments")


def site_worker_parser() -> argparse.ArgumentParser:
    """The site worker's parser (`fedllm-flwr site-worker`), which its module builds inside `main`."""
    from fedllm_flwr.site_worker.__main__ import main

    return parser_of(main, [], prog="fedllm-flwr site-worker")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """A parser's subcommands: name -> (help line, parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (helps.get(name, ""), sub) for name, sub in action.choices.items()}
    return {}


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(action.option_strings) or action.dest
        if action.nargs in ("*", "+"):
            name += " ..."
        default = "" if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings \
            else code(action.default)  # fmt: skip
        text = action.help or ""
        if action.choices:
            text += " Choices: " + ", ".join(f"`{c}`" for c in action.choices) + "."
        rows.append(f"| `{name}` | {default} | {cell(text)} |")
    return ["| argument | default | what it is |", "|---|---|---|", *rows] if rows else []


def _command(title: str, parser: argparse.ArgumentParser, help_line: str, lines: list[str]) -> None:
    lines += ["", f"## `{title}`", ""]
    if help_line:
        lines += [cell(help_line[0].upper() + help_line[1:]) + ".", ""]
    lines += ["```", parser.format_usage().replace("usage: ", "").strip(), "```", ""]
    lines += _arguments(parser)


def cli_reference() -> str:
    """The CLI reference page's body, from the parsers `fedllm-flwr` runs."""
    from fedllm_tools.cli import build_parser

    parser = build_parser()
    lines = ["Written from the argparse definitions in `fedllm_tools/cli.py` and "
             "`fedllm_flwr/site_worker/__main__.py` when the site is built (`python -m fedllm_tools.cli` runs "
             "the same command). Every subcommand that "
             "takes `OVERRIDE`s takes the Hydra overrides `flwr run` takes in its `overrides` "
             "run-config key ([configuration reference](configuration.md)). Bad input prints one "
             "line on stderr and exits with status 2."]  # fmt: skip
    for name, (help_line, sub) in subcommands(parser).items():
        if name == "sweep":
            lines += ["", "## `fedllm-flwr sweep`", "", cell(help_line) + ".", "",
                      "```", "fedllm-flwr sweep -m KEY=V1,V2 [GROUP=A,B] [OVERRIDE ...] [hydra.sweep.dir=DIR]", "```",
                      "", "Hydra parses this command line itself (`conf/sweep.yaml` on top of `conf/config.yaml`): "
                      "`-m` and Hydra's own flags, comma-separated values to sweep, and the `sweep.*` keys of the "
                      "[configuration](configuration.md#sweep). See [Sweeps](../features/sweeps.md)."]  # fmt: skip
        elif name == "site-worker":
            worker = site_worker_parser()
            _command("fedllm-flwr site-worker", worker, help_line, lines)
            lines += ["", "The same command runs as `python -m fedllm_flwr.site_worker` (what a ClientApp's "
                      "proxy runs: the tooling is not shipped to sites)."]  # fmt: skip
            for sub_name, (sub_help, sub_parser) in subcommands(worker).items():
                _command(f"fedllm-flwr site-worker {sub_name}", sub_parser, sub_help, lines)
        else:
            _command(f"fedllm-flwr {name}", sub, help_line, lines)
    return "\n".join(lines) + "\n"


# --- the code ---------------------------------------------------------------------


def first_sentence(path: Path) -> str:
    """The first paragraph of a module's docstring, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def layout() -> str:
    """Every module of the project, by folder, with what its docstring says it is."""
    places = [
        ("The apps", ["server_app.py", "client_app.py"]),
        ("The core package (what a FAB ships to every node)", ["fedllm_flwr/**/*.py"]),
        ("The tooling (stays on the machine driving the runs; never imported by the core)", ["fedllm_tools/*.py"]),
        ("Benchmarks (print JSON figures; never asserted in tests)", ["benchmarks/*.py"]),
        ("Scripts", ["scripts/*.py", "scripts/*.sh"]),
        ("Test helpers (the tests themselves are `tests/test_<subject>.py`)", ["tests/[!t]*.py", "tests/tiny.py"]),
    ]
    lines = []
    for title, patterns in places:
        lines += ["", f"## {title}", "", "| file | what it is |", "|---|---|"]
        files = sorted({p for pattern in patterns for p in ROOT.glob(pattern)})
        for path in files:
            if path.suffix == ".py":
                about = first_sentence(path)
            else:  # a shell script: its opening comment
                comment = [line[2:] for line in path.read_text().splitlines()[1:] if line.startswith("# ")]
                about = " ".join(comment[:2])
            lines.append(f"| `{path.relative_to(ROOT)}` | {cell(about)} |")
    return "\n".join(lines) + "\n"
