"""What the studio shows of a run, derived only from its files (trainers.service.jobs.RunInfo, which
reads events.jsonl and train.log): progress, loss curve, samples, artifacts, one-line status.
Plain functions without Gradio, so the tests can check them and every view agrees."""

from __future__ import annotations

import heapq
import html
import math
import time
from pathlib import Path

import pandas as pd

from trainers.events import FINAL_PHASES
from trainers.service.jobs import INSTANCE_DIR, RunInfo, log_tail, redact

from .forms import plain
from .model import source_name


def _inside(run_dir: Path, rel: str) -> Path | None:
    """A path named by an event, only if it stays inside the run folder and exists."""
    path = (run_dir / rel).resolve()
    return path if path.is_relative_to(run_dir.resolve()) and path.is_file() else None


def last_step(info: RunInfo) -> dict | None:
    return next((e for e in reversed(info.events) if e.get("event") == "step"), None)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"


def class_images(info: RunInfo) -> tuple[int, int, float | None] | None:
    """(made, total, seconds left) while the run makes its class images; None otherwise."""
    if info.status != "running" or info.phase != "class-images":
        return None
    counted = [e for e in info.events if e.get("event") == "phase" and e.get("phase") == "class-images" and e.get("total")]
    if not counted:
        return None
    first, last = counted[0], counted[-1]
    made, total = int(last.get("done", 0)), int(last["total"])
    rate = (made - int(first.get("done", 0))) / max(last["t"] - first["t"], 1e-6) if len(counted) > 1 else 0
    return made, total, (total - made) / rate if rate > 0 else None


def duration(info: RunInfo) -> float | None:
    """Seconds from the run's (last) start to its end, class images included."""
    starts = [e["t"] for e in info.events if e.get("event") == "phase" and e.get("phase") == "loading" and "t" in e]
    ends = [e["t"] for e in info.events if e.get("event") == "phase" and e.get("phase") == "done" and "t" in e]
    return ends[-1] - starts[-1] if starts and ends and ends[-1] >= starts[-1] else None


NEXT_STEP = "Next: see it beside the base model in the Compare tab, or make pictures with it in Generate."


def _bar(info: RunInfo, done: int, total: int, text: str, kind: str = "training") -> str:
    fraction = min(1.0, done / total) if total else 0.0
    return (f"<div class='rt-progress' data-status='{info.status}' data-kind='{kind}' data-step='{done}' data-total='{total}'>"
            f"<div class='rt-progress-bar' style='width:{fraction * 100:.1f}%'></div></div>"
            f"<div class='rt-progress-text'>{html.escape(text)}</div>")


def progress_html(info: RunInfo | None, wait: str = "") -> str:
    """A progress bar with step/total, speed and ETA from the last step event; while class images
    are made, their own bar and ETA; once done, how long it took and what to do next. `wait`: when
    a queued run should start (start_words), shown after its place in the queue."""
    if info is None:
        return "<div class='rt-progress-text'>No run yet: upload images (or try an example) and press Train.</div>"
    making = class_images(info)
    if making is not None:
        made, total, left = making
        return _bar(info, made, total, f"making class images {made}/{total}" + (f" · ETA {_duration(left)}" if left else "")
                    + " · training starts after them", kind="class-images")
    step = last_step(info)
    total = (step or {}).get("total") or info.config.get("max_train_steps") or 0
    done = (step or {}).get("step", 0)
    if info.status == "done":
        done = total or done
    parts = [f"step {done}/{total}" if total else "step ?"]
    if step and info.status == "running":
        parts.append(f"{step.get('sec_per_step', 0):.2f} s/step")
        parts.append(f"ETA {_duration(step.get('eta_sec'))}")
    parts.append(status_line(info))
    if wait and info.status == "queued":
        parts.append(wait)
    if info.status == "done":
        took = duration(info)
        parts[-1] = f"done in {_duration(took)}" if took is not None else "done"
        return _bar(info, done, total, " · ".join(parts)) + f"<div class='rt-progress-text' id='live-next'>{NEXT_STEP}</div>"
    return _bar(info, done, total, " · ".join(parts))


def _pace_key(info: RunInfo) -> tuple:
    """What a run's seconds per step depend on: runs alike in these train at about the same pace."""
    c = info.config
    return (info.method, c.get("pretrained_model_name_or_path"), c.get("resolution"), c.get("train_batch_size"))


def paces(runs: list[RunInfo]) -> dict[tuple, float]:
    """_pace_key -> seconds per step, as the newest run of that kind that made a step measured it."""
    measured = {}
    for info in sorted(runs, key=lambda r: r.created):
        step = last_step(info)
        if step and isinstance(step.get("sec_per_step"), (int, float)) and step["sec_per_step"] > 0:
            measured[_pace_key(info)] = float(step["sec_per_step"])
    return measured


def seconds_left(info: RunInfo, pace: float | None = None, now: float | None = None) -> float | None:
    """Seconds until `info` (running or queued) should end: its steps left times the seconds per
    step it measured, or `pace` (measured on a like run) before its first step, plus the class
    images it is still making. None when that cannot be told yet. Loading is not counted."""
    if info.status == "running" and info.phase in FINAL_PHASES:
        return 0.0
    step = last_step(info)
    total = int((step or {}).get("total") or info.config.get("max_train_steps") or 0)
    done = int((step or {}).get("step", 0))
    per_step = step.get("sec_per_step") if step else pace
    if not isinstance(per_step, (int, float)) or not per_step > 0 or not total:
        return None
    left = max(total - done, 0) * float(per_step)
    if step and isinstance(step.get("t"), (int, float)):
        left = max(left - ((time.time() if now is None else now) - step["t"]), 0.0)  # time since that step
    making = class_images(info)
    if making is not None:
        if making[2] is None:
            return None
        left += making[2]
    return left


def start_in(info: RunInfo, runs: list[RunInfo], slots: int = 1, now: float | None = None) -> float | None:
    """Seconds until the queued run `info` should start: the runs running now hold the `slots`
    places (runs that train at once) until seconds_left, and each queued run ahead of it (by place
    in the queue) takes the first place that frees. 0 with none ahead and a place free; None when
    a run it waits for cannot be estimated yet (no step made, and no like run measured)."""
    measured = paces(runs)

    def left(run):
        return seconds_left(run, measured.get(_pace_key(run)), now)

    ends = [left(r) for r in runs if r.status == "running" and r.id != info.id]
    ahead = sorted((r for r in runs if r.status == "queued" and r.id != info.id and r.position is not None
                    and info.position is not None and r.position < info.position), key=lambda r: r.position)
    durations = [left(r) for r in ahead]
    if any(t is None for t in ends + durations):
        return None
    slots = max(1, slots)
    # with more runs holding places than there are (one still exiting), a place frees only when enough have ended
    places = sorted([0.0] * max(0, slots - len(ends)) + ends)[max(0, len(ends) - slots):]
    heapq.heapify(places)
    for duration in durations:
        heapq.heappush(places, heapq.heappop(places) + duration)
    return places[0]


def start_words(seconds: float | None) -> str:
    """When a queued run should start, in plain words."""
    if seconds is None:
        return "no start time yet: the run ahead has not made its first step"
    if seconds < 60:
        return "should start within a minute"
    minutes = math.ceil(seconds / 60)
    if minutes < 90:
        return f"should start in about {minutes} min"
    return f"should start in about {minutes / 60:.1f} h".replace(".0 h", " h")


def queue_words(runner, info: RunInfo) -> str:
    """When the queued run `info` should start, from every run of `runner` (trainers.service.jobs.JobRunner)
    ahead of it; "" for a run not queued or one held back for a reason of its own (a full disk)."""
    if info.status != "queued" or info.position is None or info.waiting:
        return ""
    slots = len(runner.devices) * getattr(runner.launcher, "per_device", 1)
    return start_words(start_in(info, runner.list_runs(), slots))


def status_line(info: RunInfo) -> str:
    if info.status == "queued":
        where = f"queued, place {info.position} in the queue" if info.position else "queued"
        return f"{where} ({info.waiting})" if info.waiting else where
    if info.status == "running" and info.phase in FINAL_PHASES:
        return f"stopping: {info.phase}, its process is writing its last files"
    if info.status == "damaged":
        return f"damaged: {info.error}"
    if info.status == "running":
        if info.phase == "class-images":
            last = next(e for e in reversed(info.events) if e.get("event") == "phase")
            if last.get("total"):
                return f"running: generating class images {last.get('done', 0)}/{last['total']}"
        return f"running: {info.phase if info.phase != 'queued' else 'starting'}"
    if info.status == "failed":
        return f"failed: {info.error}"
    return info.status


def loss_frame(info: RunInfo | None) -> pd.DataFrame:
    """step -> loss; after a resume the re-run steps replace the earlier ones."""
    by_step = {}
    for e in (info.events if info else []):
        if e.get("event") == "step" and e.get("loss") is not None:
            by_step[int(e["step"])] = float(e["loss"])
    return pd.DataFrame({"step": list(by_step), "loss": list(by_step.values())})


SMOOTHING = 0.9  # the exponential moving average's weight on the past: per-step diffusion loss is mostly noise


def loss_plot_frame(info: RunInfo | None) -> pd.DataFrame:
    """The loss plot's points: each step's loss ("per step") and its moving average ("smoothed"),
    in long form so the plot draws one line per series."""
    frame = loss_frame(info)
    smoothed = frame["loss"].ewm(alpha=1 - SMOOTHING, adjust=True).mean() if not frame.empty else frame["loss"]
    return pd.concat([frame.assign(series="per step"), frame.assign(loss=smoothed, series="smoothed")], ignore_index=True)


def samples(info: RunInfo | None) -> list[tuple[str, str]]:
    """Validation images as they appear, newest first, captioned with their step."""
    out = []
    for e in (info.events if info else []):
        if e.get("event") == "sample":
            for rel in e.get("paths", []):
                path = _inside(info.dir, rel)
                if path is not None:
                    out.append((str(path), f"step {e.get('step')}: {e.get('prompt', '')}"))
    return out[::-1]


def artifacts(info: RunInfo) -> dict[str, Path]:
    """kind (tuner | lora-diffusers | lora-kohya | unet | model-card) -> file, from artifact events."""
    out = {}
    for e in info.events:
        if e.get("event") == "artifact" and e.get("path"):
            path = _inside(info.dir, e["path"])
            if path is not None:
                out[e["kind"]] = path
    return out


def facts(info: RunInfo) -> dict:
    """The `info` events merged (trainable_params, method, device, ...)."""
    merged = {}
    for e in info.events:
        if e.get("event") == "info":
            merged.update({k: v for k, v in e.items() if k not in ("t", "event")})
    return merged


def run_name(info: RunInfo) -> str:
    """The name its user gave the run (the Train form's "Run name", an import's "Name"); "" for a
    run the studio labelled with its method."""
    return info.label if info.label != info.method else ""


def recipe_facts(info: RunInfo) -> dict[str, str]:
    """What tells runs of one method apart at a glance, each where known: {"steps": "300 steps",
    "lr": "lr 0.01", "images": "8 images"} (the learning rate the trainer used, else the one asked for)."""
    steps = info.config.get("max_train_steps")
    rate = facts(info).get("learning_rate", info.config.get("learning_rate"))
    try:
        images = sum(1 for entry in (info.dir / INSTANCE_DIR).iterdir() if entry.is_file())
    except OSError:
        images = 0
    whole = isinstance(steps, int) and not isinstance(steps, bool)
    found = {"steps": f"{steps} step{'' if steps == 1 else 's'}" if whole else "",
             "lr": f"lr {rate:g}" if isinstance(rate, (int, float)) and not isinstance(rate, bool) else "",
             "images": f"{images} images" if images else ""}
    return {k: v for k, v in found.items() if v}


def log_text(info: RunInfo | None, lines: int = 20) -> str:
    """Phase messages and the process output's last lines."""
    if info is None:
        return ""
    events = [e for e in info.events if e.get("event") == "phase"]
    # a class-image count is news only until the next one
    events = [e for i, e in enumerate(events) if not (_count(e) and i + 1 < len(events) and _count(events[i + 1]))]
    phases = [redact(_phase_line(e), info.dir) for e in events]
    if info.status == "cancelled" and info.hint:
        phases.append(info.hint)
    # the trainer names its options as a command line does (--learning_rate); the page, by their labels
    return "\n".join(phases[-8:] + ["---"] + [plain(line) for line in log_tail(info.dir, lines)])


PHASE_WORDS = {"loading": "loading the base model", "class-images": "class images", "training": "training",
               "saving": "saving", "queued": "queued"}


def _count(e: dict) -> bool:
    return e.get("phase") == "class-images" and bool(e.get("total")) and not e.get("message")


def _phase_line(e: dict) -> str:
    """One phase event as the log shows it: 'class images: 12/100', not a bare '[class-images]'."""
    words = PHASE_WORDS.get(e["phase"], e["phase"])
    text = e.get("message") or e.get("error") or (f"{e.get('done', 0)}/{e['total']} made" if e.get("total") else "")
    hint = f"\n  hint: {e['hint']}" if e.get("hint") else ""
    return f"{words}: {text}{hint}" if text else f"{words}{hint}"


def human_size(n: int | None) -> str:
    if n is None:
        return ""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


WEIGHT_KINDS = ("tuner", "lora-diffusers")  # the file whose size the table shows: a method's own format first


def weights_file(info: RunInfo) -> Path | None:
    files = artifacts(info)
    return next((files[k] for k in WEIGHT_KINDS if k in files), None)


def run_row(info: RunInfo) -> list:
    """One line of the runs table: what tells runs apart (name, method, recipe, base model) before
    how each one stands."""
    tuner = weights_file(info)
    params = facts(info).get("trainable_params")
    base = info.config.get("pretrained_model_name_or_path")
    return [info.id, run_name(info), info.method, " · ".join(recipe_facts(info).values()),
            source_name(base) if isinstance(base, str) and base else "",
            status_line(info) if info.status != "failed" else "failed",
            f"{params:,}" if isinstance(params, int) else "", human_size(tuner.stat().st_size if tuner else None),
            info.prompt]


RUN_COLUMNS = ["run", "name", "method", "recipe", "base model", "status", "trainable params", "weights file", "prompt"]


def log_size(info: RunInfo) -> int:
    try:
        return (info.dir / "train.log").stat().st_size
    except FileNotFoundError:
        return 0
