"""Several processes (one per GPU, on one or several nodes): who they are, who writes, who waits. Primitives only:
what a recipe does with them (sharded scoring in ``llmcls.infer``, FSDP settings in ``llmcls.trainer``) lives there.

``torchrun``, ``accelerate launch`` and torchrun's multi-node rendezvous all set ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``. :func:`state` turns them into a process group through accelerate's ``PartialState`` (NCCL on
GPUs, gloo on CPUs), the same state the HF Trainer uses later, so nothing is initialised twice. Without a
launcher every helper here is a single-process no-op and nothing distributed is imported or started.

Global rank 0 alone writes the run directory; the other processes wait for it and read what it wrote. Runs
over several nodes therefore need ``train.output_dir`` on a filesystem that every node sees, which the
Trainer's own checkpoints (written by rank 0 only) and ``--resume`` already require.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")

# TrainingArguments.ddp_timeout's default: rank 0 may spend minutes encoding data while the others wait.
TIMEOUT = timedelta(seconds=1800)


class OtherRankFailed(RuntimeError):
    """Raised on every other process when a step that rank 0 runs alone failed there. Rank 0 raises (and the
    CLI reports) the real error; the others only stop."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """True under torchrun / accelerate launch with more than one process."""
    return world_size() > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def state():
    """The process group of a launched run, started on first use (None in a single process)."""
    if not launched():
        return None
    from accelerate import PartialState

    # accelerate makes CPU processes a group only when told they are CPU processes (else: N lone processes).
    return PartialState(cpu=True, backend="gloo", timeout=TIMEOUT) if _on_cpu() else PartialState(timeout=TIMEOUT)


def device() -> Optional[str]:
    """This process's device under a launcher ('cuda:LOCAL_RANK' or 'cpu'); None in a single process."""
    st = state()
    return None if st is None else str(st.device)


def barrier() -> None:
    st = state()
    if st is not None:
        st.wait_for_everyone()


def local_main_first():
    """Context: the first process of each node goes first (hub downloads and caches are per node), the node's
    other processes then find the files in place."""
    st = state()
    return nullcontext() if st is None else st.local_main_process_first()


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its (picklable) result to every process. The others wait meanwhile.
    An exception on rank 0 is raised there and turns into :class:`OtherRankFailed` elsewhere, so no process
    is left waiting for a result that will never come."""
    if not launched():
        return fn()
    import torch.distributed as tdist

    state()
    box: list[Any] = [None]
    error: Optional[BaseException] = None
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # sent as text: exceptions with custom constructors do not unpickle
            error = e
            box[0] = ("error", f"{type(e).__name__}: {e}")
    tdist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise OtherRankFailed(f"rank 0 failed: {value}")
    return value


def all_gather(obj: T) -> list[T]:
    """Every process's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not launched():
        return [obj]
    import torch.distributed as tdist

    state()
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out
