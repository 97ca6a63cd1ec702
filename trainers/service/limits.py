"""What one visitor, and all of them together, may take of a shared studio: the job runner's caps.

A shared studio (a Hugging Face Space) gives every browser, and every API session, a new visitor
id for free, so a per-visitor cap alone bounds nothing: each one here has a global twin. A local
studio has one user and by default no caps but the free-disk floor (a run that cannot write its
files is not started); a variable sets a cap there too, but for the runs per visitor (the local
user has no visitor id, so every run would be refused). Every cap is an environment variable
(docs/space.md), read at start-up:

    RESTUNING_RUNS_PER_VISITOR      queued + running runs per visitor            (shared: 2)
    RESTUNING_MAX_QUEUED_RUNS       queued + running runs in all                 (shared: 8)
    RESTUNING_MAX_STEPS             training steps per run                       (shared: 3000)
    RESTUNING_MAX_RUN_MINUTES       minutes one run may train before it is stopped with a checkpoint,
                                    resumable at the back of the queue          (shared: 60)
    RESTUNING_CHECKPOINTS_KEPT      checkpoints a run keeps (its checkpoints_total_limit when not
                                    set, and the most it may ask for)            (shared: 2; local: 3 by default)
    RESTUNING_DISK_PER_VISITOR_GB   what one visitor's runs and pictures may hold on disk (shared: 5)
    RESTUNING_DISK_TOTAL_GB         what the runs folder may hold in all         (shared: 50)
    RESTUNING_MIN_FREE_DISK_MB      free disk below which nothing new is queued or started (256)
    RESTUNING_IMPORTS_PER_VISITOR   imported tuners one visitor may keep         (shared: 10)
    RESTUNING_MAX_IMPORTS           imported tuners in all                       (shared: 200)
    RESTUNING_UPLOAD_MB_PER_CLIENT  what one client (address) may send in request bodies, to any route,
                                    per hour (webui.files.UploadQuota)           (shared: 1024)
    RESTUNING_UPLOAD_MB_TOTAL       what all clients may send so per hour        (shared: 8192)

A value of 0 (or "off") turns a cap off, but a shared studio's runs per visitor (each run there
belongs to a visitor and is counted). Prompt lengths are bounded for everyone by the trainer's
own options (trainers.options.MAX_PROMPT_CHARS).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

GB, MB = 1 << 30, 1 << 20
SCRATCH = "_studio"  # the studio's own folder in the runs folder (webui.visitors), never a run id


@dataclass(frozen=True)
class Limits:
    runs_per_owner: int | None = None
    queued_total: int | None = None
    max_steps: int | None = None
    max_run_seconds: float | None = None
    checkpoints_kept: int | None = 3
    disk_per_owner: int | None = None  # bytes
    disk_total: int | None = None  # bytes
    min_free_disk: int = 256 * MB
    imports_per_owner: int | None = None
    imports_total: int | None = None
    upload_per_client: int | None = None  # bytes per hour
    upload_total: int | None = None  # bytes per hour

    @property
    def shared(self) -> bool:
        """Runs belong to visitors (every run needs an owner id)."""
        return self.runs_per_owner is not None


SHARED = Limits(runs_per_owner=2, queued_total=8, max_steps=3000, max_run_seconds=3600, checkpoints_kept=2,
                disk_per_owner=5 * GB, disk_total=50 * GB, imports_per_owner=10, imports_total=200,
                upload_per_client=1 * GB, upload_total=8 * GB)
LOCAL = Limits()

# field -> (environment variable, unit in bytes or seconds)
ENV = {
    "runs_per_owner": ("RESTUNING_RUNS_PER_VISITOR", 1),
    "queued_total": ("RESTUNING_MAX_QUEUED_RUNS", 1),
    "max_steps": ("RESTUNING_MAX_STEPS", 1),
    "max_run_seconds": ("RESTUNING_MAX_RUN_MINUTES", 60),
    "checkpoints_kept": ("RESTUNING_CHECKPOINTS_KEPT", 1),
    "disk_per_owner": ("RESTUNING_DISK_PER_VISITOR_GB", GB),
    "disk_total": ("RESTUNING_DISK_TOTAL_GB", GB),
    "min_free_disk": ("RESTUNING_MIN_FREE_DISK_MB", MB),
    "imports_per_owner": ("RESTUNING_IMPORTS_PER_VISITOR", 1),
    "imports_total": ("RESTUNING_MAX_IMPORTS", 1),
    "upload_per_client": ("RESTUNING_UPLOAD_MB_PER_CLIENT", MB),
    "upload_total": ("RESTUNING_UPLOAD_MB_TOTAL", MB),
}


def from_env(shared: bool, env=None, **overrides) -> Limits:
    """The defaults for a shared or a local studio, each replaced by its environment variable
    when set, then by `overrides` (command-line flags: 0 is off there too). ValueError names a
    malformed variable or flag, and a shared studio without runs per visitor."""
    env = os.environ if env is None else env
    values = dataclasses.asdict(SHARED if shared else LOCAL)
    for name, (var, unit) in ENV.items():
        text = env.get(var, "").strip().lower()
        if not text:
            continue
        if text in ("off", "none"):
            values[name] = None if name != "min_free_disk" else 0
            continue
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{var}={env[var]!r} is not a number (or 'off')") from None
        if not (number >= 0 and number * unit < 2**62):
            raise ValueError(f"{var}={env[var]!r}: expected a number from 0 up")
        values[name] = (None if name != "min_free_disk" else 0) if number == 0 else int(number * unit)
    for name, value in overrides.items():
        if value is None:
            continue
        if value < 0:
            raise ValueError(f"{ENV[name][0]} (or its flag) must be a number from 0 up, got {value}")
        values[name] = (None if name != "min_free_disk" else 0) if value == 0 else value
    if not shared:
        values["runs_per_owner"] = None
    if shared and values["runs_per_owner"] is None:
        raise ValueError("a shared studio needs a limit of runs per visitor (RESTUNING_RUNS_PER_VISITOR > 0)")
    return Limits(**values)


def size_text(n: int | float) -> str:
    for unit, scale in (("GB", GB), ("MB", MB), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def folder_bytes(path) -> int:
    """Bytes of the files under `path` (symlinks not followed, unreadable entries skipped)."""
    total, stack = 0, [os.fspath(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        continue
        except OSError:
            continue
    return total


# -- the checks the job runner makes (trainers.service.jobs.JobRunner: `runner`) --------------------------


class JobError(ValueError):
    """A request the run service refuses (unknown run, wrong state, a cap); the message is for the user."""


def _refuse(message: str):
    raise JobError(message)


def check_new_runs(runner, owner: str, batch: int = 1) -> None:
    """JobError when `batch` more runs would take this visitor, or all visitors together, past
    their caps: runs queued or running, disk held."""
    lim = runner.limits
    runs = runner.list_runs()
    active = [r for r in runs if r.status in ("queued", "running")]
    if lim.runs_per_owner is not None:
        if batch > lim.runs_per_owner:
            _refuse(f"{batch} runs at once are more than the {lim.runs_per_owner} a visitor may have queued or running on "
                    f"this shared studio: choose at most {lim.runs_per_owner} methods")
        mine = sum(1 for r in active if r.owner == owner)
        if mine + batch > lim.runs_per_owner:
            _refuse(f"you have {mine} run(s) queued or running; this studio is shared and allows "
                    f"{lim.runs_per_owner} per visitor: wait for one to finish or cancel one")
    if lim.queued_total is not None and len(active) + batch > lim.queued_total:
        _refuse(f"the studio's queue is full: {len(active)} runs are queued or running, {lim.queued_total} at most; "
                "try again when some have finished")
    check_disk(runner, owner, runs)


def check_disk(runner, owner: str, runs=None) -> None:
    """JobError when the runs folder, or this visitor's part of it, holds its cap already."""
    lim = runner.limits
    if lim.disk_total is not None:
        used = folder_bytes(runner.runs_dir)
        if used >= lim.disk_total:
            _refuse(f"the studio's runs hold {size_text(used)}, its cap is {size_text(lim.disk_total)}: nothing new "
                    "can be stored until runs are deleted")
    if lim.disk_per_owner is not None and owner:
        used = owner_bytes(runner, owner, runs)
        if used >= lim.disk_per_owner:
            _refuse(f"your runs and pictures hold {size_text(used)}, the {size_text(lim.disk_per_owner)} a visitor may keep "
                    "on this shared studio: delete runs you no longer need (Runs tab)")


def owner_bytes(runner, owner: str, runs=None) -> int:
    """Bytes one visitor holds: their runs' folders and the pictures the studio rendered for them
    (webui.visitors.scratch_dir: <runs>/_studio/<owner id>)."""
    runs = runner.list_runs() if runs is None else runs
    scratch = runner.runs_dir / SCRATCH / owner
    return sum(folder_bytes(r.dir) for r in runs if r.owner == owner) + (folder_bytes(scratch) if scratch.is_dir() else 0)


def check_import(runner, owner: str, size: int) -> None:
    """JobError when one more imported tuner of `size` bytes would pass the import or disk caps."""
    lim = runner.limits
    runs = runner.list_runs()
    imported = [r for r in runs if r.imported]
    if lim.imports_total is not None and len(imported) >= lim.imports_total:
        _refuse(f"this studio holds {len(imported)} imported tuners, as many as it keeps; try again when some are deleted")
    if lim.imports_per_owner is not None and owner:
        mine = sum(1 for r in imported if r.owner == owner)
        if mine >= lim.imports_per_owner:
            _refuse(f"you have imported {mine} tuners, the {lim.imports_per_owner} a visitor may keep here: delete one first")
    check_disk(runner, owner, runs)
    if lim.disk_per_owner is not None and owner and owner_bytes(runner, owner, runs) + size > lim.disk_per_owner:
        _refuse(f"this file ({size_text(size)}) would take your runs past the {size_text(lim.disk_per_owner)} a visitor may "
                "keep here: delete runs you no longer need")
