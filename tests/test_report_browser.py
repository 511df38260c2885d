"""The finalize report in a real browser (Debian's headless Chromium, as test_dashboard_browser.py).

Every plot must have drawn content, the page must be no wider than the window (a 47-class
confusion matrix included), and no command may be cut off in a scroll box. Screenshots are kept
in the test's tmp dir and in test-artifacts/ for people to look at.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from conftest import REPO, FinishedSearch, run_cli
from test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS
from test_report import ALL_PLOTS, synthetic_study, write

pytestmark = pytest.mark.browser

ARTIFACTS = REPO / "test-artifacts"

# Per figure: its size on the page and how many drawn marks (paths, markers, text) it holds.
MEASURE = """() => [...document.querySelectorAll('figure.plot svg')].map(svg => {
    const box = svg.getBoundingClientRect();
    return {width: box.width, height: box.height,
            marks: svg.querySelectorAll('path, use, text, rect, polyline, image').length,
            text: svg.textContent.trim().length};
})"""
OVERFLOW = """() => ({page: document.documentElement.scrollWidth, window: window.innerWidth,
    pre: [...document.querySelectorAll('pre')].map(p => [p.scrollWidth, p.clientWidth])})"""


def check_in_browser(html: Path, shot: Path, figures: int, widths=(1280, 420)) -> list[dict]:
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does this)")
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": widths[0], "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: errors.append(f"request {r.url}") if not r.url.startswith("file:") else None)
            page.goto(html.as_uri())
            figs = page.evaluate(MEASURE)
            assert len(figs) == figures
            for f in figs:
                assert f["width"] > 200 and f["height"] > 100, f
                assert f["marks"] > 20 and f["text"], f
            for width in widths:
                page.set_viewport_size({"width": width, "height": 900})
                o = page.evaluate(OVERFLOW)
                assert o["page"] <= o["window"], (width, o)
                assert all(scroll <= client for scroll, client in o["pre"]), (width, o)
                page.screenshot(path=str(shot.with_name(f"{shot.stem}-{width}.png")), full_page=True)
        finally:
            browser.close()
    assert errors == [], errors
    return figs


@pytest.mark.parametrize("kind", ["47-classes-many-trials", "zero-loss-few-trials"])
def test_synthetic_reports_fit_the_window(kind, tmp_path):
    if kind == "47-classes-many-trials":
        s = synthetic_study(tmp_path, n_complete=80, n_pruned=30, n_failed=4, classes=47, name="c47")
    else:
        s = synthetic_study(tmp_path, n_complete=4, n_pruned=2, winner_value=0.0, name="zero")
    write(s)
    check_in_browser(s.out / "report.html", tmp_path / f"report-{kind}.png", len(ALL_PLOTS))
    ARTIFACTS.mkdir(exist_ok=True)
    for png in tmp_path.glob("report-*.png"):
        (ARTIFACTS / png.name).write_bytes(png.read_bytes())


def test_real_finalize_report_fits_the_window(finished_search: FinishedSearch, mnist_dir, tmp_path):
    # A copy: the session's search stays unfinalized for the other tests.
    folder = tmp_path / "search"
    shutil.copytree(finished_search.folder, folder, ignore=shutil.ignore_patterns("hpsearch.db*"))
    with sqlite3.connect(finished_search.folder / "hpsearch.db") as src, sqlite3.connect(folder / "hpsearch.db") as dst:
        src.backup(dst)
    r = run_cli("finalize", "--study", finished_search.name, "--storage", f"sqlite:///{folder / 'hpsearch.db'}",
                "--out", str(tmp_path / "reports"), "--data-dir", str(mnist_dir), "--device", "cpu", cwd=folder)
    assert r.returncode == 0, r.stderr
    html = tmp_path / "reports" / finished_search.name / "report.html"
    check_in_browser(html, tmp_path / "report-real.png", len(ALL_PLOTS))
    ARTIFACTS.mkdir(exist_ok=True)
    for png in tmp_path.glob("report-real*.png"):
        (ARTIFACTS / png.name).write_bytes(png.read_bytes())
