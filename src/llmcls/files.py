"""Writing results so that a crash never leaves a half-written one behind: every file and every directory is built
under a temporary name beside its target, flushed to disk, and renamed into place. Readers see the old result or
the new one, never a mixture. One way for files (:func:`atomic_open`), one for directories (:func:`atomic_dir`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry is data of the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8"):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result is made to be read by others
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None:  # a failed write (disk full) names no file by itself
            e.filename = str(path)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _finalise_tree(folder: Path) -> None:
    """Flush every file before the rename publishes the folder (a crash must not leave a complete-looking folder
    of truncated weights), and give the usual umask modes: the temporary folder is private (0700) and some
    writers (safetensors) make 0600 files, but a result is made to be shared."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(p, 0o666 & ~mask)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


@contextmanager
def atomic_dir(target: str | Path, exists: Literal["error", "replace", "keep"] = "error") -> Iterator[Path]:
    """Build a directory: yields an empty temporary folder beside ``target``; when the block ends without error its
    files are flushed and it is renamed to ``target``; on error it is removed and ``target`` is untouched.

    ``exists`` says what happens when ``target`` exists as the block ends: ``error`` raises FileExistsError (a
    user's folder is never replaced unasked), ``replace`` moves the old one aside first (a crash between the two
    renames leaves it recoverable under a ``.old`` name) and deletes it after, ``keep`` keeps the existing one and
    drops the new build (another process made the same thing first, e.g. a cache filled on every node)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _finalise_tree(tmp)
        if target.exists():
            if exists == "keep":
                shutil.rmtree(tmp)
                return
            if exists == "error":
                raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.rmdir(old)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def refuse_overwrite(path: str | Path, overwrite: bool) -> None:
    """Outputs a user named explicitly are never replaced unless they asked for it."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
