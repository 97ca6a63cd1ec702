"""The studio's part 2 in headless Chromium: two finished runs (trained for a few steps by the
real trainer on the demo model) and the base model in one Compare grid, downloaded with its
metadata; Generate with a tuner, its PNG's metadata read back and loaded into the form; and the
app as a Hugging Face Space (SPACE_ID set): bound to 0.0.0.0 at $PORT, two browser contexts as two
visitors who cannot see or cancel each other's runs, a per-visitor queue limit."""

import io
import json
import re
import shutil
import time

import psutil
import pytest
from PIL import Image
from playwright.sync_api import expect

from tests.e2e.conftest import DEMO_MODEL, free_port, serve
from tests.e2e.test_studio import STARS, error_toast, fill, upload, wait_text
from trainers.service.jobs import JOB_FILE, JobRunner
from trainers.sampling import PNG_KEY, read_png_settings

pytestmark = pytest.mark.slow
METHODS = ("res-tuning", "lora")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{method: run folder}: the real trainer (accelerate launch) for 3 steps per method."""
    if not (DEMO_MODEL / "model_index.json").exists():
        pytest.skip("assets/demo-model is missing")
    runner = JobRunner(tmp_path_factory.mktemp("trained") / "runs", devices=["cpu"], per_device=2, poll_seconds=0.2)
    base = {"pretrained_model_name_or_path": str(DEMO_MODEL), "instance_prompt": "a sks star", "resolution": 64,
            "max_train_steps": 3, "checkpointing_steps": 1000, "mixed_precision": "no"}
    ids = {m: runner.submit({**base, "method": m}, [(p, p.name) for p in STARS[:3]], label=f"star-{m}") for m in METHODS}
    deadline = time.monotonic() + 400
    while any(runner.info(i).status in ("queued", "running") for i in ids.values()) and time.monotonic() < deadline:
        runner.tick()
        time.sleep(0.5)
    for m, run_id in ids.items():
        info = runner.info(run_id)
        assert info.status == "done", (m, info.error, info.log_tail)
    return {m: runner.runs_dir / run_id for m, run_id in ids.items()}


def copy_runs(trained, runs, **job):
    out = {}
    for m, src in trained.items():
        dst = runs / src.name
        shutil.copytree(src, dst)
        record = json.loads((dst / JOB_FILE).read_text())
        (dst / JOB_FILE).write_text(json.dumps({**record, **job}))
        out[m] = dst.name
    return out


def set_slider(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_compare_two_runs_and_the_base_then_generate_with_a_tuner(page, studio, trained, tmp_path):
    _, runs = studio
    ids = copy_runs(trained, runs)
    page.get_by_role("tab", name="Compare").click()
    # the tab opens with the newest run ticked; the columns follow the order of ticking
    page.locator("#compare-runs input:checked").first.wait_for(timeout=30_000)
    for box in page.locator("#compare-runs input:checked").all():
        box.uncheck()
    for m in METHODS:
        page.locator("#compare-runs label", has_text=f"star-{m}").locator("input").check()
    page.fill("#compare-prompt textarea", "a sks star")
    page.fill("#compare-seeds textarea, #compare-seeds input", "0, 1")
    set_slider(page, "compare-steps", 6)
    page.wait_for_selector("#compare-scale-1", state="visible")
    page.click("#compare-render")
    wait_text(page, "#compare-note", "2 row(s) x 3 column(s)", timeout=180_000)
    page.wait_for_selector("#compare-grid img", timeout=30_000)
    with page.expect_download() as download:
        page.click("#compare-download")
    grid = tmp_path / "grid.png"
    download.value.save_as(grid)
    meta = read_png_settings(grid)
    assert [c["caption"][0] for c in meta["columns"]] == ["Base model", "Res-Tuning", "LoRA"]
    assert [c["run"] for c in meta["columns"]][1:] == [ids["res-tuning"], ids["lora"]]
    assert [r["seed"] for r in meta["rows"]] == [0, 1] and meta["rows"][0]["steps"] == 6
    assert Image.open(grid).width >= 3 * 256

    page.get_by_role("tab", name="Generate").click()
    page.locator("#gen-tuner input").click()
    page.get_by_role("option", name=re.compile("star-res-tuning")).click()
    page.fill("#gen-prompt textarea", "a sks star on blue")
    page.fill("#gen-seed input", "5")
    set_slider(page, "gen-steps", 6)
    page.click("#gen-go")
    page.wait_for_function("document.querySelectorAll('#gen-gallery img').length >= 2", timeout=180_000)
    src = page.locator("#gen-gallery img").first.get_attribute("src")
    served = page.request.get(src if src.startswith("http") else studio[0] + src).body()
    text = Image.open(io.BytesIO(served)).text
    settings = json.loads(text[PNG_KEY])
    assert settings["tuner"] == ids["res-tuning"] and settings["prompt"] == "a sks star on blue"
    assert settings["seed"] in (5, 6) and settings["steps"] == 6 and settings["scheduler"]
    assert not page.locator("#gen-settings").is_visible(), "no empty settings box before a picture is chosen"
    page.locator("#gen-gallery .thumbnail-item").first.click()
    page.wait_for_function("(document.querySelector('#gen-settings') || {}).innerText?.includes('a sks star on blue')",
                           timeout=30_000)

    # a saved picture brings its settings back into the form
    saved = tmp_path / "picture.png"
    saved.write_bytes(served)
    page.fill("#gen-prompt textarea", "something else")
    page.get_by_text("Load settings from a PNG", exact=True).click()
    page.set_input_files("#gen-load-png input[type=file]", str(saved))
    page.wait_for_function("document.querySelector('#gen-prompt textarea').value === 'a sks star on blue'", timeout=30_000)
    assert page.input_value("#gen-seed input") == str(settings["seed"])


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """The studio as a Space starts it: SPACE_ID and PORT in the environment, no flags."""
    runs = tmp_path_factory.mktemp("space") / "runs"
    port = free_port()
    yield from serve(runs, [], {"SPACE_ID": "tester/restuning-studio", "PORT": str(port), "RESTUNING_RUNS_DIR": str(runs)},
                     port)


def visitor(browser, url):
    context = browser.new_context(viewport={"width": 1400, "height": 1200})
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#train", timeout=30_000)
    return context, page


def test_as_a_space_it_binds_all_interfaces_and_keeps_visitors_apart(browser, space, trained):
    url, runs = space
    port = int(url.rsplit(":", 1)[1])
    listening = {c.laddr.ip for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert "0.0.0.0" in listening or "::" in listening, listening
    # a list of runs shows a run by its name (the run id is its value): the published one has one
    published = copy_runs({"lora": trained["lora"]}, runs, owner="c" * 32, published=True, label="carols star")["lora"]

    ctx_a, alice = visitor(browser, url)
    ctx_b, bob = visitor(browser, url)
    try:
        upload(alice, STARS[:3])
        alice.wait_for_selector("#concept-preview img", timeout=30_000)
        alice.fill("#instance-prompt textarea", "a sks star")
        fill(alice, "max_train_steps", 3000)  # long enough to be running or queued below, within the shared cap
        alice.click("#comparison .label-wrap")
        # no more ticked than a visitor may queue; the accordion renders its boxes a moment after the click
        expect(alice.locator("#compare-methods input:checked")).to_have_count(2, timeout=15_000)
        alice.locator("#compare-methods label", has_text="Adapter").locator("input").check()
        alice.click("#compare")  # three methods: over the limit of 2 per visitor
        assert "choose at most 2 methods" in error_toast(alice)
        alice.locator(".toast-close").first.click()
        alice.click("#train")
        alice.wait_for_selector("#live-progress [data-status=running], #live-progress [data-status=queued]", timeout=120_000)
        mine = [p.name for p in runs.iterdir() if p.is_dir() and p.name != published and not p.name.startswith("_")]
        assert len(mine) == 1 and len(mine[0].rsplit("-", 1)[1]) == 16, mine

        # Bob: not in his live view, his runs table or his compare list; the published run is
        bob.reload()
        bob.wait_for_selector("#train")
        assert "No run yet" in bob.inner_text("#live-progress")
        bob.get_by_role("tab", name="Runs / tuners").click()
        wait_text(bob, "#runs-table", published)
        assert mine[0] not in bob.inner_text("#runs-table")
        assert not bob.locator("#runs-cancel").is_visible() and not bob.locator("#runs-delete").is_visible()
        assert not bob.locator("#runs-publish").is_visible(), "only the owner publishes"
        bob.get_by_role("tab", name="Compare").click()
        bob.locator("#compare-runs label", has_text="carols star").wait_for(timeout=30_000)

        # Alice, after a reload (her id is remembered by the browser), still has her run and controls it
        alice.reload()
        alice.wait_for_selector("#live-progress [data-status]", timeout=30_000)
        alice.get_by_role("tab", name="Runs / tuners").click()
        wait_text(alice, "#runs-table", mine[0])
        alice.get_by_role("tab", name="Train").click()
        alice.click("#live-cancel")
        alice.wait_for_selector("#live-progress [data-status=cancelled]", timeout=120_000)
        assert bob.locator("#runs-cancel").count() == 0 or not bob.locator("#runs-cancel").is_visible()
    finally:
        ctx_a.close()
        ctx_b.close()
