"""The page in headless Chromium (Debian's, driven by Playwright): upload an image, see its caption and
where the Q-Former's queries look."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)

from serve_support import png_bytes, running_server, sample_image, tiny_trained_run  # noqa: E402

from qvlm.serve import ServeSettings, create_app  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from qvlm.models.vlm import QVLM

    run = tiny_trained_run(tmp_path_factory.getbasetemp() / "serve-runs" / "tinyrun")  # shared with test_serve
    with running_server(create_app(QVLM.from_pretrained(run), "tinyrun", ServeSettings())) as url:
        yield url


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            # bypass_csp: our strict CSP forbids eval, which wait_for_function uses
            yield browser.new_page(viewport={"width": 1100, "height": 700}, bypass_csp=True)
        finally:
            browser.close()


def test_upload_shows_caption_then_answers(server, page, tmp_path: Path):
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    external: list[str] = []
    page.on("request", lambda req: external.append(req.url) if not req.url.startswith((server, "data:")) else None)
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('tinyrun')", timeout=10_000)

    image = tmp_path / "red.png"
    image.write_bytes(png_bytes(sample_image(64)))
    page.set_input_files("#file", str(image))
    page.wait_for_function("document.getElementById('caption').dataset.state === 'done'", timeout=30_000)
    assert page.inner_text("#caption").strip()
    assert page.is_hidden("#error")
    page.wait_for_selector("#attention:not([hidden])", timeout=30_000)  # the mean, then the tiny run's 4 queries
    assert page.locator("#attention-maps figcaption").all_inner_texts() == ["mean"] + [f"query {q}" for q in range(4)]
    assert page.locator("#attention-maps canvas").count() == 5
    # a stage-2 model: a row per word of its caption, a cell per query, then its share on the image
    assert page.is_visible("#word-table")
    assert page.locator("#word-table tr").first.locator("th").all_inner_texts() == (
        ["word"] + [f"q{q}" for q in range(4)] + ["on image"])
    assert page.locator("#word-table tr").count() >= 2 and page.locator("#word-table td").count() % 5 == 0

    page.fill("#question", "What color is it?")
    page.click("#send")
    page.wait_for_function("document.querySelector('#log .a') && "
                           "!document.querySelector('#log .a').classList.contains('working')", timeout=30_000)
    assert page.inner_text("#log .a").strip()
    page.screenshot(path=str(tmp_path / "page.png"))
    if os.environ.get("QVLM_SCREENSHOT"):  # to look at the page during development
        page.screenshot(path=os.environ["QVLM_SCREENSHOT"], full_page=True)
    assert not errors and not external


def test_error_is_readable(server, page, tmp_path: Path):
    page.goto(server + "/")
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)
    assert "not an image" in page.inner_text("#error")
