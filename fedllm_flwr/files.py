"""Files and folders that appear whole or not at all, and locks between processes.

Caches (converted models, FedOT emulators) are shared by every worker on a
machine and run folders are read while a run writes them: each is written
under a temporary name beside its target and renamed into place, which is
atomic within one file system. Locks are `filelock`'s (already installed with
Hugging Face's libraries).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock


def file_lock(path: Path) -> FileLock:
    """An exclusive lock held through a file at `path` (its folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


@contextlib.contextmanager
def temp_folder(parent: Path, name: str) -> Iterator[Path]:
    """A fresh hidden folder in `parent` to fill; gone on exit unless `publish`ed."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, target: Path, replace: bool = False) -> None:
    """Rename the filled folder `tmp` to `target`, readable by other users as a
    shared cache must be. With `replace`, an existing `target` is removed first."""
    tmp.chmod(0o755)
    if replace:
        shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` for a temporary file beside `path`, then rename it to `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))
