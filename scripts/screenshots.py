"""Screenshots of the studio, made from the real app, so the README's picture stays true.

    python -m scripts.screenshots [--out docs/images]     # the example as a newcomer trains it
    python -m scripts.screenshots --steps 30                # a quick run, for pictures of the layout only

Starts `python app.py` on the bundled demo model with a fresh runs folder, and in the system's
Chromium (Debian's `chromium`, through Playwright; never `playwright install`) does what a newcomer
does: the star example trained with every default (the preselected method), then the same with
the Bypass, a Compare grid of the base model and both runs, a Generate click. It then photographs
the Train, Compare and Generate tabs at 1280x800 and at 390x844 (a phone):
docs/images/{train,compare,generate}-{desktop,phone}.png. About 4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}
LONG = 600_000  # ms: a loaded 2-core machine trains and renders slowly


def start_studio(runs: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RESTUNING_RUNS_DIR=str(runs), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    log = open(runs.parent / "app.log", "wb")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                sys.exit("the studio did not start:\n" + (runs.parent / "app.log").read_text()[-3000:])
            time.sleep(0.5)


def set_number(page, option: str, value) -> None:
    box = page.locator(f"#opt-{option} input, #opt-{option} textarea").first
    box.fill(str(value))
    box.press("Tab")


def train_example(page, steps: int | None, method: str | None = None) -> None:
    """The star example trained with every default (`steps`: a short run with a few class images
    instead), by `method` where given, else the preselected one, watched to the end."""
    page.click("#example-star")
    page.wait_for_selector("#concept-preview img", timeout=LONG)
    if method:
        page.locator(f'#method input[value="{method}"]').check()
    if steps:
        set_number(page, "max_train_steps", steps)
        page.click("#advanced .label-wrap")
        for option, value in (("num_class_images", 8), ("validation_steps", max(1, steps // 3)), ("num_validation_images", 2),
                              ("num_inference_steps", 10), ("checkpointing_steps", steps)):
            set_number(page, option, value)
        page.click("#advanced .label-wrap")
    before = page.locator("#live-run input").first.input_value() if page.locator("#live-run input").count() else ""
    page.click("#train")
    page.wait_for_function("(before) => { const i = document.querySelector('#live-run input'); return i && i.value && i.value !== before; }",
                           arg=before, timeout=LONG)  # the live view follows the new run
    page.wait_for_selector("#live-progress [data-status=queued], #live-progress [data-status=running]", timeout=LONG)
    page.wait_for_selector("#live-progress [data-status=done], #live-progress [data-status=failed]", timeout=LONG)


def render_compare(page) -> None:
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_selector("#compare-runs input:checked", timeout=LONG)
    for box in page.locator("#compare-runs input:not(:checked)").all():  # every run beside the base model
        box.check()
    page.fill("#compare-more textarea", "a green sks shape on a yellow background")
    page.click("#compare-render")
    page.wait_for_selector("#compare-grid img", timeout=LONG)


def generate(page, prompt: str) -> None:
    page.get_by_role("tab", name="Generate").click()
    page.locator("#gen-tuner input").click()
    page.get_by_role("option").nth(1).click()  # the run just trained, after "Base model"
    page.fill("#gen-prompt textarea", prompt)
    page.click("#gen-go")
    page.wait_for_function("document.querySelectorAll('#gen-gallery img').length >= 2", timeout=LONG)


def shoot(page, tab: str, out: Path) -> None:
    page.get_by_role("tab", name=tab.capitalize()).click()
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(500)  # the tab's own fade-in; what it shows was waited for before
    page.screenshot(path=str(out))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    p.add_argument("--steps", type=int, default=None, help="a short run of this many steps instead of the example's recipe")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no Chromium found (Debian: apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="restuning-shots-") as work:
        proc, url = start_studio(Path(work) / "runs")
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
                for size, (width, height) in SIZES.items():
                    context = browser.new_context(viewport={"width": width, "height": height})
                    page = context.new_page()
                    page.goto(url)
                    page.wait_for_selector("#train", timeout=LONG)
                    if size == "desktop":
                        train_example(page, args.steps, "bypass")
                        train_example(page, args.steps, "res-tuning")  # the preselected method last: the Train tab shows it
                    else:  # the phone re-attaches to the finished run
                        page.wait_for_selector("#live-progress [data-status=done]", timeout=LONG)
                    render_compare(page)
                    generate(page, "a green sks shape on a yellow background")
                    for tab in ("train", "compare", "generate"):
                        shoot(page, tab, args.out / f"{tab}-{size}.png")
                        print(f"wrote {args.out / f'{tab}-{size}.png'}")
                    context.close()
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            from tests.e2e.conftest import stop_runs

            stop_runs(Path(work) / "runs")


if __name__ == "__main__":
    main()
