"""The base model: a hub id, a local diffusers folder, or a single-file `.safetensors` checkpoint,
of Stable Diffusion 1.x, 2.x or XL.

    source = check_source(name_or_path)   # cheap: what kind and family it is, or ModelError saying what is missing
    pipe = load_pipeline(source, dtype)   # StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) in that dtype

Pickle-based checkpoints (.ckpt, .bin, .pt) are refused, in a folder or on the hub too
(`use_safetensors=True`): unpickling a downloaded file can run arbitrary code. A single-file
checkpoint is recognised from its safetensors header (no weights read) and converted by diffusers
with the family's component configs and tokenizers bundled in assets/sd-configs (scripts/sd_configs.py),
so it loads without the hub. Every error says what was tried and what is missing.

SD 2.x single files hold no word of what they predict: the 768-px models (2.0-v, 2.1) predict v,
the 512-px ones (2.0-base, 2.1-base) predict the noise. Unless told (`prediction_type`), the U-Net
is asked, the way AUTOMATIC1111 decides it (`is_using_v_parameterization_for_sd2`): at t = 999 on a
constant latent of 0.5 an epsilon model returns about the latent itself, a v model a value far below it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

FOLDER_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_PARTS = ("text_encoder_2", "tokenizer_2")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PREDICTION_TYPES = ("epsilon", "v_prediction")


class ModelError(RuntimeError):
    """The base model cannot be used; the message says what was tried and what is missing."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # folder | single-file | hub
    location: str  # resolved path, or the hub id
    family: str = ""  # sd1 | sd2 | sdxl (FAMILIES); "" for a hub id until it is loaded

    def key(self) -> str:
        """What identifies these weights, for caches (class images): the id, or the path and the
        size and time of its weight files, so a rebuilt model gets a new key."""
        if self.kind == "hub":
            return f"hub:{self.location}"
        path = Path(self.location)
        files = [path] if path.is_file() else sorted(path.glob("*/*.safetensors"))
        stamp = ",".join(f"{f.relative_to(path.parent)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        return f"{self.kind}:{path}:{stamp}"


FAMILIES = {
    "sd1": "Stable Diffusion 1.x (CLIP ViT-L text encoder)",
    "sd2": "Stable Diffusion 2.x (OpenCLIP text encoder; 768-px 2.x models predict v, 512-px ones the noise)",
    "sdxl": "Stable Diffusion XL (two text encoders, size and crop conditioning)",
    "sdxl-refiner": "the SDXL refiner (an image-to-image model for SDXL's last steps)",
    "unknown": "not a Stable Diffusion checkpoint this loader knows (no model.diffusion_model.* U-Net weights)",
}
# The component configs and tokenizers a single file of each family is converted with.
CONFIGS_ROOT = Path(__file__).resolve().parents[1] / "assets" / "sd-configs"
CONFIGS = {"sd1": CONFIGS_ROOT / "sd-v1", "sd2": CONFIGS_ROOT / "sd-v2", "sdxl": CONFIGS_ROOT / "sd-xl"}
SD1_CONFIG = CONFIGS["sd1"]
SHORT = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
NOT_TEXT_TO_IMAGE = ("a pipeline of another kind: this trainer tunes the text-to-image pipelines of Stable Diffusion "
                     "1.x and 2.x (StableDiffusionPipeline) and XL (StableDiffusionXLPipeline)")


def check_source(name_or_path: str | os.PathLike) -> ModelSource:
    """What kind of model source this is, and its family, checked without loading any weights."""
    text = str(name_or_path).strip()
    if not text:
        raise ModelError("no base model given: pass --pretrained_model_name_or_path (a hub id, a folder or a .safetensors file)")
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelSource("folder", str(path.resolve()), folder_family(path))
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelError(f"{path.name}: pickle-based checkpoints are not loaded (unpickling can run code); "
                             "use a .safetensors checkpoint or a diffusers folder")
        if path.suffix.lower() != ".safetensors":
            raise ModelError(f"{path.name}: a single-file model must be a .safetensors checkpoint")
        family = single_file_family(path)
        if family == "sdxl-refiner":
            raise ModelError(f"{path.name} is {FAMILIES[family]}, not a text-to-image base model: use an SDXL base checkpoint")
        return ModelSource("single-file", str(path.resolve()), family)
    if HUB_ID.match(text) and not text.endswith(".safetensors"):
        return ModelSource("hub", text)
    raise ModelError(f"base model {text!r} not found: it is not an existing folder or .safetensors file, "
                     "nor a hub id of the form owner/name")


def folder_family(path: Path) -> str:
    """sd1, sd2 or sdxl of a diffusers folder, from its model_index.json and U-Net config; ModelError
    for a folder that is incomplete or holds another kind of pipeline."""
    from restuning.arch import family

    if not (path / "model_index.json").is_file():
        raise ModelError(f"{path} is a folder but not a diffusers pipeline: model_index.json is missing "
                         f"(expected the subfolders {', '.join(FOLDER_PARTS)} too)")
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        name = index.get("_class_name") if isinstance(index, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}/model_index.json is not readable JSON ({exc})") from None
    xl = PIPELINES.get(name) == "sdxl"
    missing = [p for p in FOLDER_PARTS + (XL_PARTS if xl else ()) if not (path / p).is_dir()]
    if missing:
        raise ModelError(f"the diffusers folder {path} is incomplete: missing {', '.join(missing)}/")
    if name not in PIPELINES:
        raise ModelError(f"{path} holds a {name or 'pipeline of no named class'}, {NOT_TEXT_TO_IMAGE}")
    if xl:
        return "sdxl"
    try:
        return family(json.loads((path / "unet" / "config.json").read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ModelError(f"{path}/unet/config.json is missing or not readable JSON ({exc})") from None


def single_file_family(path: Path) -> str:
    """sd1, sd2, sdxl, sdxl-refiner or unknown, from the names in the file's safetensors header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path.name}: not a readable .safetensors file ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "sdxl-refiner"  # only the OpenCLIP bigG encoder, as the refiner has
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        return "unknown"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    return "sd1"


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _hub_family(source: ModelSource, hub: dict) -> str:
    """A hub id's family, from its model_index.json (the local cache only when HF_HUB_OFFLINE is set)."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(source.location, **hub)
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ModelError(f"the hub id {source.location} holds a {name}, {NOT_TEXT_TO_IMAGE}")
    return "sdxl" if PIPELINES[name] == "sdxl" else "sd"


def load_pipeline(source: ModelSource, dtype=None, revision: str | None = None, variant: str | None = None,
                  prediction_type: str | None = None):
    """The pipeline of the checked source in `dtype` (default fp32; no safety checker is loaded).
    Loading in the run's precision saves holding an fp32 copy first. `prediction_type` overrides
    what the model's scheduler says (an SD 2.x single file's is found from its weights otherwise)."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Progress bars would fill a background run's log with carriage returns; events carry progress.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if source.kind == "single-file" and source.family not in CONFIGS:
        raise ModelError(f"{Path(source.location).name}: {FAMILIES.get(source.family, FAMILIES['unknown'])}")
    hub = {k: v for k, v in (("revision", revision), ("variant", variant)) if v}
    try:
        family = source.family or _hub_family(source, hub)
        sd = {"safety_checker": None, "requires_safety_checker": False} if family != "sdxl" else {}
        common = {**sd, **({"dtype": dtype} if dtype is not None else {})}
        cls = pipeline_class(family)
        if source.kind == "folder":
            pipe = cls.from_pretrained(source.location, local_files_only=True, use_safetensors=True, **common, **hub)
        elif source.kind == "single-file":
            pipe = cls.from_single_file(source.location, config=str(CONFIGS[family]), local_files_only=True, **common)
        else:
            pipe = cls.from_pretrained(source.location, use_safetensors=True, **common, **hub)
    # IndexError/AttributeError: what diffusers' single-file conversion raises on tensors of unexpected shapes.
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError, IndexError, AttributeError,
            SingleFileComponentError) as exc:
        raise ModelError(_load_failure(source, exc)) from None
    if prediction_type is None and source.kind == "single-file" and source.family == "sd2":
        prediction_type = "v_prediction" if predicts_v(pipe.unet) else "epsilon"
    if prediction_type is not None and pipe.scheduler.config.prediction_type != prediction_type:
        pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    return pipe


def hub_offline(repo_id: str, exc: BaseException | None = None) -> str | None:
    """The plain reason a hub id cannot load when it is not in the local Hugging Face cache and
    the hub cannot be reached (HF_HUB_OFFLINE set, or `exc` a failed connection); None when its
    model_index.json is cached or the hub may be asked. diffusers' own words for it ("does not
    appear to have a file named config.json") read as if the model were broken."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str):
        return None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in constants.ENV_VARS_TRUE_VALUES or constants.HF_HUB_OFFLINE
    unreachable = exc is not None and re.search(r"couldn't connect|local_files_only|offline", str(exc), re.I)
    if not (offline or unreachable):
        return None
    why = "this machine is offline (HF_HUB_OFFLINE is set)" if offline else "the hub cannot be reached from this machine"
    return (f"the hub model {repo_id} is not downloaded (it is not in this machine's Hugging Face cache) and {why}: "
            f"download it where the hub can be reached (hf download {repo_id}), or use a diffusers folder or a "
            ".safetensors file")


def _load_failure(source: ModelSource, exc: BaseException) -> str:
    if source.kind == "hub":
        offline = hub_offline(source.location, exc)
        if offline:
            return f"could not load the base model: {offline}"
    if source.kind == "folder":
        pickles = sorted(str(p.relative_to(source.location)) for p in Path(source.location).glob("*/*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            return (f"the diffusers folder {source.location} holds pickle weights ({', '.join(pickles[:3])}) where "
                    ".safetensors are needed: they are not loaded (unpickling can run code); re-save the "
                    "pipeline with save_pretrained(..., safe_serialization=True)")
    tried = {
        "folder": f"loading the diffusers folder {source.location}",
        "single-file": f"converting the single-file checkpoint {source.location}, {FAMILIES.get(source.family, 'of unknown kind')} "
                       f"(with the bundled {SHORT.get(source.family, '')} configs in "
                       f"{CONFIGS.get(source.family, CONFIGS_ROOT).relative_to(CONFIGS_ROOT.parents[1])})",
        "hub": f"the hub id {source.location} (from the local cache"
               + (" only: HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") else " or the hub") + ")",
    }[source.kind]
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"could not load the base model: tried {tried}; {reason}"


def load_vae(name_or_path: str, dtype=None, revision: str | None = None):
    """--pretrained_vae_model_name_or_path: an AutoencoderKL from a diffusers folder (its own, or a
    pipeline's vae/) or a hub id, safetensors only; ModelError saying what was tried."""
    from diffusers import AutoencoderKL

    path = Path(str(name_or_path)).expanduser()
    local = path.is_dir()
    if local and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    kwargs = {"use_safetensors": True, **({"dtype": dtype} if dtype is not None else {})}
    try:
        if local:
            return AutoencoderKL.from_pretrained(str(path), local_files_only=True, **kwargs)
        return AutoencoderKL.from_pretrained(str(name_or_path), **kwargs, **({"revision": revision} if revision else {}))
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load the VAE {name_or_path} (--pretrained_vae_model_name_or_path): {reason}") from None


# A U-Net this small (the demo model's is 17 MB) leaves each op little work to split across threads,
# and a thread that waits for its core stalls the others at every barrier. The example's step
# (batch 8 + 8) on 2 cores: with nothing else running, 2 threads 0.17 s and 1 thread 0.24 s; beside
# a process using half a core (a browser watching the run), 0.41 s and 0.29 s; beside a process
# busy on both cores, 0.91 s and 0.41 s (docs/benchmarks.md, "First result"). A studio always has
# something beside its runs, so such a U-Net gets one thread.
SMALL_UNET_BYTES = 64 * 2**20


def cpu_threads_for(model: str, cores: int) -> int:
    """CPU threads to give a training run or a sampler of `model` on `cores` cores: 1 for a folder
    whose U-Net weights are under SMALL_UNET_BYTES, else every core."""
    path = Path(str(model))
    try:
        size = sum(f.stat().st_size for f in path.glob("unet/*.safetensors")) if path.is_dir() else 0
    except OSError:
        size = 0
    return 1 if 0 < size < SMALL_UNET_BYTES else cores


def predicts_v(unet) -> bool:
    """Whether an SD 2.x U-Net predicts v: AUTOMATIC1111's test (modules/sd_models_config.py) on
    diffusers' U-Net. At t = 999 (ᾱ ≈ 0.005) on a latent of 0.5 everywhere, an epsilon model predicts
    noise ≈ the latent itself, so (prediction − latent) averages near 0; a v model predicts
    v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x₀ ≈ −x₀, which its test finds below −1."""
    import torch

    param = next(unet.parameters())
    latent = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    text = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        out = unet(latent, torch.tensor([999], device=param.device), text).sample
    return float((out.float() - latent.float()).mean()) < -1


def config_folder(model: str) -> Path | None:
    """Where the model's component configs are: its folder, its family's bundled configs for a
    single checkpoint file (CONFIGS), the local hub cache for a hub id; None if
    nowhere offline."""
    path = Path(str(model)).expanduser()
    if path.is_dir():
        return path
    if path.suffix.lower() in (".safetensors", ".ckpt"):
        try:
            return CONFIGS.get(single_file_family(path)) if path.is_file() else None
        except ModelError:
            return None
    try:
        from huggingface_hub import snapshot_download

        found = Path(snapshot_download(str(model), local_files_only=True, allow_patterns=["*/config.json", "model_index.json"]))
        return found if (found / "unet" / "config.json").is_file() else None
    except Exception:  # noqa: BLE001 - not in the cache, not a repo id: no estimate
        return None
