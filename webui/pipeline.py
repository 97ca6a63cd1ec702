"""The studio's sampling side (Compare and Generate tabs): the base pipeline a run was trained
on, loaded on first use and shared by every visitor (one base model in memory at a time: picking
a run of another base replaces it), and the finished runs turned into grid columns.

Loading takes the trainer's own loader (trainers.models) so the studio samples exactly the model
it trains on. trainers.sampling.Sampler serialises renders with its own lock; the lock here only
guards the one-time load, so two first clicks do not load the model twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

from restuning.methods import METHODS
from trainers.sampling import SCHEDULERS, Column, Sampler, inference_dtype
from trainers.service.jobs import RunInfo

from . import live
from .model import SETTINGS_FILE

FALLBACK_DEFAULTS = {"steps": 25, "guidance": 7.5, "scheduler": "DPM++ 2M"}


class StudioPipeline:
    """`base`: the studio's own model (what the base column shows without runs, and a run that
    records none was trained on); `catalog` describes the others (webui.catalog)."""

    def __init__(self, base, device: str = "cpu", catalog=None):
        from .catalog import single

        self.base, self.device = base, device
        self.catalog = catalog or single(base)
        self._loaded: tuple[str, Sampler] | None = None  # (base source, its sampler)
        self._load_lock = threading.Lock()

    def base_of(self, info: RunInfo):
        """The base model the run was trained on (its config's pretrained_model_name_or_path);
        ValueError when it cannot be read here."""
        source = info.config.get("pretrained_model_name_or_path")
        if not isinstance(source, str) or not source or source == self.base.source:
            return self.base
        try:
            return self.catalog.base_of(source)
        except ValueError as exc:
            raise ValueError(f"run {info.id}: {exc}") from None

    def is_loaded(self, base=None) -> bool:
        return self._loaded is not None and self._loaded[0] == (base or self.base).source

    def sampler(self, base=None) -> Sampler:
        """The sampler of `base` (the studio's own by default), loading it in place of another."""
        base = base or self.base
        with self._load_lock:
            if not self.is_loaded(base):
                from trainers.models import check_source, cpu_threads_for, load_pipeline

                self._loaded = None  # the other model's pipeline goes before this one loads

                if self.device == "cpu":
                    import torch

                    # torch counts the machine's cores, not the ones this process may run on (a
                    # container's share): more threads than cores spin against each other; a
                    # small U-Net gains nothing from a second thread and waits for its core
                    torch.set_num_threads(cpu_threads_for(base.source, cpu_threads()))
                pipe = load_pipeline(check_source(base.source), inference_dtype(self.device)).to(self.device)
                pipe.set_progress_bar_config(disable=True)
                self._loaded = (base.source, Sampler(pipe))
            return self._loaded[1]

    def defaults(self, base=None) -> dict:
        """steps, guidance, scheduler (a SCHEDULERS name) and size: the model's (the studio's own
        by default) recommended settings when it ships them, else common SD defaults at the
        model's own resolution."""
        base = base or self.base
        out = dict(FALLBACK_DEFAULTS, height=base.resolution, width=base.resolution)
        path = Path(base.source) / SETTINGS_FILE
        try:
            shipped = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            shipped = {}
        by_class = {cls: name for name, cls in SCHEDULERS.items()}
        if shipped.get("scheduler") in by_class:
            out["scheduler"] = by_class[shipped["scheduler"]]
        for key, ours in (("num_inference_steps", "steps"), ("guidance_scale", "guidance"), ("height", "height"), ("width", "width")):
            if isinstance(shipped.get(key), (int, float)):
                out[ours] = shipped[key]
        return out


def cpu_threads() -> int:
    """The cores this process may run on (its affinity), or OMP_NUM_THREADS where that is set."""
    configured = os.environ.get("OMP_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def weights(info: RunInfo) -> tuple[str, Path] | None:
    """("tuner", file) or ("unet", folder) of a finished run, from its artifact events; only a
    path that stays inside the run folder counts."""
    if info.status != "done":
        return None
    root = info.dir.resolve()
    found = {}
    for e in info.events:
        if e.get("event") == "artifact" and e.get("kind") in ("tuner", "unet") and e.get("path"):
            path = (info.dir / e["path"]).resolve()
            if path.is_relative_to(root) and path != root and path.exists():
                found[e["kind"]] = path
    if "tuner" in found and found["tuner"].is_file():
        return "tuner", found["tuner"]
    if "unet" in found and found["unet"].is_dir():
        return "unet", found["unet"]
    return None


def params_text(n) -> str:
    if not isinstance(n, int):
        return "params ?"
    return f"{n / 1e6:.2f}M params" if n >= 10_000 else f"{n:,} params"


def caption(info: RunInfo) -> list[str]:
    """A grid column's caption, a short line each: method, size, the name its user gave it, its
    steps and learning rate, its images and when it was trained, its prompt. Two runs of one
    method differ in what was set differently, not only in a date."""
    method, recipe, name = METHODS.get(info.method), live.recipe_facts(info), live.run_name(info)
    recipe["when"] = time.strftime("%d %b %H:%M", time.localtime(info.created)) if info.created else ""
    return [method.label if method else (info.method or "tuner"), params_text(live.facts(info).get("trainable_params")),
            *([name] if name else []), " · ".join(recipe[k] for k in ("steps", "lr") if recipe.get(k)),
            " · ".join(recipe[k] for k in ("images", "when") if recipe.get(k)), info.prompt or ""]


def column(info: RunInfo, scale: float = 1.0) -> Column:
    found = weights(info)
    if found is None:
        raise ValueError(f"run {info.id} has no finished tuner to sample with")
    kind, path = found
    return Column(info.id, tuner=path if kind == "tuner" else None, unet_dir=path if kind == "unet" else None,
                  scale=float(scale), caption=caption(info))


def base_column(base) -> Column:
    return Column("base", caption=["Base model", "no tuner", base.label])


def choice(info: RunInfo) -> tuple[str, str]:
    """A run as a list of runs shows it, short enough for the Generate tab's dropdown: its name
    (else its method), steps and when it was trained; the run id is the value."""
    method = METHODS.get(info.method)
    kind = method.label if method else (info.method or "tuner")
    name = f"{live.run_name(info)} ({kind})" if live.run_name(info) else kind
    steps = live.recipe_facts(info).get("steps")
    when = time.strftime("%d %b %H:%M", time.localtime(info.created)) if info.created else ""
    return " · ".join(part for part in (name, steps, when) if part), info.id


def id_end(run_id: str) -> str:
    """The last part of a run id (its random part), which the Runs table and the live view show too."""
    return run_id.rsplit("-", 1)[-1]


def choices(infos) -> list[tuple[str, str]]:
    """choice() of each run; runs that would read alike (one name or method, steps and minute) end
    in the last part of their ids to tell them apart."""
    picked = [choice(info) for info in infos]
    seen = Counter(label for label, _ in picked)
    return [(f"{label} · {id_end(run_id)}" if seen[label] > 1 else label, run_id) for label, run_id in picked]


def told_apart(columns: list[Column]) -> list[Column]:
    """Grid columns whose captions would read alike (runs of one recipe trained in one minute) get
    a last line with the end of their run ids, as the lists of runs do."""
    seen = Counter(tuple(c.caption) for c in columns)
    return [dataclasses.replace(c, caption=[*c.caption, f"run …{id_end(c.label)}"]) if seen[tuple(c.caption)] > 1 else c
            for c in columns]
