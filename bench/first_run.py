"""A newcomer's first result, driven through the real studio: click the star example, Train with
every default, wait for the finished run; then render it for seeds 0-7 and count the stars.

    python -m bench.first_run                     # quiet, then beside a process busy on every core
    python -m bench.first_run --loads quiet       # one condition
    python -m bench.first_run --no-score          # timing only

For each load condition it starts `python app.py` on the bundled demo model with a fresh runs
folder, opens the page in the system's Chromium (Playwright), clicks "star" and Train, and waits
for the live view to say done. Reported: click to done (wall time in the browser), when each of
the run's phases began (its events), the trainer's seconds per step, and the machine's load
average. "busy" runs, beside the studio, one process per core that spins at normal priority
(what a shared Space's neighbours do). Then the finished run's tuner is rendered as the studio's
Generate and Compare tabs render it (trainers.sampling.Sampler, the model's own sampling
settings) for seeds 0-7 of "a sks shape" and "a green sks shape on a yellow background", and the
demo model's shipped evaluator (assets/evaluator) names each sample's shape.
Writes bench/results/first_run.json and .md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PROMPTS = ("a sks shape", "a green sks shape on a yellow background")
LONG = 1_200_000  # ms


def spin() -> None:
    while True:
        pass


def click_to_done(url: str, chromium: str) -> dict:
    """The star example trained with every default, through the page: seconds from the Train click
    to the live view's done (or failed)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        page.wait_for_selector("#train", timeout=LONG)
        method = page.locator("#method input:checked").first.input_value()
        page.click("#example-star")
        page.wait_for_selector("#concept-preview img", timeout=LONG)
        started = time.monotonic()
        page.click("#train")
        page.wait_for_selector("#live-progress [data-status=done], #live-progress [data-status=failed]", timeout=LONG)
        seconds = time.monotonic() - started
        status = page.locator("#live-progress [data-status]").first.get_attribute("data-status")
        browser.close()
    return {"click_to_done_s": round(seconds, 1), "status": status, "method_shown": method}


def run_figures(runs: Path) -> dict:
    from trainers.events import read_events

    folders = [p for p in runs.iterdir() if (p / "events.jsonl").is_file()]
    if len(folders) != 1:
        return {"error": f"expected one run in {runs}, found {len(folders)}"}
    run = folders[0]
    events = read_events(run)
    config = json.loads((run / "config.json").read_text())
    phases: dict[str, float] = {}
    for e in events:
        if e.get("event") == "phase" and e.get("phase") not in phases:
            phases[e["phase"]] = e["t"]
    steps = [e for e in events if e.get("event") == "step"]
    start = events[0]["t"] if events else 0
    return {"run": run.name, "method": config.get("method"), "steps": config.get("max_train_steps"),
            "phase_start_s": {k: round(v - start, 1) for k, v in phases.items()},
            "training_s": round(phases["saving"] - phases["training"], 1) if {"saving", "training"} <= set(phases) else None,
            "sec_per_step_median": round(statistics.median(e["sec_per_step"] for e in steps), 4) if steps else None,
            "tuner": str(run / "tuner.safetensors")}


def count_stars(tuner: Path, seeds: int) -> dict:
    """{prompt: stars among seeds 0..seeds-1}, rendered as the studio renders."""
    from scripts.evaluator import Evaluator
    from trainers.sampling import Column, Settings
    from webui.model import describe
    from webui.pipeline import StudioPipeline

    model = StudioPipeline(describe(None), "cpu")
    defaults = model.defaults()
    sampler = model.sampler()
    evaluator = Evaluator.load(ROOT / "assets" / "evaluator")
    counts = {}
    for prompt in PROMPTS:
        rows = [Settings(prompt=prompt, seed=s, steps=int(defaults["steps"]), guidance=float(defaults["guidance"]),
                         scheduler=defaults["scheduler"], height=defaults["height"], width=defaults["width"]) for s in range(seeds)]
        images = [row[0] for row in sampler.render([Column("tuner", tuner=tuner)], rows)]
        shapes = [p["shape"] for p in evaluator.predict(images)]
        counts[prompt] = {"stars": shapes.count("star"), "of": seeds, "shapes": shapes}
    return counts


def one_condition(load: str, chromium: str, score: bool, seeds: int) -> dict:
    from scripts.screenshots import start_studio
    from tests.e2e.conftest import stop_runs

    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(os.cpu_count() or 1)] if load == "busy" else []
    for p in spinners:
        p.start()
    row = {"load": load, "busy_processes": len(spinners), "load_avg_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="first-run-") as work:
        runs = Path(work) / "runs"
        proc, url = start_studio(runs)
        try:
            row.update(click_to_done(url, chromium))
            row["load_avg_after"] = round(os.getloadavg()[0], 2)
        finally:
            for p in spinners:
                p.terminate()
            proc.terminate()
            proc.wait(timeout=30)
            stop_runs(runs)
        row.update(run_figures(runs))
        tuner = Path(row.pop("tuner", ""))
        if score and row.get("status") == "done" and tuner.is_file():
            row["stars"] = count_stars(tuner, seeds)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["### First result: the star example in the studio, every default", "",
             "`python -m bench.first_run`: click *star*, Train, wait for done in Chromium; then seeds 0-7 rendered as "
             "the studio renders, shapes named by the shipped evaluator.", "",
             "| date | load | load avg | method | steps | click to done (s) | loading (s) | class images (s) | training (s) "
             "| s/step | stars: a sks shape | stars: green on yellow |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ph = r.get("phase_start_s", {})
        gap = lambda a, b: round(ph[b] - ph[a], 1) if {a, b} <= set(ph) else ""  # noqa: E731
        stars = r.get("stars", {})
        cell = lambda p: f"{stars[p]['stars']}/{stars[p]['of']}" if p in stars else ""  # noqa: E731
        lines.append(f"| {r['date']} | {r['load']} ({r['busy_processes']} spinning) | {r['load_avg_before']} -> {r.get('load_avg_after', '')} "
                     f"| {r.get('method', '')} | {r.get('steps', '')} | {r.get('click_to_done_s', r.get('error', ''))} "
                     f"| {gap('loading', 'class-images')} | {gap('class-images', 'training')} | {r.get('training_s', '')} "
                     f"| {r.get('sec_per_step_median', '')} | {cell(PROMPTS[0])} | {cell(PROMPTS[1])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.first_run", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", default="quiet,busy", help="comma-separated: quiet, busy")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--no-score", action="store_true", help="timing only")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no Chromium found (Debian: apt-get install chromium)")
    rows = []
    for load in args.loads.split(","):
        row = one_condition(load.strip(), chromium, not args.no_score and load.strip() == "quiet", args.seeds)
        row.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=f"{os.cpu_count()} CPU cores")
        print(json.dumps({k: v for k, v in row.items() if k != "stars"}), flush=True)
        rows.append(row)
    path = args.out_dir / "first_run.json"
    old = json.loads(path.read_text()) if path.is_file() else []
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old + rows, indent=2) + "\n")
    table = markdown(old + rows)
    path.with_suffix(".md").write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
