"""Run generated Python programs in a child process that contains the usual accidents.

`run_program` executes code in a fresh `python -I -B` process whose working
directory, HOME and TMPDIR are a new temporary folder, deleted afterwards.
Before the code runs, the child lowers its resource limits (address space,
CPU seconds, file size, no core dumps) and installs an audit hook
(`sys.addaudithook`, which cannot be removed) that raises PermissionError for:

* opening a file for writing, and removing, renaming, linking, chmod/chown,
  utime, truncating or creating folders, outside the temporary folder
  (paths resolved against the working directory or `dir_fd`, symlinks
  followed);
* starting processes or signalling them: fork, exec, spawn, posix_spawn,
  system, subprocess, pty.spawn, kill, killpg (and `_posixsubprocess.fork_exec`,
  `os.mknod`, `os.mkfifo`, which raise no audit event and are replaced);
* network: socket connect, bind, sendto, sendmsg and name lookups;
* ctypes (loading libraries, raw memory access, foreign calls; in practice
  `import ctypes` itself is refused) and raising resource limits.

The wall-clock timeout kills the child's whole process group.

This contains what bad completions usually do (endless loops, huge
allocations, fork bombs, stray writes or deletes, network calls), but it is
not a security boundary against deliberately malicious code: reads are not
isolated (the code can read any file the user can, including the environment
of other processes), `os.open(..., dir_fd=...)` is judged as if relative to
the working directory because its audit event carries no `dir_fd`, and a
determined program can reach unaudited primitives (for example re-importing
patched built-in modules, or racing symlinks against the path checks). For
models or prompts you do not trust, run the whole evaluation in a container
or VM without network access and with a read-only view of your files.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

BLOCKED_EXIT = 86
FILE_LIMIT_BYTES = 10 * 1024 * 1024
DETAIL_CHARS = 1000
_TAIL_BYTES = 64 * 1024

_LAUNCHER = r'''"""Launcher written by fedllm_flwr.evaluate.sandbox: limits, audit hook, then program.py."""

import builtins
import json
import os
import posix
import resource
import sys
import threading
import time
import traceback
import types

import _posixsubprocess

HERE = os.path.dirname(os.path.realpath(__file__))
PREFIX = HERE + os.sep
PROGRAM = os.path.join(HERE, "program.py")
with open(os.path.join(HERE, "sandbox.json"), encoding="utf-8") as config_file:
    CONFIG = json.load(config_file)
os.remove(os.path.join(HERE, "sandbox.json"))
TOKEN = CONFIG["token"]
REPORT = os.dup(2)
PARENT = os.getppid()
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
ALWAYS = frozenset(
    {
        "os.fork", "os.forkpty", "os.vfork", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg",
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.call_function",
        "resource.setrlimit", "resource.prlimit",
    }
)
PATHS = {
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.mkdir": ((0, 2),),
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.utime": ((0, 3),),
    "os.truncate": ((0, None),),
    "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
    "os.chflags": ((0, None),),
    "shutil.rmtree": ((0, 1),),
    "shutil.move": ((0, None), (1, None)),
}


class SandboxViolation(PermissionError):
    event = ""


def deny(event, args):
    shown = ", ".join(repr(arg)[:120] for arg in args)
    error = SandboxViolation(f"sandbox blocked {event}({shown[:400]})")
    error.event = event
    raise error


def absolute(path, dir_fd=None):
    if isinstance(path, int):
        target = os.readlink(f"/proc/self/fd/{path}")
        if not os.path.isabs(target):
            raise ValueError(target)
        return target
    path = os.fsdecode(os.fspath(path))
    if os.path.isabs(path):
        return path
    if isinstance(dir_fd, int) and dir_fd >= 0:
        return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.join(os.getcwd(), path)


def contained(path, root_too=False):
    real = os.path.realpath(path)
    if root_too and real == HERE:
        return True
    parent = os.path.realpath(os.path.dirname(path))
    return real.startswith(PREFIX) and (parent == HERE or parent.startswith(PREFIX))


def allowed(path, dir_fd=None, root_too=False):
    try:
        return contained(absolute(path, dir_fd), root_too)
    except Exception:
        return False


def is_devnull(path):
    try:
        return os.path.realpath(absolute(path)) == os.devnull
    except Exception:
        return False


def symlink_allowed(src, dst, dir_fd=None):
    try:
        link = absolute(dst, dir_fd)
        target = os.fsdecode(os.fspath(src))
        if not os.path.isabs(target):
            target = os.path.join(os.path.dirname(link), target)
        return contained(link) and contained(target)
    except Exception:
        return False


def guard(event, args):
    if event in ALWAYS:
        deny(event, args)
    elif event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & WRITE_FLAGS
        )
        if writes and not isinstance(path, int) and not is_devnull(path) and not allowed(path, root_too=True):
            deny(event, args)
    elif event == "os.symlink":
        if not symlink_allowed(*args):
            deny(event, args)
    elif event in PATHS:
        for path_index, fd_index in PATHS[event]:
            if not allowed(args[path_index], None if fd_index is None else args[fd_index]):
                deny(event, args)


def blocker(event):
    def blocked(*args, **kwargs):
        deny(event, args)

    return blocked


def find_violation(error, seen):
    if error is None or id(error) in seen:
        return None
    seen.add(id(error))
    if isinstance(error, SandboxViolation):
        return error
    inner = [error.__cause__, error.__context__]
    if isinstance(error, BaseExceptionGroup):
        inner.extend(error.exceptions)
    for candidate in inner:
        found = find_violation(candidate, seen)
        if found is not None:
            return found
    return None


def set_limit(which, value):
    hard = resource.getrlimit(which)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def watch_parent():
    while os.getppid() == PARENT:
        time.sleep(0.25)
    os._exit(1)


def write_report(text):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os.write(REPORT, text.encode("utf-8", "replace"))


def finish(status, message=""):
    write_report("\n" + TOKEN + " " + status + " " + " ".join(message.split()) + "\n")
    os._exit({"passed": 0, "blocked": CONFIG["blocked_exit"]}.get(status, 1))


def main():
    set_limit(resource.RLIMIT_AS, CONFIG["memory_bytes"])
    set_limit(resource.RLIMIT_CPU, CONFIG["cpu_seconds"])
    set_limit(resource.RLIMIT_FSIZE, CONFIG["file_bytes"])
    set_limit(resource.RLIMIT_CORE, 0)
    with open(PROGRAM, encoding="utf-8") as program_file:
        source = program_file.read()
    threading.Thread(target=watch_parent, daemon=True).start()
    _posixsubprocess.fork_exec = blocker("_posixsubprocess.fork_exec")
    for name in ("mknod", "mkfifo"):
        setattr(os, name, blocker("os." + name))
        setattr(posix, name, blocker("os." + name))
    module = types.ModuleType("__main__")
    module.__file__ = PROGRAM
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = [PROGRAM]
    sys.addaudithook(guard)
    try:
        exec(compile(source, PROGRAM, "exec"), module.__dict__)
    except BaseException as error:
        violation = find_violation(error, set())
        if violation is not None:
            finish("blocked", str(violation))
        if isinstance(error, SystemExit):
            text = f"program called exit({error.code!r}) before it finished\n"
        else:
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__.tb_next))
        write_report(text)
        finish("failed")
    finish("passed")


main()
'''


@dataclass
class ExecResult:
    """How a program ended: "passed", "failed", "timeout" or "blocked", with a short explanation."""

    status: str
    detail: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(text: str, limit: int = DETAIL_CHARS) -> str:
    """The last `limit` characters of `text`, starting at a line boundary when cut."""
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    newline = cut.find("\n")
    return "..." + (cut[newline:] if 0 <= newline < limit // 2 else "\n" + cut)


def _read_tail(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - _TAIL_BYTES))
        return f.read().decode("utf-8", "replace")


def _split_report(stderr: str, token: str) -> tuple[str | None, str, str]:
    """(status, message) from the launcher's last report line, and stderr without report lines."""
    status, message, kept = None, "", []
    for line in stderr.splitlines():
        if line.startswith(token + " "):
            _, status, message = (line.split(" ", 2) + [""])[:3]
        else:
            kept.append(line)
    return status, message.strip(), "\n".join(kept)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


_SIGNAL_HINTS = {
    signal.SIGXCPU: "CPU time limit",
    signal.SIGKILL: "CPU time limit or out of memory",
    signal.SIGXFSZ: f"wrote more than {FILE_LIMIT_BYTES // (1024 * 1024)} MB to a file or its output",
    signal.SIGSEGV: "crashed",
}


def run_program(code: str, timeout: float = 5.0, memory_mb: int = 1024) -> ExecResult:
    """Run `code` as a script in a contained child process and report how it ended.

    "passed": the code ran to its end; "failed": it raised, exited early
    (including `exit(0)`) or was killed by a limit; "timeout": it ran longer
    than `timeout` seconds of wall-clock time (its process group is killed);
    "blocked": it tried a forbidden action and the PermissionError escaped.
    `detail` is empty when passed, otherwise the last ~1000 characters of
    its error output (or the blocked action).
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if memory_mb <= 0:
        raise ValueError(f"memory_mb must be positive, got {memory_mb}")
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="fedllm-sandbox-", ignore_cleanup_errors=True) as tmp:
        root = os.path.realpath(tmp)
        config = {
            "token": token,
            "memory_bytes": int(memory_mb) * 1024 * 1024,
            "cpu_seconds": math.ceil(timeout) + 1,
            "file_bytes": FILE_LIMIT_BYTES,
            "blocked_exit": BLOCKED_EXIT,
        }
        files = {"launcher.py": _LAUNCHER, "program.py": code, "sandbox.json": json.dumps(config)}
        for name, text in files.items():
            with open(os.path.join(root, name), "w", encoding="utf-8") as f:
                f.write(text)
        out_path, err_path = os.path.join(root, "stdout.txt"), os.path.join(root, "stderr.txt")
        env = {"PATH": "/usr/bin:/bin", "HOME": root, "TMPDIR": root, "LANG": "C.UTF-8"}
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", os.path.join(root, "launcher.py")],
                cwd=root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                if proc.returncode is None:
                    _kill_group(proc)
                    proc.wait()
        status, message, stderr = _split_report(_read_tail(err_path), token)
        output = stderr.strip() or _read_tail(out_path)
    return _classify(proc.returncode, timed_out, timeout, status, message, output)


def _classify(
    returncode: int, timed_out: bool, timeout: float, status: str | None, message: str, output: str
) -> ExecResult:
    if timed_out:
        return ExecResult("timeout", _tail(f"timed out after {timeout:g} s\n{output}"))
    if status == "passed" and returncode == 0:
        return ExecResult("passed", "")
    if status == "blocked" and returncode == BLOCKED_EXIT:
        return ExecResult("blocked", message[:DETAIL_CHARS])
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
            name = f"{sig.name} ({_SIGNAL_HINTS[sig]})" if sig in _SIGNAL_HINTS else sig.name
        except ValueError:
            name = f"signal {-returncode}"
        return ExecResult("failed", _tail(f"killed by {name}\n{output}"))
    if status is None:
        return ExecResult("failed", _tail(f"exited with code {returncode} before the program finished\n{output}"))
    return ExecResult("failed", _tail(output) or f"exited with code {returncode}")
