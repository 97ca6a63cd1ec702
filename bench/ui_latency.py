"""Studio responsiveness while a run trains on the same machine (issue 5, item 8): how long a
page load and a tab switch take in a real browser.

    python -m bench.ui_latency                    # demo model, 10 loads and 10 switches each way
    python -m bench.ui_latency --repeats 3        # quicker

It starts `python app.py` on a free port with a fresh runs folder, starts a training run through
the page as a user would (the star concept, enough steps to outlast the measurement), waits until
the trainer reports steps, then measures in headless Chromium (Playwright, the system's
`chromium`):
- page load: a new tab opening the studio until the form shows (the Train button), and until
  the live view shows the training run (`[data-status=running]`: the page re-attached to the
  run by reading its events); in a fresh browser profile each time (a first visit: every
  script fetched), and in one profile that has loaded the page before (a reload or a second
  tab: scripts from the browser's cache);
- tab switch to "Runs / tuners" until the runs table lists the run (the first switch builds
  the tab: reported on its own too), and back to "Train" until the live view is visible again;
- the server's share of a page load (Resource Timing): the HTML's request to last byte, and the
  slowest API call the page made; the rest is the browser's, which here shares the 2 cores;
- for reference, page loads before the run starts.
For scale, the same page-load measure on a one-button Gradio page served at the same time.
Each figure is wall time from the action to the condition (Playwright polls the DOM on every
animation frame). It checks the run still trains after the measurement, then cancels it.
Writes bench/results/ui_latency.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
RUNNING = "#live-progress [data-status=running]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(runs: Path, port: int, model: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "app.py", "--runs-dir", str(runs), "--port", str(port)] + (["--model", model] if model else [])
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(runs.parent / "app.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    proc.kill()
    sys.exit("the studio did not start:\n" + (runs.parent / "app.log").read_text()[-3000:])


def start_run(page, steps: int) -> None:
    stars = sorted((ROOT / "assets" / "concepts" / "star").glob("*.png"))
    page.set_input_files("#concept-files input[type=file]", [str(p) for p in stars])
    page.wait_for_selector("#concept-preview img", timeout=30_000)
    page.fill("#instance-prompt textarea", "a sks star")
    page.fill("#opt-max_train_steps input", str(steps))
    page.press("#opt-max_train_steps input", "Tab")
    page.click("#train")
    page.wait_for_selector(RUNNING, timeout=180_000)
    page.wait_for_function("() => +document.querySelector('#live-progress .rt-progress').dataset.step > 0",
                           timeout=300_000)


def start_baseline() -> str:
    """A one-button Gradio page served from this process: what any Gradio page costs here."""
    import gradio as gr

    with gr.Blocks() as demo:
        gr.Button("Train", elem_id="train")
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}"


def last_step(run_dir: Path) -> dict:
    from trainers.events import read_events

    return next(e for e in reversed(read_events(run_dir)) if e["event"] == "step")


def server_times(page) -> tuple[float, float]:
    """What the studio's server took, from the browser's Resource Timing: (seconds from request to
    the last byte of the page's HTML, the longest API call the page made while loading)."""
    html = page.evaluate("() => { const n = performance.getEntriesByType('navigation')[0];"
                         " return (n.responseEnd - n.requestStart) / 1000; }")
    api = page.evaluate("() => Math.max(0, ...performance.getEntriesByType('resource')"
                        ".filter(r => r.name.includes('/gradio_api/')).map(r => r.responseEnd - r.requestStart)) / 1000")
    return html, api


VIEWPORT = {"width": 1400, "height": 1200}


def open_page(opener, url: str, selectors: list[str]):
    """Open url in a new tab of `opener` (the browser: a fresh profile each time, nothing cached;
    or one browser context: its cache warm, as for a reload or a second tab); return the tab and
    the seconds until each selector showed."""
    page = opener.new_page(viewport=VIEWPORT) if hasattr(opener, "new_context") else opener.new_page()
    start = time.perf_counter()
    page.goto(url)
    times = []
    for selector in selectors:
        page.wait_for_selector(selector, timeout=30_000)
        times.append(time.perf_counter() - start)
    return page, times


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(values: list[float]) -> dict:
    values = sorted(values)
    return {"n": len(values), "median_s": round(statistics.median(values), 3),
            "p90_s": round(values[min(len(values) - 1, int(0.9 * len(values)))], 3), "max_s": round(values[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2000, help="training steps of the background run (outlasts the measurement)")
    parser.add_argument("--model", default=None, help="base model for app.py (default: the demo model)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no Chromium found: install Debian's chromium")
    work = Path(tempfile.mkdtemp(prefix="ui-latency-"))
    runs = work / "runs"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = start_app(runs, port, args.model)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            page.wait_for_selector("#train")
            idle = []
            for _ in range(args.repeats):
                fresh, (shown_at,) = open_page(browser, url, ["#train"])
                idle.append(shown_at)
                fresh.close()
            start_run(page, args.steps)
            run_id = next(runs.iterdir()).name
            before = last_step(runs / run_id)
            baseline_url = start_baseline()
            baseline = []
            for _ in range(args.repeats):
                fresh, (shown_at,) = open_page(browser, baseline_url, ["#train"])
                baseline.append(shown_at)
                fresh.close()
            shown, loads, to_runs, to_train, html, api, warm_shown, warm_loads = [], [], [], [], [], [], [], []
            returning = browser.new_context(viewport=VIEWPORT)
            open_page(returning, url, ["#train"])[0].close()  # its first visit fills the cache
            for _ in range(args.repeats):
                fresh, (shown_at, loaded_at) = open_page(returning, url, ["#train", RUNNING])
                warm_shown.append(shown_at)
                warm_loads.append(loaded_at)
                fresh.close()
            for _ in range(args.repeats):
                fresh, (shown_at, loaded_at) = open_page(browser, url, ["#train", RUNNING])
                shown.append(shown_at)
                loads.append(loaded_at)
                h, a = server_times(fresh)
                html.append(h)
                api.append(a)
                fresh.close()
            for _ in range(args.repeats):
                to_runs.append(timed(lambda: (page.get_by_role("tab", name="Runs / tuners").click(),
                                              page.wait_for_function(
                                                  "id => (document.querySelector('#runs-table') || {}).innerText?.includes(id)"
                                                  " && document.querySelector('#runs-table').offsetParent !== null",
                                                  arg=run_id, timeout=30_000))))
                to_train.append(timed(lambda: (page.get_by_role("tab", name="Train").click(),
                                               page.wait_for_selector(RUNNING, timeout=30_000))))
            after = last_step(runs / run_id)
            browser.close()
    finally:
        for record in runs.glob("*/process.json"):
            try:
                os.killpg(json.loads(record.read_text())["pid"], signal.SIGTERM)
            except (ProcessLookupError, PermissionError, ValueError, KeyError):
                pass
        app.terminate()
        app.wait(timeout=30)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "model": args.model or "assets/demo-model",
        "training_during_measurement": {"step_before": before["step"], "step_after": after["step"],
                                        "sec_per_step": after["sec_per_step"]},
        "baseline_one_button_page": summary(baseline), "page_shown_idle": summary(idle),
        "server_html": summary(html), "server_page_load_api": summary(api), "page_shown": summary(shown),
        "page_load": summary(loads), "page_shown_cached": summary(warm_shown), "page_load_cached": summary(warm_loads),
        "tab_to_runs": summary(to_runs), "tab_to_runs_first": summary(to_runs[:1]), "tab_to_train": summary(to_train),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ui_latency.json").write_text(json.dumps(result, indent=2))
    rows = [("for scale: a one-button Gradio page, same machine, same time", result["baseline_one_button_page"]),
            ("page load with nothing training, until the form shows", result["page_shown_idle"]),
            ("page load, until the form shows", result["page_shown"]),
            ("page load, until the live run shows", result["page_load"]),
            ("page load in a browser that has been here (cache warm), until the form shows", result["page_shown_cached"]),
            ("page load in a browser that has been here (cache warm), until the live run shows", result["page_load_cached"]),
            ("tab switch Train -> Runs / tuners", result["tab_to_runs"]),
            ("of which the first (the tab is built on its first visit)", result["tab_to_runs_first"]),
            ("tab switch Runs / tuners -> Train", result["tab_to_train"]),
            ("server side of a page load: the page's HTML, request to last byte", result["server_html"]),
            ("server side of a page load: its slowest API call (re-attaching the live run)", result["server_page_load_api"])]
    table = ["| action | n | median (s) | p90 (s) | max (s) |", "|---|---|---|---|---|"]
    table += [f"| {name} | {s['n']} | {s['median_s']} | {s['p90_s']} | {s['max_s']} |" for name, s in rows]
    t = result["training_during_measurement"]
    text = "\n".join(table) + (f"\n\nMeasured while a run on {result['model']} trained on the same machine "
                              f"({os.cpu_count()} CPUs): it went from step {t['step_before']} to {t['step_after']} "
                              f"during the measurement, {t['sec_per_step']} s/step.\n")
    if t["step_after"] <= t["step_before"]:
        text += "WARNING: the run made no progress during the measurement; the figures are not under load.\n"
    (RESULTS / "ui_latency.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
