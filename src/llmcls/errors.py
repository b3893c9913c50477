"""How a command ends when something is wrong: one line naming the setting, the row or the path and the cause,
and an exit status (:func:`error_line`); and the checks on files a command reads and writes that run before any
model library is imported (:func:`input_file`, :func:`writable`). Imports nothing heavy: the CLI uses it before it
knows whether torch will be needed."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from llmcls.config import ConfigError

DEBUG_ENV = "LLMCLS_DEBUG"


def input_file(path, what: str) -> None:
    """An input file that cannot be read stops the command before a model is loaded, not after. A missing name
    without a file suffix is left to the reader: it may be a dataset id rather than a path."""
    if not path or path == "-" or Path(path).is_file():
        return
    if Path(path).is_dir():
        from llmcls.data import is_dataset_folder  # light: llmcls.data imports only the config

        if not is_dataset_folder(path):
            raise ConfigError(f"{what} {path}: is a directory with no data files or saved dataset in it")
        return
    if Path(path).suffix or path.startswith(("/", ".", "~")):
        raise ConfigError(f"{what} {path}: not found")


def writable(path: str | Path, what: str) -> None:
    """Refuse an output that cannot be written (a read-only file system, no permission, a file where a folder must
    be) before the work that would produce it; a full disk still shows only when writing."""
    p = Path(path).absolute()
    at = p if p.is_dir() else p.parent
    while not at.exists():
        at = at.parent
    if not at.is_dir():
        raise ConfigError(f"{what} {path}: {at} is a file, not a folder")
    if not os.access(at, os.W_OK):  # also false for root on a read-only mount
        raise ConfigError(f"{what} {path}: cannot write in {at} (read-only file system or no permission)")


# Errors that are the user's input (a setting, a file, a row): their message is the whole report. Named by module
# so that reporting one imports nothing; a class whose module was never imported cannot have been raised.
_INPUT_ERRORS = (("llmcls.config", "ConfigError"), ("llmcls.data", "DataError"), ("llmcls.encode", "PromptTooLong"),
                 ("llmcls.model.load", "ModelNotFound"), ("llmcls.recipes.train", "RunExists"))


def _raised_here(e: BaseException) -> bool:
    """Whether llmcls itself raised ``e`` (its ValueErrors are refusals written for the user); one from inside a
    library is a bug to report with the traceback."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    package = Path(__file__).resolve().parent
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(package)


def is_error(e: BaseException, module: str, name: str) -> bool:
    cls = getattr(sys.modules.get(module), name, None)
    return cls is not None and isinstance(e, cls)


def error_line(e: BaseException) -> tuple[int, str]:
    """(exit status, one line) for an exception that ended a command: 2 for bad input, settings, files and the
    system (disk full, permissions) and llmcls's own refusals, 1 for anything else (a bug: the line says how to
    get the traceback)."""
    if any(is_error(e, m, n) for m, n in _INPUT_ERRORS) or isinstance(e, (FileExistsError, FileNotFoundError)):
        return 2, str(e)
    if isinstance(e, OSError) and e.strerror:
        where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
        cause = "no space left on the device" if e.errno == errno.ENOSPC else e.strerror
        return 2, f"{where}: {cause}" if where else cause
    if isinstance(e, RecursionError):
        return 2, "input nested too deeply to read"
    if isinstance(e, ValueError) and _raised_here(e):
        return 2, str(e)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return 1, (f"{type(e).__name__}: {first} (an unexpected error: run again with --debug or {DEBUG_ENV}=1 for "
               "the traceback)")
