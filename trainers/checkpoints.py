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


def step_of(path: Path) -> int:
    """The step in a checkpoint folder's name; -1 for a name that is not checkpoint-<step>."""
    name = Path(path).name
    if not name.startswith(PREFIX) or not name[len(PREFIX):].isdigit():
        return -1
    return int(name[len(PREFIX):])


def found(output_dir: str | Path) -> list[Path]:
    """The run's checkpoint folders, newest (highest step) first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if step_of(p) >= 0 and p.is_dir() and not p.is_symlink()),
                  key=step_of, reverse=True)


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
