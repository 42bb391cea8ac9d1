"""The report in a real browser (headless Chromium via Selenium), its PNG export (kaleido) and the scaling
command's HTML and PNG figures. All slow: each starts a browser.

The browser comes from Debian's chromium and chromium-driver packages: installed here by apt-get when
running as root (as CI does) and missing, else the test is skipped with the reason.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("plotly", reason="the report needs plotly: pip install 'nanollama[report]'")

from nanollama.report import figures  # noqa: E402
from nanollama.report.__main__ import main  # noqa: E402
from nanollama.report.synthetic import write_run, write_sweep  # noqa: E402
from nanollama.scaling.__main__ import main as scaling_main  # noqa: E402

pytestmark = pytest.mark.slow
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1800"]  # fmt: skip


def _browser() -> tuple[str, str] | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    return found if all(found) else None


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """(chromium, chromedriver) paths, installing Debian's packages first when root and they are missing."""
    if _browser() is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
        if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode != 0:  # stale package lists
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            subprocess.run(cmd, env=env, capture_output=True, timeout=900)
    found = _browser()
    if found is None:
        pytest.skip("no chromium + chromedriver, and they could not be installed (apt-get install chromium "
                    "chromium-driver as root)")  # fmt: skip
    return found


@pytest.fixture
def driver(chromium, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=chromium[1]), options=options)
    yield d
    d.quit()


def test_the_report_renders_every_figure_in_headless_chromium(tmp_path, driver):
    from selenium.webdriver.support.ui import WebDriverWait

    sweep = write_sweep(tmp_path / "sweep", dims=(16, 32, 64), seeds=(0, 1), steps=400, running=1)
    run = write_run(tmp_path / "run", steps=400, probes=True, profile=True)
    out = tmp_path / "report.html"
    assert main([str(sweep), str(run), "-o", str(out)]) == 0
    figs = figures(sweep, run)
    assert any("scaling_loss_vs_N" in k for k in figs) and any("final_losses" in k for k in figs)
    driver.get(out.as_uri())
    count = "return document.querySelectorAll('.js-plotly-plot').length"
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(count) == len(figs))
    traces = driver.execute_script(
        "return Array.from(document.querySelectorAll('.js-plotly-plot')).map(d => d._fullLayout ? d.data.length : -1)"
    )
    assert traces == [len(f.data) for f in figs.values()]  # every div was drawn with all of its traces
    drawn = driver.execute_script(  # SVG paths of scatter lines and table cells actually in the page
        "return Array.from(document.querySelectorAll('.js-plotly-plot')).map("
        "d => d.querySelectorAll('g.trace, g.table').length)"
    )
    assert all(n > 0 for n in drawn), drawn
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    shot = tmp_path / "report.png"
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1400, min(height, 4000))
    assert driver.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000


def test_png_export_writes_one_file_per_figure_or_says_why_not(tmp_path, chromium, capsys):
    run = write_run(tmp_path / "run", steps=200, probes=True)
    out = tmp_path / "png"
    assert main([str(run), "-o", str(tmp_path / "r.html"), "--png", str(out)]) == 0
    text = capsys.readouterr().out
    if "PNG skipped" in text:
        pytest.skip(text.strip().splitlines()[-1])
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"{k}.png" for k in figures(run))
    assert all((out / p).read_bytes()[:4] == b"\x89PNG" for p in pngs) and not list(out.glob(".*"))


def test_the_scaling_command_writes_html_and_png_beside_its_svgs(tmp_path, chromium, capsys):
    sweep = write_sweep(tmp_path / "sweep", dims=(16, 32, 64), seeds=(0, 1), steps=200)
    out = tmp_path / "fit"
    assert scaling_main([str(sweep), "--form", "N", "--out", str(out), "--boot", "50"]) == 0
    text = capsys.readouterr().out
    names = ["excess_vs_N", "loss_vs_N", "residuals_vs_N"]
    assert sorted(p.stem for p in out.glob("*.svg")) == names
    page = (out / "fit.html").read_text()
    assert page.count('class="plotly-graph-div"') == 3 and "<script src=" not in page
    assert json.loads((out / "fit.json").read_text())["fit"]["form"] == "N"
    if "PNG skipped" not in text:
        assert sorted(p.stem for p in Path(out).glob("*.png")) == names
