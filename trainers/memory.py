"""A run's peak memory, estimated before it starts from the model's configs and the run's
options, and what the device has for it: the check before a run is queued (studio) or starts
(trainer CLI), the line beside the studio's Train button, and the size of each run's cap.

    est = estimate(options)              # a trainers.options.Options; est.total in bytes, est.parts
    est = estimate_config(config)        # the same from a run's config dict; None if it cannot be read
    room = device_room("cpu")            # what one run may use there, and what is free now
    verdict = judge(est, room)           # .level "ok" | "close" | "too-big", .message names what to lower
    check(options, device)               # raises MemoryRefused for a run that cannot fit

The formula (bytes; every parameter count from the model folder's configs, built on the meta
device, no weights read; the method's trainable count from attaching it to that meta U-Net):

    weights    = frozen (U-Net + VAE + text encoders: SDXL's two) x b_w + trainable x 4
                 b_w = 2 under fp16/bf16 mixed precision (the pipeline is loaded in that dtype), else 4;
                 the method's trainable weights stay fp32; full fine-tuning under mixed precision also
                 holds autocast's half copy of the U-Net (+2 per parameter)
    grads      = trainable x 4
    optimizer  = trainable x 8 (AdamW, two fp32 moments) or x 2 (8-bit AdamW)
    activations= k[device, precision][method] x units x (0.25 with gradient checkpointing);
                 a Bypass injecting at depth k: k_bypass + (k_decoder − k_bypass) x the share of
                 the decoder's activations in its last k up blocks (rendered_share: their ResNets'
                 only with the skip-attention gradient, none with skip-path), x 0.5 with
                 gradient checkpointing (the largest rendered module is recomputed whole)
                 units = (batch x (2 with prior preservation) + off-concept rows) x latent pixels / 1024 x arch,
                 the off-concept rows being Res-Tuning's (conditioning.OFF_CONCEPT_ROWS, with its loss on),
                 latent pixels = (resolution / VAE scale)^2, and arch the U-Net's activation size per
                 latent pixel relative to SD v1.5 (channels x layers per level / 4^level, a layer with
                 attention counting 1 + 2 x its transformer depth: 1.0 for SD v1.5 and SD 2.x, 1.84
                 for SDXL with its 2- and 10-deep stacks, 0.040 for the bundled demo model)
    sampling   = validation images (or, with prior preservation, a batch of class images if larger):
                 the U-Net at batch 2 x images (guidance) under no_grad, k_infer x units, and the VAE
                 decoding them all at once: 0.1 + 0.97 GiB x images x (res/512)^2 x (VAE top
                 channels / 128), halved in half precision (assumed); grads are freed by then
    overhead   = the trainer process: Python, torch, diffusers, transformers, accelerate (0.5 GiB
                 on CPU); on CUDA the context and the caching allocator's slack (1.0 GiB of the
                 card, assumed). `accelerate launch` itself is not counted: each run's cap
                 (run_cap: x1.5, at least +2 GiB) has headroom for it
    peak       = overhead + weights + optimizer + max(grads + activations, sampling)

Calibration, SD v1.5 U-Net, GiB per 1024 latent pixels x sample (k):

    method kind                      CPU fp32   CUDA fp16/bf16
    bypass (no grad in backbone)       0.10        0.05
    res-tuning/adapter/prefix/prompt   0.40        0.175
    lora (peft keeps its inputs)       0.55        0.19
    full / anything in the encoder     0.55        0.20
    inference (validation samples)     0.05        0.025

Every k is fitted to measured peaks of SD v1.5 (SD 2.x and SDXL bench results join the table when
measured); the arch scale is computed from the config, not fitted. A single-file checkpoint is
estimated from its family's bundled configs (trainers.models.CONFIGS). bf16
on a CPU takes half the fp32 figure, fp32 on CUDA twice the half one. Where each constant comes
from, what was measured and what was not: docs/benchmarks.md, "Memory estimate". The estimate
against every measurement (`python -m bench.memory_estimate`, `--write` into
bench/results/memory_estimate.md) stays within 0.90-1.20x (tests/test_memory.py holds it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .models import config_folder
from .options import DEMO_MODEL, OptionError, check_method_fits, from_dict  # noqa: F401 - DEMO_MODEL for callers

GIB = 2**30
REPO_ROOT = Path(__file__).resolve().parent.parent

# GiB per 1024 latent pixels x sample on the SD v1.5 U-Net (see the docstring)
ACTIVATION_K = {
    ("cpu", "fp32"): {"beside": 0.10, "decoder": 0.40, "lora": 0.55, "whole": 0.55, "infer": 0.05},
    ("cuda", "half"): {"beside": 0.05, "decoder": 0.175, "lora": 0.19, "whole": 0.20, "infer": 0.025},
}
CHECKPOINTING = 0.25
# A Bypass rendered by frozen blocks under checkpointing: those blocks keep only their inputs, but
# diffusers recomputes them module by module in the backward, and the largest (a transformer at
# the 64x64 level, most of what depth 2 renders) holds its activations whole meanwhile
# (docs/benchmarks.md, "Memory estimate").
CHECKPOINTING_RENDERED = 0.5
VAE_DECODE_GIB = (0.1, 0.97)  # fixed, per 512 px image (SD v1.5's VAE, fp32)
OVERHEAD = {"cpu": 0.5 * GIB, "cuda": 1.0 * GIB}
HOST_OVERHEAD_CUDA = 3.0 * GIB  # a CUDA run's host memory: the process, and the weights while loading

# Thresholds of the verdict: "close" above this share of what a run may use
CLOSE = 0.85
# Environment
SHARE_ENV = "RESTUNING_RUN_MEMORY_SHARE"  # the most of the machine's memory one run may take (0..1)
CHECK_ENV = "RESTUNING_MEMORY_CHECK"  # "off": no refusal (the estimate is still shown and logged)
CUDA_CAP_ENV = "RESTUNING_CUDA_MEMORY_CAP"  # bytes of the card a studio run may allocate (set by trainers.service.jobs)
DEFAULT_SHARE = 0.8


class MemoryRefused(OptionError):
    """A run that cannot fit on this device; the message names the estimate, the room and the
    options to lower."""


# -- the model's facts, from its configs ------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    unet_params: int
    vae_params: int
    text_params: int
    vae_scale: int  # pixels per latent pixel
    vae_channels: int  # the VAE decoder's channels at full resolution
    arch: float  # activations per latent pixel, relative to SD v1.5's U-Net
    unet_config: dict = field(hash=False, compare=False)


def _level_sizes(cfg: dict, attention: bool = True) -> tuple[list[float], list[float], float]:
    """Activation size per latent pixel of each level's down and up blocks (index 0: the full
    latent resolution) and of the middle block: channels x layers / 4^level, a layer with attention
    counting 1 + 2 x its transformer depth (3 in SD 1.x and 2.x; 5 and 21 at SDXL's attention
    levels, whose stacks are 2 and 10 deep; `attention` False: 1, the ResNets alone)."""
    channels = list(cfg.get("block_out_channels") or [320, 640, 1280, 1280])
    layers = cfg.get("layers_per_block", 2)
    layers = layers if isinstance(layers, int) else max(layers)
    depths = cfg.get("transformer_layers_per_block", 1)
    depths = [depths] * len(channels) if isinstance(depths, int) else [max(d) if isinstance(d, list) else d for d in depths]
    down_types = list(cfg.get("down_block_types") or [])
    up_types = list(cfg.get("up_block_types") or [])[::-1]
    down, up = [], []
    for i, c in enumerate(channels):
        attn_down = 1 + 2 * depths[i] if attention and i < len(down_types) and "Attn" in down_types[i] else 1
        attn_up = 1 + 2 * depths[i] if attention and i < len(up_types) and "Attn" in up_types[i] else 1
        down.append(c * layers * attn_down / 4**i)
        up.append(c * (layers + 1) * attn_up / 4**i)
    return down, up, channels[-1] * (2 + 2 * depths[-1]) / 4 ** (len(channels) - 1)


def arch_scale(unet_config: dict) -> float:
    """Activation size per latent pixel relative to SD v1.5: down and up paths and the middle block."""
    from restuning.arch import SD15_UNET_CONFIG

    def size(cfg: dict) -> float:
        down, up, mid = _level_sizes(cfg)
        return sum(down) + sum(up) + mid

    return size(unet_config) / size(SD15_UNET_CONFIG)


def rendered_share(unet_config: dict, depth: int, gradient: str = "exact") -> float:
    """The share of the decoder's (middle and up blocks') activations that lies in its last
    `depth` up blocks: what a Bypass injecting there keeps for the backward. With a
    straight-through `gradient` less is kept: 'skip-attention' keeps their ResNets' share (an
    attention layer counts 1 of its 1 + 2 x depth), 'skip-path' none."""
    if gradient == "skip-path":
        return 0.0
    _, up, mid = _level_sizes(unet_config)
    kept = up
    if gradient == "skip-attention":
        _, up_resnets, _ = _level_sizes(unet_config, attention=False)
        kept = up_resnets
    return sum(kept[:depth]) / (sum(up) + mid)


def _read(folder: Path, part: str) -> dict:
    return json.loads((folder / part / "config.json").read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=16)
def model_facts(model: str) -> ModelFacts | None:
    """Parameter counts and shapes of a base model, from its configs (cached: the studio asks on
    every change of an option). None when its configs cannot be read offline."""
    folder = config_folder(model)
    if folder is None:
        return None
    try:
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        unet_cfg, vae_cfg = _read(folder, "unet"), _read(folder, "vae")
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_cfg)
            vae = AutoencoderKL.from_config(vae_cfg)
            texts = [CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))]
            if (folder / "text_encoder_2" / "config.json").is_file():  # SDXL's second encoder, with its projection
                texts.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2"))))
    except Exception:  # noqa: BLE001 - an unreadable or foreign config: no estimate rather than a failure
        return None
    channels = list(vae_cfg.get("block_out_channels") or [128])
    return ModelFacts(unet_params=sum(p.numel() for p in unet.parameters()), vae_params=sum(p.numel() for p in vae.parameters()),
                      text_params=sum(p.numel() for m in texts for p in m.parameters()), vae_scale=2 ** (len(channels) - 1),
                      vae_channels=int(channels[0]), arch=arch_scale(unet_cfg), unet_config=unet_cfg)


@functools.lru_cache(maxsize=64)
def trainable_weights(model: str, method: str, method_json: str) -> tuple[int, str, float] | None:
    """(trainable parameters, activation kind, rendered share) of a method on the model's U-Net,
    attached on the meta device. The kind: 'beside' (nothing trains inside the backbone: no
    gradient through its weights), 'decoder' (only the middle and up blocks), 'whole' (anything
    earlier), 'lora' (peft). The rendered share: for a Bypass injecting k up blocks before the
    head, the share of the decoder's activations those frozen blocks keep for the backward."""
    facts = model_facts(model)
    if facts is None:
        return None
    import torch
    from diffusers import UNet2DConditionModel

    import restuning
    from restuning.methods import METHODS

    config = METHODS[method].config.from_dict(json.loads(method_json))
    if getattr(config, "text_encoder", "") or getattr(config, "text_encoder_2", ""):
        # The U-Net's share only: a text-encoder LoRA adds ~0.3M parameters on CLIP ViT-L (SDXL's
        # second encoder ~1M) and the small encoders' activations, within the estimate's margin.
        config = dataclasses.replace(config, text_encoder="", text_encoder_2="")
    if getattr(config, "identifier", ""):
        # Likewise Res-Tuning's identifier: a row or two of the embedding table (768 numbers each on
        # SD v1.5) and the text encoder's activations for two prompts.
        config = dataclasses.replace(config, identifier="")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(facts.unet_config)
    try:
        handle = restuning.attach(unet, config)
    except (restuning.AttachError, ValueError, TypeError):
        return None  # options that do not fit the model: no estimate (trainers.options.check_method_fits says why)
    trainable = sum(p.numel() for p in handle.parameters())
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    inside = [n for n in names if n.split(".", 1)[0] in dict(unet.named_children()) and not n.startswith("restuning")]
    rendered = (rendered_share(facts.unet_config, getattr(config, "depth", 0), getattr(config, "gradient", "exact"))
                if method == "bypass" else 0.0)
    if not inside:
        kind = "beside"
    elif any(not n.startswith(("mid_block", "up_blocks", "conv_norm_out", "conv_out")) for n in inside):
        kind = "whole"
    else:
        kind = "lora" if method == "lora" else "decoder"
    return trainable, kind, rendered


# -- the estimate ---------------------------------------------------------------------------------


@dataclass
class Estimate:
    total: int  # bytes at the run's peak, on its device
    parts: dict  # name -> bytes (weights, optimizer, grads, activations, sampling, overhead)
    device: str  # "cpu" | "cuda"
    settings: dict  # what it was computed from (for messages)
    host: int = 0  # a CUDA run's host memory (the CPU's own for a CPU run)

    def gib(self, name: str | None = None) -> float:
        return (self.total if name is None else self.parts[name]) / GIB

    def summary(self) -> str:
        """What the estimate is made of, in GiB: the larger of the training step and the
        validation samples counts."""
        p = {k: v / GIB for k, v in self.parts.items()}
        text = f"weights {p['weights']:.1f}"
        if p["optimizer"] >= 0.05:
            text += f", optimizer {p['optimizer']:.1f}"
        text += f", training step {p['grads'] + p['activations']:.1f}"
        if p["sampling"] >= 0.05:
            text += f", validation samples {p['sampling']:.1f}"
        return text + f", process {p['overhead']:.1f}"


def _act_k(device: str, half: bool, kind: str) -> float:
    if device == "cuda":
        return ACTIVATION_K[("cuda", "half")][kind] * (1 if half else 2)
    return ACTIVATION_K[("cpu", "fp32")][kind] * (0.5 if half else 1)


def estimate_parts(facts: ModelFacts, trainable: int, kind: str, *, device: str, resolution: int, batch: int,
                   prior: bool = False, precision: str = "no", checkpointing: bool = False, adam8: bool = False,
                   validation_images: int = 0, class_batch: int = 0, unet_only: bool = False, rendered: float = 0.0,
                   extra_rows: int = 0) -> Estimate:
    """The formula of the module's docstring. `unet_only`: the U-Net's training step alone (what
    bench/train_cost measures), without the VAE, the text encoder and sampling. `rendered`: the
    share of the decoder's activations a 'beside' method keeps (a Bypass at depth k > 0). `extra_rows`:
    samples the training step adds to the batch (Res-Tuning's off-concept rows)."""
    half = precision in ("fp16", "bf16")
    b_w = 2 if half else 4
    full = kind == "whole" and trainable >= facts.unet_params
    frozen = (0 if full else facts.unet_params) + (0 if unet_only else facts.vae_params + facts.text_params)
    weights = frozen * b_w + trainable * 4 + (facts.unet_params * 2 if full and half else 0)
    grads = trainable * 4
    optimizer = trainable * (2 if adam8 else 8)
    latent = (resolution / facts.vae_scale) ** 2 / 1024 * facts.arch
    k = _act_k(device, half, kind)
    if kind == "beside" and rendered:
        k += (_act_k(device, half, "decoder") - k) * rendered
    activations = k * (batch * (2 if prior else 1) + extra_rows) * latent
    if checkpointing and (kind != "beside" or rendered):
        activations *= CHECKPOINTING if kind != "beside" else CHECKPOINTING_RENDERED
    sampling = 0.0
    if not unet_only:
        images = max(validation_images, class_batch)
        if images:
            decode = (VAE_DECODE_GIB[0] + VAE_DECODE_GIB[1] * images * (resolution / 512) ** 2) * facts.vae_channels / 128
            sampling = _act_k(device, half, "infer") * 2 * images * latent + decode * (0.5 if half else 1)
    activations, sampling = activations * GIB, sampling * GIB
    overhead = OVERHEAD[device]
    total = overhead + weights + optimizer + max(grads + activations, sampling)
    parts = {"overhead": overhead, "weights": weights, "optimizer": optimizer, "grads": grads,
             "activations": activations, "sampling": sampling}
    host = total if device == "cpu" else HOST_OVERHEAD_CUDA + frozen * b_w
    settings = {"resolution": resolution, "batch": batch, "prior": prior, "precision": precision, "checkpointing": checkpointing,
                "adam8": adam8, "validation_images": validation_images, "kind": kind, "trainable": trainable, "rendered": rendered}
    return Estimate(int(total), {k: int(v) for k, v in parts.items()}, device, settings, int(host))


def _device_kind(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def estimate(options, device: str = "cpu") -> Estimate | None:
    """The run's peak memory from its checked options (trainers.options.Options); None when the
    model's configs cannot be read offline (a hub id not in the cache)."""
    args, method_config = options.args, options.method_config
    model = str(args.pretrained_model_name_or_path)
    method_json = json.dumps({k: v for k, v in method_config.to_dict().items() if k != "method"}, sort_keys=True)
    facts = model_facts(model)
    found = trainable_weights(model, method_config.method, method_json) if facts is not None else None
    if found is None:
        return None
    trainable, kind, rendered = found
    validation = len(args.validation_prompt or []) and args.num_validation_images
    from .conditioning import OFF_CONCEPT_ROWS

    off_rows = OFF_CONCEPT_ROWS if method_config.method == "res-tuning" and getattr(method_config, "off_concept_loss", 0) else 0
    return estimate_parts(facts, trainable, kind, device=_device_kind(device), resolution=args.resolution,
                          batch=args.train_batch_size, prior=args.with_prior_preservation,
                          precision=args.mixed_precision or "no", checkpointing=args.gradient_checkpointing,
                          adam8=args.use_8bit_adam, validation_images=int(validation or 0),
                          class_batch=args.sample_batch_size if args.with_prior_preservation else 0, rendered=rendered,
                          extra_rows=off_rows)


def estimate_config(config: dict, device: str = "cpu") -> Estimate | None:
    """The estimate from a run's config dict (config.json, the studio's form); None if the
    options do not parse (the form says why) or the model's configs cannot be read."""
    values = {k: v for k, v in dict(config).items() if k not in ("instance_data_dir", "output_dir", "resume_from_checkpoint")}
    try:
        options = from_dict({"instance_prompt": "x", **values, "instance_data_dir": "instance",
                             "output_dir": tempfile.gettempdir()})
    except (OptionError, ValueError, TypeError):
        return None
    return estimate(options, device)


# -- what the device has ------------------------------------------------------------------------------


def memory_share() -> float:
    """The most of the machine's memory one run may take: RESTUNING_RUN_MEMORY_SHARE (0 < x <= 1),
    default 0.8."""
    try:
        value = float(os.environ.get(SHARE_ENV, DEFAULT_SHARE))
    except ValueError:
        return DEFAULT_SHARE
    return value if 0 < value <= 1 else DEFAULT_SHARE


def _cgroup_room() -> tuple[int | None, int | None]:
    """(limit, usage) of this process's cgroup (v2, else v1); None where there is none."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit() or int(text) >= 2**60:
            return None, None
        try:
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            usage = None
        return int(text), usage
    return None, None


@dataclass
class Room:
    device: str  # "cpu" | "cuda:0" ...
    limit: int  # the most one run may use there (bytes)
    free: int  # what is free now
    total: int  # the device's whole memory
    where: str  # how limit was found, for messages


def host_room(share: float | None = None) -> Room:
    """The machine's memory: a run may take `share` of it (or of the cgroup's limit), and what is
    available now (MemAvailable, or what the cgroup has left)."""
    import psutil

    share = memory_share() if share is None else share
    vm = psutil.virtual_memory()
    total, free, where = vm.total, vm.available, "of this machine's"
    limit, usage = _cgroup_room()
    if limit is not None and limit < total:
        total, where = limit, "of this container's"
        if usage is not None:
            free = min(free, max(0, limit - usage))
    return Room("cpu", int(total * share), int(free), int(total), f"{share:.0%} {where} {total / GIB:.1f} GiB")


@functools.lru_cache(maxsize=8)
def _cuda_total(index: int) -> tuple[int, str]:
    import torch

    props = torch.cuda.get_device_properties(index)
    return int(props.total_memory), props.name


def device_room(device: str, share: float | None = None) -> Room:
    if not str(device).startswith("cuda"):
        return host_room(share)
    index = int(str(device).split(":", 1)[1]) if ":" in str(device) else 0
    total, name = _cuda_total(index)
    share = memory_share() if share is None else share
    try:
        import torch

        free = int(torch.cuda.mem_get_info(index)[0])
    except Exception:  # noqa: BLE001
        free = total
    return Room(str(device), int(total * share), free, total, f"{share:.0%} of the {name}'s {total / GIB:.1f} GiB")


# -- the verdict --------------------------------------------------------------------------------------


@dataclass
class Verdict:
    level: str  # ok | close | too-big | unknown
    message: str
    estimate: Estimate | None = None
    room: Room | None = None


LOWER_ORDER = ("train_batch_size", "resolution", "gradient_checkpointing", "with_prior_preservation",
               "num_validation_images", "use_8bit_adam", "method")
LOWER_LABELS = {"train_batch_size": "batch size", "resolution": "resolution", "gradient_checkpointing": "gradient checkpointing",
                "with_prior_preservation": "prior preservation", "num_validation_images": "validation images",
                "use_8bit_adam": "8-bit Adam", "method": "method"}


def _changes(settings: dict, kind: str) -> list[tuple[str, str, dict]]:
    """Single option changes that lower the estimate: (option, what to write, estimate_parts kwargs)."""
    out = []
    if settings["batch"] > 1:
        out.append(("train_batch_size", "batch size 1 (--train_batch_size 1)", {"batch": 1}))
    if settings["resolution"] > 256:
        half = max(64, settings["resolution"] // 2 // 8 * 8)
        out.append(("resolution", f"resolution {half} (--resolution {half})", {"resolution": half}))
    if not settings["checkpointing"] and (kind != "beside" or settings.get("rendered")):
        out.append(("gradient_checkpointing", "gradient checkpointing on (--gradient_checkpointing)", {"checkpointing": True}))
    if settings["prior"]:
        out.append(("with_prior_preservation", "prior preservation off", {"prior": False}))
    if settings["validation_images"] > 1:
        out.append(("num_validation_images", "1 validation image (--num_validation_images 1)", {"validation_images": 1}))
    if not settings["adam8"] and settings["trainable"] > 50e6:
        out.append(("use_8bit_adam", "8-bit Adam (--use_8bit_adam)", {"adam8": True}))
    return out


def advice(est: Estimate, facts: ModelFacts, limit: int) -> str:
    """What to lower, best first: each single change that fits, with its estimate; else all of
    them together."""
    s = est.settings
    base = dict(device=est.device, resolution=s["resolution"], batch=s["batch"], prior=s["prior"], precision=s["precision"],
                checkpointing=s["checkpointing"], adam8=s["adam8"], validation_images=s["validation_images"],
                rendered=s.get("rendered", 0.0))
    fits, together = [], dict(base)
    for _, text, change in _changes(s, s["kind"]):
        new = estimate_parts(facts, s["trainable"], s["kind"], **{**base, **change})
        together.update(change)
        if new.total <= limit:
            fits.append(f"{text}: about {new.gib():.1f} GiB")
    if fits:
        return "lower one of: " + "; ".join(fits)
    if together != base:
        new = estimate_parts(facts, s["trainable"], s["kind"], **together)
        if new.total <= limit:
            return ("lower all of batch size, resolution and validation images, and turn on the memory savers "
                    f"(about {new.gib():.1f} GiB)")
    if s["kind"] != "beside":
        return ("use the Res-Tuning-Bypass method (no gradient through the backbone), a lower resolution, "
                "or a device with more memory")
    return "use a device with more memory"


def judge(est: Estimate | None, room: Room, facts: ModelFacts | None = None, *, queued: bool = False) -> Verdict:
    """ok, close (a warning), or too-big (a refusal) for one run of estimate `est` on `room`.
    `queued`: a studio run waits for its turn, so only the run's own limit decides; the CLI starts
    at once and must also fit in what is free now."""
    if est is None:
        return Verdict("unknown", "memory estimate: not available (the model's configs cannot be read offline)", None, room)
    need = est.total
    what = "card" if room.device.startswith("cuda") else "machine"
    if queued or room.limit <= room.free:
        limit, allowed = room.limit, f"a run may use {room.limit / GIB:.1f} GiB ({room.where})"
    else:
        limit = room.free
        allowed = f"the {what} has {room.free / GIB:.1f} GiB free now (a run may use {room.limit / GIB:.1f} GiB: {room.where})"
    head = f"this run needs about {need / GIB:.1f} GiB ({est.summary()})"
    if need > limit:
        lower = advice(est, facts, limit) if facts is not None else "lower the batch size or the resolution"
        return Verdict("too-big", f"{head}, but {allowed}: {lower}", est, room)
    if need > CLOSE * limit:
        return Verdict("close", f"{head}, close to what {allowed}; it may run out of memory: "
                       "a lower batch size or resolution is safer", est, room)
    if queued and need > room.free:
        return Verdict("close", f"{head}; a run may use {room.limit / GIB:.1f} GiB but only {room.free / GIB:.1f} GiB "
                       f"are free on this {what} now: it may run out of memory if that stays so", est, room)
    return Verdict("ok", f"{head}; {allowed}", est, room)


def check_enabled() -> bool:
    return os.environ.get(CHECK_ENV, "on").strip().lower() not in ("off", "0", "no", "false")


def run_device() -> str:
    """The device this trainer process will train on, as accelerate will choose it."""
    import torch

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def check(options, device: str, *, queued: bool = False) -> Verdict:
    """The trainer's check before it loads anything: MemoryRefused for a run that cannot fit
    (unless RESTUNING_MEMORY_CHECK=off), else the verdict (its message: a warning when close).
    The method's options are checked against the model first (trainers.options.check_method_fits:
    the form's check too): an OptionError names what does not fit."""
    check_method_fits(options.method_config, str(options.args.pretrained_model_name_or_path))
    est = estimate(options, device)
    facts = model_facts(str(options.args.pretrained_model_name_or_path))
    verdict = judge(est, device_room(device), facts, queued=queued)
    if verdict.level == "too-big" and check_enabled():
        raise MemoryRefused(f"{verdict.message} (the check: {CHECK_ENV}=off skips it)")
    return verdict


# -- each run's cap ------------------------------------------------------------------------------------


def run_cap(est: Estimate | None, limit: int) -> int:
    """What a run is allowed: its estimate with headroom (x1.5, at least +2 GiB), never above
    `limit` (its share of the machine or card); `limit` itself without an estimate."""
    if est is None:
        return int(limit)
    return int(min(limit, max(est.total * 1.5, est.total + 2 * GIB)))


def cap_cuda(device) -> int | None:
    """In the trainer: hold this process to RESTUNING_CUDA_MEMORY_CAP bytes of its GPU
    (torch.cuda.set_per_process_memory_fraction), so a run over its cap fails with CUDA's out of
    memory, alone. An address-space limit cannot do it: the CUDA driver maps far more address
    space than any memory it uses."""
    value = os.environ.get(CUDA_CAP_ENV, "")
    if not value.isdigit() or getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return None
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, int(value) / total), device)
    return int(value)


def line(verdict: Verdict) -> str:
    """The studio's one Markdown line beside the Train button."""
    if verdict.estimate is None:
        return "Memory estimate: not available for this model"
    est, room = verdict.estimate, verdict.room
    icon = {"ok": "✅", "close": "⚠️", "too-big": "⛔"}.get(verdict.level, "")
    where = "GPU" if est.device == "cuda" else "CPU"
    text = f"{icon} Memory estimate: **{est.gib():.1f} GiB** of the {room.limit / GIB:.1f} GiB a run may use on this {where}"
    if verdict.level == "too-big":
        text += " — too much: " + verdict.message.split(": ", 1)[-1]
    elif verdict.level == "close":
        text += " — close: a lower batch size or resolution is safer"
    return text
