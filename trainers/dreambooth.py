"""DreamBooth-style training of any registered method on a Stable Diffusion U-Net, on accelerate.

    python -m trainers.dreambooth --instance_data_dir dog/ --instance_prompt "a photo of sks dog" \\
        --method res-tuning --output_dir runs/dog
    accelerate launch -m trainers.dreambooth --config runs/dog/config.json      # what the studio runs

The recipe is diffusers' train_dreambooth_lora.py, shortened. With x_0 = s·VAE(image),
ε ~ N(0, I) (+ noise_offset·N(0, I) per channel), t ~ U{0, ..., T-1}:

    x_t    = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε
    target = ε  (epsilon)   or   v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x_0  (v_prediction), as the scheduler says
    loss   = E[w_t·|U-Net(x_t, t, c) - target|²]  +  prior_loss_weight · (the same on class images)
    w_t    = min(SNR_t, γ)/SNR_t  (÷(SNR_t+1) for v)  with --snr_gamma γ (min-SNR), else 1

Only the method's parameters train: `restuning.attach` freezes the rest (the paper's Eq. 7
Res-Tuners, Eq. 8 Bypass, or a baseline, whichever the registry entry attaches). The text
encoder is frozen, so the prompts' embeddings are computed once. Progress goes to
`<run>/events.jsonl` (trainers/events.py); SIGTERM saves a checkpoint and ends as `cancelled`.
"""

from __future__ import annotations

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

import torch
import torch.nn.functional as F

from . import artifacts, data, models
from . import options as opts
from .events import EventLog
from .images import ImageError, check_folder

CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
TUNER_STATE = "tuner_state.safetensors"
STEP_EVENT_INTERVAL = 0.5  # seconds: at most ~2 step events a second, always the first and last
DEFAULT_SAMPLING = {"num_inference_steps": 25, "guidance_scale": 7.5}
OOM_HINT = ("out of memory: try --method bypass (no gradient flows through the backbone), --gradient_checkpointing, "
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


# -- input checks, all before anything heavy ---------------------------------------------------


def _is_main_process() -> bool:
    # Before accelerate is set up, the launcher's environment says which process this is.
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def find_checkpoint(output_dir: Path, value: str | None) -> Path | None:
    """The checkpoint to resume from: None to start fresh (also 'latest' with none saved yet)."""
    if not value:
        return None
    if value == "latest":
        found = sorted(checkpoints(output_dir), key=_checkpoint_step)
        return found[-1] if found else None
    path = Path(value)
    if not (path.is_dir() and path.name.startswith("checkpoint-") and _checkpoint_step(path) >= 0):
        raise opts.OptionError(f"--resume_from_checkpoint {value}: not a checkpoint folder (checkpoint-<step>) or 'latest'")
    return path


def _checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def checkpoints(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS
    return [p for p in root.glob("checkpoint-*") if p.is_dir() and _checkpoint_step(p) >= 0] if root.is_dir() else []


def check_inputs(args) -> tuple[list[Path], models.ModelSource, Path | None]:
    """Instance images, base model and checkpoint, checked: ImageError/ModelError/OptionError."""
    instance_files = [info.path for info in check_folder(args.instance_data_dir)]
    source = models.check_source(args.pretrained_model_name_or_path)
    resume = find_checkpoint(Path(args.output_dir), args.resume_from_checkpoint)
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise opts.OptionError("--mixed_precision fp16 needs a CUDA GPU; on a CPU use bf16 or no")
    if args.class_data_dir and not args.with_prior_preservation:
        raise opts.OptionError("--class_data_dir is only used with --with_prior_preservation")
    return instance_files, source, resume


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


@torch.no_grad()
def encode_prompt(pipe, prompt: str, device) -> torch.Tensor:
    tokens = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    return pipe.text_encoder(tokens.input_ids.to(device))[0]


def diffusion_loss(unet, vae, noise_scheduler, pixel_values, embeddings, num_instance: int, args,
                   generator: torch.Generator, weight_dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(total loss, instance loss, prior loss or None) of one batch; every random draw comes from `generator`."""
    device = pixel_values.device
    with torch.no_grad():
        latents = vae.encode(pixel_values.to(weight_dtype)).latent_dist.sample(generator=generator)
        latents = (latents * vae.config.scaling_factor).float()
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator).to(device)
    if args.noise_offset:
        noise = noise + args.noise_offset * torch.randn((b, c, 1, 1), generator=generator).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = noise_scheduler.config.prediction_type
    target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    model_pred = unet(noisy.to(weight_dtype), timesteps, embeddings.to(weight_dtype)).sample
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if args.snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=args.snr_gamma) / (snr + 1 if prediction == "v_prediction" else snr)
        per_sample = per_sample * weights
    instance = per_sample[:num_instance].mean()
    if num_instance == b:
        return instance, instance, None
    prior = per_sample[num_instance:].mean()
    return instance + args.prior_loss_weight * prior, instance, prior


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

    def update(self, step: int, loss: float, lr: float, seconds: float, **extra) -> None:
        self.pending.append(loss)
        self.durations = (self.durations + [seconds])[-20:]
        now = time.monotonic()
        if self.first or step >= self.total or now - self.last_emit >= self.interval:
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
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if limit is not None:
            for old in sorted(checkpoints(output_dir), key=_checkpoint_step)[:-limit]:
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


# -- the run ---------------------------------------------------------------------------------------


def train(options: opts.Options, events: EventLog, stop: StopFlag, on_attached=None) -> TrainResult:
    """One run. `on_attached(pipe, handle)`, if given, is called once the method is attached and
    before training starts (tests use it to see the starting weights)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from safetensors.torch import load_file, save_file

    import restuning
    from restuning.methods import METHODS

    args, method_config = options.args, options.method_config
    method = METHODS[method_config.method]
    output_dir = Path(args.output_dir)
    instance_files, source, resume = check_inputs(args)

    try:
        accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                                  mixed_precision=args.mixed_precision,
                                  project_config=ProjectConfiguration(project_dir=str(output_dir)))
    except ValueError as exc:
        raise opts.OptionError(f"accelerate refused the setup: {exc}") from None
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # Otherwise each process would train alone and all would write the same run folder.
        raise opts.OptionError(
            f"launched as {launched} processes but accelerate set up {accelerator.num_processes}: "
            "without GPUs, set ACCELERATE_USE_CPU=1 (or choose the CPU in `accelerate config`)")
    events.enabled = accelerator.is_main_process
    set_seed(args.seed)
    result = TrainResult()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # 1. the base model
    events.phase("loading", message=f"loading {source.location}")
    pipe = models.load_pipeline(source)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(accelerator.device)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise models.ModelError(f"the scheduler predicts {noise_scheduler.config.prediction_type!r}; "
                                "only epsilon and v_prediction models are supported")
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    sampling = sampling_settings(args, source)
    if stop.agreed(accelerator):
        raise Cancelled

    # 2. class images for prior preservation, generated by the untouched base model
    class_files = None
    if args.with_prior_preservation:
        class_dir = Path(args.class_data_dir) if args.class_data_dir else data.class_cache_dir(
            output_dir.resolve().parent, source.key(), args.class_prompt, args.resolution)
        if accelerator.is_main_process:
            events.phase("class-images", message=f"{args.num_class_images} class images in {class_dir}")
            data.ensure_class_images(
                pipe, class_dir, args.class_prompt, args.num_class_images, args.resolution, args.seed, batch_size=4,
                progress=lambda done, total: events.phase("class-images", done=done, total=total), should_stop=stop.event.is_set,
                **sampling)
        accelerator.wait_for_everyone()
        if stop.agreed(accelerator):
            raise Cancelled
        class_files = data.usable_images(class_dir)[: args.num_class_images]
        if len(class_files) < args.num_class_images:
            raise ImageError(f"only {len(class_files)} of {args.num_class_images} class images could be made in {class_dir}")

    # 3. the method, from the registry: attention first (xformers would replace prefix/prompt processors)
    attention = choose_attention(unet, args.enable_xformers_memory_efficient_attention)
    if accelerator.is_main_process:
        print(f"attention: {attention}", flush=True)
    handle = restuning.attach(unet, method_config)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    # Frozen weights in the compute dtype; trainable ones back to fp32 (fp16 gradients cannot be unscaled).
    if weight_dtype != torch.float32:
        for module in (unet, vae, text_encoder):
            module.to(dtype=weight_dtype)
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in handle.parameters() if p.requires_grad]
    if on_attached is not None:
        on_attached(pipe, handle)
    trainable = sum(p.numel() for p in params)
    events.emit("info", method=method.name, method_config=method_config.to_dict(), trainable_params=trainable,
                total_params=sum(p.numel() for p in unet.parameters()), device=str(accelerator.device),
                num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision,
                attention=attention, prediction_type=noise_scheduler.config.prediction_type, sampling=sampling)

    # 4. prompts: the text encoder is frozen, so each prompt's embedding is computed once
    limit = pipe.tokenizer.model_max_length
    for prompt in filter(None, [args.instance_prompt, args.class_prompt if class_files else None]):
        if len(pipe.tokenizer(prompt).input_ids) > limit:
            events.emit("info", message=f"the prompt {prompt!r} is longer than the text encoder's {limit} tokens; its end is cut")
    instance_emb = encode_prompt(pipe, args.instance_prompt, accelerator.device)
    class_emb = encode_prompt(pipe, args.class_prompt, accelerator.device) if class_files else None
    dataset = data.DreamBoothData(instance_files, class_files, args.resolution, args.center_crop, args.random_flip, args.seed)

    # 5. optimiser and schedule
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise opts.OptionError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_class, extra = bnb.optim.AdamW8bit, {}
    else:
        optimizer_class, extra = torch.optim.AdamW, {"fused": accelerator.device.type in ("cpu", "cuda")}
    optimizer = optimizer_class(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **extra)
    # The prepared scheduler steps once per process per optimiser step (diffusers does the same).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    # Checkpoints hold the method's weights only, not the frozen base again.
    def save_hook(models_, weights, folder):
        if accelerator.is_main_process:
            state = {k: v.detach().to("cpu").contiguous() for k, v in handle.state_dict().items()}
            save_file(state, os.path.join(folder, TUNER_STATE))
        weights.clear()

    def load_hook(models_, folder):
        models_.clear()
        state = load_file(os.path.join(folder, TUNER_STATE))
        own = handle.state_dict()
        handle.load_state_dict({k: v.to(own[k].device, own[k].dtype) if k in own else v for k, v in state.items()})

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    step = 0
    if resume is not None:
        try:
            accelerator.load_state(str(resume))
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise opts.OptionError(f"cannot resume from {resume}: it does not fit this run's method and options "
                                   f"({str(exc).splitlines()[0]}); start a new run or use the options it was saved with") from None
        step = _checkpoint_step(resume)
        events.emit("info", resumed_from=str(resume), step=step)
    elif args.resume_from_checkpoint:
        events.emit("info", message="no checkpoint to resume from yet; starting from step 0")
    last_checkpoint = step

    # 6. the loop
    events.phase("training", step=step, total=args.max_train_steps)
    reporter = StepReporter(events, args.max_train_steps)
    rank, world, accum, bs = accelerator.process_index, accelerator.num_processes, args.gradient_accumulation_steps, args.train_batch_size
    last_sampled = -1

    def validate(at: int) -> None:
        nonlocal last_sampled
        if accelerator.is_main_process and args.validation_prompt:
            for item in sample_images(pipe, args.validation_prompt, args.num_validation_images, args.seed, sampling,
                                      args.resolution, output_dir / SAMPLES, at, accelerator.autocast):
                events.emit("sample", step=at, prompt=item["prompt"], paths=[str(p.relative_to(output_dir)) for p in item["paths"]])
        last_sampled = at

    unet.train()
    while step < args.max_train_steps:
        if stop.agreed(accelerator):
            if step > last_checkpoint:
                save_checkpoint(accelerator, output_dir, step, args.checkpoints_total_limit, events)
            raise Cancelled
        started = time.perf_counter()
        losses, instance_losses = [], []
        for micro in range(accum):
            batch = dataset.batch(((step * accum + micro) * world + rank) * bs, bs)
            pixels = batch["pixel_values"].to(accelerator.device)
            embeddings = torch.cat([instance_emb.expand(bs, -1, -1)] + ([class_emb.expand(bs, -1, -1)] if class_files else []))
            with accelerator.accumulate(unet):
                loss, instance_loss, _ = diffusion_loss(unet, vae, noise_scheduler, pixels, embeddings, batch["num_instance"],
                                                        args, step_generator(args.seed, step, micro, rank), weight_dtype)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            instance_losses.append(instance_loss.item())
        step += 1
        loss_value = sum(losses) / accum
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the loss became {loss_value} at step {step}")
        result.losses.append(loss_value)
        result.instance_losses.append(sum(instance_losses) / accum)
        extra = {"instance_loss": result.instance_losses[-1]} if class_files else {}
        reporter.update(step, loss_value, lr_scheduler.get_last_lr()[0], time.perf_counter() - started, **extra)
        if step % args.checkpointing_steps == 0 and step < args.max_train_steps:
            save_checkpoint(accelerator, output_dir, step, args.checkpoints_total_limit, events)
            last_checkpoint = step
        if step % args.validation_steps == 0:
            validate(step)
    result.step = step
    result.pipeline, result.handle = pipe, handle

    # 7. artefacts, written once by the main process, all from the registry entry
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if args.validation_prompt and last_sampled != step:
            validate(step)
        events.phase("saving")
        pipe.unet = accelerator.unwrap_model(unet)
        written = method.export(pipe, handle, output_dir)
        samples = sorted((output_dir / SAMPLES).glob(f"step{step:06d}-*.png")) if args.validation_prompt else []
        written.append(("model-card", artifacts.write_model_card(output_dir, options, method, source, step, samples, written)))
        for kind, path in written:
            events.emit("artifact", kind=kind, path=str(Path(path).relative_to(output_dir)))
        result.artifacts = written
        events.phase("done", step=step, artifacts=[str(Path(p).relative_to(output_dir)) for _, p in written])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def hint_for(exc: BaseException) -> str | None:
    text = str(exc).lower()
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or "can't allocate memory" in text:
        return OOM_HINT
    if isinstance(exc, FloatingPointError):
        return "the loss diverged: lower --learning_rate, or use --mixed_precision bf16 instead of fp16"
    return None


def _run_dir(argv: list[str] | None) -> Path | None:
    """Where a run that failed before its options were understood should report: --output_dir,
    else the --config file's output_dir or folder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    found = {}
    for i, token in enumerate(argv):
        for name in ("--output_dir", "--config"):
            if token == name and i + 1 < len(argv):
                found[name] = argv[i + 1]
            elif token.startswith(name + "="):
                found[name] = token.split("=", 1)[1]
    if "--output_dir" in found:
        return Path(found["--output_dir"])
    if "--config" in found:
        try:
            config = opts.read_config(Path(found["--config"]))
            return Path(config["output_dir"]) if isinstance(config.get("output_dir"), str) else Path(found["--config"]).parent
        except opts.OptionError:
            return Path(found["--config"]).parent if Path(found["--config"]).parent.is_dir() else None
    return None


def main(argv: list[str] | None = None) -> int:
    stop = StopFlag()
    stop.install()
    is_main = _is_main_process()
    events = None
    try:
        try:
            options = opts.parse(argv)
        except opts.OptionError as exc:
            run_dir = _run_dir(argv)
            if run_dir is not None and is_main:
                try:
                    EventLog(run_dir).phase("failed", error=str(exc), hint="fix the option and start again")
                except OSError:  # the folder is what is wrong (the message says so): nowhere to log it
                    pass
            print(f"error: {exc}", file=sys.stderr)
            return 2
        events = EventLog(options.args.output_dir, enabled=is_main)
        train(options, events, stop)
        return 0
    except Cancelled:
        events.phase("cancelled", message="stopped on request; resume with --resume_from_checkpoint latest")
        print("cancelled", file=sys.stderr)
        return 0
    except (opts.OptionError, ImageError, models.ModelError) as exc:
        events.phase("failed", error=str(exc), hint="fix the input and start again")
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - any failure must end as a `failed` event the studio can show
        hint = hint_for(exc)
        if hint is None:
            traceback.print_exc()
        events.phase("failed", error=f"{type(exc).__name__}: {exc}", hint=hint or "see the log (train.log) for the traceback")
        print(f"error: {exc}" + (f"\nhint: {hint}" if hint else ""), file=sys.stderr)
        return 1
    finally:
        stop.restore()


if __name__ == "__main__":
    sys.exit(main())
