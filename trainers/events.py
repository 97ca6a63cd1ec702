"""The run folder's progress log, `<run>/events.jsonl`: one JSON object per line, appended by the
trainer and read by the studio (and anyone else) to show real progress.

Every event has `t` (unix seconds) and `event`; the kinds and their fields:

    phase       phase: loading | class-images | training | saving | done | failed | cancelled
                message (optional); on failed also error and hint;
                class-images may carry done and total
    info        free facts about the run, e.g. trainable_params, method, device, attention
    step        step, total, loss, lr, sec_per_step, eta_sec (and instance_loss with prior preservation)
    sample      step, prompt, paths (relative to the run folder)
    checkpoint  step, path
    artifact    kind (tuner | lora-diffusers | lora-kohya | unet | model-card), path

The studio derives a run's status from the last `phase` event and whether its process lives.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .safe_json import Unreadable, append_line, loads

PHASES = ("queued", "loading", "class-images", "training", "saving", "done", "failed", "cancelled")
FINAL_PHASES = ("done", "failed", "cancelled")
EVENTS_FILE = "events.jsonl"
MAX_LINE_BYTES = 256 * 1024  # an event the trainer writes is well under 10 kB


class EventLog:
    """Appends events to a run folder's events file; each line is written whole or not at all
    (safe_json.append_line: a full disk raises OSError and leaves no half line)."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True):
        self.path = Path(run_dir) / EVENTS_FILE
        self.enabled = enabled

    def emit(self, event: str, **fields) -> dict:
        record = {"t": round(time.time(), 3), "event": event, **fields}
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_line(self.path, json.dumps(record, default=str))
        return record

    def phase(self, phase: str, **fields) -> dict:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        return self.emit("phase", phase=phase, **fields)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# what the readers of each kind rely on; a line that breaks it is skipped like unreadable JSON
SHAPES = {
    "phase": lambda e: e.get("phase") in PHASES,
    "step": lambda e: all(_number(e.get(k)) for k in ("step", "total", "loss"))
    and all(_number(e[k]) for k in ("lr", "sec_per_step", "eta_sec", "instance_loss") if k in e),
    "sample": lambda e: _strings(e.get("paths", [])),
    "checkpoint": lambda e: isinstance(e.get("path"), str),
    "artifact": lambda e: isinstance(e.get("kind"), str) and isinstance(e.get("path"), str),
}


def well_formed(event) -> bool:
    """An object with a string `event`, and for the kinds the studio reads, fields of the types
    it reads them as (other kinds are free, as `info` is)."""
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return False
    shape = SHAPES.get(event["event"])
    return shape is None or shape(event)


def _lines(f):
    """Complete lines of at most MAX_LINE_BYTES; a longer one is read past in pieces and given as
    None (malformed), so no line is ever held whole in memory."""
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(MAX_LINE_BYTES)
            if not line:
                return  # a huge half-written last line: neither read nor counted
            yield None
            continue
        yield line


def scan_events(run_dir: str | os.PathLike) -> tuple[list[dict], int]:
    """(the run's well-formed events, how many complete lines were skipped as malformed: not
    UTF-8, not JSON, nested too deeply, too long, or not the shape its kind needs). A
    half-written last line (a writer mid-append) is neither read nor counted."""
    path = Path(run_dir) / EVENTS_FILE
    events, skipped = [], 0
    try:
        f = open(path, "rb")
    except (FileNotFoundError, NotADirectoryError):
        return events, skipped
    except OSError:
        return events, 1  # unreadable as a whole (a folder in its place, no permission): one bad "line"
    with f:
        for line in _lines(f):
            if line is not None and not line.endswith(b"\n"):
                break
            try:
                event = loads(line, max_bytes=MAX_LINE_BYTES) if line is not None else None
            except Unreadable:
                event = None
            if well_formed(event):
                events.append(event)
            elif line is None or line.strip():
                skipped += 1
    return events, skipped


def read_events(run_dir: str | os.PathLike) -> list[dict]:
    """All complete, well-formed events of a run (scan_events also counts the skipped lines)."""
    return scan_events(run_dir)[0]


def last_phase(events: list[dict]) -> str | None:
    for event in reversed(events):
        if event.get("event") == "phase":
            return event["phase"]
    return None
