"""DreamBooth-style training of any registered method on a Stable Diffusion U-Net, on accelerate.

    python -m trainers.dreambooth --instance_data_dir dog/ --instance_prompt "a photo of sks dog" \\
        --method res-tuning --output_dir runs/dog
    accelerate launch -m trainers.dreambooth --config runs/dog/config.json      # what the studio runs

The recipe is diffusers' train_dreambooth_lora.py (train_dreambooth_lora_sdxl.py on SDXL), shortened.
With x_0 = s·VAE(image), c the U-Net's conditioning (trainers/conditioning.py: the prompt's text
embedding; on SDXL both encoders' and the pooled text and each image's size and crop ids),
ε ~ N(0, I) (+ noise_offset·N(0, I) per channel), t ~ U{0, ..., T-1}:

    x_t    = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε
    target = ε  (epsilon)   or   v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x_0  (v_prediction), as the scheduler says
    loss   = E[w_t·|U-Net(x_t, t, c) - target|²]  +  prior_loss_weight · (the same on class images)
    w_t    = min(SNR_t, γ)/SNR_t  (÷(SNR_t+1) for v)  with --snr_gamma γ (min-SNR), else 1

Only the method's parameters train: `restuning.attach` freezes the rest (the paper's Eq. 7
Res-Tuners, Eq. 8 Bypass, or a baseline, whichever the registry entry attaches). The text
encoders are frozen (unless a LoRA tunes them or Res-Tuning's identifier embedding trains), so the
prompts' embeddings are computed once. With an off-concept loss (Res-Tuning's, a Bypass's) each
step adds its term on prompts that do not name the concept (OffConcept, off_concept_energies). Progress goes to
`<run>/events.jsonl` (trainers/events.py); SIGTERM saves a checkpoint and ends as `cancelled`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import math
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import artifacts, checkpoints as saved, conditioning, data, memory, models
from . import options as opts
from .events import EventLog
from .images import ImageError, check_folder

CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
TUNER_STATE = "tuner_state.safetensors"
STEP_EVENT_INTERVAL = 0.5  # seconds: at most ~2 step events a second, always the first and last
STOP_CHECK_STEPS = 10  # with several processes, how often they agree on stopping (a collective)
MAX_PENDING_STEPS = 50  # losses read off the device at least this often (a diverged run stops soon)
DEFAULT_SAMPLING = {"num_inference_steps": 25, "guidance_scale": 7.5}
OOM_HINT = ("out of memory: try --method bypass --depth 0 (no gradient flows through the backbone), --gradient_checkpointing, "
            "a lower --resolution, --train_batch_size 1, or --mixed_precision bf16/fp16 on a GPU")


class Cancelled(Exception):
    pass


@dataclass
class TrainResult:
    """What a run did, for tests and in-process callers: per-step losses of this process, the last
    step, the artefacts written (main process), the trained pipeline and the method's handle."""

    losses: list[float] = field(default_factory=list)
    instance_losses: list[float] = field(default_factory=list)
    step: int = 0
    artifacts: list[tuple[str, Path]] = field(default_factory=list)
    pipeline: object = None  # the trained pipeline (its U-Net carries the method)
    handle: object = None


# -- input checks, all before anything heavy -------------------------------------------------------


def _is_main_process() -> bool:
    # Before accelerate is set up, the launcher's environment says which process this is.
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def find_checkpoint(output_dir: Path, value: str | None, note=print) -> Path | None:
    """The checkpoint to resume from: None to start fresh (also 'latest' with none saved yet).
    'latest' is the newest that looks whole; each newer damaged one is named through `note`
    (trainers.checkpoints; loading falls back further if it fails). A bare name
    (checkpoint-<step>, diffusers' naming) is looked up in the run's checkpoints folder."""
    if not value:
        return None
    if value == "latest":
        return saved.newest(output_dir, note)
    path = Path(value)
    if not path.is_dir() and path.name == value:
        path = Path(output_dir) / CHECKPOINTS / value
    if not (path.is_dir() and saved.step_of(path) >= 0):
        names = ", ".join(p.name for p in reversed(saved.found(output_dir))) or "none yet"
        raise opts.OptionError(f"--resume_from_checkpoint {value}: no such checkpoint; this run's are in "
                               f"{Path(output_dir) / CHECKPOINTS} ({names}): give one of them, a checkpoint folder, or 'latest'")
    return path


def check_inputs(args, note=print) -> tuple[list[Path], models.ModelSource, Path | None]:
    """Instance images, base model and checkpoint, checked: ImageError/ModelError/OptionError."""
    instance_files = [info.path for info in check_folder(args.instance_data_dir)]
    source = models.check_source(args.pretrained_model_name_or_path)
    resume = find_checkpoint(Path(args.output_dir), args.resume_from_checkpoint, note)
    if mixed_precision(args) == "fp16" and memory.run_device() == "cpu":
        given = "--mixed_precision fp16" if args.mixed_precision else "accelerate's mixed precision fp16 (accelerate launch / config)"
        raise opts.OptionError(f"{given} needs a CUDA GPU; on a CPU use --mixed_precision bf16 or no")
    if args.prior_generation_precision == "fp16" and not torch.cuda.is_available():
        raise opts.OptionError("--prior_generation_precision fp16 needs a CUDA GPU; on a CPU use bf16 or fp32")
    if args.class_data_dir and not args.with_prior_preservation:
        raise opts.OptionError("--class_data_dir is only used with --with_prior_preservation")
    return instance_files, source, resume


def mixed_precision(args) -> str:
    """The precision accelerate will set up: --mixed_precision, else what `accelerate launch`
    passes in its environment (its flag or `accelerate config`), else no."""
    return (args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no").lower()


def check_text_length(args, text_encoder) -> None:
    """--tokenizer_max_length fits the text encoder's position embeddings (OptionError if not)."""
    positions = getattr(text_encoder.config, "max_position_embeddings", None)
    if args.tokenizer_max_length and positions and args.tokenizer_max_length > positions:
        raise opts.OptionError(f"--tokenizer_max_length {args.tokenizer_max_length} is longer than the text encoder's {positions} "
                               f"positions: give at most {positions}, or leave it out (the tokenizer's own length)")


def _recipe_value(args, method_config, name: str) -> str:
    value = getattr(args, name) if hasattr(args, name) else getattr(method_config, name, None)
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


# -- the pieces of the recipe ----------------------------------------------------------------------


def sampling_settings(args, source: models.ModelSource) -> dict:
    """Validation/class-image sampling: the options, else the model folder's demo_settings.json, else diffusers' usual."""
    settings = dict(DEFAULT_SAMPLING)
    demo = Path(source.location) / "demo_settings.json"
    if source.kind == "folder" and demo.is_file():
        try:
            found = opts.read_config(demo)
        except opts.OptionError:
            found = {}
        settings.update({k: found[k] for k in DEFAULT_SAMPLING if isinstance(found.get(k), (int, float))})
    for key in DEFAULT_SAMPLING:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return settings


def choose_attention(unet, want_xformers: bool) -> str:
    """xformers when asked for and it works on CUDA, else PyTorch SDPA (diffusers' default processor)."""
    if want_xformers:
        if not torch.cuda.is_available():
            reason = "no CUDA device"
        else:
            try:
                unet.enable_xformers_memory_efficient_attention()  # diffusers runs a test op on the GPU
                return "xformers"
            except Exception as exc:  # ImportError, NotImplementedError, or the test op failing
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"PyTorch SDPA (xformers not used: {reason})"
    return "PyTorch SDPA"


def attention_summary(unet, chosen: str) -> str:
    """`chosen`, and under xformers how many attention layers a method's own processor (prefix,
    prompt: PyTorch SDPA with its extra keys and values) took over after it was set."""
    if chosen != "xformers":
        return chosen
    names = [type(p).__name__ for p in unet.attn_processors.values()]
    own = sum("XFormers" not in n for n in names)
    return f"xformers ({own} of {len(names)} attention layers run the method's own processor on PyTorch SDPA)" if own else chosen


def trackers(wanted: str) -> tuple[list[str] | str | None, list[str]]:
    """accelerate's log_with for --report_to, and a note for each tracker whose package is missing."""
    import importlib.util

    if wanted == "none":
        return None, []
    if wanted == "all":
        return "all", []
    package = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml"}[wanted]
    if importlib.util.find_spec(package) is None:
        return None, [f"--report_to {wanted}: {package} is not installed, so nothing is reported to it (pip install {package})"]
    return [wanted], []


def diffusion_loss(unet, posterior, scaling_factor: float, noise_scheduler, embeddings, num_instance: int, args,
                   generator: torch.Generator, weight_dtype, added: dict | None = None,
                   off_concept: "OffConcept | None" = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(total loss, instance loss, prior loss or None) of one batch whose VAE posterior is given
    (fresh or cached); every random draw comes from `generator`, the latent's first. `added`: an
    SDXL U-Net's added_cond_kwargs (trainers.conditioning). `off_concept`: the last rows' noisy
    latents again with prompts that do not name the concept, their prediction held to the frozen
    model's (weighted into the total; OffConcept)."""
    with torch.no_grad():
        latents = (posterior.sample(generator=generator) * scaling_factor).float()
    device = latents.device
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator).to(device)
    if args.noise_offset:
        noise = noise + args.noise_offset * torch.randn((b, c, 1, 1), generator=generator).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = noise_scheduler.config.prediction_type
    target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    inputs = (noisy, timesteps, embeddings, added)
    if off_concept is not None:
        teacher_inputs = off_concept.inputs(noisy, timesteps, added)
        with torch.no_grad():
            teacher = off_concept.frozen(*[x.to(weight_dtype) if x.is_floating_point() else x for x in teacher_inputs[:3]],
                                         _cast(teacher_inputs[3], weight_dtype)).float()
        inputs = tuple(_join(a, b) for a, b in zip(inputs, teacher_inputs))
    noisy_in, timesteps_in, embeddings_in, added_in = inputs
    extra = {"added_cond_kwargs": _cast(added_in, weight_dtype)} if added_in else {}
    model_pred = unet(noisy_in.to(weight_dtype), timesteps_in, embeddings_in.to(weight_dtype), **extra).sample.float()
    per_sample = F.mse_loss(model_pred[:b], target.float(), reduction="none").mean(dim=(1, 2, 3))
    if args.snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=args.snr_gamma) / (snr + 1 if prediction == "v_prediction" else snr)
        per_sample = per_sample * weights
    instance = per_sample[:num_instance].mean()
    total = instance
    prior = None
    if num_instance < b:
        prior = per_sample[num_instance:].mean()
        total = instance + args.prior_loss_weight * prior
    if off_concept is not None:
        total = total + off_concept.weight * F.mse_loss(model_pred[b:], teacher)
    return total, instance, prior


def _cast(added: dict | None, dtype) -> dict | None:
    return {k: v.to(dtype) for k, v in added.items()} if added else None


def _join(a, b):
    if a is None:
        return None
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


@dataclass
class OffConcept:
    """Res-Tuning's off-concept loss for one step: `prompts` (rows, tokens, width) that do not name
    the concept (conditioning.concept_prompts; SDXL: with `pooled`) read the batch's last rows'
    noisy latents (its class images with prior preservation) again, and the tuned U-Net's
    prediction there is held to `frozen`'s, the same U-Net with the method at strength 0: MSE,
    times `weight`. The frozen model's answer costs one no-grad pass of those rows; the tuned one's
    rides in the step's own U-Net call."""

    prompts: torch.Tensor
    pooled: torch.Tensor | None
    frozen: Callable
    weight: float

    def inputs(self, noisy, timesteps, added: dict | None):
        """(noisy latents, timesteps, prompts, SDXL's added conditioning) of the off-concept rows:
        the batch's last rows (as many as there are prompts, at most the batch)."""
        b = noisy.shape[0]
        k = min(self.prompts.shape[0], b)
        rows = slice(b - k, b)
        more = {"text_embeds": self.pooled[:k], "time_ids": added["time_ids"][rows]} if added else None
        return noisy[rows], timesteps[rows], self.prompts[:k], more


def step_generator(seed: int, step: int, micro: int, process: int) -> torch.Generator:
    # One generator per (step, micro-batch, process): noise, timesteps and VAE sampling depend on
    # the position only, so a resumed run draws exactly what an uninterrupted one would.
    return torch.Generator().manual_seed(hash((seed, step, micro, process)) & 0x7FFF_FFFF_FFFF)


@torch.no_grad()
def sample_images(pipe, prompts: list[str], count: int, seed: int, settings: dict, resolution: int,
                  folder: Path, step: int, autocast) -> list[dict]:
    """`count` images per prompt with a fixed seed: the same noise at every step, so samples compare."""
    folder.mkdir(parents=True, exist_ok=True)
    unet = pipe.unet
    was_training = unet.training
    unet.eval()
    out = []
    try:
        for p, prompt in enumerate(prompts):
            generators = [torch.Generator(pipe.device).manual_seed(seed + i) for i in range(count)]
            with autocast():
                images = pipe([prompt] * count, generator=generators, height=resolution, width=resolution,
                              **settings).images
            paths = []
            for i, image in enumerate(images):
                path = folder / f"step{step:06d}-p{p}-{i}.png"
                tmp = path.with_name("." + path.name + ".tmp")
                image.save(tmp, format="PNG")
                os.replace(tmp, path)
                paths.append(path)
            out.append({"prompt": prompt, "paths": paths})
    finally:
        unet.train(was_training)
    return out


class StepReporter:
    """Step events, throttled: the first and last always, otherwise at most one per interval. The
    loss shown is the mean since the previous event, so throttling drops no information."""

    def __init__(self, events: EventLog, total: int, interval: float = STEP_EVENT_INTERVAL):
        self.events, self.total, self.interval = events, total, interval
        self.last_emit = -math.inf
        self.pending: list[float] = []
        self.durations: list[float] = []
        self.first = True

    def due(self) -> bool:
        """Whether the next update would be sent (the trainer reads its losses off the GPU then)."""
        return self.first or time.monotonic() - self.last_emit >= self.interval

    def update(self, step: int, loss: float, lr: float, seconds: float, hold: bool = False, **extra) -> None:
        """`hold`: more steps read at the same time follow, so only the last of them may be sent."""
        self.pending.append(loss)
        self.durations = (self.durations + [seconds])[-20:]
        now = time.monotonic()
        if not hold and (self.first or step >= self.total or now - self.last_emit >= self.interval):
            sec = sum(self.durations) / len(self.durations)
            self.events.emit("step", step=step, total=self.total, loss=sum(self.pending) / len(self.pending), lr=lr,
                             sec_per_step=round(sec, 4), eta_sec=round(sec * (self.total - step), 1), **extra)
            self.pending, self.last_emit, self.first = [], now, False


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int | None, events: EventLog) -> Path:
    """accelerate's state (tuner weights via the hook, optimiser, scheduler, RNG) written under a
    temporary name and renamed, so a crash mid-save never leaves a checkpoint that looks whole."""
    root = Path(output_dir) / CHECKPOINTS
    final, tmp = root / f"checkpoint-{step}", root / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except BaseException:  # a full disk: no half-written checkpoint is left to fill it further
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if limit is not None:
            for old in saved.found(output_dir)[limit:]:
                shutil.rmtree(old, ignore_errors=True)
        events.emit("checkpoint", step=step, path=str(final.relative_to(output_dir)))
    accelerator.wait_for_everyone()
    return final


class StopFlag:
    """Set by SIGTERM (the studio's Cancel) or SIGINT; the loop looks at it between steps."""

    def __init__(self):
        self.event = threading.Event()
        self.previous = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, lambda *_: self.event.set())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed(self, accelerator=None) -> bool:
        """Whether to stop; with several processes all of them decide together at the same step
        (a process stopping alone would leave the others waiting in a collective)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.event.is_set()
        flag = torch.tensor([1.0 if self.event.is_set() else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


# -- the run: train() calls one stage after another; what they share is in the dataclasses below ---


@dataclass
class Base:
    """The loaded base model: the pipeline (frozen weights in `weight_dtype`), the DDPM scheduler that
    adds noise in training, and the sampling settings of validation and class images."""

    pipe: object
    noise_scheduler: object
    weight_dtype: torch.dtype
    sampling: dict


@dataclass
class Tuning:
    """The attached method: its handle, the parameters that train, the ids of those among them that
    sit in the text encoder (their own learning rate) and the attention processors in use."""

    handle: object
    params: list[torch.nn.Parameter]
    text_params: set[int]
    attention: str


@dataclass
class Training:
    """What every optimiser step uses, as accelerate prepared it. Nothing here changes during the
    loop except the models' and optimiser's own state."""

    accelerator: object
    args: object
    events: EventLog
    output_dir: Path
    base: Base
    tuning: Tuning
    unet: torch.nn.Module  # prepared (wrapped under several processes); base.pipe.unet is the plain one
    trained: list[torch.nn.Module]  # the prepared U-Net, and the text encoder when its LoRA trains
    optimizer: object
    lr_scheduler: object
    dataset: data.DreamBoothData
    latent_cache: data.LatentCache | None
    encoders: list[Callable[[], conditioning.Text]]  # the instance prompt's conditioning, then the class prompt's
    log_with: list[str] | str | None
    off_concept: tuple | None = None  # prompts without and with the concept, embedded (off_concept_text)


@dataclass
class Progress:
    """The run's position, the only state the loop changes. The losses stay on the device (`pending`,
    one (loss, instance loss) per step) and are read in one go when reported, checkpointed or
    sampled: reading each step's loss (.item()) would make the CPU wait for the GPU every step."""

    step: int
    reporter: StepReporter
    bar: object  # a tqdm bar at a terminal, else None
    result: TrainResult
    last_checkpoint: int = 0
    last_sampled: int = -1
    pending: list[torch.Tensor] = field(default_factory=list)
    pending_seconds: list[float] = field(default_factory=list)


def train(options: opts.Options, events: EventLog, stop: StopFlag, on_attached=None) -> TrainResult:
    """One run. `on_attached(pipe, handle)`, if given, is called once the method is attached and
    before training starts (tests use it to see the starting weights). Raises Cancelled when
    `stop` is set (after a checkpoint, once training has started)."""
    from restuning.methods import METHODS

    args, method = options.args, METHODS[options.method_config.method]
    output_dir = Path(args.output_dir)
    instance_files, source, resume = check_inputs(args, lambda text: _note(events, text))
    verdict = check_memory(options)
    accelerator, log_with = set_up_accelerator(args, output_dir, events)
    base = load_base(args, source, accelerator, events, stop)
    source = dataclasses.replace(source, family=conditioning.family(base.pipe))  # a hub id's is known once loaded
    class_files = make_class_images(args, source, base, accelerator, events, stop) if args.with_prior_preservation else None
    tuning = attach_method(options, base.pipe, accelerator.is_main_process, on_attached)
    describe_run(options, method, base, tuning, accelerator, verdict, events)
    dataset, latent_cache, prompts = prepare_data(args, base, instance_files, class_files, events)
    training = prepare_training(args, base, tuning, dataset, latent_cache, prompts, accelerator, log_with, events, output_dir)
    progress = start_progress(training, resume)
    run_loop(training, progress, stop)
    progress.result.step = progress.step
    progress.result.pipeline, progress.result.handle = base.pipe, tuning.handle
    save_and_export(training, progress, options, method, source)
    return progress.result


# -- setting up: accelerate, the base model, class images ------------------------------------------


def check_memory(options: opts.Options) -> memory.Verdict:
    """memory.check's verdict; MemoryRefused (an OptionError) before anything is loaded."""
    verdict = memory.check(options, memory.run_device())
    if verdict.level in ("close", "too-big") and _is_main_process():  # too-big: only with the check off
        print(f"warning: {verdict.message}", flush=True)
    return verdict


def set_up_accelerator(args, output_dir: Path, events: EventLog):
    """The Accelerator (refused with an OptionError where it does not match how the run was
    launched), the trackers it logs to, tf32 and the seed."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    log_with, notes = trackers(args.report_to)
    try:
        accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                                  mixed_precision=args.mixed_precision, log_with=log_with,
                                  project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                      logging_dir=str(output_dir / args.logging_dir)))
    except ValueError as exc:
        raise opts.OptionError(f"accelerate refused the setup: {exc}") from None
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # Otherwise each process would train alone and all would write the same run folder.
        raise opts.OptionError(
            f"launched as {launched} processes but accelerate set up {accelerator.num_processes}: "
            "without GPUs, set ACCELERATE_USE_CPU=1 (or choose the CPU in `accelerate config`)")
    events.enabled = accelerator.is_main_process
    memory.cap_cuda(accelerator.device)  # the studio's per-run cap on a GPU (RESTUNING_CUDA_MEMORY_CAP)
    if accelerator.is_main_process:
        for note in notes + opts.compat_notes(args):
            print(note, flush=True)
            events.emit("info", message=note)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    return accelerator, log_with


def load_base(args, source: models.ModelSource, accelerator, events: EventLog, stop: StopFlag) -> Base:
    """The base pipeline on the run's device with the VAE and text encoder frozen. Frozen weights are
    in the compute dtype from the start, class-image generation included; the method's trainable
    weights go back to fp32 once attached (fp16 gradients cannot be unscaled)."""
    from diffusers import DDPMScheduler

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    events.phase("loading", message=f"loading {source.location}")
    pipe = models.load_pipeline(source, weight_dtype, revision=args.revision, variant=args.variant,
                                prediction_type=args.prediction_type)
    pipe.set_progress_bar_config(disable=True)
    check_family_options(args, pipe)
    if args.pretrained_vae_model_name_or_path:
        pipe.vae = models.load_vae(args.pretrained_vae_model_name_or_path, weight_dtype, args.revision)
    elif weight_dtype != torch.float32 and pipe.vae.config.get("force_upcast"):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (its config says so); diffusers' SDXL script keeps it fp32
    pipe.to(accelerator.device)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise models.ModelError(f"the scheduler predicts {noise_scheduler.config.prediction_type!r}; "
                                "only epsilon and v_prediction models are supported")
    check_text_length(args, pipe.text_encoder)
    pipe.vae.requires_grad_(False)
    for encoder in conditioning.text_encoders(pipe).values():
        encoder.requires_grad_(False)
    base = Base(pipe, noise_scheduler, weight_dtype, sampling_settings(args, source))
    if stop.agreed(accelerator):
        raise Cancelled
    return base


def check_family_options(args, pipe) -> None:
    """Options of SD 1.x/2.x training that SDXL's two encoders do not take: an OptionError naming them."""
    if conditioning.is_xl(pipe):
        for name in ("tokenizer_max_length", "text_encoder_use_attention_mask"):
            if getattr(args, name):
                raise opts.OptionError(f"--{name} is refused on SDXL: both its text encoders read 77 tokens without a mask, "
                                       "as diffusers' SDXL pipeline encodes them")


def make_class_images(args, source: models.ModelSource, base: Base, accelerator, events: EventLog,
                      stop: StopFlag) -> list[Path]:
    """Class images for prior preservation, made by the untouched base model (or found in their
    cache, shared by runs of one model, prompt and resolution): ImageError if too few result."""
    class_dir = Path(args.class_data_dir) if args.class_data_dir else data.class_cache_dir(
        Path(args.output_dir).resolve().parent, source.key(), args.class_prompt, args.resolution)
    # the cache's folder is a digest (and a server's path in the studio's Log box): said in words
    where = f"in {class_dir}" if args.class_data_dir else "kept in the runs folder for runs of this model, prompt and size"
    events.phase("class-images", message=f"{args.num_class_images} class images of '{args.class_prompt}', {where}")
    prior_dtype = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.prior_generation_precision, base.weight_dtype)
    base.pipe.to(dtype=prior_dtype)
    if source.kind == "folder" and accelerator.is_main_process:
        made_as = {"prompt": args.class_prompt, "resolution": args.resolution, "seed": args.seed,
                   "precision": str(prior_dtype).removeprefix("torch."), **base.sampling}
        shipped = data.shipped_class_images(Path(source.location), made_as)
        if shipped and data.seed_class_cache(class_dir, shipped, args.num_class_images):
            events.phase("class-images", message=f"class images from the base model's folder ({len(shipped)} shipped)")
    accelerator.wait_for_everyone()
    # Every process makes its share (image i on process i mod N); the main one reports its own.
    data.ensure_class_images(
        base.pipe, class_dir, args.class_prompt, args.num_class_images, args.resolution, args.seed,
        batch_size=args.sample_batch_size, shard=(accelerator.process_index, accelerator.num_processes),
        progress=lambda done, total: events.phase("class-images", done=done, total=total), should_stop=stop.event.is_set,
        **base.sampling)
    base.pipe.to(dtype=base.weight_dtype)
    accelerator.wait_for_everyone()
    if stop.agreed(accelerator):
        raise Cancelled
    class_files = data.usable_images(class_dir)[: args.num_class_images]
    if len(class_files) < args.num_class_images:
        raise ImageError(f"only {len(class_files)} of {args.num_class_images} class images could be made in {class_dir}")
    return class_files


# -- the method and the data -----------------------------------------------------------------------


def attach_method(options: opts.Options, pipe, is_main: bool, on_attached=None) -> Tuning:
    """The method from the registry, attached to the pipeline's U-Net (and text encoders for LoRA with
    --train_text_encoder: both of SDXL's, as diffusers' SDXL script trains them; Res-Tuning's
    identifier embedding in each of them); `restuning.attach` freezes everything else. Attention is chosen first: xformers set afterwards would replace the
    prefix and prompt methods' own processors."""
    from diffusers.training_utils import cast_training_params

    import restuning

    args, unet, encoders = options.args, pipe.unet, conditioning.text_encoders(pipe)
    config = options.method_config
    if args.train_text_encoder and "text_encoder_2" in encoders and not getattr(config, "text_encoder_2", ""):
        config = options.method_config = dataclasses.replace(config, text_encoder_2=config.text_encoder)
    if getattr(config, "text_encoder_2", "") and "text_encoder_2" not in encoders:
        raise opts.OptionError("--text_encoder_2 names layers of SDXL's second text encoder; this base model has one text encoder")
    attention = choose_attention(unet, args.enable_xformers_memory_efficient_attention)
    handle = restuning.attach(pipe, config)
    text_params = {id(p) for encoder in encoders.values() for p in encoder.parameters() if p.requires_grad}
    attention = attention_summary(unet, attention)
    if is_main:
        print(f"attention: {attention}", flush=True)
    trained = [e for e in encoders.values() if any(p.requires_grad for p in e.parameters())]
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in trained:
            encoder.gradient_checkpointing_enable()
    for model in (unet, *encoders.values()):
        cast_training_params(model, dtype=torch.float32)
    params = [p for p in handle.parameters() if p.requires_grad]
    if on_attached is not None:
        on_attached(pipe, handle)
    return Tuning(handle, params, text_params, attention)


def describe_run(options: opts.Options, method, base: Base, tuning: Tuning, accelerator, verdict: memory.Verdict,
                 events: EventLog) -> None:
    """The recipe line on stdout and the run's `info` event: method, sizes, device, precision."""
    args, method_config = options.args, options.method_config
    if accelerator.is_main_process and options.recipe:
        print("recipe: " + "; ".join(f"--{k} {_recipe_value(args, method_config, k)} ({where})" for k, where in options.recipe.items()),
              flush=True)
    text_lr = {"text_encoder_learning_rate": args.text_encoder_lr or args.learning_rate} if tuning.text_params else {}
    events.emit("info", method=method.name, method_config=method_config.to_dict(),
                trainable_params=sum(p.numel() for p in tuning.params), learning_rate=args.learning_rate,
                recipe=options.recipe, **text_lr, total_params=sum(p.numel() for p in base.pipe.unet.parameters()),
                device=str(accelerator.device), num_processes=accelerator.num_processes,
                mixed_precision=accelerator.mixed_precision, attention=tuning.attention,
                prediction_type=base.noise_scheduler.config.prediction_type, sampling=base.sampling,
                memory_estimate=verdict.estimate.total if verdict.estimate else None, memory=verdict.message)


def prepare_data(args, base: Base, instance_files: list[Path], class_files: list[Path] | None, events: EventLog):
    """(dataset, latent cache or None, prompts: the instance prompt, then the class prompt with
    prior preservation); a prompt longer than the text encoder takes is reported."""
    tokenizer = base.pipe.tokenizer
    limit = args.tokenizer_max_length or tokenizer.model_max_length
    prompts = [args.instance_prompt] + ([args.class_prompt] if class_files else [])
    for prompt in filter(None, prompts):
        if len(tokenizer(prompt).input_ids) > limit:
            events.emit("info", message=f"the prompt {prompt!r} is longer than the text encoder's {limit} tokens; its end is cut")
    dataset = data.DreamBoothData(instance_files, class_files, args.resolution, args.center_crop, args.random_flip, args.seed,
                                  args.image_interpolation_mode)
    latent_cache = data.LatentCache(base.pipe.vae) if args.cache_latents else None
    return dataset, latent_cache, prompts


# -- optimiser, schedule, accelerate's preparation and resume --------------------------------------


def make_optimizer(args, tuning: Tuning, device: torch.device, num_processes: int):
    """(optimiser, learning-rate schedule), unprepared: AdamW (bitsandbytes' 8-bit with
    --use_8bit_adam), the text encoder's parameters in their own group with their own rate."""
    from diffusers.optimization import get_scheduler

    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise opts.OptionError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_class, extra = bnb.optim.AdamW8bit, {}
    else:
        optimizer_class, extra = torch.optim.AdamW, {"fused": device.type in ("cpu", "cuda")}
    params, text_params = tuning.params, tuning.text_params
    groups = [{"params": [p for p in params if id(p) not in text_params]}]
    if text_params:
        decay = args.adam_weight_decay if args.adam_weight_decay_text_encoder is None else args.adam_weight_decay_text_encoder
        groups.append({"params": [p for p in params if id(p) in text_params], "lr": args.text_encoder_lr or args.learning_rate,
                       "weight_decay": decay})
    optimizer = optimizer_class(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **extra)
    # The prepared scheduler steps once per process per optimiser step (diffusers does the same).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                                 num_training_steps=args.max_train_steps * num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    return optimizer, lr_scheduler


def prepare_training(args, base: Base, tuning: Tuning, dataset, latent_cache, prompts: list[str], accelerator, log_with,
                     events: EventLog, output_dir: Path) -> Training:
    """The optimiser and schedule made, everything that trains passed through accelerator.prepare,
    the trackers started and the checkpoint hooks registered."""
    optimizer, lr_scheduler = make_optimizer(args, tuning, accelerator.device, accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(base.pipe.unet, optimizer, lr_scheduler)
    # the text encoders whose LoRA trains, prepared like the U-Net (gradients synchronised across
    # processes); the pipeline keeps the plain ones
    texts = {name: accelerator.prepare(model) for name, model in conditioning.text_encoders(base.pipe).items()
             if any(id(p) in tuning.text_params for p in model.parameters())}
    trained = [unet, *texts.values()]
    encoders = conditioning.prompt_encoders(base.pipe, prompts, accelerator.device, max_length=args.tokenizer_max_length,
                                            use_attention_mask=args.text_encoder_use_attention_mask, trained=texts or None)
    if log_with:
        accelerator.init_trackers("restuning-dreambooth", config={k: v for k, v in vars(args).items()
                                                                  if isinstance(v, (int, float, str, bool))})
    accelerator.register_save_state_pre_hook(functools.partial(save_tuner_state, tuning.handle, accelerator.is_main_process))
    accelerator.register_load_state_pre_hook(functools.partial(load_tuner_state, tuning.handle))
    return Training(accelerator, args, events, output_dir, base, tuning, unet, trained, optimizer, lr_scheduler, dataset,
                    latent_cache, encoders, log_with, off_concept_text(args, base, tuning, accelerator.device, events))


def off_concept_text(args, base: Base, tuning: Tuning, device, events: EventLog) -> tuple | None:
    """The conditioning of prompts without and with the concept (conditioning.concept_prompts) when
    the method's off-concept loss is on (a Bypass's or Res-Tuning's), else None: (without: hidden
    states, without: SDXL's pooled embeddings or None, with: hidden states). Prompts without the
    concept never hold the identifier, so they are encoded once even when its embedding trains."""
    if not getattr(tuning.handle.config, "off_concept_loss", 0):
        return None
    off, on = conditioning.concept_prompts(base.pipe.tokenizer, args.instance_prompt, args.class_prompt,
                                           conditioning.OFF_CONCEPT_PROMPTS, args.seed)
    events.emit("info", message=f"off-concept loss: {len(off)} prompts without the concept (e.g. {off[1]!r}, {off[2]!r}) "
                                f"and {len(on)} with it (e.g. {on[0]!r})")

    def encoded(prompts):
        with torch.no_grad():
            return [encode() for encode in conditioning.prompt_encoders(
                base.pipe, prompts, device, max_length=args.tokenizer_max_length, use_attention_mask=args.text_encoder_use_attention_mask)]

    without, within = encoded(off), encoded(on)
    pooled = torch.cat([t.pooled for t in without]).to(base.weight_dtype) if without[0].pooled is not None else None
    return (torch.cat([t.hidden for t in without]).to(base.weight_dtype), pooled,
            torch.cat([t.hidden for t in within]).to(base.weight_dtype))


def save_tuner_state(handle, is_main: bool, models_, weights, folder) -> None:
    """accelerate's save-state hook: a checkpoint holds the method's weights only, not the frozen base again."""
    from safetensors.torch import save_file

    if is_main:
        state = {k: v.detach().to("cpu").contiguous() for k, v in handle.state_dict().items()}
        save_file(state, os.path.join(folder, TUNER_STATE))
    weights.clear()


def load_tuner_state(handle, models_, folder) -> None:
    """accelerate's load-state hook: the method's weights back, each in its parameter's device and dtype."""
    from safetensors.torch import load_file

    models_.clear()
    state = load_file(os.path.join(folder, TUNER_STATE))
    own = handle.state_dict()
    handle.load_state_dict({k: v.to(own[k].device, own[k].dtype) if k in own else v for k, v in state.items()})


def start_progress(training: Training, resume: Path | None) -> Progress:
    """Step 0, or the checkpoint's step with its weights, optimiser, schedule and RNG states loaded;
    a checkpoint of other options is refused with an OptionError."""
    args, events = training.args, training.events
    step = 0
    if resume is not None:
        fallback = training.output_dir if args.resume_from_checkpoint == "latest" else None
        try:
            resume = saved.load(training.accelerator, resume, fallback, lambda text: _note(events, text))
        except ValueError as exc:
            raise opts.OptionError(f"cannot resume: no checkpoint loads ({exc}); a checkpoint of other options (another "
                                   "method or sizes) fails like this: start a new run, or use the options it was saved with") from None
        step = saved.step_of(resume)
        events.emit("info", resumed_from=str(resume), step=step)
    elif args.resume_from_checkpoint:
        events.emit("info", message="no checkpoint to resume from yet; starting from step 0")
    return Progress(step=step, reporter=StepReporter(events, args.max_train_steps), bar=None, result=TrainResult(),
                    last_checkpoint=step)


# -- the loop --------------------------------------------------------------------------------------


def run_loop(training: Training, progress: Progress, stop: StopFlag) -> None:
    """Optimiser steps up to --max_train_steps; between them, losses read when due, checkpoints and
    validation samples. Stopping is agreed by all processes (a collective, so only every
    STOP_CHECK_STEPS steps with several), saves a checkpoint and raises Cancelled."""
    args, accelerator = training.args, training.accelerator
    training.events.phase("training", step=progress.step, total=args.max_train_steps)
    progress.bar = progress_bar(accelerator, args.max_train_steps, progress.step)
    for model in training.trained:
        model.train()
    while progress.step < args.max_train_steps:
        if (accelerator.num_processes == 1 or progress.step % STOP_CHECK_STEPS == 0) and stop.agreed(accelerator):
            read_losses(training, progress)
            if progress.step > progress.last_checkpoint:
                save_checkpoint(accelerator, training.output_dir, progress.step, args.checkpoints_total_limit, training.events)
            raise Cancelled
        started = time.perf_counter()
        step_loss = train_step(training, progress.step)
        progress.step += 1
        progress.pending.append(step_loss)
        progress.pending_seconds.append(time.perf_counter() - started)
        after_step(training, progress)


def progress_bar(accelerator, total: int, initial: int):
    """A progress bar for a person at a terminal only: the studio's runs log to a file, where
    carriage-return redraws would be noise (events.jsonl carries their progress)."""
    if not (accelerator.is_main_process and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)


def train_step(training: Training, step: int) -> torch.Tensor:
    """One optimiser step over --gradient_accumulation_steps micro-batches; returns the mean
    (loss, instance loss) over them, on the device. Batch positions and random draws depend on
    (step, micro-batch, process) only, so a resumed run repeats an uninterrupted one."""
    args, accelerator, base = training.args, training.accelerator, training.base
    rank, world, accum, bs = accelerator.process_index, accelerator.num_processes, args.gradient_accumulation_steps, args.train_batch_size
    vae = base.pipe.vae
    step_loss = torch.zeros(2, device=accelerator.device)
    for micro in range(accum):
        batch = training.dataset.batch(((step * accum + micro) * world + rank) * bs, bs)
        pixels = batch["pixel_values"]
        if training.latent_cache is not None:
            posterior = training.latent_cache.posterior(batch["views"], pixels, vae.dtype)
        else:
            with torch.no_grad():
                posterior = vae.encode(pixels.to(accelerator.device, vae.dtype)).latent_dist
        with accelerator.accumulate(*training.trained):
            embeddings, added = conditioning.unet_inputs(base.pipe, [encode() for encode in training.encoders], batch,
                                                         training.dataset, accelerator.device)
            off_generator = step_generator(args.seed + 1, step, micro, rank)
            with off_concept_energies(training, embeddings.shape[0], batch["num_instance"], off_generator) as energies:
                loss, instance_loss, _ = diffusion_loss(training.unet, posterior, vae.config.scaling_factor, base.noise_scheduler,
                                                        embeddings, batch["num_instance"], args,
                                                        step_generator(args.seed, step, micro, rank), base.weight_dtype, added,
                                                        off_concept_rows(training, off_generator))
            if energies:
                loss = loss + training.tuning.handle.config.off_concept_loss * torch.stack(energies).mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(training.tuning.params, args.max_grad_norm)
            training.optimizer.step()
            training.lr_scheduler.step()
            training.optimizer.zero_grad(set_to_none=True)
        step_loss += torch.stack([loss.detach(), instance_loss.detach()]).float() / accum
    return step_loss


@contextlib.contextmanager
def off_concept_energies(training: Training, rows: int, instances: int, generator: torch.Generator):
    """A Bypass's off-concept loss: restuning's off_concept around a step's U-Net call, `rows`
    prompts without the concept and `instances` with it, drawn by `generator` (its own: the step's
    noise and timesteps stay as they were); yields the energies to add to the loss (empty without
    the banks, and for every other method)."""
    if training.off_concept is None or training.tuning.handle.config.method != "bypass":
        yield []
        return
    from restuning.methods.bypass import off_concept

    off, _, on = training.off_concept
    pick_off = torch.randint(0, off.shape[0], (rows,), generator=generator).to(off.device)
    pick_on = torch.randint(0, on.shape[0], (instances,), generator=generator).to(on.device)
    with off_concept(off[pick_off], on[pick_on]) as energies:
        yield energies


def off_concept_rows(training: Training, generator: torch.Generator) -> OffConcept | None:
    """Res-Tuning's off-concept loss for one step (OffConcept): conditioning.OFF_CONCEPT_ROWS prompts without
    the concept drawn by `generator`, the frozen model being the same U-Net at strength 0."""
    if training.off_concept is None or training.tuning.handle.config.method != "res-tuning":
        return None
    import restuning

    off, pooled, _ = training.off_concept
    pick = torch.randint(0, off.shape[0], (conditioning.OFF_CONCEPT_ROWS,), generator=generator).to(off.device)
    unet, name = training.base.pipe.unet, training.tuning.handle.name

    def frozen(noisy, timesteps, embeddings, added):
        restuning.set_scale(unet, 0.0, name=name)
        try:
            extra = {"added_cond_kwargs": added} if added else {}
            return unet(noisy, timesteps, embeddings, **extra).sample
        finally:
            restuning.set_scale(unet, 1.0, name=name)

    return OffConcept(off[pick], pooled[pick] if pooled is not None else None, frozen, training.tuning.handle.config.off_concept_loss)


def after_step(training: Training, progress: Progress) -> None:
    """Losses read when a report, checkpoint or sample is due (or MAX_PENDING_STEPS wait, so a
    diverged run stops soon), then the checkpoint and the validation samples."""
    args, step = training.args, progress.step
    due_checkpoint = step % args.checkpointing_steps == 0 and step < args.max_train_steps
    due_sample = step % args.validation_steps == 0
    if (progress.reporter.due() or due_checkpoint or due_sample or step >= args.max_train_steps
            or len(progress.pending) >= MAX_PENDING_STEPS):
        read_losses(training, progress)
    if due_checkpoint:
        save_checkpoint(training.accelerator, training.output_dir, step, args.checkpoints_total_limit, training.events)
        progress.last_checkpoint = step
    if due_sample:
        validate(training, progress, step)


def read_losses(training: Training, progress: Progress) -> None:
    """The pending steps' losses off the device, into the result, the step events, the trackers and
    the bar; FloatingPointError on the first loss that is not finite."""
    if not progress.pending:
        return
    values = torch.stack(progress.pending).tolist()
    lr = training.lr_scheduler.get_last_lr()[0]
    first = progress.step - len(values) + 1
    for i, ((loss_value, instance_value), seconds) in enumerate(zip(values, progress.pending_seconds)):
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the loss became {loss_value} at step {first + i}")
        progress.result.losses.append(loss_value)
        progress.result.instance_losses.append(instance_value)
        extra = {"instance_loss": instance_value} if training.dataset.class_files else {}
        progress.reporter.update(first + i, loss_value, lr, seconds, hold=i < len(values) - 1, **extra)
        if training.log_with:
            training.accelerator.log({"loss": loss_value, "lr": lr, **extra}, step=first + i)
    if progress.bar is not None:
        progress.bar.update(len(values))
        progress.bar.set_postfix(loss=f"{values[-1][0]:.4f}", lr=f"{lr:.2e}", refresh=False)
    progress.pending.clear()
    progress.pending_seconds.clear()


def validate(training: Training, progress: Progress, at: int) -> None:
    """Validation samples at step `at` (main process, with --validation_prompt), each a `sample` event."""
    args, output_dir = training.args, training.output_dir
    if training.accelerator.is_main_process and args.validation_prompt:
        for item in sample_images(training.base.pipe, args.validation_prompt, args.num_validation_images, args.seed,
                                  training.base.sampling, args.resolution, output_dir / SAMPLES, at, training.accelerator.autocast):
            training.events.emit("sample", step=at, prompt=item["prompt"],
                                 paths=[str(p.relative_to(output_dir)) for p in item["paths"]])
    progress.last_sampled = at


# -- the end: artefacts ----------------------------------------------------------------------------


def save_and_export(training: Training, progress: Progress, options: opts.Options, method, source: models.ModelSource) -> None:
    """The last samples, the method's artefacts (all from its registry entry) and the model card,
    written once by the main process; every process then ends accelerate's run."""
    accelerator, output_dir, events, step = training.accelerator, training.output_dir, training.events, progress.step
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if training.args.validation_prompt and progress.last_sampled != step:
            validate(training, progress, step)
        events.phase("saving")
        pipe = training.base.pipe
        pipe.unet = accelerator.unwrap_model(training.unet)
        written = method.export(pipe, training.tuning.handle, output_dir)
        samples = sorted((output_dir / SAMPLES).glob(f"step{step:06d}-*.png")) if training.args.validation_prompt else []
        written.append(("model-card", artifacts.write_model_card(output_dir, options, method, source, step, samples, written)))
        for kind, path in written:
            events.emit("artifact", kind=kind, path=str(Path(path).relative_to(output_dir)))
        if progress.bar is not None:
            progress.bar.close()
        print(f"done: {step} steps; in {output_dir}: " + ", ".join(f"{Path(p).relative_to(output_dir)} ({kind})" for kind, p in written),
              flush=True)
        progress.result.artifacts = written
        events.phase("done", step=step, artifacts=[str(Path(p).relative_to(output_dir)) for _, p in written])
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _note(events: EventLog, text: str) -> None:
    """A line for the run's log (train.log) and its events (the studio's live view)."""
    print(text, flush=True)
    events.emit("info", message=text)


def hint_for(exc: BaseException) -> str | None:
    text = str(exc).lower()
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or "can't allocate memory" in text:
        return OOM_HINT
    if isinstance(exc, FloatingPointError):
        return "the loss diverged: lower --learning_rate, or use --mixed_precision bf16 instead of fp16"
    return None


def _run_dir(argv: list[str] | None) -> tuple[Path | None, Path | None]:
    """(where a run that failed before its options were understood should report: --output_dir,
    else the --config file's output_dir or folder; the --config file)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    found = {}
    for i, token in enumerate(argv):
        for name in ("--output_dir", "--config"):
            if token == name and i + 1 < len(argv):
                found[name] = argv[i + 1]
            elif token.startswith(name + "="):
                found[name] = token.split("=", 1)[1]
    config = Path(found["--config"]) if found.get("--config", "").strip() else None
    if "--output_dir" in found:
        return (Path(found["--output_dir"]) if found["--output_dir"].strip() else None), config
    if config is not None:
        try:
            values = opts.read_config(config)
            out = values.get("output_dir")
            return (Path(out) if isinstance(out, str) and out.strip() else config.parent), config
        except opts.OptionError:
            return (config.parent if config.parent.is_dir() else None), config
    return None, None


DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "file write failed")


def disk_full(exc: BaseException, output_dir: str | Path) -> bool:
    """A write that failed for lack of space: an OSError saying so, or what torch.save and
    safetensors raise instead (their own errors, naming it or not), with the disk now (nearly) full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(word in str(exc) for word in DISK_FULL_WORDS):
        return True
    try:
        return isinstance(exc, (OSError, RuntimeError)) and shutil.disk_usage(output_dir).free < (1 << 20)
    except OSError:
        return False


def _end(events: EventLog | None, phase: str, **fields) -> None:
    """The run's final event; with a full disk it may not be written, and the studio then shows
    the run as failed from its files alone (trainers.service.jobs)."""
    if events is None:
        return
    try:
        events.phase(phase, **fields)
    except OSError as exc:
        print(f"error: the run's final event ({phase}) could not be written: {exc.strerror or exc}", file=sys.stderr)


def _refused(argv, exc: opts.OptionError, is_main: bool) -> int:
    """Options refused before training: reported in the run folder's events only when that
    folder is a run this trainer (or the studio) made; never into a folder of someone else's files."""
    run_dir, config = _run_dir(argv)
    if run_dir is not None and opts.ANY_CONTROL.search(str(run_dir)):  # a name refused as it is: not made to report in
        run_dir = None
    allowed = {config.name} if config is not None and run_dir is not None and config.absolute().parent == run_dir.absolute() else set()
    if run_dir is not None and is_main and (not run_dir.exists() or opts.is_run_folder(run_dir, allowed)):
        try:  # a folder it creates, or one holding nothing but its --config file, is its own
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / opts.RUN_MARKERS[0]).touch()
        except OSError:  # the folder is what is wrong (the message says so): nowhere to log it
            pass
    if run_dir is not None and is_main and opts.owns(run_dir):
        _end(EventLog(run_dir), "failed", error=str(exc), hint="fix the option and start again")
    print(f"error: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    stop = StopFlag()
    stop.install()
    is_main = _is_main_process()
    events, output_dir = None, None
    try:
        try:
            options = opts.parse(argv)
            if is_main:
                opts.claim_output_dir(options.args)
        except opts.OptionError as exc:
            return _refused(argv, exc, is_main)
        output_dir = Path(options.args.output_dir)
        events = EventLog(output_dir, enabled=is_main)
        train(options, events, stop)
        return 0
    except Cancelled:
        kept = saved.newest(output_dir, note=lambda _: None) if output_dir else None
        _end(events, "cancelled", message=f"stopped on request; resume continues from {kept.name}" if kept else
             "stopped on request before any checkpoint was saved: there is nothing to resume, start the run again")
        print("cancelled", file=sys.stderr)
        return 0
    except (opts.OptionError, ImageError, models.ModelError) as exc:
        hint = (f"lower what it names, or set {memory.CHECK_ENV}=off to start it anyway"
                if isinstance(exc, memory.MemoryRefused) else "fix the input and start again")
        _end(events, "failed", error=str(exc), hint=hint)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - any failure must end as a `failed` event the studio can show
        if output_dir is not None and disk_full(exc, output_dir):
            return _out_of_disk(exc, output_dir, events)
        hint = hint_for(exc)
        if hint is None:
            traceback.print_exc()
        _end(events, "failed", error=f"{type(exc).__name__}: {exc}", hint=hint or "see the log (train.log) for the traceback")
        print(f"error: {exc}" + (f"\nhint: {hint}" if hint else ""), file=sys.stderr)
        return 1
    finally:
        stop.restore()


def _out_of_disk(exc: BaseException, output_dir: Path, events: EventLog | None) -> int:
    """The disk filled: what was being written is removed (nothing half-written stays), and the
    run ends failed, saying so and what to do."""
    removed = saved.remove_partial(output_dir)
    kept = saved.newest(output_dir, note=lambda _: None)
    error = "the disk is full: a file could not be written" + (f" ({len(removed)} half-written removed)" if removed else "")
    hint = ("free space (delete runs or files you no longer need), then resume: it continues from " + kept.name
            if kept else "free space (delete runs or files you no longer need), then start it again")
    _end(events, "failed", error=error, hint=hint)
    print(f"error: {error} ({type(exc).__name__}: {exc})\nhint: {hint}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
