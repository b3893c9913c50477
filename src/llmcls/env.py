"""The environment a result came from: package versions, device, git commit (every result JSON carries it)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ["llmcls", "torch", "transformers", "peft", "accelerate", "datasets", "swanlab", "scikit-learn"]


def git_commit(path: str | Path | None = None) -> str | None:
    """The checkout's commit (``-dirty`` with uncommitted changes). ``$LLMCLS_GIT_COMMIT`` names it instead where
    the code was copied without its own history (a benchmark's tree sent to a GPU machine: there a stale .git
    would name another commit)."""
    if os.environ.get("LLMCLS_GIT_COMMIT"):
        return os.environ["LLMCLS_GIT_COMMIT"]
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def cpu_model() -> str | None:
    """The processor's name (Linux), for results measured on a CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment() -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
               "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    return {"python": sys.version.split()[0], "platform": platform.platform(), "versions": versions,
            "gpu": gpu, "cpu_threads": torch.get_num_threads(), "git_commit": git_commit()}
