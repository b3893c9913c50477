"""``llmcls serve``: a trained run or an export behind an HTTP JSON API, with dynamic batching.

    POST /classify   {"text": "...", "candidates": ["A", "B"]}            one text (candidates optional)
                     {"inputs": [{"text": "..."}, ...], "candidates": [...]}  many texts
                  -> {"results": [{"label": "A", "probs": {"A": 0.93, "B": 0.07}}, ...]}
    GET  /labels     the label set (the default candidates)
    GET  /health     liveness, model, batching counters (never needs the token)
    GET  /openapi.json, /docs

Requests do not run the model themselves. Each text is first shortened to the run's ``max_length`` on a small
pool of preparation threads (tokenising a 3,000-character text takes milliseconds of CPU that would otherwise
stall the GPU), then queued as one row. One model thread takes rows off the queue — waiting at most
``max_wait_ms`` for company once the first row is there (longer, up to ``PREP_WAIT_FACTOR`` times, while rows are
known to be in preparation), never more than ``max_batch`` rows — scores them with one
:func:`llmcls.infer.score_batch` call, and hands the results back to the event loop. Under load a forward pass
serves many requests at once; alone, a request waits only ``max_wait_ms``. The event loop never runs the model,
so /health answers while a batch runs.

Bad input is refused before it reaches the queue, with the status a client can act on: malformed JSON 400, a
missing or empty text or an unknown candidate 422 (the candidates are an enum of the label set in the OpenAPI
schema), a body over ``max_body_bytes`` 413, a missing or wrong bearer token 401, a full queue 503.

The batcher and the loader need neither FastAPI nor uvicorn (only :func:`create_app` and :func:`run` import them),
so ``benchmarks/serve_load.py`` can drive the batcher in-process where those are not installed.
"""

# No ``from __future__ import annotations`` here: the request models are built at run time from the label set,
# and FastAPI/pydantic must see their annotations as objects, not as strings naming local variables.

import asyncio
import collections
import hmac
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from llmcls.config import PromptConfig
from llmcls.data import Row

# torch and the model code are imported where used: the CLI builds its parser from this module's DEFAULTS, and
# that must not cost a torch import.
if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TOKEN_ENV = "LLMCLS_SERVE_TOKEN"
PREP_WAIT_FACTOR = 10
DEFAULTS = {"max_batch": 32, "max_wait_ms": 5.0, "max_body_bytes": 1 << 20, "max_texts": 64,
            "max_text_chars": 100_000, "max_queue_rows": 4096, "prepare_threads": min(4, os.cpu_count() or 1)}


# ------------------------------------------------------------------------------------------------- model
@dataclass
class Classifier:
    """What serving needs from a run or an export: the model, its prompt, its labels and token budget."""

    model: Any
    tokenizer: Any
    prompt: PromptConfig
    labels: Optional[list[str]]
    max_length: Optional[int]
    name: str
    kind: str                      # "run" or "export"
    builder: Any = field(init=False)

    def __post_init__(self):
        from llmcls.encode import PromptBuilder

        self.builder = PromptBuilder(self.tokenizer, self.prompt)
        self._local = threading.local()

    @property
    def device(self) -> str:
        from llmcls.model import compute_device

        return str(compute_device(self.model))

    @property
    def dtype(self) -> str:
        from llmcls.model import compute_dtype

        return str(compute_dtype(self.model)).replace("torch.", "")

    def prepare(self, rows: Sequence[Row]) -> list[tuple[Row, list[int]]]:
        """Each row with its prompt ids, the text shortened to ``max_length`` as in training
        (:func:`llmcls.infer.prompts_for`). Tokenising costs milliseconds of CPU per long text; done here, on the
        requests' side and on several threads, it overlaps the model's work instead of stalling it. Each thread
        has its own copy of the tokenizer: a fast tokenizer shared between threads can fail with 'Already
        borrowed'."""
        from llmcls.infer import prompts_for

        builder = getattr(self._local, "builder", None)
        if builder is None:
            import copy

            from llmcls.encode import PromptBuilder

            builder = self._local.builder = PromptBuilder(copy.deepcopy(self.tokenizer), self.prompt)
        return list(zip(rows, prompts_for(builder, rows, self.max_length)))

    def score(self, prepared: Sequence[tuple[Row, list[int]]]) -> list:
        """One :class:`llmcls.infer.Prediction` per prepared row, all in one :func:`llmcls.infer.score_batch`."""
        from llmcls.infer import Prediction, score_batch, to_probs

        rows = [r for r, _ in prepared]
        logliks = score_batch(self.model, self.builder, rows, prompts=[p for _, p in prepared])
        out = []
        for i, (r, ll) in enumerate(zip(rows, logliks)):
            probs = dict(zip(r.candidates, to_probs(ll)))
            out.append(Prediction(i, max(probs, key=probs.get), probs))
        return out

    def classify(self, rows: Sequence[Row]) -> list:
        """The library's own path (:func:`llmcls.infer.classify`), for comparisons: the server uses
        :meth:`prepare` and :meth:`score`."""
        from llmcls.infer import classify

        return classify(self.model, self.builder, rows, method="score", batch_size=max(1, len(rows)),
                        max_length=self.max_length, progress=False)


def load_classifier(path: str | Path, device: Optional[str] = None, dtype: Optional["torch.dtype"] = None,
                    compile: bool = False) -> Classifier:
    """A run directory (``llmcls train``) or an export folder (``llmcls export``), told apart by their files.
    ``compile``: regional torch.compile of the decoder layers (:func:`llmcls.model.compile_layers`)."""
    clf = _load_classifier(path, device, dtype)
    if compile:
        from llmcls.model import compile_layers

        compile_layers(clf.model)
    return clf


def _load_classifier(path, device, dtype) -> Classifier:
    from llmcls.export import META_FILE, read_export_meta
    from llmcls.model import device_default, resolve_dtype

    p = Path(path)
    if (p / META_FILE).is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        meta = read_export_meta(p)
        device = device or device_default()
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype or resolve_dtype("auto", device)).to(device)
        model.eval()
        tok = AutoTokenizer.from_pretrained(p)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return Classifier(model, tok, PromptConfig(**meta["prompt"]), list(meta["labels"]), meta["max_length"],
                          p.resolve().name, "export")
    if (p / "config.yaml").is_file():
        from llmcls.model import load_trained
        from llmcls.predict import trained_labels

        model, tok, cfg = load_trained(p, device=device, dtype=dtype)
        return Classifier(model, tok, cfg.prompt, trained_labels(p), cfg.data.max_length, p.resolve().name, "run")
    raise FileNotFoundError(f"{p} is neither a run directory (config.yaml) nor an export ({META_FILE})")


# ---------------------------------------------------------------------------------------------- batching
class Overloaded(RuntimeError):
    """The queue holds ``max_queue_rows`` rows already; the client should retry later."""


@dataclass
class _Item:
    payload: Any            # a row, or what ``prepare`` made of it
    future: asyncio.Future


class Batcher:
    """Dynamic batching: rows from concurrent requests share forward passes.

    ``prepare`` (optional) turns a request's rows into items, on a pool of ``prepare_threads`` threads; ``score``
    maps a list of items (rows, without ``prepare``) to one result each, one batch at a time, on the batcher's own
    model thread. That thread takes its next batch straight off the queue the moment a pass ends: it never waits
    for the event loop, which under load is busy parsing requests and writing responses (a batcher living on the
    event loop left the GPU idle for that long between passes). Results go back to the loop with
    ``call_soon_threadsafe``. A batch that fails is retried item by item, so one bad row fails its own request
    and no other."""

    def __init__(self, score: Callable[[Sequence[Any]], list], max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_queue_rows: int = 4096, prepare: Optional[Callable[[Sequence[Row]], list]] = None,
                 prepare_threads: int = 4):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.score = score
        self.prepare = prepare
        self.prepare_threads = max(1, prepare_threads)
        self._prep_pool: Optional[ThreadPoolExecutor] = None
        self._preparing = 0  # rows between submit() and the queue
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.max_queue_rows = max_queue_rows
        self._items: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.stats = {"batches": 0, "rows": 0, "failed_batches": 0, "batch_sizes": collections.Counter(),
                      "busy_s": 0.0}

    @property
    def queued(self) -> int:
        return len(self._items)

    def start(self) -> None:
        """Start the model thread (idempotent); call from the event loop that will submit."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        if self.prepare is not None and self._prep_pool is None:
            self._prep_pool = ThreadPoolExecutor(max_workers=self.prepare_threads, thread_name_prefix="llmcls-prep")
        self._thread = threading.Thread(target=self._work, name="llmcls-model", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        while self._items:
            item = self._items.popleft()
            if not item.future.done():
                item.future.cancel()
        if self._prep_pool is not None:
            self._prep_pool.shutdown(wait=True)
            self._prep_pool = None

    async def submit(self, rows: Sequence[Row]) -> list:
        """Queue the rows and wait for their results (in order). Raises :class:`Overloaded` when full, or the
        row's own exception (e.g. :class:`PromptTooLong`)."""
        self.start()
        if len(self._items) + len(rows) > self.max_queue_rows:
            raise Overloaded(f"{len(self._items)} rows are queued; retry later")
        loop = asyncio.get_running_loop()
        if self.prepare is not None:
            n = len(rows)
            self._preparing += n
            try:
                rows = await loop.run_in_executor(self._prep_pool, self.prepare, rows)
            finally:
                with self._cond:  # a batch waiting on these rows re-checks at once
                    self._preparing -= n
                    self._cond.notify()
        items = [_Item(r, loop.create_future()) for r in rows]
        with self._cond:
            self._items.extend(items)
            self._cond.notify()
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        finally:
            for i in items:  # the client went away: its rows are skipped if still queued
                if not i.future.done():
                    i.future.cancel()

    def _next_batch(self) -> Optional[list[_Item]]:
        """Block until there is a batch to run (None: stopping). A batch that is not full waits up to max_wait
        for company (under load the queue refills while the model runs, so full batches leave at once). Rows
        still being prepared (tokenised) are known to be milliseconds away: waiting for them, up to
        PREP_WAIT_FACTOR windows, costs less than a forward pass without them."""
        with self._cond:
            while not self._items and not self._stopping:
                self._cond.wait()
            now = time.monotonic()
            deadline, hard = now + self.max_wait, now + self.max_wait * PREP_WAIT_FACTOR
            while len(self._items) < self.max_batch and not self._stopping:
                remaining = (hard if self._preparing else deadline) - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._stopping:
                return None
            batch = []
            while self._items and len(batch) < self.max_batch:
                item = self._items.popleft()
                if not item.future.done():  # skipped: its request was cancelled
                    batch.append(item)
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            t0 = time.perf_counter()
            results = self._score_isolating([i.payload for i in batch])
            self.stats["busy_s"] += time.perf_counter() - t0
            self.stats["batches"] += 1
            self.stats["rows"] += len(batch)
            self.stats["batch_sizes"][len(batch)] += 1
            try:
                self._loop.call_soon_threadsafe(self._resolve, batch, results)
            except RuntimeError:  # the event loop is gone: nobody is waiting any more
                return

    @staticmethod
    def _resolve(batch: list[_Item], results: list) -> None:
        for item, res in zip(batch, results):
            if item.future.done():
                continue
            if isinstance(res, BaseException):
                item.future.set_exception(res)
            else:
                item.future.set_result(res)

    def _score_isolating(self, rows: list[Row]) -> list:
        try:
            return list(self.score(rows))
        except Exception as e:
            if len(rows) == 1:
                return [e]
            self.stats["failed_batches"] += 1
            log.warning("a batch of %d rows failed (%s: %s); scoring its rows one by one", len(rows),
                        type(e).__name__, e)
            out = []
            for r in rows:
                try:
                    out.extend(self.score([r]))
                except Exception as e1:
                    out.append(e1)
            return out

    def snapshot(self) -> dict:
        s = self.stats
        return {"max_batch": self.max_batch, "max_wait_ms": self.max_wait * 1000, "queued_rows": self.queued,
                "batches": s["batches"], "rows": s["rows"], "failed_batches": s["failed_batches"],
                "mean_batch": round(s["rows"] / s["batches"], 3) if s["batches"] else None,
                "largest_batch": max(s["batch_sizes"], default=0), "busy_s": round(s["busy_s"], 3)}


# ------------------------------------------------------------------------------------------------- HTTP
class BodyLimit:
    """Refuses bodies over ``limit`` bytes with 413 before the app parses them: by the declared Content-Length,
    and by counting for chunked uploads (which declare none). The body is buffered here, at most ``limit``."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await self._reply(send, 400, "invalid Content-Length header")
            if size > self.limit:
                return await self._reply(send, 413, f"request body larger than {self.limit} bytes")
        messages, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client disconnected
                messages.append(msg)
                break
            total += len(msg.get("body", b""))
            if total > self.limit:
                return await self._reply(send, 413, f"request body larger than {self.limit} bytes")
            messages.append(msg)
            if not msg.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    async def _reply(send, status: int, detail: str):
        import json

        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _clean_errors(errors) -> list[dict]:
    """Validation errors without the offending input (a long text should not be echoed back) and with every
    context value JSON-safe."""
    out = []
    for e in errors:
        d = {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        ctx = e.get("ctx")
        if ctx:
            d["ctx"] = {str(k): v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
                        for k, v in ctx.items()}
        out.append(d)
    return out


def create_app(clf: Classifier, token: Optional[str] = None, max_batch: int = DEFAULTS["max_batch"],
               max_wait_ms: float = DEFAULTS["max_wait_ms"], max_body_bytes: int = DEFAULTS["max_body_bytes"],
               max_texts: int = DEFAULTS["max_texts"], max_text_chars: int = DEFAULTS["max_text_chars"],
               max_queue_rows: int = DEFAULTS["max_queue_rows"], prepare_threads: int = DEFAULTS["prepare_threads"],
               batcher: Optional[Batcher] = None):
    from contextlib import asynccontextmanager
    from typing import Annotated, Literal, Union

    from fastapi import Body, Depends, FastAPI, HTTPException
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag

    from llmcls.encode import PromptTooLong

    batcher = batcher or Batcher(clf.score, max_batch, max_wait_ms, max_queue_rows, prepare=clf.prepare,
                                 prepare_threads=prepare_threads)
    labels = clf.labels
    if max_body_bytes:
        # Every text the schema allows must fit in a body the server accepts (a character can take 12 bytes as
        # an escaped surrogate pair), so that a text one character too long gets 422 and names the field, not 413.
        max_text_chars = max(1, min(max_text_chars, max_body_bytes // 16))

    # ---- request and response models: the label set becomes an enum, so the schema itself tells clients (and
    # the fuzzer) which candidates exist, and an unknown one fails validation (422) like any other bad field.
    def _encodable(text: str) -> str:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text holds a lone surrogate (not valid Unicode)") from None
        return text

    def _distinct(cands: list) -> list:
        if len(set(cands)) != len(cands):
            raise ValueError("candidates must be distinct")
        return cands

    Label = Literal[tuple(labels)] if labels else Annotated[str, Field(min_length=1, max_length=200)]
    Text = Annotated[str, Field(min_length=1, max_length=max_text_chars, pattern=r"\S",
                                description="The text to classify (not empty, not only whitespace)."),
                     AfterValidator(_encodable)]
    Candidates = Annotated[list[Label], Field(min_length=1, max_length=len(labels) if labels else 256,
                                              json_schema_extra={"uniqueItems": True},
                                              description="Labels to choose from (default: the whole label set)."),
                           AfterValidator(_distinct)]
    if labels:
        OptCandidates = Optional[Candidates]
        cand_default: Any = None
    else:  # no label set known: every text must bring its candidates
        OptCandidates, cand_default = Candidates, ...

    class TextItem(BaseModel):
        model_config = ConfigDict(extra="forbid", title="TextItem")
        text: Text
        candidates: OptCandidates = cand_default  # type: ignore[valid-type]

    class OneText(TextItem):
        model_config = ConfigDict(extra="forbid", title="OneText",
                                  json_schema_extra={"examples": [{"text": "The match ended 2-1.",
                                                                   "candidates": (labels or ["A", "B"])[:2]}]})

    class ManyTexts(BaseModel):
        model_config = ConfigDict(extra="forbid", title="ManyTexts")
        inputs: Annotated[list[TextItem], Field(min_length=1, max_length=max_texts,
                                                description=f"Up to {max_texts} texts.")]
        candidates: Optional[Candidates] = Field(  # type: ignore[valid-type]
            None, description="Default candidates for inputs that bring none.")

    def _shape(v: Any) -> str:
        return "many" if isinstance(v, dict) and "inputs" in v else "one"

    # Told apart by the presence of "inputs", so a bad request is reported against the shape it meant, not both.
    ClassifyRequest = Annotated[Union[Annotated[OneText, Tag("one")], Annotated[ManyTexts, Tag("many")]],
                                Discriminator(_shape)]

    class Result(BaseModel):
        label: str = Field(description="The most probable candidate.")
        probs: dict[str, float] = Field(description="Probability of each candidate (they sum to 1).")

    class ClassifyResponse(BaseModel):
        results: list[Result]

    class Error(BaseModel):
        detail: Any

    class LabelsResponse(BaseModel):
        labels: list[str]

    # ---- app
    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        if labels:  # one pass before the first client: load lazy kernels, fail fast on a broken model
            await batcher.submit([Row("warm-up", list(labels[:2]), None)])
        yield
        await batcher.stop()

    from llmcls.env import environment

    version = environment()["versions"].get("llmcls") or "0"
    app = FastAPI(title="llmcls classifier", version=version, lifespan=lifespan,
                  description=f"Text classifier served by llmcls from {clf.kind} '{clf.name}'.")

    bearer = HTTPBearer(auto_error=False, description=f"The server's token (--token or ${TOKEN_ENV}).")

    async def require_token(creds: Annotated[Optional[HTTPAuthorizationCredentials], Depends(bearer)]):
        # compare_digest: the time taken must not tell how much of a guessed token was right
        if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_token)] if token else []
    errors = {400: {"model": Error, "description": "Malformed JSON."},
              413: {"model": Error, "description": f"Body over {max_body_bytes} bytes."},
              503: {"model": Error, "description": "Queue full; retry later."}}
    if token:
        errors[401] = {"model": Error, "description": "Missing or wrong bearer token."}

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errs = _clean_errors(exc.errors())
        status = 400 if any(e["type"] == "json_invalid" for e in errs) else 422
        return JSONResponse({"detail": errs}, status_code=status)

    @app.exception_handler(RecursionError)
    async def _too_deep(request, exc):  # json.loads gives up on deeply nested arrays this way
        return JSONResponse({"detail": [{"loc": ["body"], "msg": "JSON nested too deeply", "type": "json_invalid"}]},
                            status_code=400)

    @app.post("/classify", response_model=ClassifyResponse, responses=errors, dependencies=auth,
              summary="Classify one or many texts")
    async def classify_texts(req: Annotated[ClassifyRequest, Body()]) -> JSONResponse:
        if isinstance(req, ManyTexts):
            items, default = req.inputs, req.candidates
        else:
            items, default = [req], None
        rows = [Row(it.text, list(it.candidates or default or labels), None) for it in items]
        try:
            preds = await batcher.submit(rows)
        except Overloaded as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
        except PromptTooLong as e:
            where = ["body", "text"] if isinstance(req, OneText) else ["body", "inputs"]
            return JSONResponse({"detail": [{"loc": where, "msg": str(e), "type": "prompt_too_long"}]},
                                status_code=422)
        # Built as plain JSON: the response model above documents it, and validating our own output again on
        # the event loop would cost every request CPU time that the batching needs.
        return JSONResponse({"results": [{"label": p.pred, "probs": p.probs} for p in preds]})

    @app.get("/labels", response_model=LabelsResponse, dependencies=auth, responses={
        k: v for k, v in errors.items() if k == 401}, summary="The label set (default candidates)")
    async def get_labels() -> LabelsResponse:
        return LabelsResponse(labels=list(labels or []))

    @app.get("/health", summary="Liveness, model and batching counters (no token needed)")
    async def health() -> dict:
        return {"status": "ok", "model": clf.name, "source": clf.kind, "device": clf.device, "dtype": clf.dtype,
                "labels": len(labels or []), "max_length": clf.max_length, "batcher": batcher.snapshot()}

    app.state.batcher = batcher
    app.state.classifier = clf
    if max_body_bytes:
        app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app


@contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", start_timeout: float = 120):
    """Serve ``app`` with uvicorn on a background thread for the duration of a ``with`` block; yields the base
    URL. Port 0 picks a free one. Used by the tests and the load benchmark."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start (see the log above)")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{'[' + bound[0] + ']' if ':' in bound[0] else bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def run(path: str | Path, host: str = "127.0.0.1", port: int = 8000, token: Optional[str] = None,
        device: Optional[str] = None, dtype: Optional["torch.dtype"] = None, compile: bool = False,
        log_level: str = "info", **limits) -> None:
    """Load and serve until interrupted. ``token`` defaults to ``$LLMCLS_SERVE_TOKEN``."""
    import uvicorn

    token = token or os.environ.get(TOKEN_ENV) or None
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("serving on %s without a token: anyone who can reach this address can use the model", host)
    clf = load_classifier(path, device, dtype, compile=compile)
    log.info("loaded %s '%s' on %s (%s), %d labels", clf.kind, clf.name, clf.device, clf.dtype,
             len(clf.labels or []))
    uvicorn.run(create_app(clf, token=token, **limits), host=host, port=port, log_level=log_level)
