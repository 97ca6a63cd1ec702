"""Where the studio runs: a laptop (serve on localhost, runs in ./runs, one user) or a Hugging
Face Space (SPACE_ID is set by the Space runtime: serve on 0.0.0.0 at the port the Space routes
to, keep runs on the persistent storage mount when one is attached, many visitors).

    env = detect()            # from os.environ and the file system, nothing is changed
    env.host, env.port, env.runs_dir, env.device, env.shared

Precedence: explicit command-line flags, then RESTUNING_* variables, then these defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PERSISTENT_MOUNT = Path("/data")  # where a Space's persistent storage is mounted
DEFAULT_PORT = 7860


@dataclass(frozen=True)
class Environment:
    space_id: str | None  # owner/name of the Space, None on a local machine
    host: str
    port: int
    runs_dir: Path
    device: str  # cuda | mps | cpu
    persistent: bool  # runs_dir is on storage that outlives a restart

    @property
    def shared(self) -> bool:
        """Many visitors share this server: each sees only their own runs."""
        return self.space_id is not None

    def summary(self) -> str:
        where = f"Hugging Face Space {self.space_id}" if self.space_id else "local machine"
        storage = "persistent storage" if self.persistent else (
            "ephemeral disk: runs vanish when the Space restarts (attach persistent storage to keep them)"
            if self.space_id else "local disk")
        return f"{where}; device {self.device}; runs in {self.runs_dir} ({storage})"


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def detect_device() -> str:
    """The device sampling uses: CUDA, else Apple's MPS, else the CPU."""
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _port(env) -> int:
    for key in ("RESTUNING_PORT", "PORT", "GRADIO_SERVER_PORT"):
        value = env.get(key, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{key}={value!r} is not a port number") from None
    return DEFAULT_PORT


def detect(env=None, *, mount: Path = PERSISTENT_MOUNT, device: str | None = None) -> Environment:
    env = os.environ if env is None else env
    space_id = env.get("SPACE_ID", "").strip() or None
    host = env.get("RESTUNING_HOST", "").strip() or env.get("GRADIO_SERVER_NAME", "").strip() or (
        "0.0.0.0" if space_id else "127.0.0.1")
    configured = env.get("RESTUNING_RUNS_DIR", "").strip()
    if configured:
        runs_dir = Path(configured)
        persistent = not space_id or runs_dir.resolve().is_relative_to(mount.resolve())
    elif space_id and _writable_dir(mount):
        runs_dir, persistent = mount / "restuning-runs", True
    else:
        runs_dir, persistent = Path("runs"), not space_id
    return Environment(space_id, host, _port(env), runs_dir, device or detect_device(), persistent)
