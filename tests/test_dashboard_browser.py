"""`hpsearch dashboard` in a real browser: Debian's headless Chromium, driven by Playwright.

The browser is /usr/bin/chromium (`.ci/run` installs it with apt when missing); nothing here
downloads one. The page must show what the database holds: the study, its trial count, its best
value and trial, the note, and the best trial's checkpoint from the shared artifact store.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import optuna
import pytest

from conftest import REPO, FinishedSearch, free_port, hpsearch_cmd

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
# Headless and quiet: no GPU, no sandbox (CI runs as root in a container), and no background
# requests to Google's services, which this network cannot reach anyway.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOT = REPO / "test-artifacts" / "dashboard.png"


def wait_until_serving(proc: subprocess.Popen, base: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"hpsearch dashboard exited with {proc.returncode}: {proc.communicate()[1]}")
        try:
            with urllib.request.urlopen(f"{base}/api/meta", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"hpsearch dashboard did not answer on {base} within {timeout:g}s")


@pytest.fixture
def dashboard(finished_search: FinishedSearch) -> Iterator[str]:
    """The real `hpsearch dashboard` CLI on a free loopback port; yields its base URL."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does this)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
    proc = subprocess.Popen(
        hpsearch_cmd("dashboard", "--storage", finished_search.storage_url, "--port", str(port)),
        cwd=finished_search.folder, env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, base)
        yield base
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    # On loopback there is nothing to warn about; the start line names the store and the address.
    assert not err.startswith("hpsearch: warning"), err
    assert f"hpsearch: dashboard on {base}/ for 1 study (quick)" in err, err
    assert proc.returncode == 0, err


def test_the_page_shows_what_the_database_holds(dashboard: str, finished_search: FinishedSearch) -> None:
    from playwright.sync_api import expect, sync_playwright

    study = optuna.load_study(study_name=finished_search.name, storage=finished_search.storage_url)
    trials = study.get_trials(deepcopy=False)
    best = study.best_trial
    artifact = f"trial-{best.number}-best.pt"

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.set_default_timeout(30_000)

            # Find the study on the start page and open it.
            page.goto(dashboard)
            page.get_by_text(re.compile(rf"^\d+\. {finished_search.name}$")).click()
            expect(page).to_have_url(re.compile(r"/dashboard/studies/\d+$"))

            # The history page: the best trial's number and value, as the database has them.
            heading = page.get_by_text(re.compile(r"^Best Trial \(number=\d+\)$"))
            expect(heading).to_be_visible()
            assert heading.inner_text() == f"Best Trial (number={best.number})"
            card = page.locator("div", has=heading).filter(has_text="Params =").last
            value = re.search(r"Best Trial \(number=\d+\)\s+(\S+)", card.inner_text())
            assert value is not None, card.inner_text()
            assert float(value.group(1)) == pytest.approx(study.best_value, rel=1e-12)
            page.wait_for_timeout(1000)  # let the plots finish drawing for the screenshot
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # The trial list: as many trials as the database, each with its state; the best one
            # carries its checkpoint from the shared artifact store.
            page.get_by_role("link", name="Trials (List)").click()
            expect(page.get_by_text(re.compile(r"^\d+ Trials$"))).to_have_text(f"{len(trials)} Trials")
            page.get_by_role("button", name=re.compile(rf"^Trial {best.number}\b")).click()
            expect(page.get_by_text(artifact, exact=True)).to_be_visible()
            for key in ("val_accuracy", "epochs", "samples_per_s", "host", "device"):
                row = page.get_by_role("paragraph").filter(has_text=re.compile(rf"^{key}\s"))
                expect(row).to_have_count(1)
                shown, stored = row.inner_text().split(None, 1)[1], best.user_attrs[key]
                if isinstance(stored, str):
                    assert shown == stored, (key, shown, stored)
                else:
                    assert float(shown) == pytest.approx(stored, rel=1e-12), (key, shown, stored)
            page.screenshot(path=str(SCREENSHOT.with_name("dashboard-trials.png")), full_page=True)

            # The note the creating worker wrote.
            page.get_by_role("link", name="Note").click()
            expect(page.get_by_role("heading", name="Search space")).to_be_visible()
            expect(page.get_by_role("cell", name="validation", exact=True)).to_be_visible()
            page.set_viewport_size({"width": 1400, "height": 1300})  # the note scrolls inside its card
            page.screenshot(path=str(SCREENSHOT.with_name("dashboard-note.png")), full_page=True)
        finally:
            browser.close()
    assert errors == [], errors
