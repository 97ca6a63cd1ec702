"""Who may see and control which run when the studio is shared (a Hugging Face Space).

A visitor is a random owner id kept in the browser (gr.BrowserState: localStorage), made on the
first visit. A run belongs to the owner who started or imported it; other visitors see it only
once its owner publishes it, and then only to look at, sample and download, never to cancel,
resume, delete or unpublish. On a local machine there is one user: owner None sees and controls
every run, as before.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from trainers.jobs import JobError, RunInfo

OWNER = re.compile(r"^[0-9a-f]{32}$")
SCRATCH = "_studio"  # not a run id (RUN_ID starts with a letter or digit): never listed as a run


def new_owner() -> str:
    return secrets.token_hex(16)


def checked_owner(value) -> str | None:
    """A well-formed owner id from the browser, else None (the caller makes a new one)."""
    return value if isinstance(value, str) and OWNER.match(value) else None


def can_see(info: RunInfo, owner: str | None) -> bool:
    return owner is None or (bool(owner) and info.owner == owner) or info.published


def can_control(info: RunInfo, owner: str | None) -> bool:
    return owner is None or (bool(owner) and info.owner == owner)


def visible_runs(runner, owner: str | None) -> list[RunInfo]:
    return [r for r in runner.list_runs() if can_see(r, owner)]


def seen(runner, run_id: str, owner: str | None) -> RunInfo:
    """The run, if this visitor may see it; otherwise the same answer as for a run that does
    not exist, so ids of others' runs cannot be probed."""
    info = runner.info(run_id)
    if not can_see(info, owner):
        raise JobError(f"no run {run_id!r}")
    return info


def controlled(runner, run_id: str, owner: str | None) -> RunInfo:
    info = seen(runner, run_id, owner)
    if not can_control(info, owner):
        raise JobError(f"run {run_id} was published by another visitor: you can sample and download it, not change it")
    return info


def scratch_dir(runner, owner: str | None, what: str) -> Path:
    """This visitor's folder for pictures the studio renders (grids, generated images), inside
    the runs folder so the server may serve it and nothing is written elsewhere."""
    if owner is not None and not OWNER.match(owner):
        raise JobError("this page has no visitor id yet; reload it")
    path = Path(runner.runs_dir) / SCRATCH / (owner or "local") / what
    path.mkdir(parents=True, exist_ok=True)
    return path
