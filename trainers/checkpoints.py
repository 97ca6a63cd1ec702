"""A run's resumable checkpoints (`<run>/checkpoints/checkpoint-<step>/`, accelerate's saved state
with the method's weights in TUNER_STATE), and which of them can be resumed from.

No torch here: the job runner asks `problem()` every time it shows a run. That check is cheap
(the tuner file's header covers its bytes, the other state files are not empty); the trainer's
resume loads each candidate for real, newest first, and falls back to an older one when it
fails (trainers.dreambooth)."""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = "checkpoints"
TUNER_STATE = "tuner_state.safetensors"
PREFIX = "checkpoint-"


def step_of(path: str | Path) -> int:
    """The step in a checkpoint folder's name, checkpoint-<step> with ASCII digits only; -1 for
    any other name (checkpoint-latest, checkpoint--1, checkpoint-1_000, checkpoint-5.tmp)."""
    name = Path(path).name
    digits = name[len(PREFIX):]
    if not name.startswith(PREFIX) or not digits.isascii() or not digits.isdigit():
        return -1
    return int(digits)


def ordered(paths) -> list[Path]:
    """The checkpoint folders among `paths`, oldest first by step number, not by name
    (checkpoint-900 before checkpoint-1000); names step_of does not read are left out. The one
    ordering of checkpoints: "latest", the fallback on resume and the rotation of
    --checkpoints_total_limit (trainers.dreambooth) all use it."""
    return sorted((Path(p) for p in paths if step_of(p) >= 0), key=lambda p: (step_of(p), p.name))


def found(output_dir: str | Path) -> list[Path]:
    """The run's checkpoint folders (not symlinks), newest (highest step) first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return ordered(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())[::-1]


def problem(path: str | Path) -> str | None:
    """Why the checkpoint folder cannot be resumed from, or None when it looks whole: its tuner
    state is a safetensors file whose header accounts for every byte (safetensors refuses a
    truncated one on open) and no state file in it is empty."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return "it is not a folder"
    files = [p for p in path.iterdir() if p.is_file()]
    if not any(p.name == TUNER_STATE for p in files):
        return f"it has no {TUNER_STATE}"
    empty = [p.name for p in files if p.stat().st_size == 0]
    if empty:
        return f"{', '.join(sorted(empty))} {'is' if len(empty) == 1 else 'are'} empty"
    try:
        with safe_open(str(path / TUNER_STATE), framework="numpy") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        return f"its {TUNER_STATE} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return None


def newest(output_dir: str | Path, note=print) -> Path | None:
    """The newest checkpoint that looks whole (`problem`); each newer one that does not is named
    through `note` (the trainer's log and events)."""
    for path in found(output_dir):
        why = problem(path)
        if why is None:
            return path
        note(f"{path.name} cannot be resumed from: {why}; trying an older checkpoint")
    return None


def load(accelerator, first: Path, fallback_dir: str | Path | None, note=print) -> Path:
    """Load accelerate's state from `first`, else (with `fallback_dir`: --resume_from_checkpoint
    latest) from each older checkpoint of that run in turn, newest first; each that fails to
    load is named through `note`. Returns the checkpoint loaded. When none loads, ValueError
    names each with its reason: a checkpoint of other options (another method, other sizes)
    fails on every one, a damaged one (an empty or truncated file) only on itself."""
    candidates = [Path(first)]
    if fallback_dir is not None:
        candidates += [p for p in found(fallback_dir) if step_of(p) < step_of(first) and problem(p) is None]
    failures = []
    for path in candidates:
        try:
            accelerator.load_state(str(path))
        except Exception as exc:  # noqa: BLE001 - any file may be damaged in any way: the next one is tried
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            failures.append(f"{path.name}: {type(exc).__name__}: {reason}")
            note(f"{path.name} cannot be resumed from ({type(exc).__name__}: {reason})"
                 + ("; trying an older checkpoint" if path != candidates[-1] else ""))
            continue
        return path
    raise ValueError("; ".join(failures))


# What the trainer writes under a temporary name before renaming it into place (checkpoints,
# samples, tuner files, the model card, a full fine-tune's unet/, LoRA files).
PARTIAL = (".checkpoint-*.tmp", "*.tmp", ".unet-*", ".lora-*")


def remove_partial(output_dir: str | Path) -> list[str]:
    """Delete what a write cut short (a full disk) left under a temporary name in the run folder,
    its samples/ and checkpoints/; returns the names removed. Whole files are never touched."""
    import shutil

    removed = []
    for folder in (Path(output_dir), Path(output_dir) / "samples", Path(output_dir) / CHECKPOINTS):
        if not folder.is_dir():
            continue
        for pattern in PARTIAL:
            for path in folder.glob(pattern):
                if path.is_symlink():
                    continue
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path.name)
    return removed
