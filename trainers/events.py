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

PHASES = ("queued", "loading", "class-images", "training", "saving", "done", "failed", "cancelled")
FINAL_PHASES = ("done", "failed", "cancelled")
EVENTS_FILE = "events.jsonl"


class EventLog:
    """Appends events to a run folder's events file; each line is written and flushed whole."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True):
        self.path = Path(run_dir) / EVENTS_FILE
        self.enabled = enabled

    def emit(self, event: str, **fields) -> dict:
        record = {"t": round(time.time(), 3), "event": event, **fields}
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=str) + "\n")
                f.flush()
        return record

    def phase(self, phase: str, **fields) -> dict:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        return self.emit("phase", phase=phase, **fields)


def read_events(run_dir: str | os.PathLike) -> list[dict]:
    """All complete events of a run; a half-written last line (a writer mid-append) is skipped."""
    path = Path(run_dir) / EVENTS_FILE
    if not path.exists():
        return []
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def last_phase(events: list[dict]) -> str | None:
    for event in reversed(events):
        if event.get("event") == "phase":
            return event["phase"]
    return None
