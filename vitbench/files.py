"""Files that are whole or absent: atomic JSON, a real write probe, fsync. Used by shard prep, the run lock,
checkpoints and results alike, so none of them imports another for these."""

from __future__ import annotations

import json
import os
from pathlib import Path


def loads(text: str | bytes):
    """json.loads for files anyone may have written: nesting too deep for the parser (a RecursionError) is a
    ValueError like any other malformed JSON, so every reader's one-line error catches it."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None


def write_json_atomic(path: Path, obj) -> None:
    """PATH holds OBJ, or what it held before: written beside it, flushed to disk, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def writable_problem(directory: Path) -> str | None:
    """Why files cannot be written in DIRECTORY (made if missing), or None: a real write, not a permission
    guess (a read-only or full filesystem, a file in the way). The probe file is created exclusively, so it
    never writes through a symlink someone left under that name."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            probe.unlink()
    except OSError as e:
        return e.strerror or str(e)
    return None


def fsync(path: Path) -> None:
    """A file's contents, or a folder's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file and folder under ROOT to stable storage (what this host wrote of it)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync(Path(dirpath) / name)
        fsync(Path(dirpath))
