"""Who may see and control which run when the studio is shared (a Hugging Face Space).

A visitor is a random secret kept in the browser (gr.BrowserState: localStorage), made on the
first visit. What is stored with a run (job.json) and names the visitor's scratch folder is the
owner id, a hash of that secret: a visitor proves who they are with the secret, and reading any
file of the runs folder (or a future leak of one) gives nobody the secret. A run belongs to the
owner who started or imported it; other visitors see it only once its owner publishes it, and
then only to look at, sample and download, never to cancel, resume, delete or unpublish. On a
local machine there is one user: owner None sees and controls every run, as before.

The BrowserState's encryption key is public (Gradio puts it into every page): nothing depends on
it being secret, and it stays the same across restarts, so a restarted studio still reads what its
visitors' browsers remember (browser_state_key).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from pathlib import Path

from trainers.service.jobs import JobError, RunInfo

SECRET = re.compile(r"[0-9a-f]{32}")  # what the browser remembers (fullmatch: "$" would let a newline through)
OWNER = re.compile(r"[0-9a-f]{64}")  # what runs store: sha256 of the secret
SCRATCH = "_studio"  # not a run id (RUN_ID starts with a letter or digit): never listed as a run
BROWSER_KEY_FILE = "browser-state.key"  # kept by studios before the key was known to be public
BROWSER_KEY_ENV = "RESTUNING_VISITOR_SECRET"  # the same, from the environment
BROWSER_STATE_KEY = "restuning-studio-visitor"  # public: see browser_state_key


def new_secret() -> str:
    return secrets.token_hex(16)


def checked_secret(value) -> str | None:
    """A well-formed secret from the browser, else None (the caller makes a new one)."""
    return value if isinstance(value, str) and SECRET.fullmatch(value) else None


def owner_id(secret: str) -> str:
    return hashlib.sha256(b"restuning-visitor:" + secret.encode()).hexdigest()


def browser_state_key(runs_dir, env=None) -> str:
    """The key Gradio's BrowserState encrypts the visitor's secret with in localStorage. Gradio
    sends it to every page (its frontend does the encrypting), so it is public by design and
    guards nothing: a visitor is proven by the 128-bit secret alone, which only their browser
    holds. A studio that kept a key from before (RESTUNING_VISITOR_SECRET, or
    <runs>/_studio/browser-state.key) goes on using it, so its visitors' browsers are still read;
    a new one uses BROWSER_STATE_KEY."""
    env = os.environ if env is None else env
    if env.get(BROWSER_KEY_ENV, "").strip():
        return env[BROWSER_KEY_ENV].strip()
    legacy = Path(runs_dir) / SCRATCH / BROWSER_KEY_FILE
    try:
        kept = legacy.read_text(encoding="ascii").strip() if legacy.is_file() else ""
    except (OSError, UnicodeDecodeError):
        kept = ""
    return kept if 0 < len(kept) <= 256 else BROWSER_STATE_KEY


def can_see(info: RunInfo, owner: str | None) -> bool:
    return owner is None or (bool(owner) and info.owner == owner) or info.published


def can_control(info: RunInfo, owner: str | None) -> bool:
    return owner is None or (bool(owner) and info.owner == owner)


def visible_runs(runner, owner: str | None) -> list[RunInfo]:
    return [r for r in runner.list_runs() if can_see(r, owner)]


def seen(runner, run_id: str, owner: str | None) -> RunInfo:
    """The run, if this visitor may see it; otherwise the same answer as for a run that does
    not exist (which names no server path), so ids of others' runs cannot be probed."""
    try:
        info = runner.info(run_id)
    except JobError:
        info = None
    if info is None or not can_see(info, owner):
        raise JobError(f"no run {run_id!r}")
    return info


def controlled(runner, run_id: str, owner: str | None) -> RunInfo:
    info = seen(runner, run_id, owner)
    if not can_control(info, owner):
        raise JobError(f"run {run_id} was published by another visitor: you can sample and download it, not change it")
    return info


def scratch_dir(runner, owner: str | None, what: str) -> Path:
    """This visitor's folder for pictures the studio renders (grids, generated images), inside
    the runs folder so nothing is written elsewhere; the page gets a copy in Gradio's cache."""
    if owner is not None and not OWNER.fullmatch(owner):
        raise JobError("this page has no visitor id yet; reload it")
    path = Path(runner.runs_dir) / SCRATCH / (owner or "local") / what
    path.mkdir(parents=True, exist_ok=True)
    prune(path)
    return path


SCRATCH_KEEP, SCRATCH_AGE = 200, 86400  # pictures per folder, and seconds, like Gradio's own cache


def prune(folder: Path, keep: int = SCRATCH_KEEP, age: float = SCRATCH_AGE) -> None:
    """Drop a visitor's rendered pictures older than a day, and all but the newest `keep`: the
    page has its copies in Gradio's cache, and a visitor who renders all day does not fill the disk."""
    files = []
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            files.append((entry.stat(follow_symlinks=False).st_mtime, entry.path))
    files.sort(reverse=True)
    now = time.time()
    for i, (mtime, name) in enumerate(files):
        if i >= keep or now - mtime > age:
            Path(name).unlink(missing_ok=True)
