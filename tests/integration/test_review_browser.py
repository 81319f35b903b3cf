"""The review app in a real headless Chromium (Debian's `chromium`, driven by Playwright; no downloaded browser).

A reviewer logs in, works through three parts with the keyboard only (heatmap toggle, defect type, comment,
confirm / override), undoes the last decision, sees the waiting count fall, and logs out. Screenshots of the
queue and of a part page are saved under the test's tmp_path and copied to bench_out/screenshots/ for review.
"""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from inspection.decisions import DecisionStore
from inspection.review import ReviewConfig, create_app
from inspection.review.demo import seed_store
from inspection.review.queries import reviewed_labels

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
PASSWORD = "correct horse battery staple"
REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_app(tmp_path: Path):
    """The real app under uvicorn on a free loopback port, with 6 flagged and 4 passed synthetic parts."""
    import uvicorn

    store = DecisionStore(tmp_path / "store")
    parts = seed_store(store, n=6, n_pass=4, seed=3, now=datetime.now(UTC))
    app = create_app(ReviewConfig(store=str(tmp_path / "store")), store=store)
    app.state.auth.add_user("rita", PASSWORD, "reviewer")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 20 s")
        time.sleep(0.05)
    flagged = [p for p in parts if p.verdict != "pass"]
    yield f"http://127.0.0.1:{port}", store, flagged
    server.should_exit = True
    thread.join(timeout=10)
    store.close()


def _shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / "screenshots" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    lead_copy = REPO_ROOT / "bench_out" / "screenshots" / name
    lead_copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, lead_copy)
    return path


def _waiting(page) -> int:
    return int(page.get_by_test_id("waiting-count").inner_text().strip())


def test_review_with_the_keyboard_in_chromium(live_app, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, store, flagged = live_app
    ids = [p.request_id for p in flagged]  # oldest first, as the queue orders them
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            console_errors: list[str] = []
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            failed: list[str] = []
            page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)

            # no session: the queue sends us to the login form
            page.goto(f"{base}/queue")
            expect(page).to_have_url(re.compile(r"/login\?next="))
            page.fill("#username", "rita")
            page.fill("#password", PASSWORD)
            page.click("button[type=submit]")
            expect(page).to_have_url(re.compile(r"/queue$"))
            assert _waiting(page) == 6
            expect(page.locator("table.queue tbody tr")).to_have_count(6)
            _shot(page, tmp_path, "review_queue.png")

            # Enter starts with the oldest waiting part
            page.keyboard.press("Enter")
            expect(page).to_have_url(re.compile(ids[0]))
            overlay = page.locator("#heatmap")
            expect(overlay).to_have_css("opacity", "0")
            page.keyboard.press("h")
            expect(page.locator("#viewer")).to_have_class(re.compile("show-heat"))
            expect(page.get_by_test_id("heat-state")).to_have_text("showing the heatmap")
            expect(overlay).to_have_css("opacity", "1")
            assert page.evaluate("document.getElementById('heatmap').naturalWidth") > 0  # the overlay really loaded
            _shot(page, tmp_path, "review_part_heatmap.png")
            page.keyboard.press("h")
            expect(overlay).to_have_css("opacity", "0")
            _shot(page, tmp_path, "review_part.png")

            # part 1: crack, a comment, confirm defect
            page.keyboard.press("2")
            assert page.locator("input[name=defect_type][value=crack]").is_checked()
            page.keyboard.press("c")
            page.keyboard.type("hairline crack on the rim <b>")
            page.keyboard.press("Escape")
            page.keyboard.press("d")
            expect(page).to_have_url(re.compile(ids[1]))
            expect(page.get_by_test_id("flash")).to_contain_text("Decision saved")
            assert _waiting(page) == 5

            # part 2: override OK
            page.keyboard.press("o")
            expect(page).to_have_url(re.compile(ids[2]))
            assert _waiting(page) == 4

            # part 3: j/k move without deciding, then confirm defect
            page.keyboard.press("j")
            expect(page).to_have_url(re.compile(ids[3]))
            page.keyboard.press("k")
            expect(page).to_have_url(re.compile(ids[2]))
            page.keyboard.press("d")
            expect(page).to_have_url(re.compile(ids[3]))
            assert _waiting(page) == 3

            # undo: back on part 3, waiting again, the audit trail keeps both rows
            page.keyboard.press("u")
            expect(page).to_have_url(re.compile(ids[2]))
            expect(page.get_by_test_id("flash")).to_contain_text("Decision undone")
            expect(page.get_by_test_id("status")).to_contain_text("Waiting for a decision")
            assert _waiting(page) == 4
            audit = page.get_by_test_id("audit")
            expect(audit.locator("tbody tr")).to_have_count(2)
            expect(audit).to_contain_text("Undo")
            expect(audit).to_contain_text("rita")
            _shot(page, tmp_path, "review_part_audit.png")

            # the first part's page shows the escaped comment and the decision in effect
            page.goto(f"{base}/parts/{ids[0]}")
            expect(page.get_by_test_id("audit")).to_contain_text("hairline crack on the rim <b>")
            expect(page.get_by_test_id("status")).to_contain_text("Confirmed defect")
            expect(page.get_by_test_id("status")).to_contain_text("crack")

            # the queue count fell from 6 to 4; q goes back to it from a part page
            page.keyboard.press("q")
            expect(page).to_have_url(re.compile(r"/queue"))
            assert _waiting(page) == 4
            expect(page.get_by_test_id("waiting-total")).to_have_text("4")
            _shot(page, tmp_path, "review_queue_after.png")

            page.goto(f"{base}/stats")
            expect(page.locator("svg.chart").first).to_be_visible()
            _shot(page, tmp_path, "review_stats.png")

            # log out: the session is gone, pages send us to the login form again
            page.get_by_test_id("logout").click()
            expect(page).to_have_url(re.compile(r"/login"))
            page.goto(f"{base}/queue")
            expect(page).to_have_url(re.compile(r"/login\?next="))
            assert not console_errors, (console_errors, failed)
        finally:
            browser.close()

    labels = {sha: label for sha, _, label, _, _ in reviewed_labels(store)}
    rows = {rid: store.get_row(rid)["image_sha256"] for rid in ids[:3]}
    assert labels == {rows[ids[0]]: "defect", rows[ids[1]]: "ok"}  # the undone third decision is not a label
