"""Stage 3, compiling: torch.compile for the decoder layers (regional, one graph for every layer), for the whole
decoder stack with CUDA graphs (``train.cuda_graphs``), in the background while scoring starts eagerly
(``eval.compile_background``), and the on-disk compile cache all of them share."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

from llmcls.model.load import unwrap

log = logging.getLogger(__name__)

COMPILE_CACHE_ENV = "LLMCLS_COMPILE_CACHE"


def use_compile_cache(folder: Optional[str] = None) -> Path:
    """Point torch.compile's on-disk caches at one persistent folder, so that a process compiling shapes an
    earlier one compiled loads the generated code instead of generating it again (the first step of a 7B run:
    ~70 s of compilation cold; the GPU benchmark ``benchmarks/warmup.py`` measures what a warm cache leaves).

    All of torch's caches live under ``TORCHINDUCTOR_CACHE_DIR``: Inductor's FX-graph cache (the generated code of
    each graph), AOTAutograd's cache (the forward and backward graphs together, so that a hit skips tracing the
    backward too), the autotuning results and, unless ``TRITON_CACHE_DIR`` is set, Triton's compiled kernels. Its
    default is ``/tmp/torchinductor_USER``, which a reboot or a fresh container empties, hence a folder under
    llmcls's cache. Which folder: an already-set ``TORCHINDUCTOR_CACHE_DIR`` wins (the user chose; also our own
    earlier call in this process, since torch keeps paths derived from it once it has compiled) unless it holds
    torch's own default (torch writes that there itself when it first looks the folder up), then ``folder``
    (``model.compile_cache``), then ``$LLMCLS_COMPILE_CACHE``, then ``~/.cache/llmcls/compile`` (``$LLMCLS_CACHE``
    moves ``~/.cache/llmcls``). Must run before the first compilation, so :func:`compile_layers` calls it.

    The switches below are torch's defaults in open-source builds (2.11 and 2.13); they are set explicitly so that
    the behaviour does not rest on a default, and the remote caches (Meta-internal services) stay off. An
    environment variable that forces one of them (``TORCHINDUCTOR_FX_GRAPH_CACHE=0``, ``TORCHINDUCTOR_AUTOGRAD_CACHE=0``)
    still takes precedence: torch's config reads forced variables over values set in code."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from llmcls.model.tiny import cache_root

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # torch writes its default into the variable the first time it looks the folder up (importing peft does),
    # so the default found there is not a choice anyone made
    if given and given != _torch_default_cache_dir():
        chosen = Path(given)
        if folder and Path(folder).expanduser().resolve() != chosen.resolve():
            log.info("compile cache: TORCHINDUCTOR_CACHE_DIR=%s is set, so model.compile_cache=%s is not used",
                     given, folder)
    else:
        chosen = Path(folder or os.environ.get(COMPILE_CACHE_ENV) or cache_root() / "compile").expanduser()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(chosen.resolve())
    chosen.mkdir(parents=True, exist_ok=True)
    for config, name, value in ((inductor_config, "fx_graph_cache", True),
                                (inductor_config, "fx_graph_remote_cache", False),
                                (inductor_config, "autotune_local_cache", True),
                                (inductor_config, "autotune_remote_cache", False),
                                (inductor_config, "bundled_autotune_remote_cache", False),
                                (functorch_config, "enable_autograd_cache", True)):
        if hasattr(config, name):  # a torch without one of them simply lacks that cache
            setattr(config, name, value)
    return chosen


def _torch_default_cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # where torch keeps it elsewhere: its default has been /tmp/torchinductor_USER throughout
        import getpass
        import tempfile

        return os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    return os.path.abspath(default_cache_dir())


def compile_stack(model, cache: Optional[str] = None) -> None:
    """``train.cuda_graphs``: the whole decoder stack (embeddings, every layer, the final norm; not the LM head,
    whose answer positions change with every step) compiled as one graph with torch.compile's
    ``reduce-overhead``, so that a step's forward and its backward are each one recorded CUDA graph, replayed.
    Not layer by layer as :func:`compile_layers` does: with a graph per layer, each layer's forward runs while the
    backward of the one before is still pending, and torch's graph trees then leave their fast path (measured on
    an H200: slower than no graphs at all, docs/BENCHMARKS.md). One graph is recorded per padded step length
    (``PackedCollator.pad_multiple``)."""
    use_compile_cache(cache)
    torch._dynamo.config.specialize_float = True  # as in compile_layers
    unwrap(model).model.compile(dynamic=True, mode="reduce-overhead")


def uncompile_stack(model) -> None:
    """Undo :func:`compile_stack` (``nn.Module.compile`` has no public undo): scoring after training compiles the
    layers its own way, and must not run inside the training's recorded graphs."""
    unwrap(model).model._compiled_call_impl = None


@contextlib.contextmanager
def stack_uncompiled(model):
    """Inside, the decoder stack runs as if :func:`compile_stack` had not compiled it (a no-op for a stack it did
    not compile): dev evaluations during a ``train.cuda_graphs`` run score eagerly instead of recording graphs
    for every shape of a scoring batch."""
    stack = unwrap(model).model
    compiled = stack._compiled_call_impl
    stack._compiled_call_impl = None
    try:
        yield model
    finally:
        stack._compiled_call_impl = compiled


def compile_layers(model, cache: Optional[str] = None, backend: str = "inductor",
                   background: bool = False) -> Optional[BackgroundCompile]:
    """Regional ``torch.compile``: each decoder layer is compiled, launches per layer drop from hundreds to a few,
    and the elementwise work between matrix products is fused. The layers share their code and dynamo inlines
    their modules (parameters are inputs of the graph), so one compiled graph serves every layer: compile time is
    that of one layer, not of 32. Shapes are dynamic: batches of any size and length (packed rows of any total
    length) reuse the compiled code instead of recompiling (``tests/test_warmup.py`` counts the graphs).
    ``cache``: the on-disk compile cache folder (:func:`use_compile_cache`); ``backend``: torch.compile's
    (tests count dynamo's graphs with ``eager``, which generates no code); ``background``: compile on a thread
    while the first calls run eagerly (:class:`BackgroundCompile`, returned; scoring only)."""
    use_compile_cache(cache)
    # A layer's Python floats (the norms' eps, LoRA's dropout p and scaling) are constants. Traced as symbolic
    # floats (torch's default under dynamic shapes), they made dynamo restart every process's first compilation
    # once AOTAutograd had traced it (its scalar-tensorifying pass specialises them anyway): a second trace, and
    # an AOTAutograd cache miss even with a warm cache (docs/BENCHMARKS.md, warm-up).
    torch._dynamo.config.specialize_float = True
    base = unwrap(model)
    earlier = getattr(base.model, "_llmcls_background", None)
    if earlier is not None:  # an earlier scoring's switch still pending: settle it before compiling again
        earlier.switch()
    for layer in base.model.layers:
        layer.compile(dynamic=True, backend=backend)
    base.model._llmcls_background = BackgroundCompile(base.model.layers) if background else None
    return base.model._llmcls_background


class BackgroundCompile:
    """Score eagerly while the compiled layers load on a thread, then switch to them (``eval.compile_background``).

    A fresh process's first compiled call pays dynamo's trace and Inductor's one-time set-up even when the compile
    cache holds every kernel (7B shape, one H200: 2.8 s before the first batch of a fresh ``llmcls eval``, against
    0.58 s for the batch itself). Here the layers start uncompiled; the first call of the first layer hands its
    very arguments to a thread, which calls the compiled layer once with them under the caller's grad, inference
    and autocast modes (thread-local in torch), so dynamo compiles the graph, with the guards, that the caller's
    calls will hit. Meanwhile the caller's batches run eagerly: the GPU has work while the thread traces (the
    caller waits on the GPU with the GIL released). At the first call of the first layer after the thread ends,
    every layer switches to its compiled call. Dynamo's frame hook is thread-local, so the eager calls are not traced.

    Both threads need the GIL: each of the thousands of operations an eager batch launches lets it go for a
    moment, and under Python's default 5 ms switch interval the tracing thread then kept it up to 5 ms each time
    (7B shape, H200: the first three batches took 6 s eagerly beside the thread against 3 s alone). While the thread
    runs the interval is 0.1 ms (restored when it ends): a fresh ``llmcls eval`` of the 1,669 Fudan test rows ran
    91.7-92.0 rows/s against 82.8-88.3 compiling in the foreground, same host (docs/BENCHMARKS.md).

    Eager and compiled layers differ by float rounding only (Inductor fuses the elementwise work); which batches
    ran eagerly depends on timing, so two runs can differ in the last bits of the first batches' scores.
    A compilation error is raised in the caller at the switch, as a foreground compilation would raise it."""

    SWITCH_INTERVAL_S = 1e-4

    def __init__(self, layers):
        self.layers = list(layers)
        self.compiled = [layer._compiled_call_impl for layer in self.layers]
        if any(c is None for c in self.compiled):
            raise ValueError("BackgroundCompile takes layers already compiled (compile_layers)")
        self.thread = None
        self.error: Optional[BaseException] = None
        self.eager_calls = 0
        self.switched = False
        # Module.__call__ calls _compiled_call_impl when set: a dispatcher there, not a hook, since the compiled
        # _call_impl would trace the hook too (a graph break on the thread's lock)
        for i, layer in enumerate(self.layers):
            layer._compiled_call_impl = functools.partial(self._call, i)

    def _call(self, i, *args, **kwargs):
        if i == 0:
            if self.thread is None:
                self._start(args, kwargs)
            elif not self.thread.is_alive():
                self.switch()
                return self.compiled[0](*args, **kwargs)
            self.eager_calls += 1
        return self.layers[i]._call_impl(*args, **kwargs)

    def _start(self, args, kwargs) -> None:
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                 torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None)
        device = torch.cuda.current_device() if torch.cuda.is_available() else None
        # not a daemon: a process that ends first waits for it rather than tearing CUDA down under it
        self.thread = threading.Thread(target=self._compile, args=(args, kwargs, modes, device),
                                       name="llmcls-compile")
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(self.SWITCH_INTERVAL_S)
        self.thread.start()

    def _compile(self, args, kwargs, modes, device):
        grad, inference, autocast = modes
        try:
            if device is not None:
                torch.cuda.set_device(device)
            ctx = contextlib.ExitStack()
            ctx.enter_context(torch.inference_mode() if inference else torch.set_grad_enabled(grad))
            if autocast is not None:
                ctx.enter_context(torch.autocast("cuda", dtype=autocast))
            with ctx:
                self.compiled[0](*args, **kwargs)
        except BaseException as e:  # raised in the caller at the switch
            self.error = e
        finally:
            sys.setswitchinterval(self._interval)

    def switch(self) -> None:
        """Use the compiled layers from now on (waits for the thread if it runs)."""
        if self.switched:
            return
        if self.thread is not None:
            self.thread.join()
        self.switched = True
        for layer, compiled in zip(self.layers, self.compiled):
            layer._compiled_call_impl = compiled
        if self.error is not None:
            raise self.error
