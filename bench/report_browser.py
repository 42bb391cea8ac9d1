"""How long headless Chromium takes to draw a report page and to redraw a zoom (a script, not a suite).

    python bench/report_browser.py report.html [--shot shot.png]

Prints the number of figures, the seconds until every one was drawn, the seconds one zoom of the
first figure takes to redraw, and the console's errors. Needs selenium, chromium and chromedriver
(Debian: apt install chromium chromium-driver). Results: bench/results/report.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1200"]  # fmt: skip
DRAWN = "return Array.from(document.querySelectorAll('.js-plotly-plot')).every(d => d._fullLayout)"
ZOOM = """const done = arguments[arguments.length - 1];
const g = document.querySelectorAll('.js-plotly-plot')[0], r = g._fullLayout.xaxis.range;
const t = performance.now();
Plotly.relayout(g, {'xaxis.range': [r[0], (r[0] + r[1]) / 2]}).then(() => done((performance.now() - t) / 1000));"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("page")
    p.add_argument("--shot", default=None)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--driver", default="/usr/bin/chromedriver")
    args = p.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for flag in [*FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='report-browser-')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(args.driver), options=options)
    try:
        driver.set_page_load_timeout(900)
        start = time.perf_counter()
        driver.get(Path(args.page).resolve().as_uri())
        WebDriverWait(driver, 900).until(lambda d: d.execute_script(DRAWN))
        drawn = time.perf_counter() - start
        count = driver.execute_script("return document.querySelectorAll('.js-plotly-plot').length")
        driver.set_script_timeout(300)
        zoom = driver.execute_async_script(ZOOM)  # until relayout's promise resolves
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        print(f"{count} figures drawn in {drawn:.1f} s; a zoom of the first redrawn in {zoom:.2f} s; "
              f"console errors: {errors or 'none'}")  # fmt: skip
        if args.shot:
            driver.save_screenshot(args.shot)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
