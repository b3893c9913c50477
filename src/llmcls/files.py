"""Writing results so that a crash never leaves a half-written one behind: every file and every directory is built
under a temporary name beside its target, flushed to disk, and renamed into place. Readers see the old result or
the new one, never a mixture. One way for files (:func:`atomic_open`), one for directories (:func:`atomic_dir`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional


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


def _tmp_prefix(target: Path) -> str:
    """``.NAME.PID.``: the writer's process id in the name lets :func:`clean_leftovers` tell a crashed writer's
    leftover (process gone) from another process's write in progress."""
    return f".{target.name}.{os.getpid()}."


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]*\.(?P<kind>tmp|old)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_leftovers(folder: str | Path, names: Optional[set[str]] = None) -> list[Path]:
    """Remove what a crashed (killed, out of disk) writer left in ``folder``: its ``.NAME.PID.*.tmp`` files and
    folders; a ``.NAME.PID.*.old`` folder is an earlier result moved aside by ``atomic_dir(exists="replace")``
    just before the crash, put back when NAME is missing, removed otherwise. A live process's leftovers stay
    (it may still be writing: another rank, or eval while a train runs). ``names``: only the leftovers of these
    targets (in a folder that is the user's, not ours). Returns what was removed or restored.
    Run directories are shared by one host's processes, so a pid check is enough there."""
    folder = Path(folder)
    done: list[Path] = []
    if not folder.is_dir():
        return done
    for p in sorted(folder.iterdir()):
        m = _LEFTOVER.match(p.name)
        if not m or (names is not None and m["name"] not in names) or _alive(int(m["pid"])):
            continue
        target = folder / m["name"]
        if m["kind"] == "old" and not target.exists():
            os.rename(p, target)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(p)
    return done


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8"):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
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


@contextmanager
def atomic_files(*paths: str | Path, encoding: str = "utf-8") -> Iterator[list]:
    """Several files that form one result (predictions and their metrics): yields one open handle per path; each is
    written under a temporary name, and only when every one is written and flushed are they renamed into place,
    one after the other. A failure while writing (a full disk) leaves every old file as it was."""
    paths = [Path(p) for p in paths]
    tmps: list[str] = []
    handles: list = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
            tmps.append(tmp)
            handles.append(os.fdopen(fd, "w", encoding=encoding))
        yield handles
        mask = _umask()
        for fh, tmp in zip(handles, tmps):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            os.chmod(tmp, 0o666 & ~mask)
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
        for parent in {p.parent for p in paths}:
            _fsync_dir(parent)
    except BaseException:
        for fh in handles:
            fh.close()
        for tmp in tmps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise


def write_results(predictions: Path, records: Iterable[dict], metrics_path: Path, metrics: dict) -> None:
    """An evaluation's predictions.jsonl and metrics.json, replaced together (:func:`atomic_files`)."""
    with atomic_files(predictions, metrics_path) as (fp, fm):
        for row in records:
            fp.write(json.dumps(row, ensure_ascii=False) + "\n")
        fm.write(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")


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
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _finalise_tree(tmp)
        if target.exists():
            if exists == "keep":
                shutil.rmtree(tmp)
                return
            if exists == "error":
                raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), suffix=".old", dir=target.parent))
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
