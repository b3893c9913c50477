"""llmcls serve: answers match the library, concurrent requests share batches, bad requests get 4xx, never 5xx."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import LABELS

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def classifier(lora_export):
    from llmcls.serving.classifier import load_classifier

    return load_classifier(lora_export, device="cpu")


@pytest.fixture(scope="module")
def server(classifier):
    """The export on a real uvicorn server on loopback. A long batching window (100 ms) makes the batching test
    deterministic on a loaded CI machine; the other tests do not depend on it."""
    from llmcls.serving.app import create_app, running

    app = create_app(classifier, token=TOKEN, max_batch=8, max_wait_ms=100, max_body_bytes=LIMIT, max_texts=16)
    with running(app) as url:
        yield {"url": url, "app": app}


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server["url"], timeout=60) as c:
        yield c


def test_classify_matches_the_library(client, classifier, lora_run, small_data, tmp_path):
    from llmcls.data import read_rows
    from llmcls.serving.classifier import load_classifier

    rows = [json.loads(l) for l in small_data["test"].read_text().splitlines()]
    # Texts far over max_length (128 tokens): the server shortens them before batching, as scoring would.
    rows += [{"text": "pollution and the " * 100, "category": ["Enviornment", "Sport"]},
             {"text": "软件" * 400 + " software", "category": ["Technology", "Politics", "Sport"]}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows), encoding="utf-8")
    r = client.post("/classify", headers=AUTH,
                    json={"inputs": [{"text": x["text"], "candidates": x["category"]} for x in rows]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]

    # The same rows through the run directory (base + adapter) and llmcls's own batch scoring.
    run_clf = load_classifier(lora_run, device="cpu")
    parsed, _ = read_rows(path, run_clf_cfg(lora_run), need_label=False)
    expected = run_clf.classify(parsed)
    assert len(results) == len(expected) == len(rows)
    for got, exp, row in zip(results, expected, rows):
        assert got["label"] == exp.pred
        assert list(got["probs"]) == row["category"]
        assert sum(got["probs"].values()) == pytest.approx(1, abs=1e-9)
        for c, p in exp.probs.items():
            assert got["probs"][c] == pytest.approx(p, abs=1e-5)

    # One text, default candidates: the whole label set.
    one = client.post("/classify", headers=AUTH, json={"text": rows[0]["text"]}).json()["results"]
    assert len(one) == 1 and sorted(one[0]["probs"]) == sorted(LABELS)
    assert client.get("/labels", headers=AUTH).json() == {"labels": sorted(LABELS)}


def run_clf_cfg(run):
    from pathlib import Path

    from llmcls.config import load_config

    return load_config(Path(run) / "config.yaml").data


def test_concurrent_requests_share_batches(server, client):
    texts = [f"{w} the of and {i}" for i, w in enumerate(["football", "election", "pollution", "software"] * 4)]
    alone = [client.post("/classify", headers=AUTH, json={"text": t}).json()["results"][0] for t in texts]
    before = client.get("/health").json()["batcher"]

    async def burst():
        async with httpx.AsyncClient(base_url=server["url"], timeout=60) as ac:
            rs = await asyncio.gather(*(ac.post("/classify", headers=AUTH, json={"text": t}) for t in texts))
        return [r.json()["results"][0] for r in rs]

    together = asyncio.run(burst())
    after = client.get("/health").json()["batcher"]
    batches, rows = after["batches"] - before["batches"], after["rows"] - before["rows"]
    assert rows == len(texts)
    assert batches <= len(texts) // 2, f"{len(texts)} concurrent requests ran in {batches} batches"
    assert after["largest_batch"] <= 8                      # max_batch is respected
    for a, b in zip(alone, together):                        # batching (and padding) changes no answer
        assert a["label"] == b["label"]
        for c in a["probs"]:
            assert a["probs"][c] == pytest.approx(b["probs"][c], abs=1e-5)


def test_bad_requests_get_client_errors(server, client):
    url = server["url"]

    def post(body=None, raw=None, headers=AUTH, **kw):
        if raw is not None:
            return client.post("/classify", content=raw, headers={**headers, "content-type": "application/json"}, **kw)
        return client.post("/classify", json=body, headers=headers, **kw)

    assert post(raw=b'{"text": "football",').status_code == 400             # malformed JSON
    assert post(raw=b"[" * 20000).status_code == 400                         # nested too deeply for the parser
    assert post(raw=b'{"text": "\xff\xfe"}').status_code in (400, 422)       # not UTF-8
    for body in ({}, {"text": ""}, {"text": "  \n\t "}, {"text": None}, {"text": 5}, {"candidates": ["Sport"]},
                 {"text": "x", "candidates": []}, {"text": "x", "candidates": ["Cooking"]},
                 {"text": "x", "candidates": ["Sport", "Sport"]}, {"text": "x", "extra": 1},
                 {"inputs": []}, {"inputs": [{"text": "a"}, {"text": ""}]}, {"inputs": [{"text": "a"}] * 17},
                 {"inputs": [{"text": "a"}], "text": "b"}, [], "text", 3):
        r = post(body)
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert isinstance(r.json()["detail"], list)
    r = post({"text": "x", "candidates": ["Cooking"]})
    assert "Cooking" not in r.text or "Sport" in r.text  # the error names the allowed labels

    big = {"text": "football " * (LIMIT // 9 + 10)}
    assert post(big).status_code == 413                                     # declared Content-Length
    chunks = (b'{"text": "' + b"a" * 1024 + b'"}' if i == 0 else b" " * 1024 for i in range(LIMIT // 1024 + 4))
    r = httpx.post(f"{url}/classify", content=chunks, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413                                              # chunked: counted while reading

    assert post({"text": "football"}, headers={}).status_code == 401
    assert post({"text": "football"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post({"text": "football"}, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert client.get("/labels").status_code == 401
    assert client.get("/labels", headers=AUTH).status_code == 200
    r = post({"text": "football"}, headers={})
    assert r.headers["www-authenticate"] == "Bearer"

    # Still up and answering.
    assert client.get("/health").json()["status"] == "ok"
    assert post({"text": "football and the"}).status_code == 200


def test_openapi_schema_describes_the_api(client):
    schema = client.get("/openapi.json").json()
    assert {"/classify", "/labels", "/health"} <= set(schema["paths"])
    comps = schema["components"]["schemas"]
    text_item = comps["TextItem"]
    cand = next(s for s in text_item["properties"]["candidates"]["anyOf"] if s.get("type") == "array")
    assert cand["items"]["enum"] == sorted(LABELS) and cand["uniqueItems"] is True
    assert text_item["properties"]["text"]["minLength"] == 1
    assert comps["ManyTexts"]["properties"]["inputs"]["maxItems"] == 16
    # the limits that give 422 are in the schema, so a schema-driven client's valid data passes them
    assert text_item["properties"]["text"]["maxLength"] == LIMIT // 16  # serve.max_text_chars capped by the body
    assert cand["maxItems"] == len(LABELS)
    responses = schema["paths"]["/classify"]["post"]["responses"]
    assert "prompt too long" in responses["422"]["description"] and "408" in responses
    assert schema["paths"]["/classify"]["post"]["security"] == [{"HTTPBearer": []}]
    assert {"400", "401", "413", "422"} <= set(schema["paths"]["/classify"]["post"]["responses"])


def test_a_body_shorter_than_its_content_length_gets_408(classifier):
    """A client that declares more bytes than it sends must not hold the connection: 408 once
    serve.body_timeout_s has passed."""
    from urllib.parse import urlsplit

    from llmcls.serving.app import create_app, running

    app = create_app(classifier, token=None, max_body_bytes=LIMIT, body_timeout_s=0.5)
    with running(app) as url:
        u = urlsplit(url)
        with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n" + b'{"text": "foo')
            t0 = time.monotonic()
            reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert 0.4 < time.monotonic() - t0 < 5
        assert httpx.post(f"{url}/classify", json={"text": "football"}, timeout=30).status_code == 200


# ------------------------------------------------------------------------------------- schema-driven fuzzing
@pytest.fixture(scope="module")
def api_schema(server):
    import schemathesis

    return schemathesis.openapi.from_url(f"{server['url']}/openapi.json")


try:
    import schemathesis
    from hypothesis import HealthCheck, settings

    fuzz_schema = schemathesis.pytest.from_fixture("api_schema")

    @fuzz_schema.parametrize()
    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def test_fuzz_from_openapi_finds_no_server_error(case, server):
        """Schemathesis generates valid and invalid requests from the schema; every answer must be one the schema
        documents (status code, content type, body), and none a 5xx."""
        case.call_and_validate(base_url=server["url"], headers=AUTH, timeout=60)
except ImportError:  # pragma: no cover - the test extra installs it
    def test_fuzz_from_openapi_finds_no_server_error():
        pytest.skip("schemathesis is not installed (pip install -e .[test])")


# ------------------------------------------------------------------------------------------ the CLI command
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_binds_loopback_and_requires_the_token(lora_export, tokenizer_dir):
    from llmcls.cli import build_parser, overrides_from
    from llmcls.rundir import export_config

    args = build_parser().parse_args(["serve", str(lora_export)])
    assert export_config(lora_export, overrides_from(args)).serve.host == "127.0.0.1"  # what serve binds

    port = _free_port()
    env = {**os.environ, "LLMCLS_SERVE_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "llmcls.cli", "-q", "serve", str(lora_export), "--port",
                             str(port), "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "llmcls serve did not come up in 120 s"
            time.sleep(0.25)
        assert httpx.post(f"{url}/classify", json={"text": "football"}).status_code == 401
        r = httpx.post(f"{url}/classify", json={"text": "football"}, headers=AUTH, timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["label"] in LABELS
        # Bound to loopback only: the socket's address is 127.0.0.1, not 0.0.0.0.
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            local = [line.split()[3] for line in out.stdout.strip().splitlines()]
            assert local == [f"127.0.0.1:{port}"], out.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=30)
