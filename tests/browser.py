"""Headless Debian Chromium driven by Playwright (its own browser download does not work offline; Debian's does).

Used by the report's browser test and by ``docs/screenshot.py``. Chromium is installed with apt where missing
and the process runs as root (CI here); elsewhere the caller is told how to install it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# Without the networking flags Chromium keeps calling Google's services, which a closed network refuses noisily.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


class NoBrowser(RuntimeError):
    pass


def ensure_chromium(install: bool = True) -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        r = subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, env=env,
                           capture_output=True, text=True, timeout=1200)
        path = shutil.which("chromium")
        if path:
            return path
        raise NoBrowser(f"apt-get install chromium failed: {r.stderr.strip()[-500:]}")
    raise NoBrowser("Debian's chromium is missing: apt-get install chromium (as root)")


@dataclass
class PageVisit:
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    plots: list[dict] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)


def visit(url: str, screenshot: Path | None = None, width: int = 1400, height: int = 1000,
          full_page: bool = True) -> PageVisit:
    """Open ``url`` in a fresh headless profile, wait for it to load, collect errors and the plots' state."""
    from playwright.sync_api import sync_playwright

    exe = ensure_chromium()
    out = PageVisit()
    with sync_playwright() as p:
        # launch() starts Chromium headless with a new temporary --user-data-dir of its own.
        browser = p.chromium.launch(executable_path=exe, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: out.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: out.page_errors.append(str(e)))
            page.on("requestfailed", lambda r: out.failed_requests.append(r.url))
            page.on("request", lambda r: out.requests.append(r.url))
            page.goto(url, wait_until="load")
            out.plots = page.evaluate("""() => Array.from(document.querySelectorAll('img.plot')).map(i => ({
                plot: i.dataset.plot, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
                shown: i.getBoundingClientRect().width}))""")
            out.sections = page.evaluate("() => Array.from(document.querySelectorAll('section h2'))"
                                         ".map(h => h.textContent)")
            if screenshot is not None:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=full_page)
        finally:
            browser.close()
    return out
