"""The report as a person sees it: rendered by headless Chromium, no console errors, no request leaving the file,
every plot decoded and on screen, and a screenshot saved (to $LLMCLS_ARTIFACTS too, when set)."""

import os
import shutil
import struct

import pytest

import browser


@pytest.fixture(scope="module")
def chromium():
    try:
        pytest.importorskip("playwright.sync_api", reason="pip install playwright (the 'test' extra)")
        return browser.ensure_chromium()
    except (browser.NoBrowser, pytest.skip.Exception) as e:
        if os.environ.get("CI"):  # CI must not pass by skipping the one check that looks at the page
            pytest.fail(f"no browser in CI: {e}")
        pytest.skip(str(e))


def png_dims(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_error_collection_works(chromium, tmp_path):
    """The harness itself: a page with a script error and a broken image is caught (so 0 below means 0)."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><script>console.error("boom"); undefinedCall();</script>'
                    '<img class="plot" data-plot="x" src="missing.png"></body></html>')
    v = browser.visit(page.as_uri())
    assert any("boom" in e for e in v.console_errors)
    assert any("undefinedCall" in e for e in v.page_errors)
    assert v.plots == [{"plot": "x", "complete": True, "width": 0, "height": 0, "shown": v.plots[0]["shown"]}]


def test_report_renders_in_chromium(chromium, trained_run, tmp_path):
    from test_report import PLOTS_ONE_RUN

    report = trained_run / "report.html"
    shot = tmp_path / "report.png"
    v = browser.visit(report.as_uri(), screenshot=shot)
    assert v.console_errors == [] and v.page_errors == [] and v.failed_requests == []
    assert all(u.startswith(("file:", "data:")) for u in v.requests), v.requests  # nothing from the network
    assert [p["plot"] for p in v.plots] == PLOTS_ONE_RUN
    for p in v.plots:
        assert p["complete"] and p["width"] > 300 and p["height"] > 150 and p["shown"] > 200, p
    assert v.sections[:4] == ["At a glance", "Training curves", "Evaluation (LLM vs baseline)", "Confusion matrix"]
    w, h = png_dims(shot)
    assert w == 1400 and h > 2000  # the whole page, not just the first screen
    from PIL import Image

    with Image.open(shot) as im:
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 200  # a rendered page, not a blank one
    if os.environ.get("LLMCLS_ARTIFACTS"):
        dest = os.path.join(os.environ["LLMCLS_ARTIFACTS"], "report-tiny-run.png")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy(shot, dest)
