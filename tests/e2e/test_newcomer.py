"""The README from the top, as a newcomer follows it in Chromium (issue 30, item 6): open the studio
on the demo model, click the example, train with the default method, compare, generate, download;
and at every stop, nothing on the screen a newcomer should not meet: a traceback, "None", "NaN", or
a raw flag name (--something). Then the same studio on a phone's screen. Every wait is on a
condition in the page, so a loaded 2-core machine only makes it slower."""

import re

import pytest

from tests.e2e.test_studio import fill

pytestmark = pytest.mark.slow
LONG = 600_000  # ms: training and sampling on a loaded 2-core machine
FORBIDDEN = re.compile(r"Traceback|\bNone\b|\bNaN\b|(?<![\w-])--[a-z][a-z0-9_-]+")


def assert_readable(page, where: str) -> None:
    """The visible text of the page (text fields' contents are not visible text) has none of it."""
    text = page.inner_text("body")
    found = FORBIDDEN.findall(text)
    assert not found, f"{where}: {found} in what the page shows"


@pytest.fixture
def newcomer(browser, studio):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    page.goto(studio[0])
    page.wait_for_selector("#train", timeout=60_000)
    yield page
    context.close()


def test_the_readme_from_the_top(newcomer, tmp_path):
    page = newcomer
    assert_readable(page, "the studio as it opens")
    page.click("#example-star")
    page.wait_for_selector("#concept-preview img", timeout=60_000)
    assert page.is_checked("#opt-with_prior_preservation input")
    # the example turns prior preservation on: the estimate still gives a figure
    page.wait_for_function("document.querySelector('#memory-estimate').innerText.includes('GiB')", timeout=120_000)

    # a short run, set through the form as a user would
    fill(page, "max_train_steps", 6)
    page.click("#advanced .label-wrap")
    for option, value in (("num_class_images", 4), ("validation_steps", 3), ("num_validation_images", 1),
                          ("num_inference_steps", 4), ("checkpointing_steps", 6)):
        fill(page, option, value)
    assert_readable(page, "the form with Advanced open")
    page.click("#train")
    page.wait_for_selector("#live-progress [data-status=done], #live-progress [data-status=failed]", timeout=LONG)
    assert page.get_attribute("#live-progress .rt-progress", "data-status") == "done", page.input_value("#live-log textarea")
    assert re.search(r"done in \d", page.inner_text("#live-progress")) and "Compare" in page.inner_text("#live-next")
    assert_readable(page, "the finished run")

    # Compare: the run is already ticked and the prompt filled; one click renders two seeds
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_selector("#compare-runs input:checked", timeout=60_000)
    assert page.input_value("#compare-prompt textarea") == "a sks shape"
    page.click("#compare-render")
    page.wait_for_selector("#compare-grid img", timeout=LONG)
    assert "2 row(s) x 2 column(s)" in page.inner_text("#compare-note")
    assert_readable(page, "the Compare grid")

    # Generate with the new tuner
    page.get_by_role("tab", name="Generate").click()
    page.locator("#gen-tuner input").click()
    page.get_by_role("option", name=re.compile("Res-Tuning")).click()
    page.fill("#gen-prompt textarea", "a green sks shape on a yellow background")
    page.click("#gen-go")
    page.wait_for_function("document.querySelectorAll('#gen-gallery img').length >= 2", timeout=LONG)
    assert_readable(page, "the generated pictures")

    # download the tuner under a name that says what it is
    page.get_by_role("tab", name="Runs / tuners").click()
    page.wait_for_selector("#download-tuner", state="visible", timeout=60_000)
    with page.expect_download() as download:
        page.click("#download-tuner")
    name = download.value.suggested_filename
    assert "res-tuning" in name and name.endswith(".safetensors") and name != "tuner.safetensors", name
    download.value.save_as(tmp_path / name)
    assert (tmp_path / name).stat().st_size > 0
    assert_readable(page, "the Runs tab")


def test_on_a_phone_the_tabs_and_the_live_view_are_in_reach(browser, studio):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        page.goto(studio[0])
        page.wait_for_selector("#train", timeout=60_000)
        for name in ("Train", "Runs / tuners", "Compare", "Generate"):
            assert page.get_by_role("tab", name=name).is_visible(), f"the {name} tab is hidden"
        live = page.locator("#live-progress").bounding_box()
        assert live is not None and live["y"] < 844, f"the live view starts at {live}"
        page.get_by_role("tab", name="Runs / tuners").click()
        page.wait_for_selector("#runs-table", timeout=60_000)
        headers = page.locator("#runs-table th").all()
        in_view = [h for h in headers if (box := h.bounding_box()) and box["x"] + box["width"] / 2 < 390]
        assert len(in_view) >= 2, "the Runs table shows one column"
        assert_readable(page, "the Runs tab on a phone")
    finally:
        context.close()
