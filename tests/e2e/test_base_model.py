"""A second base model picked and trained in the page (issue 39, item 7): the studio started on the
demo model with a models folder holding a tiny SD 2.x model; the newcomer picks it in the Train
form's list, trains a short real run, and the run records that base (its config and model card) and samples
on it in Compare.
No page shows the model's server path."""

import json

import pytest

from tests.e2e.conftest import free_port, serve
from tests.e2e.test_studio import STARS, fill, upload, wait_text

pytestmark = pytest.mark.slow
LONG = 600_000  # ms: training and sampling on a loaded 2-core machine


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """(url, runs folder, the tiny SD 2.x model's folder) of `python app.py --models-dir <folder>`."""
    import tempfile
    from unittest import mock

    from tests.tiny_pipeline import build_tiny

    root = tmp_path_factory.mktemp("two-models")
    (root / "scratch").mkdir()
    with mock.patch.object(tempfile, "tempdir", str(root / "scratch")):  # build_tiny's tokenizer scratch
        model = build_tiny(root / "models" / "tiny-sd2", "sd2")
    port = free_port()
    for url, runs in serve(root / "runs", ["--port", str(port), "--models-dir", str(root / "models")],
                           {"RESTUNING_RUNS_DIR": str(root / "runs")}, port):
        yield url, runs, model.resolve()


def test_a_second_base_model_is_picked_and_trained_in_the_page(browser, two_models):
    url, runs, model = two_models
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#train", timeout=60_000)
    assert page.locator("#examples").is_visible()  # the demo model's examples, on the demo model

    page.click("#base-model input")
    page.get_by_role("option", name="tiny-sd2 (SD 2.x)").click()
    page.locator("#examples").wait_for(state="hidden", timeout=30_000)  # "a sks shape" is the demo model's word
    assert page.get_attribute("#instance-prompt textarea", "placeholder") == "a photo of sks star"

    upload(page, STARS[:3])
    page.wait_for_selector("#concept-preview img", timeout=30_000)
    page.fill("#instance-prompt textarea", "a photo of sks dog")
    page.get_by_text("Advanced", exact=True).click()
    for option, value in (("max_train_steps", 2), ("validation_steps", 2), ("num_validation_images", 1),
                          ("num_inference_steps", 2), ("checkpointing_steps", 2)):
        fill(page, option, value)
    page.click("#train")
    page.wait_for_selector("#live-progress [data-status=done], #live-progress [data-status=failed]", timeout=LONG)
    assert page.get_attribute("#live-progress .rt-progress", "data-status") == "done", page.input_value("#live-log textarea")
    (run,) = [p for p in runs.iterdir() if (p / "job.json").is_file()]
    assert json.loads((run / "config.json").read_text())["pretrained_model_name_or_path"] == str(model)
    assert f"`{model}`" in (run / "README.md").read_text()  # the model card names the run's own base

    # Compare renders the run on its own base: the base column is the tiny model
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_selector("#compare-runs input:checked", timeout=60_000)
    page.fill("#compare-seeds textarea", "0")
    fill_steps = page.locator("#compare-steps input[type=number]")
    fill_steps.fill("2")
    fill_steps.press("Tab")
    page.click("#compare-render")
    wait_text(page, "#compare-note", "1 row(s) x 2 column(s)", timeout=LONG)
    assert str(model.parent) not in page.content()
    context.close()
