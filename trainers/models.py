"""The base model: a hub id, a local diffusers folder, or a single-file `.safetensors` checkpoint.

    source = check_source(name_or_path)   # cheap: what kind it is, or ModelError saying what is missing
    pipe = load_pipeline(source, dtype)   # StableDiffusionPipeline in that dtype, no safety checker

Pickle-based checkpoints (.ckpt, .bin, .pt) are refused, in a folder or on the hub too
(`use_safetensors=True`): unpickling a downloaded file can run arbitrary code. A single-file
checkpoint is recognised from its safetensors header (no weights read): SD 1.x and 2.x load,
SDXL is refused with a message. Every error says what was tried and what is missing.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

FOLDER_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(RuntimeError):
    """The base model cannot be used; the message says what was tried and what is missing."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # folder | single-file | hub
    location: str  # resolved path, or the hub id
    family: str = ""  # single files: what their header says they are (FAMILIES)

    def key(self) -> str:
        """What identifies these weights, for caches (class images): the id, or the path and the
        size and time of its weight files, so a rebuilt model gets a new key."""
        if self.kind == "hub":
            return f"hub:{self.location}"
        path = Path(self.location)
        files = [path] if path.is_file() else sorted(path.glob("*/*.safetensors"))
        stamp = ",".join(f"{f.relative_to(path.parent)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        return f"{self.kind}:{path}:{stamp}"


def check_source(name_or_path: str | os.PathLike) -> ModelSource:
    """What kind of model source this is, checked without loading any weights."""
    text = str(name_or_path).strip()
    if not text:
        raise ModelError("no base model given: pass --pretrained_model_name_or_path (a hub id, a folder or a .safetensors file)")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{path} is a folder but not a diffusers pipeline: model_index.json is missing "
                             f"(expected the subfolders {', '.join(FOLDER_PARTS)} too)")
        missing = [p for p in FOLDER_PARTS if not (path / p).is_dir()]
        if missing:
            raise ModelError(f"the diffusers folder {path} is incomplete: missing {', '.join(missing)}/")
        return ModelSource("folder", str(path.resolve()))
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelError(f"{path.name}: pickle-based checkpoints are not loaded (unpickling can run code); "
                             "use a .safetensors checkpoint or a diffusers folder")
        if path.suffix.lower() != ".safetensors":
            raise ModelError(f"{path.name}: a single-file model must be a .safetensors checkpoint")
        family = single_file_family(path)
        if family == "sdxl":
            raise ModelError(f"{path.name} is an SDXL checkpoint (two text encoders, another U-Net): this studio tunes "
                             "Stable Diffusion 1.x and 2.x; use an SD 1.5 checkpoint or a diffusers folder of one")
        return ModelSource("single-file", str(path.resolve()), family)
    if HUB_ID.match(text) and not text.endswith(".safetensors"):
        return ModelSource("hub", text)
    raise ModelError(f"base model {text!r} not found: it is not an existing folder or .safetensors file, "
                     "nor a hub id of the form owner/name")


# SD 1.x's component configs and CLIP tokenizer (scripts/sd_configs.py), so that a single-file
# SD 1.x checkpoint loads with no hub: the file holds the weights only.
SD1_CONFIG = Path(__file__).resolve().parents[1] / "assets" / "sd-configs" / "sd-v1"

FAMILIES = {
    "sd1": "Stable Diffusion 1.x (CLIP ViT-L text encoder)",
    "sd2": "Stable Diffusion 2.x (OpenCLIP text encoder; 768-px 2.x models predict v, which the trainer follows "
           "from the scheduler's prediction_type)",
    "sdxl": "Stable Diffusion XL",
    "unknown": "not a Stable Diffusion checkpoint this loader knows (no model.diffusion_model.* U-Net weights)",
}


def single_file_family(path: Path) -> str:
    """sd1, sd2, sdxl or unknown, from the names in the file's safetensors header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path.name}: not a readable .safetensors file ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        return "unknown"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    return "sd1"


def load_pipeline(source: ModelSource, dtype=None, revision: str | None = None, variant: str | None = None):
    """A StableDiffusionPipeline from the checked source in `dtype` (default fp32; no safety
    checker is loaded). Loading in the run's precision saves holding an fp32 copy first."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Progress bars would fill a background run's log with carriage returns; events carry progress.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    common = {"safety_checker": None, "requires_safety_checker": False, **({"dtype": dtype} if dtype is not None else {})}
    hub = {k: v for k, v in (("revision", revision), ("variant", variant)) if v}
    if source.kind == "single-file" and source.family == "unknown":
        raise ModelError(f"{Path(source.location).name}: {FAMILIES['unknown']}")
    try:
        if source.kind == "folder":
            return StableDiffusionPipeline.from_pretrained(source.location, local_files_only=True, use_safetensors=True,
                                                           **common, **hub)
        if source.kind == "single-file":
            local = {"config": str(SD1_CONFIG), "local_files_only": True} if source.family == "sd1" else {}
            return StableDiffusionPipeline.from_single_file(source.location, **common, **local)
        return StableDiffusionPipeline.from_pretrained(source.location, use_safetensors=True, **common, **hub)
    # IndexError/AttributeError: what diffusers' single-file conversion raises on tensors of unexpected shapes.
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError, IndexError, AttributeError,
            SingleFileComponentError) as exc:
        if source.kind == "folder":
            pickles = sorted(str(p.relative_to(source.location)) for p in Path(source.location).glob("*/*") if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise ModelError(f"the diffusers folder {source.location} holds pickle weights ({', '.join(pickles[:3])}) where "
                                 ".safetensors are needed: they are not loaded (unpickling can run code); re-save the "
                                 "pipeline with save_pretrained(..., safe_serialization=True)") from None
        tried = {
            "folder": f"loading the diffusers folder {source.location}",
            "single-file": f"converting the single-file checkpoint {source.location}, {FAMILIES.get(source.family, 'of unknown kind')} "
                           + ("(with the bundled SD 1.x configs)" if source.family == "sd1" else
                              "(diffusers also needs the matching SD 2.x component configs, fetched from the hub or its cache)"),
            "hub": f"the hub id {source.location} (from the local cache"
                   + (" only: HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") else " or the hub") + ")",
        }[source.kind]
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load the base model: tried {tried}; {reason}") from None


def check_method_fits(method_config, model: str) -> None:
    """OptionError when the method's options cannot be attached to this base model (a Bypass
    deeper than the U-Net, LoRA layer names that match nothing): the check the trainer's attach
    would make after loading, made on a weightless copy built from the model's configs, so the
    form, the runner and the trainer refuse the same options before anything is queued or
    loaded. Nothing is checked when the model's configs cannot be read offline (the trainer's
    own attach still is)."""
    problem = _attach_problem(str(model), method_config.to_json())
    if problem:
        raise _option_error(f"{method_config.method}: its options do not fit this base model: {problem}")


def _option_error(message: str):
    from .options import OptionError

    return OptionError(message)


@functools.lru_cache(maxsize=64)
def _attach_problem(model: str, method_json: str) -> str | None:
    import json

    import torch
    from diffusers import UNet2DConditionModel

    import restuning
    from restuning import AttachError, ConfigError

    from .memory import config_folder

    folder = config_folder(model)
    if folder is None:
        return None
    config = restuning.config_from_dict(json.loads(method_json))
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8")))
            text = _meta_text_encoder(folder) if getattr(config, "text_encoder", "") else None
    except (OSError, ValueError, TypeError):
        return None  # configs unreadable here: the trainer's own attach decides
    try:
        restuning.attach(unet, config, text_encoder=text)
    except (AttachError, ConfigError, ValueError, TypeError) as exc:
        return str(exc)
    return None


def _meta_text_encoder(folder: Path):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
