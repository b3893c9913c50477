"""The dynamic batcher on its own, with a scorer that records its calls (no model, no HTTP)."""

import asyncio
import threading
import time

import pytest

from llmcls.data import Row
from llmcls.serving.batcher import Batcher, Overloaded


class Recorder:
    def __init__(self, delay=0.0, fail_on=None):
        self.calls, self.delay, self.fail_on = [], delay, fail_on
        self.threads = set()

    def __call__(self, rows):
        self.calls.append([r.text for r in rows])
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        if self.fail_on and any(r.text == self.fail_on for r in rows):
            raise ValueError(f"cannot score {self.fail_on}")
        return [f"result:{r.text}" for r in rows]


def rows(*texts):
    return [Row(t, ["A", "B"], None) for t in texts]


async def _burst(batcher, n, per_request=1):
    batcher.start()
    reqs = [batcher.submit(rows(*(f"t{i}.{j}" for j in range(per_request)))) for i in range(n)]
    out = await asyncio.gather(*reqs, return_exceptions=True)
    await batcher.stop()
    return out


def test_concurrent_rows_share_batches_up_to_max_batch():
    rec = Recorder(delay=0.01)
    b = Batcher(rec, max_batch=4, max_wait_ms=50)
    out = asyncio.run(_burst(b, 10))
    assert out == [[f"result:t{i}.0"] for i in range(10)]       # every request gets its own rows back, in order
    sizes = [len(c) for c in rec.calls]
    assert sum(sizes) == 10 and max(sizes) == 4 and len(sizes) == 3
    assert len(rec.threads) == 1                               # one model thread, never the event loop's


def test_max_batch_one_is_one_row_per_pass():
    rec = Recorder()
    out = asyncio.run(_burst(Batcher(rec, max_batch=1, max_wait_ms=50), 5, per_request=2))
    assert all(len(c) == 1 for c in rec.calls) and len(rec.calls) == 10
    assert out[3] == ["result:t3.0", "result:t3.1"]


def test_a_failing_row_fails_only_its_own_request():
    rec = Recorder(fail_on="t2.0")
    b = Batcher(rec, max_batch=8, max_wait_ms=50)
    out = asyncio.run(_burst(b, 5))
    assert isinstance(out[2], ValueError)
    assert [o for i, o in enumerate(out) if i != 2] == [[f"result:t{i}.0"] for i in (0, 1, 3, 4)]
    assert b.stats["failed_batches"] == 1


def test_full_queue_is_refused_not_grown():
    async def main():
        b = Batcher(Recorder(delay=0.2), max_batch=2, max_wait_ms=0, max_queue_rows=3)
        b.start()
        first = asyncio.ensure_future(b.submit(rows("a", "b")))
        await asyncio.sleep(0.05)                            # the first batch is running, the queue is empty
        second = asyncio.ensure_future(b.submit(rows("c", "d", "e")))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await b.submit(rows("f"))
        assert await first == ["result:a", "result:b"]
        assert await second == ["result:c", "result:d", "result:e"]
        await b.stop()

    asyncio.run(main())


def test_rows_of_a_cancelled_request_are_skipped():
    async def main():
        rec = Recorder(delay=0.1)
        b = Batcher(rec, max_batch=1, max_wait_ms=0)
        b.start()
        busy = asyncio.ensure_future(b.submit(rows("busy")))
        await asyncio.sleep(0.02)
        gone = asyncio.ensure_future(b.submit(rows("gone")))
        await asyncio.sleep(0.01)
        gone.cancel()                                        # the client disconnected while queued
        assert await busy == ["result:busy"]
        assert await b.submit(rows("next")) == ["result:next"]
        await b.stop()
        return rec.calls

    assert asyncio.run(main()) == [["busy"], ["next"]]


def test_next_batch_leaves_while_the_event_loop_is_busy():
    """The model thread takes the next batch off the queue itself: a pass does not wait for the event loop, which
    under load is busy with HTTP (here: blocked outright for 0.5 s)."""
    starts = []

    def score(items):
        starts.append(time.monotonic())
        time.sleep(0.1)
        return [f"result:{r.text}" for r in items]

    async def main():
        b = Batcher(score, max_batch=2, max_wait_ms=0)
        b.start()
        reqs = [asyncio.ensure_future(b.submit(rows(f"t{i}"))) for i in range(6)]
        await asyncio.sleep(0.02)             # all six rows queued, the first pass running
        blocked = time.monotonic()
        time.sleep(0.5)                       # the event loop does nothing for 0.5 s
        out = await asyncio.gather(*reqs)
        await b.stop()
        return blocked, out

    blocked, out = asyncio.run(main())
    assert out == [[f"result:t{i}"] for i in range(6)]
    assert len(starts) == 3                   # 3 passes of 2 rows, all started while the loop was blocked
    assert all(t < blocked + 0.5 for t in starts)
    assert 0.19 <= starts[2] - starts[0] < 0.45  # back to back: two passes of 0.1 s in between


def test_load_generator_counts_only_the_measuring_window():
    """benchmarks/serve_load.py's closed-loop driver, against a fake 10 ms server."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    async def send(row):
        await asyncio.sleep(0.01)
        return 200 if row["text"] != "bad" else 500

    rows = [{"text": "a", "candidates": ["A"]}] * 3 + [{"text": "bad", "candidates": ["A"]}]
    raw = asyncio.run(bench.drive(send, rows, concurrency=4, warmup_s=0.1, seconds=0.5))
    assert raw["errors"] > 0 and raw["statuses"]["500"] == raw["errors"]
    # 4 clients x 0.5 s / 10 ms = at most 200 answers in the window, 3 in 4 of them good.
    assert 40 <= raw["completed"] <= 160
    assert all(5 <= ms < 200 for ms in raw["latencies_ms"])
    m = bench.summarise("x", 1, raw, {"mean_batch": 1.0})
    assert m["rows_per_s"] == pytest.approx(raw["completed"] / 0.5) and m["p50_ms"] <= m["p99_ms"]
