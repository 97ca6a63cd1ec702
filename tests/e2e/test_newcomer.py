"""The README from the top, as a newcomer follows it in Chromium (issue 30, item 6): open the studio
on the demo model, click the example, train with the default method, compare, generate, download;
and at every stop, nothing on the screen a newcomer should not meet: a traceback, "None", "NaN", or
a raw flag name (--something). Then the same studio on a phone's screen. Every wait is on a
condition in the page, so a loaded 2-core machine only makes it slower.

Issue 39's newcomer, on a studio whose trainer is tests/fake_trainer.py (what the page does, without
training's minutes): the new run's live view in sight after Train, a form that outlives a reload,
and a run's settings loaded back into the form; at a desktop's and a phone's width, runs told apart
and the class-image cache listed nowhere. Then a second base model picked in the Train form and
trained (a short real run on a tiny SD 2.x model in a models folder), no page showing its path."""

import contextlib
import json
import re

import pytest

from tests.e2e.conftest import free_port, serve, stop_runs
from tests.e2e.test_studio import STARS, fill, upload, wait_text
from tests.test_jobs import make_runner, wait_for
from trainers.data import class_cache_dir
from trainers.service.jobs import JobError
from webui.model import EXAMPLE_CONCEPTS

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


SCREENS = {"desktop": {"viewport": {"width": 1280, "height": 800}},
           "phone": {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}}


@pytest.fixture(scope="module")
def quick_studio(tmp_path_factory):
    """(url, runner) of a local studio on the demo model, served in this process over a job runner
    whose trainer is tests/fake_trainer.py."""
    import webui
    from webui.model import describe

    runs = tmp_path_factory.mktemp("quick") / "runs"
    runner = make_runner(runs).start()
    demo = webui.build(runner, describe(None), device="cpu", preset="CPU demo", detected="test")
    port = free_port()
    demo.launch(prevent_thread_lock=True, quiet=True, **webui.launch_options(runner, "127.0.0.1", port))
    yield f"http://127.0.0.1:{port}", runner
    demo.close()
    runner.stop()
    stop_runs(runs)


@pytest.fixture
def visit(browser, quick_studio):
    """visit(screen) -> a page of the quick studio in a fresh browser profile (nothing remembered)."""
    contexts = []

    def open_page(screen="desktop"):
        contexts.append(browser.new_context(**SCREENS[screen]))
        page = contexts[-1].new_page()
        page.goto(quick_studio[0])
        page.wait_for_selector("#train", timeout=60_000)
        return page

    yield open_page
    for context in contexts:
        context.close()


def watched_run(page, before) -> str:
    """The id of the run the live view shows, once it is a run not in `before`."""
    page.wait_for_function("(before) => { const id = (document.querySelector('#live-run input')?.value || '').split(' · ')[0];"
                           " return !!id && !before.includes(id); }", arg=sorted(before), timeout=60_000)
    return page.input_value("#live-run input").split(" · ")[0]


# in the viewport, and nothing over it (a toast covered the run's name): the page's topmost element
# at its middle is the element itself or inside it
IN_SIGHT = ("() => ['#live-run', '#live-progress'].every(sel => {"
            " const e = document.querySelector(sel), r = e.getBoundingClientRect();"
            " const top = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);"
            " return r.height > 0 && r.top > -1 && r.bottom < innerHeight + 1 && !!top && e.contains(top); })")

SIGHT_REPORT = ("() => ['#live-run', '#live-progress'].map(sel => {"
                " const e = document.querySelector(sel), r = e.getBoundingClientRect();"
                " const top = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);"
                " return `${sel} from ${Math.round(r.top)} to ${Math.round(r.bottom)} px`"
                " + (top && !e.contains(top) ? ` under ${top.className || top.tagName}` : ''); }).join(', ')"
                " + ` of ${innerHeight}`")


@pytest.mark.parametrize("screen", list(SCREENS))
def test_after_train_the_new_runs_live_view_is_in_sight(visit, quick_studio, screen):
    _, runner = quick_studio
    page = visit(screen)
    page.click("#example-star")
    page.wait_for_selector("#concept-preview img", timeout=60_000)
    label, first = (page.locator(sel).first.bounding_box()
                    for sel in ("#concept-preview label", "#concept-preview .thumbnail-item"))
    assert label["y"] + label["height"] <= first["y"], f"the gallery's label {label} covers its first picture {first}"
    before = set(runner.run_ids())
    page.click("#train")  # Playwright scrolls to the button first, as the user did
    run_id = watched_run(page, before)
    try:
        page.wait_for_function(IN_SIGHT, timeout=10_000)  # once the run is shown, the page has scrolled to it
    except Exception:
        pytest.fail(f"the live view of {run_id} is out of sight after Train: " + page.evaluate(SIGHT_REPORT))
    try:  # the watched run's id and state are whole, not cut by the dropdown's width
        page.wait_for_function("() => { const e = document.querySelector('#live-run input');"
                               " return / · (training|done)$/.test(e.value) && e.scrollWidth <= e.clientWidth; }", timeout=60_000)
    except Exception:
        pytest.fail("the watched run's line is cut: " + page.evaluate(
            "() => { const e = document.querySelector('#live-run input');"
            " return `${e.value}: ${e.scrollWidth} > ${e.clientWidth} px`; }"))
    finally:
        with contextlib.suppress(JobError):  # the next test's run need not wait for it (unless it is over)
            runner.cancel(run_id)


def test_a_reload_keeps_the_form(visit):
    page = visit()
    upload(page, STARS[:3])
    page.wait_for_function("document.querySelectorAll('#concept-preview img').length === 3", timeout=60_000)
    page.click("#method label:has-text('LoRA')")
    page.fill("#instance-prompt textarea", "a sks star")
    fill(page, "max_train_steps", 7)
    page.click("#advanced .label-wrap")
    fill(page, "validation_steps", 3)
    page.click("#method-options .label-wrap")
    saved = page.evaluate("localStorage.getItem('restuning-form')")
    fill(page, "lora-rank", 8)
    # the browser keeps the form (encrypted): the last change is kept once the stored value changes
    page.wait_for_function("(saved) => localStorage.getItem('restuning-form') !== saved", arg=saved, timeout=10_000)
    page.reload()
    page.wait_for_function("document.querySelectorAll('#concept-preview img').length === 3", timeout=60_000)
    assert page.is_checked("#method input[value=lora]")
    assert page.input_value("#instance-prompt textarea") == "a sks star"
    assert page.input_value("#opt-max_train_steps input") == "7"
    page.click("#advanced .label-wrap")
    assert page.input_value("#opt-validation_steps input") == "3"
    page.click("#method-options .label-wrap")
    assert page.input_value("#opt-lora-rank input") == "8"
    assert [s.stem for s in STARS[:3]] == re.findall(r"star_\d+", page.inner_text("#concept-files"))


def test_a_runs_settings_fill_the_form_to_train_again(visit, quick_studio):
    """The Runs tab's "Train again with these settings": the form takes the run's method, options
    and images, and Train makes a run with the same config."""
    from webui import forms
    from webui.model import describe

    _, runner = quick_studio
    trainer = {"instance_prompt": "a sks star", "class_prompt": "a shape", "with_prior_preservation": True, "max_train_steps": 9,
               "learning_rate": "0.003", "validation_prompt": "a sks star\na sks star on grass", "resolution": 64,
               "mixed_precision": "no", "num_class_images": 4}
    method = {"tuners": ["attn1=adapter", "ff=prefix"], "blocks": ["mid", "up"], "dim": 8, "resnet_dim": 16, "heads": 8,
              "identifier": "auto", "off_concept_loss": 0.2}
    original = forms.build_config("res-tuning", trainer, method, model=describe(None).source, device="cpu")
    first = runner.submit(original, [(p, p.name) for p in STARS[:3]], label="res-tuning")
    page = visit()
    page.get_by_role("tab", name="Runs / tuners").click()
    page.wait_for_selector("#runs-train-again", timeout=60_000)  # the newest run is selected
    page.wait_for_function("(id) => document.querySelector('#runs-details').innerText.includes(id)", arg=first, timeout=60_000)
    page.click("#runs-train-again")
    page.wait_for_function("document.querySelectorAll('#concept-preview img').length === 3", timeout=60_000)
    assert page.locator("#train").is_visible(), "the Train tab is shown"
    assert page.is_checked("#method input[value=res-tuning]") and page.input_value("#opt-max_train_steps input") == "9"
    before = set(runner.run_ids())
    page.click("#train")
    again = watched_run(page, before)
    made = json.loads((runner.run_dir(again) / "config.json").read_text())
    # every option the run was given, given again (the form adds its own values of the options not given)
    given = {k: v for k, v in runner.info(first).config.items() if k not in ("output_dir", "instance_data_dir")}
    assert {k: made.get(k) for k in given} == given
    trained = sorted(f.read_bytes() for f in (runner.run_dir(again) / "instance").iterdir())
    assert trained == sorted(f.read_bytes() for f in STARS[:3])


# -- runs told apart; the class-image cache is no run (items 2 and 6) ---------------------------------


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
        # each header sits over its column (Gradio sizes the header row and the body's rows apart)
        header, body = page.evaluate("() => [Array.from(document.querySelectorAll('#runs-table th')),"
                                     " Array.from(document.querySelectorAll('#runs-table .virtual-row')[0].children)]"
                                     ".map(cells => cells.map(c => Math.round(c.getBoundingClientRect().left)))")
        assert header == body, (header, body)

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


# -- a second base model picked and trained in the page (item 7) ------------------------------------


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """(url, runs folder, the tiny SD 2.x model's folder) of `python app.py --models-dir <folder>`."""
    from tests.tiny_pipeline import build_tiny

    root = tmp_path_factory.mktemp("two-models")
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
