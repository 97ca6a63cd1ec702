"""The base models a studio offers in the Train form, found when it starts, never downloaded:

- the bundled demo model, and the one `--model` names (the form's first choice);
- each diffusers folder and each single `.safetensors` checkpoint directly in the models folder
  (`--models-dir`, env RESTUNING_MODELS_DIR, default `models/` beside app.py); an entry whose real
  path leaves that folder (a symlink out of it), a pickle checkpoint, a LoRA or any other file is
  left out;
- each hub id whose snapshot in the local Hugging Face cache is a whole text-to-image pipeline
  (huggingface_hub.scan_cache_dir; a repo of configs only, without U-Net weights, is left out).

Each is of SD 1.x, 2.x or XL and listed by its label (name and family); the form's value is a
key looked up here, so what a browser sends can only name a model of this list.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .model import DEMO_MODEL, BaseModel, describe, model_label, source_name

log = logging.getLogger("restuning.studio")
MODELS_DIR_ENV = "RESTUNING_MODELS_DIR"
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEMO_KEY = "demo"


@dataclass(frozen=True)
class Entry:
    key: str  # the form's value: "demo", "default" (--model), "file:<name in the models folder>", "hub:<id>"
    label: str  # name and family, never a server path
    source: str  # what the trainer loads: a resolved path or a hub id


class Catalog:
    """The models to pick from, the first the default; `base(key)` describes one (once)."""

    def __init__(self, entries: list[Entry], default: BaseModel | None = None):
        self.entries = {e.key: e for e in entries}
        self.default_key = entries[0].key
        self._bases = {entries[0].source: default} if default is not None else {}
        self._lock = threading.Lock()

    def choices(self) -> list[tuple[str, str]]:
        return [(e.label, e.key) for e in self.entries.values()]

    def entry(self, key) -> Entry:
        """ValueError for a key not listed (a forged form value)."""
        if key not in self.entries:
            raise ValueError("choose a base model from the list")
        return self.entries[key]

    def base(self, key) -> BaseModel:
        return self.base_of(self.entry(key).source)

    def base_of(self, source: str) -> BaseModel:
        """The model at `source` (a run's recorded base too), described once; ValueError naming it
        without its server path when its configs cannot be read."""
        with self._lock:
            if source not in self._bases:
                try:
                    self._bases[source] = describe(source)
                except ValueError:
                    raise ValueError(f"the base model {source_name(source)} cannot be read on this server (moved, deleted, or "
                                     "not downloaded)") from None
            return self._bases[source]

    def key_of(self, source: str) -> str | None:
        """The key of the model at `source` (a run's pretrained_model_name_or_path: a hub id, or a
        path, relative to the studio's folder or not), None if not listed."""
        if not isinstance(source, str) or not source:
            return None
        where = os.path.realpath(source) if os.path.exists(source) else source
        return next((e.key for e in self.entries.values()
                     if e.source == source or (os.path.exists(e.source) and os.path.realpath(e.source) == where)), None)


def single(base: BaseModel) -> Catalog:
    """A catalog of one model: `base`."""
    return Catalog([Entry(DEMO_KEY if base.is_demo else "default", base.label, base.source)], base)


def models_dir(given: str | None = None) -> Path:
    return Path(given or os.environ.get(MODELS_DIR_ENV) or DEFAULT_MODELS_DIR).expanduser()


def local_models(folder: Path) -> list[Entry]:
    """The diffusers folders and .safetensors checkpoints of SD 1.x, 2.x or XL directly in `folder`."""
    from trainers.models import ModelError, folder_family, single_file_family

    try:
        root = folder.resolve()
        children = sorted(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return []
    found = []
    for child in children:
        try:
            real = child.resolve()
            if child.name.startswith(".") or not real.is_relative_to(root):
                continue  # hidden, or a symlink out of the models folder
            if real.is_dir() and (real / "model_index.json").is_file():
                kind = folder_family(real)
            elif real.is_file() and real.suffix.lower() == ".safetensors":
                kind = single_file_family(real)
            else:
                continue
        except (ModelError, OSError) as exc:
            log.warning("models folder: %s left out: %s", child.name, exc)
            continue
        if kind in ("sd1", "sd2", "sdxl"):
            found.append(Entry(f"file:{child.name}", model_label(child.name, kind), str(real)))
    return found


def cached_hub_models(cache_dir: str | os.PathLike | None = None) -> list[Entry]:
    """The hub ids whose cached snapshot (the one `main` names, else the newest) is a whole SD
    1.x, 2.x or XL pipeline with U-Net weights; nothing is downloaded."""
    from huggingface_hub import scan_cache_dir

    from trainers.models import ModelError, folder_family

    try:
        repos = scan_cache_dir(cache_dir).repos
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's CacheNotFound, an unreadable cache: nothing to offer
        log.info("hub cache: not read (%s)", exc)
        return []
    found = []
    for repo in sorted(repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = next((r for r in repo.revisions if "main" in r.refs), max(repo.revisions, key=lambda r: r.last_modified))
        snapshot = Path(revision.snapshot_path)
        try:
            kind = folder_family(snapshot)
            weights = any((snapshot / "unet").glob("*.safetensors"))
        except (ModelError, OSError):
            continue
        if weights and kind in ("sd1", "sd2", "sdxl"):
            found.append(Entry(f"hub:{repo.repo_id}", model_label(repo.repo_id, kind), repo.repo_id))
    return found


def discover(default: BaseModel, folder: Path | None = None, cache_dir: str | os.PathLike | None = None) -> Catalog:
    """`default` (the studio's --model) first, the demo model, then the models folder's and the
    hub cache's, each model once."""
    entries = [single(default).entries[DEMO_KEY if default.is_demo else "default"]]
    if not default.is_demo:
        entries.append(Entry(DEMO_KEY, describe(str(DEMO_MODEL)).label, str(DEMO_MODEL)))
    for entry in local_models(folder or models_dir()) + cached_hub_models(cache_dir):
        if all(entry.source != e.source for e in entries):
            entries.append(entry)
    return Catalog(entries, default)
