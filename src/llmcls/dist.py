"""Several processes (one per GPU, on one or several nodes): who writes, who waits, how rows are shared out.

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


# ------------------------------------------------------------------------------------------ inference
def classify(model, builder, rows, **kwargs):
    """``llmcls.infer.classify`` over all processes: each classifies every world-th batch of the same batch
    plan a single process would use, and every process gets all predictions back in input order. A row meets
    the same batch (same padding) as in one process, so the results are the same, not just close."""
    from llmcls.infer import classify as classify_one

    if not launched():
        return classify_one(model, builder, rows, **kwargs)
    if not is_main():
        kwargs["progress"] = False
    mine = classify_one(model, builder, rows, shard=(rank(), world_size()), **kwargs)
    merged = [None] * len(rows)
    for part in all_gather([p for p in mine if p is not None]):
        for p in part:
            merged[p.index] = p
    missing = [i for i, p in enumerate(merged) if p is None]
    if missing:  # a broken batch plan would silently drop rows from the metrics
        raise RuntimeError(f"sharded classification lost {len(missing)} rows (first: {missing[:5]})")
    return merged


# --------------------------------------------------------------------------------------------- training
def check_device_map(model_cfg) -> None:
    from llmcls.config import ConfigError

    if model_cfg.device_map and launched():
        raise ConfigError(
            f"model.device_map={model_cfg.device_map} spreads one model over the GPUs of a single process; it "
            f"cannot run under a launcher with {world_size()} processes. Run without torchrun/accelerate, or "
            "(training) use train.fsdp to shard the model over the processes")


def check_launch(cfg) -> None:
    """Refuse settings that cannot work with the way ``train`` was launched, before anything is loaded
    (accelerate would otherwise quietly run DDP where FSDP was asked for on a CPU)."""
    from llmcls.config import ConfigError

    check_device_map(cfg.model)
    if cfg.model.offload_embeddings and launched():
        # DDP and FSDP want every weight of a process on its GPU (DDP refuses a module spread over devices).
        raise ConfigError("model.offload_embeddings is a single-GPU memory saver; it cannot run under a launcher "
                          f"with {world_size()} processes (use train.fsdp to save memory there)")
    if cfg.train.fsdp != "off":
        import torch

        if cfg.model.device_map:
            raise ConfigError("train.fsdp and model.device_map are two ways to split a model; choose one")
        if cfg.model.quantize != "none":
            raise ConfigError(f"model.quantize={cfg.model.quantize} with train.fsdp: FSDP cannot shard "
                              "bitsandbytes' packed 4-bit weights here; use DDP (train.fsdp: off) or no quantize")
        if not launched():
            raise ConfigError(f"train.fsdp={cfg.train.fsdp} shards the model over several processes: launch with "
                              "'torchrun --nproc_per_node N -m llmcls.cli train ...' (or accelerate launch)")
        if not torch.cuda.is_available():
            raise ConfigError("train.fsdp needs CUDA GPUs (on CPUs accelerate would silently fall back to DDP)")
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise ConfigError("the launcher asks for FSDP (an accelerate FSDP config) but train.fsdp is 'off'; set "
                          "train.fsdp to full_shard or shard_grad_op and launch without the FSDP config")


def trainer_arguments(cfg) -> dict:
    """TrainingArguments for several processes (harmless for one).

    FSDP (``train.fsdp``) is FSDP2 through accelerate: the units gathered for compute are the model's own
    ``_no_split_modules`` (whole decoder layers), accelerate's default. With ``cpu_ram_efficient_loading`` only
    the first process of each node reads the checkpoint; the others start from zero-filled placeholders and
    accelerate sends rank 0's weights into every shard."""
    # Every trainable weight gets a gradient each step; DDP's search for unused ones would cost every step.
    out: dict = {"ddp_find_unused_parameters": False}
    if launched() and _on_cpu():  # see state(): the CI's gloo runs
        out.update(use_cpu=True, ddp_backend="gloo")
    if cfg.train.fsdp != "off":
        out.update(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": cfg.train.fsdp == "full_shard",
                                           "cpu_ram_efficient_loading": True})
    return out


def fsdp_loading(cfg, on: bool) -> None:
    """Switch transformers' FSDP loading mode: with it on, ``from_pretrained`` reads real weights only on each
    node's first process, the others get zeros (accelerate then sends rank 0's into every shard). On before the
    model is loaded
    (the Trainer's own switch comes with its construction, too late); off once training is over, or a later
    load in the same process (``llmcls run`` evaluates next) would get zeros on the other processes."""
    if cfg.train.fsdp == "off":
        return
    from accelerate.utils import disable_fsdp_ram_efficient_loading, enable_fsdp_ram_efficient_loading

    enable_fsdp_ram_efficient_loading() if on else disable_fsdp_ram_efficient_loading()


def full_state_dict(model, trainable_only: bool) -> dict:
    """The whole weights of an FSDP-sharded model on rank 0 (empty dict elsewhere). Every process must call it:
    each contributes its shards. ``trainable_only`` gathers just the adapter, not the frozen base model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=trainable_only))
