"""What the studio shows of a run, derived only from its files (trainers.jobs.RunInfo, which
reads events.jsonl and train.log): progress, loss curve, samples, artifacts, one-line status.
Plain functions without Gradio, so the tests can check them and every view agrees."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from trainers.events import FINAL_PHASES
from trainers.jobs import RunInfo, log_tail, redact


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


def progress_html(info: RunInfo | None) -> str:
    """A progress bar with step/total, speed and ETA from the last step event."""
    if info is None:
        return "<div class='rt-progress-text'>No run yet: upload images and press Train.</div>"
    step = last_step(info)
    total = (step or {}).get("total") or info.config.get("max_train_steps") or 0
    done = (step or {}).get("step", 0)
    if info.status == "done":
        done = total or done
    fraction = min(1.0, done / total) if total else 0.0
    parts = [f"step {done}/{total}" if total else "step ?"]
    if step and info.status == "running":
        parts.append(f"{step.get('sec_per_step', 0):.2f} s/step")
        parts.append(f"ETA {_duration(step.get('eta_sec'))}")
    parts.append(status_line(info))
    return (f"<div class='rt-progress' data-status='{info.status}' data-step='{done}' data-total='{total}'>"
            f"<div class='rt-progress-bar' style='width:{fraction * 100:.1f}%'></div></div>"
            f"<div class='rt-progress-text'>{html.escape(' · '.join(parts))}</div>")


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


def log_text(info: RunInfo | None, lines: int = 20) -> str:
    """Phase messages and the process output's last lines."""
    if info is None:
        return ""
    phases = [redact(f"[{e['phase']}] {e.get('message') or e.get('error') or ''}".rstrip()
                     + (f"\n  hint: {e['hint']}" if e.get("hint") else ""), info.dir)
              for e in info.events if e.get("event") == "phase"]
    if info.status == "cancelled" and info.hint:
        phases.append(info.hint)
    return "\n".join(phases[-8:] + ["---"] + log_tail(info.dir, lines))


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
    """One line of the runs table."""
    tuner = weights_file(info)
    params = facts(info).get("trainable_params")
    return [info.id, info.method, status_line(info) if info.status != "failed" else "failed",
            f"{params:,}" if isinstance(params, int) else "", human_size(tuner.stat().st_size if tuner else None),
            info.prompt]


RUN_COLUMNS = ["run", "method", "status", "trainable params", "weights file", "prompt"]


def log_size(info: RunInfo) -> int:
    try:
        return (info.dir / "train.log").stat().st_size
    except FileNotFoundError:
        return 0
