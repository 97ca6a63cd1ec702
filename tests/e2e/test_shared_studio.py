"""Two visitors in two browsers, and a restart (issue 13, items 1-3 as a visitor meets them; the
rest of that issue's tests are in tests/security/): a run one visitor imports is not the other's,
and its owner still has it after the studio restarts (the BrowserState key is kept in the runs
folder)."""

import pytest

from tests.e2e.conftest import free_port, serve
from tests.e2e.test_studio import REPO, wait_text

pytestmark = pytest.mark.slow


def demo_tuner(path):
    import restuning
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(REPO / "assets" / "demo-model", subfolder="unet")
    restuning.attach(unet, restuning.ResTuningConfig(dim=4))
    return restuning.save(unet, path)


def visit(browser, url):
    context = browser.new_context(viewport={"width": 1400, "height": 1200})
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#train", timeout=30_000)
    page.get_by_role("tab", name="Runs / tuners").click()
    page.wait_for_selector("#runs-table", timeout=30_000)
    return context, page


def test_a_visitors_runs_are_theirs_across_a_restart_and_no_one_elses(browser, tmp_path):
    runs = tmp_path / "runs"
    tuner = demo_tuner(tmp_path / "alices-star.safetensors")
    port = free_port()
    started = []

    def start():
        studio = serve(runs, ["--port", str(port), "--shared"], {"RESTUNING_RUNS_DIR": str(runs)}, port)
        started.append(studio)
        return next(studio)[0]

    try:
        check(browser, start, lambda: next(started[-1], None), tuner)
    finally:
        for studio in started:
            next(studio, None)  # the rest of serve(): stops that studio and its runs


def reopen(page, url, attempts=5):
    """Load the studio again after its restart. The page's Gradio client may be reloading it by
    itself when the server comes back, and a navigation of ours racing that one is aborted
    (net::ERR_ABORTED): navigate again until one lands."""
    from playwright.sync_api import Error

    for attempt in range(attempts):
        try:
            page.goto(url, wait_until="load")
            return
        except Error as exc:
            if "ERR_ABORTED" not in str(exc) or attempt == attempts - 1:
                raise


def check(browser, start, stop, tuner):
    url = start()
    alice, page = visit(browser, url)
    page.get_by_text("Import a tuner file", exact=True).click()
    page.set_input_files("#import-file input[type=file]", str(tuner))
    page.fill("#import-name textarea", "alices-star")
    page.click("#import")
    wait_text(page, "#runs-table", "alices-star")
    bob, other = visit(browser, url)
    other.wait_for_timeout(2500)  # the table's 2 s timer has ticked
    assert "alices-star" not in other.inner_text("#runs-table")
    stop()
    assert start() == url
    for visitor, expected in ((page, True), (other, False)):
        reopen(visitor, url)
        visitor.wait_for_selector("#train", timeout=30_000)
        visitor.get_by_role("tab", name="Runs / tuners").click()
        visitor.wait_for_selector("#runs-table", timeout=30_000)
        visitor.wait_for_timeout(2500)
        assert ("alices-star" in visitor.inner_text("#runs-table")) is expected
    alice.close(), bob.close()
