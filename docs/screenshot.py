"""Screenshot of a report for the docs: ``python docs/screenshot.py RUN/report.html docs/report-demo.png``.

Uses the same headless Debian Chromium + Playwright harness as the browser test (tests/browser.py), and fails if
the page logs an error. The first screen (1400x1000) is what a newcomer sees; pass --full for the whole page.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browser import visit  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report")
    ap.add_argument("png")
    ap.add_argument("--full", action="store_true", help="The whole page instead of the first screen.")
    ap.add_argument("--height", type=int, default=1000)
    a = ap.parse_args()
    v = visit(Path(a.report).resolve().as_uri(), screenshot=Path(a.png), height=a.height, full_page=a.full)
    errors = v.console_errors + v.page_errors + v.failed_requests
    if errors:
        sys.exit(f"the page has errors: {errors}")
    print(f"{a.png}: {len(v.plots)} plots, sections: {', '.join(v.sections)}")
