"""The review app in a real headless Chromium (Debian's `chromium`, driven by Playwright; no downloaded browser).

1. A reviewer logs in, works through three parts with the keyboard only (heatmap toggle, defect type, comment,
   confirm / override), undoes the last decision, sees the waiting count fall, and logs out.
2. At 1400x900 and 1024x768: the queue of parts (a part photographed three times is one row with its photos
   side by side), that part's page with and without its heatmap overlay, the score scale at the real line's
   thresholds (review 0.007, reject 0.019, score 0.992) with label boxes measured in the DOM (none overlaps,
   none leaves the scale), and the "same part, labels disagree" queue from an ingest store; then one decision
   settles each.

Screenshots go to the test's tmp_path, or to $INSPECTION_SCREENSHOTS when it is set (e.g. bench_out/screenshots);
the folder is printed (pytest -s or -rP shows it).
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from inspection.decisions import DecisionStore
from inspection.images import encode_png
from inspection.ingest import IngestConfig, label_conflicts, load_samples, run_ingest
from inspection.review import ReviewConfig, create_app
from inspection.review import parts as P
from inspection.review.demo import fake_heatmap, seed_store, write_mixed_label_folder
from inspection.review.queries import reviewed_labels
from inspection.schemas import InspectionResult, Thresholds
from inspection.synth import render_part
from inspection.thresholds import verdict_for

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
SIZES = [(1400, 900), (1024, 768)]
LINE_THRESHOLDS = Thresholds(reject=0.019, review=0.007)  # what the model trained on the real photos calibrated

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(app):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 20 s")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(autouse=True)
def chromium_installed() -> None:
    """A missing browser fails the test, never skips it: `make test` installs it (deploy/install_test_servers.sh)."""
    if not CHROMIUM.exists():
        pytest.fail(f"Debian chromium is not at {CHROMIUM}: run `make test` or deploy/install_test_servers.sh")


@pytest.fixture
def live_app(tmp_path: Path):
    """The real app under uvicorn on a free loopback port, with 6 flagged and 4 passed synthetic parts."""
    store = DecisionStore(tmp_path / "store")
    parts = seed_store(store, n=6, n_pass=4, seed=3, now=datetime.now(UTC))
    app = create_app(ReviewConfig(store=str(tmp_path / "store")), store=store)
    app.state.auth.add_user("rita", PASSWORD, "reviewer")
    base, server, thread = _serve(app)
    flagged = [p for p in parts if p.verdict != "pass"]
    yield base, store, flagged
    server.should_exit = True
    thread.join(timeout=10)
    store.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("INSPECTION_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    print(f"\nreview screenshots: {folder.resolve()}")


def _shot(page, folder: Path, name: str) -> Path:
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    return path


def _images_loaded(page) -> None:
    """Wait until every image of the page has arrived (the overlays are rendered on request, they come last)."""
    import time

    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # lazy thumbnails load once in view
    # polled from Python: a polling wait_for_function evaluates a string, which the page's CSP forbids
    deadline = time.monotonic() + 30
    while not page.evaluate("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)"):
        assert time.monotonic() < deadline, "images of the page did not load within 30 s"
        time.sleep(0.1)
    page.evaluate("window.scrollTo(0, 0)")


def _waiting(page) -> int:
    return int(page.get_by_test_id("waiting-count").inner_text().strip())


def _login(page, base: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{base}/queue")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.fill("#username", "rita")
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/queue$"))


def test_review_with_the_keyboard_in_chromium(live_app, shots: Path) -> None:
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

            _login(page, base)  # no session: the queue sends us to the login form first
            assert _waiting(page) == 6
            expect(page.locator("table.queue tbody tr")).to_have_count(6)

            # Enter starts with the oldest waiting part
            page.keyboard.press("Enter")
            expect(page).to_have_url(re.compile(ids[0]))
            overlay = page.locator("#heatmap")
            expect(overlay).to_have_css("opacity", "0")
            page.keyboard.press("h")
            expect(page.locator("#viewer")).to_have_class(re.compile("show-heat"))
            expect(page.get_by_test_id("heat-state")).to_have_text("showing the heatmap")
            expect(overlay).to_have_css("opacity", "1")
            _images_loaded(page)  # the overlay really loaded
            page.keyboard.press("h")
            expect(overlay).to_have_css("opacity", "0")

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
            _shot(page, shots, "review_part_audit.png")

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

            page.goto(f"{base}/stats")
            expect(page.locator("svg.chart").first).to_be_visible()
            _shot(page, shots, "review_stats.png")

            # log out: the session is gone, pages send us to the login form again
            page.get_by_test_id("logout").click()
            expect(page).to_have_url(re.compile(r"/login"))
            page.goto(f"{base}/queue")
            expect(page).to_have_url(re.compile(r"/login\?next="))
            assert not console_errors, (console_errors, failed)
        finally:
            browser.close()

    labels = {r.sha256: r.label for r in reviewed_labels(store)}
    rows = {rid: store.get_row(rid)["image_sha256"] for rid in ids[:3]}
    assert labels == {rows[ids[0]]: "defect", rows[ids[1]]: "ok"}  # the undone third decision is not a label


# -- parts, the score scale and label conflicts at two screen sizes ---------------------------------------------


def _record_burst(store: DecisionStore, now: datetime) -> list[str]:
    """One part photographed three times within a minute at the real line's thresholds: a 19x19 map, a 7x7 map
    and a photo held without a map; scores 0.992, 0.012 (review) and 0.4."""
    rng = np.random.default_rng(12)
    image, mask = render_part(rng, True, 300)
    ids = []
    for k, (score, cells) in enumerate(((0.992, 19), (0.012, 7), (0.4, None))):
        rid = f"burst{k}".ljust(32, "0")
        view = np.ascontiguousarray(np.rot90(image, k))
        result = InspectionResult(
            request_id=rid,
            part_id="IMP-4711",
            station="line-1",
            timestamp=now + timedelta(seconds=20 * k),
            verdict=verdict_for(score, LINE_THRESHOLDS),
            defect_score=score,
            thresholds=LINE_THRESHOLDS,
            model_version="v0007",
            latency_ms=6.0,
        )
        heat = fake_heatmap(np.rot90(mask, k), rng, cells) if cells else None
        store.record_inspection(result, encode_png(view), heat, "http")
        ids.append(rid)
    return ids


def _label_boxes(page) -> list[dict]:
    return page.evaluate(
        """() => [...document.querySelectorAll('svg.gauge text')].map(t => {
             const r = t.getBoundingClientRect();
             return {text: t.textContent, left: r.left, right: r.right, top: r.top, bottom: r.bottom};
           })"""
    )


def _assert_scale_reads(page, expected: set[str]) -> None:
    boxes = _label_boxes(page)
    svg = page.locator("svg.gauge").bounding_box()
    assert expected <= {b["text"] for b in boxes}, boxes
    for b in boxes:  # inside the scale: nothing clipped by the panel
        assert svg["x"] - 0.5 <= b["left"] and b["right"] <= svg["x"] + svg["width"] + 0.5, b
    for a, b in itertools.combinations(boxes, 2):
        apart = a["right"] <= b["left"] or b["right"] <= a["left"] or a["bottom"] <= b["top"] or b["bottom"] <= a["top"]
        assert apart, f"labels overlap: {a} and {b}"


def test_parts_scale_and_label_conflicts_at_two_sizes(tmp_path: Path, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    store = DecisionStore(tmp_path / "store")
    now = datetime.now(UTC) - timedelta(hours=1)
    seeded = [p for p in seed_store(store, n=3, n_pass=2, seed=5, now=now) if p.verdict != "pass"]
    burst = _record_burst(store, now + timedelta(minutes=5))
    write_mixed_label_folder(tmp_path / "drop", n_parts=4, copies=6, seed=2)
    run_ingest(IngestConfig(progress=False, workers=1), [tmp_path / "drop"], tmp_path / "ingest")
    conflict = label_conflicts(tmp_path / "ingest")[0]
    config = ReviewConfig(store=str(tmp_path / "store"), ingest_store=str(tmp_path / "ingest"))
    app = create_app(config, store=store)
    app.state.auth.add_user("rita", PASSWORD, "reviewer")
    base, server, thread = _serve(app)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                for width, height in SIZES:
                    size = f"{width}x{height}"
                    page = browser.new_page(viewport={"width": width, "height": height})
                    failed: list[str] = []
                    page.on(
                        "response", lambda r, f=failed: f.append(f"{r.status} {r.url}") if r.status >= 400 else None
                    )
                    _login(page, base)

                    # the queue counts parts: 3 seeded + the burst of 3 photos as one row
                    assert _waiting(page) == 4
                    rows = page.locator("table.queue tbody tr")
                    expect(rows).to_have_count(4)
                    row = page.locator(f'tr[data-href^="/parts/{burst[0]}"]')
                    expect(row.locator("td.thumbs img")).to_have_count(3)
                    expect(row.get_by_test_id("photo-count")).to_have_text("· 3 photos")
                    expect(page.get_by_test_id("conflicts-total")).to_have_text("1")
                    _images_loaded(page)
                    _shot(page, shots, f"review_queue_{size}.png")

                    # the burst: its three photos side by side, the scale at 0.007 / 0.019 / 0.992
                    row.locator("a").first.click()
                    expect(page).to_have_url(re.compile(burst[0]))
                    expect(page.get_by_test_id("photo")).to_have_count(3)
                    expect(page.locator("img.overlay")).to_have_count(2)  # the third photo has no map
                    _assert_scale_reads(page, {"review 0.007", "reject 0.019", "0.992"})
                    _images_loaded(page)
                    for img in page.locator("img.photo").all():
                        assert img.evaluate("i => i.complete && i.naturalWidth") == 300
                    _shot(page, shots, f"review_part_{size}.png")
                    page.keyboard.press("h")
                    expect(page.locator("#heatmap")).to_have_css("opacity", "1")
                    for img in page.locator("img.overlay").all():
                        assert img.evaluate("i => i.complete && i.naturalWidth") == 300  # rendered at photo size
                    _shot(page, shots, f"review_part_heatmap_{size}.png")
                    page.keyboard.press("h")  # the choice is remembered: leave the photo showing

                    # a part at the demo thresholds reads as well
                    page.goto(f"{base}/parts/{seeded[0].request_id}")
                    _assert_scale_reads(page, {"review 0.30", "reject 0.70"})

                    # the label conflict queue and its part, photos side by side with their labels
                    page.get_by_test_id("nav-conflicts").click()
                    expect(page).to_have_url(re.compile(r"/conflicts$"))
                    expect(page.get_by_test_id("conflicts-count")).to_have_text("1")
                    _images_loaded(page)
                    _shot(page, shots, f"review_conflicts_{size}.png")
                    page.keyboard.press("Enter")
                    expect(page).to_have_url(re.compile(f"/conflicts/{conflict.group_id}"))
                    expect(page.get_by_test_id("conflict-photo")).to_have_count(len(conflict.photos))
                    expect(page.get_by_test_id("photos-defect").get_by_test_id("conflict-photo")).to_have_count(
                        conflict.counts["defect"]
                    )
                    _images_loaded(page)
                    _shot(page, shots, f"review_conflict_part_{size}.png")
                    assert not failed, failed
                    if (width, height) != SIZES[-1]:
                        page.close()

                # decide, at the last size: the burst as one part, then the conflict as one part
                page.goto(f"{base}/parts/{burst[1]}")
                page.keyboard.press("d")
                expect(page.get_by_test_id("flash")).to_contain_text("Decision saved")
                assert _waiting(page) == 3
                assert all(P.part_of(store, rid).decision == "confirm_defect" for rid in burst)
                page.goto(f"{base}/conflicts/{conflict.group_id}")
                page.keyboard.press("o")
                expect(page).to_have_url(re.compile(r"/conflicts\?msg=conflicts_empty"))
                expect(page.get_by_test_id("conflicts-count")).to_have_text("0")
                expect(page.get_by_test_id("conflicts-total")).to_have_text("0")
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        store.close()
    assert label_conflicts(tmp_path / "ingest") == []
    assert {s.label for s in load_samples(tmp_path / "ingest") if s.group_id == conflict.group_id} == {"ok"}
    assert len({sha for sha, *_ in reviewed_labels(store)}) == 3  # the burst's 3 images, nothing else
