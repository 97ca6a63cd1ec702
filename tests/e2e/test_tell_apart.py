"""Issue 39, items 2 and 6 in Chromium, at a desktop's 1280x800 and a phone's 390x844: the
class-image cache is listed nowhere, a run in the Generate tab's list is read whole, nothing covers
the Compare grid's captions, and the Runs table shows more than its id column. The runs are
finished runs of the fake trainer (tests/fake_trainer.py), made before the studio starts."""

import pytest

from tests.e2e.conftest import free_port, serve
from tests.test_jobs import make_runner, wait_for
from trainers.data import class_cache_dir
from webui.model import EXAMPLE_CONCEPTS

pytestmark = pytest.mark.slow
SCREENS = {"desktop": {"viewport": {"width": 1280, "height": 800}},
           "phone": {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}}


@pytest.fixture(scope="module")
def studio_with_runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("tell-apart") / "runs"
    runner = make_runner(runs)
    star = sorted((EXAMPLE_CONCEPTS / "star").glob("*.png"))
    for steps, name in ((300, ""), (600, "star, fewer images")):
        config = {"method": "res-tuning", "max_train_steps": steps, "instance_prompt": "a sks shape", "fake_step_seconds": 0}
        wait_for(runner, runner.submit(config, [(p, p.name) for p in star[:3]], label=name), {"done"})
    cache = class_cache_dir(runs, "demo", "a shape", 64)
    cache.mkdir(parents=True)
    (cache / "0.png").write_bytes(star[0].read_bytes())
    port = free_port()
    yield from serve(runs, ["--port", str(port)], {"RESTUNING_RUNS_DIR": str(runs)}, port)


def overlaps(a, b) -> bool:
    return a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"] and a["y"] < b["y"] + b["height"] \
        and b["y"] < a["y"] + a["height"]


@pytest.mark.parametrize("screen", SCREENS)
def test_runs_can_be_told_apart_and_the_cache_is_no_run(browser, studio_with_runs, screen):
    url, runs = studio_with_runs
    context = browser.new_context(**SCREENS[screen])
    page = context.new_page()
    width = SCREENS[screen]["viewport"]["width"]
    try:
        page.goto(url)
        page.wait_for_selector("#train", timeout=60_000)
        page.wait_for_function("document.querySelector('#live-run input').value !== ''", timeout=60_000)
        page.locator("#live-run input").click()
        page.get_by_role("option").first.wait_for(timeout=30_000)
        listed = [o.inner_text() for o in page.get_by_role("option").all()]
        assert len(listed) == 2 and not any("class-images" in o for o in listed), listed
        page.keyboard.press("Escape")

        page.get_by_role("tab", name="Runs / tuners").click()
        page.wait_for_function("(document.querySelector('#runs-table') || {}).innerText?.includes('res-tuning')",
                               timeout=60_000)
        assert "class-images" not in page.inner_text("#runs-table") + page.inner_text("#runs-pick")
        headers = page.locator("#runs-table th").all()
        in_view = [h for h in headers if (box := h.bounding_box()) and box["x"] + box["width"] / 2 < width]
        assert len(in_view) >= 2, f"the Runs table shows {len(in_view)} column(s) at {width} px"

        page.get_by_role("tab", name="Generate").click()
        page.locator("#gen-tuner input").click()
        page.get_by_role("option").nth(2).wait_for(timeout=30_000)
        options = [o.inner_text() for o in page.get_by_role("option").all()]
        assert any(o.startswith("star, fewer images (Res-Tuning) · 600 steps") for o in options), options
        page.get_by_role("option", name="Res-Tuning · 300 steps", exact=False).click()
        box = page.locator("#gen-tuner input")
        assert box.input_value().startswith("Res-Tuning · 300 steps · ")
        shown, needed = box.evaluate("i => [i.clientWidth, i.scrollWidth]")
        assert needed <= shown, f"the chosen run is cut at {width} px: {needed} px of text in {shown} px"

        page.get_by_role("tab", name="Compare").click()
        page.wait_for_selector("#compare-grid", timeout=60_000)
        grid = page.locator("#compare-grid").bounding_box()
        covering = [label.bounding_box() for label in page.locator("#compare-grid [data-testid=block-label]").all()
                    if label.is_visible()]
        assert not any(overlaps(label, grid) for label in covering), "a label lies over the grid's captions"
    finally:
        context.close()
