"""``llmcls serve``: a trained run or an export behind an HTTP JSON API, with dynamic batching
(``serving/batcher.py``).

    POST /classify   {"text": "...", "candidates": ["A", "B"]}            one text (candidates optional)
                     {"inputs": [{"text": "..."}, ...], "candidates": [...]}  many texts
                     optional "top_k": 3 (both shapes)
                  -> {"results": [{"label": "A", "probs": {"A": 0.93, "B": 0.07}, "confidence": 0.93,
                                   "abstain": false, "top_k": [["A", 0.93], ...]}, ...]}
                     (abstain only where the model has a threshold, top_k only when asked)
    GET  /labels     the label set (the default candidates)
    GET  /health     liveness, model, batching counters (never needs the token)
    GET  /openapi.json, /docs

Bad input is refused before it reaches the queue, with the status a client can act on: malformed JSON 400, a
missing or empty text or an unknown candidate 422 (the candidates are an enum of the label set in the OpenAPI
schema), a body over ``serve.max_body_bytes`` 413, a missing or wrong bearer token 401, a full queue 503.
Limits are the ``serve.*`` settings (``llmcls.config.ServeConfig``).
"""

# No ``from __future__ import annotations`` here: the request models are built at run time from the label set,
# and FastAPI/pydantic must see their annotations as objects, not as strings naming local variables.

import asyncio
import hmac
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from llmcls.config import ServeConfig
from llmcls.data import Row
from llmcls.serving.batcher import Batcher, Overloaded
from llmcls.serving.classifier import Classifier, load_classifier

log = logging.getLogger(__name__)

TOKEN_ENV = "LLMCLS_SERVE_TOKEN"


class BodyLimit:
    """Refuses bodies over ``limit`` bytes with 413 before the app parses them: by the declared Content-Length,
    and by counting for chunked uploads (which declare none). The body is buffered here, at most ``limit`` (0: no
    limit). A body that has not fully arrived ``timeout`` seconds after the request began gets 408: uvicorn's
    keep-alive timeout covers idle connections only, so a client sending less than its Content-Length would
    otherwise hold a connection (and its buffer) for as long as it likes."""

    def __init__(self, app, limit: int, timeout: Optional[float] = None):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await self._reply(send, 400, "invalid Content-Length header")
            if self.limit and size > self.limit:
                return await self._reply(send, 413, f"request body larger than {self.limit} bytes")
        messages, total = [], 0
        deadline = None if not self.timeout else asyncio.get_running_loop().time() + self.timeout
        while True:
            try:
                msg = await (receive() if deadline is None else
                             asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time())))
            except asyncio.TimeoutError:
                return await self._reply(send, 408, f"request body not received within {self.timeout:g} s")
            if msg["type"] != "http.request":  # the client disconnected
                messages.append(msg)
                break
            total += len(msg.get("body", b""))
            if self.limit and total > self.limit:
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




# ---------------------------------------------------------------------------------------- request schemas
@dataclass
class Schemas:
    """The request and response models of one server. Built per server because the label set becomes an enum:
    the schema itself tells clients (and the fuzzer) which candidates exist, and an unknown one fails validation
    (422) like any other bad field."""

    OneText: Any
    ManyTexts: Any
    ClassifyRequest: Any
    ClassifyResponse: Any
    LabelsResponse: Any
    Error: Any


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


def _not_bool(v: Any) -> Any:
    # JSON Schema's integer admits 3.0 but not false; pydantic's lax mode would take false as 0
    if isinstance(v, bool):
        raise ValueError("an integer, not true or false")
    return v


def _shape(v: Any) -> str:
    return "many" if isinstance(v, dict) and "inputs" in v else "one"


def build_schemas(labels: Optional[list[str]], max_texts: int, max_text_chars: int) -> Schemas:
    from typing import Annotated, Literal, Union

    from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

    Label = Literal[tuple(labels)] if labels else Annotated[str, Field(min_length=1, max_length=200, pattern=r"\S")]
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

    TopK = Annotated[int, Field(ge=0, le=len(labels) if labels else 256,
                                description="Also return the k most probable candidates (0: not asked)."),
                     BeforeValidator(_not_bool)]

    class TextItem(BaseModel):
        model_config = ConfigDict(extra="forbid", title="TextItem")
        text: Text
        candidates: OptCandidates = cand_default  # type: ignore[valid-type]

    class OneText(TextItem):
        model_config = ConfigDict(extra="forbid", title="OneText",
                                  json_schema_extra={"examples": [{"text": "The match ended 2-1.",
                                                                   "candidates": (labels or ["A", "B"])[:2]}]})
        top_k: TopK = 0

    class ManyTexts(BaseModel):
        model_config = ConfigDict(extra="forbid", title="ManyTexts")
        inputs: Annotated[list[TextItem], Field(min_length=1, max_length=max_texts,
                                                description=f"Up to {max_texts} texts.")]
        candidates: Optional[Candidates] = Field(  # type: ignore[valid-type]
            None, description="Default candidates for inputs that bring none.")
        top_k: TopK = 0

    # Told apart by the presence of "inputs", so a bad request is reported against the shape it meant, not both.
    ClassifyRequest = Annotated[Union[Annotated[OneText, Tag("one")], Annotated[ManyTexts, Tag("many")]],
                                Discriminator(_shape)]

    class Result(BaseModel):
        label: str = Field(description="The most probable candidate.")
        probs: dict[str, float] = Field(description="Probability of each candidate (they sum to 1), calibrated "
                                                    "where the model has a calibration.")
        confidence: float = Field(description="The label's probability.")
        abstain: Optional[bool] = Field(None, description="True when the confidence is below the model's "
                                                          "abstention threshold: send the text to a person. "
                                                          "Present when the model has a threshold.")
        top_k: Optional[list[tuple[str, float]]] = Field(
            None, description="The top_k most probable candidates, most probable first (when asked).")
        labels: Optional[list[str]] = Field(
            None, description="Multi-label models: every candidate over its label's threshold (and the most "
                              "probable one), most probable first.")

    class ClassifyResponse(BaseModel):
        results: list[Result]

    class Error(BaseModel):
        detail: Any

    class LabelsResponse(BaseModel):
        labels: list[str]

    return Schemas(OneText, ManyTexts, ClassifyRequest, ClassifyResponse, LabelsResponse, Error)


def result(p, top_k: int, thresholds=None) -> dict:
    """One ``Result``: the fields old clients read (label, probs) and the newer ones beside them; ``thresholds``
    (a multi-label model's :class:`llmcls.multilabel.Thresholds`) adds the predicted ``labels``."""
    out = {"label": p.pred, "probs": p.probs, "confidence": p.confidence}
    if thresholds is not None:
        out["labels"] = thresholds.select(list(p.probs), list(p.probs.values()))
    if p.abstain is not None:
        out["abstain"] = p.abstain
    if top_k:
        out["top_k"] = p.top_k(top_k)
    return out


# ------------------------------------------------------------------------------------------------- app
def create_app(clf: Classifier, token: Optional[str] = None, cfg: Optional[ServeConfig] = None,
               batcher: Optional[Batcher] = None, **limits):
    """The FastAPI app serving ``clf``. ``cfg`` holds the limits (``serve.*``); keyword ``limits`` override single
    fields of it (``max_batch=8``)."""
    from contextlib import asynccontextmanager
    from dataclasses import replace
    from typing import Annotated

    from fastapi import Body, Depends, FastAPI, HTTPException
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    from llmcls.encode import PromptTooLong

    cfg = replace(cfg or ServeConfig(), **limits)
    batcher = batcher or Batcher(clf.score, cfg.max_batch, cfg.max_wait_ms, cfg.max_queue_rows, prepare=clf.prepare,
                                 prepare_threads=cfg.prepare_threads or min(4, os.cpu_count() or 1))
    labels = clf.labels
    max_text_chars = cfg.max_text_chars
    if cfg.max_body_bytes:
        # Every text the schema allows must fit in a body the server accepts (a character can take 12 bytes as
        # an escaped surrogate pair), so that a text one character too long gets 422 and names the field, not 413.
        max_text_chars = max(1, min(max_text_chars, cfg.max_body_bytes // 16))
    s = build_schemas(labels, cfg.max_texts, max_text_chars)
    ClassifyRequest, OneText, ManyTexts = s.ClassifyRequest, s.OneText, s.ManyTexts

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
    errors = {400: {"model": s.Error, "description": "Malformed JSON."},
              408: {"model": s.Error, "description": f"Body not received within {cfg.body_timeout_s:g} s."},
              413: {"model": s.Error, "description": f"Body over {cfg.max_body_bytes} bytes."},
              422: {"model": s.Error, "description": (
                  f"A field outside the schema's limits (a text over {max_text_chars} characters, over "
                  f"{cfg.max_texts} texts, an unknown candidate), or a prompt too long for the model's "
                  f"{clf.max_length} tokens even with the text cut (too many or too long candidates).")},
              503: {"model": s.Error, "description": "Queue full; retry later."}}
    if token:
        errors[401] = {"model": s.Error, "description": "Missing or wrong bearer token."}

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errs = _clean_errors(exc.errors())
        status = 400 if any(e["type"] == "json_invalid" for e in errs) else 422
        return JSONResponse({"detail": errs}, status_code=status)

    @app.exception_handler(RecursionError)
    async def _too_deep(request, exc):  # json.loads gives up on deeply nested arrays this way
        return JSONResponse({"detail": [{"loc": ["body"], "msg": "JSON nested too deeply", "type": "json_invalid"}]},
                            status_code=400)

    @app.post("/classify", response_model=s.ClassifyResponse, responses=errors, dependencies=auth,
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
        return JSONResponse({"results": [result(p, req.top_k, clf.thresholds) for p in preds]})

    @app.get("/labels", response_model=s.LabelsResponse, dependencies=auth, responses={
        k: v for k, v in errors.items() if k == 401}, summary="The label set (default candidates)")
    async def get_labels():
        return s.LabelsResponse(labels=list(labels or []))

    @app.get("/health", summary="Liveness, model and batching counters (no token needed)")
    async def health() -> dict:
        cal = clf.calibration
        return {"status": "ok", "model": clf.name, "source": clf.kind, "device": clf.device, "dtype": clf.dtype,
                "labels": len(labels or []), "max_length": clf.max_length, "batcher": batcher.snapshot(),
                "long_text": vars(clf.windows) if clf.windows is not None else None,
                "calibration": None if cal is None else {"method": cal.method, "temperature": cal.temperature,
                                                         "threshold": cal.threshold}}

    app.state.batcher = batcher
    app.state.classifier = clf
    if cfg.max_body_bytes or cfg.body_timeout_s:
        app.add_middleware(BodyLimit, limit=cfg.max_body_bytes, timeout=cfg.body_timeout_s)
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


def serve(path: str | Path, cfg: Optional[ServeConfig] = None, token: Optional[str] = None,
          log_level: str = "info", abstain_below: Optional[float] = None, windows=None) -> None:
    """Load and serve until interrupted, as ``cfg`` (``serve.*``) says. ``token`` defaults to ``$LLMCLS_SERVE_TOKEN``.
    ``windows``: how long texts are read (:class:`llmcls.windows.WindowSettings`; default: as the run or export
    says)."""
    import uvicorn

    import torch

    cfg = cfg or ServeConfig()
    token = token or os.environ.get(TOKEN_ENV) or None
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("serving on %s without a token: anyone who can reach this address can use the model", cfg.host)
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    clf = load_classifier(path, cfg.device, dtype, compile=cfg.compile)
    clf.abstain_below = abstain_below
    clf.windows = windows or clf.windows
    log.info("loaded %s '%s' on %s (%s), %d labels", clf.kind, clf.name, clf.device, clf.dtype,
             len(clf.labels or []))
    uvicorn.run(create_app(clf, token=token, cfg=cfg), host=cfg.host, port=cfg.port, log_level=log_level)
