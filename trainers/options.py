"""The trainer's options: diffusers' DreamBooth names, plus --method and each method's own options
generated from its config dataclass in the registry (`restuning.methods.METHODS`).

    options = parse(["--instance_data_dir", "dog", "--instance_prompt", "a photo of sks dog",
                     "--method", "res-tuning", "--tuners", "attn1=adapter,ff=adapter", "--dim", "10"])
    options = parse(["--config", "runs/x/config.json"])    # what the studio writes; flags still override
    options = from_dict({...})                              # the same checks, for a caller holding a dict
    options.args            # argparse.Namespace of the common options
    options.method_config   # the method's validated config (a restuning.MethodConfig)

A config file is one JSON object whose keys are the options' names without dashes (method options
too, at the top level), with JSON values: {"method": "res-tuning", "tuners": {"ff": "adapter"},
"blocks": ["mid", "up"], "max_train_steps": 400, ...}. Every check here is cheap (no model is
loaded), so bad input is refused before any heavy work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from restuning.config import MethodConfig
from restuning.methods import METHODS
from restuning.methods.lora.config import TEXT_ENCODER_ATTENTION

from .models import config_folder

DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo-model"
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DEFAULT_METHOD = "res-tuning"
DEFAULT_STEPS = 400
# What no run needs, and what would take the machine down: a 24 GB card trains SD v1.5 at 512 px
# with a batch of a few; the bounds leave room for bigger cards, not for 1e6.
UPPER = {"resolution": 2048, "train_batch_size": 64, "gradient_accumulation_steps": 1024, "max_train_steps": 1_000_000,
         "num_validation_images": 16, "num_class_images": 10_000, "num_inference_steps": 1000, "validation_prompts": 16,
         "sample_batch_size": 64, "method_size": 4096}
# Every number the parser takes, bounded: name -> (lowest, highest, whether the lowest is allowed).
# A prompt is cut at the text encoder's 77 tokens (about 300 characters) anyway; the text bound
# keeps a pasted book out of config.json, the model card and every visitor's page.
MAX_PROMPT_CHARS = 1000
MAX_OPTION_CHARS = 1000  # other free text: a method's layer names, paths
# Control characters (C0, DEL and C1, whose 0x9b opens an escape sequence too) in a value would
# reach the terminal through every message and log line that echoes it. A prompt may hold tabs and
# newlines; no other text option (a path, a name, a layer list) holds any.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
PROMPTS = ("instance_prompt", "class_prompt", "validation_prompt")
STEPS = 1_000_000
BOUNDS = {
    "num_class_images": (1, UPPER["num_class_images"], True), "sample_batch_size": (1, UPPER["sample_batch_size"], True),
    "prior_loss_weight": (0, 1000, False), "seed": (0, 2**32 - 1, True), "resolution": (64, UPPER["resolution"], True),
    "train_batch_size": (1, UPPER["train_batch_size"], True),
    "gradient_accumulation_steps": (1, UPPER["gradient_accumulation_steps"], True),
    "max_train_steps": (1, UPPER["max_train_steps"], True), "learning_rate": (0, 10, False),
    "lr_warmup_steps": (0, STEPS, True), "adam_beta1": (0, 0.999999, True), "adam_beta2": (0, 0.999999, True),
    "adam_weight_decay": (0, 10, True), "adam_epsilon": (0, 1, False), "max_grad_norm": (0, 1e6, False),
    "snr_gamma": (0, 1000, False), "noise_offset": (0, 10, True),
    "num_validation_images": (1, UPPER["num_validation_images"], True), "validation_steps": (1, STEPS, True),
    "num_inference_steps": (1, UPPER["num_inference_steps"], True), "guidance_scale": (0, 100, True),
    "checkpointing_steps": (1, STEPS, True), "checkpoints_total_limit": (1, 1000, True),
    "num_train_epochs": (1, 100_000, True), "validation_epochs": (1, 100_000, True), "lr_num_cycles": (1, 1000, True),
    "lr_power": (0, 100, False), "tokenizer_max_length": (1, 1024, True), "text_encoder_lr": (0, 10, False),
    "dataloader_num_workers": (0, 1024, True), "local_rank": (-1, 1024, True),
    "adam_weight_decay_text_encoder": (0, 10, True), "repeats": (1, 10_000, True),
}


# Option values a user asks for by name (--recipe); options given too win. "paper": the paper's
# generative setting (Table 11: batch 8, CenterCrop and RandomHorizontalFlip, AdamW at 1e-4 constant,
# 512 px, guidance 3.0 when sampling), where the defaults are diffusers' DreamBooth ones.
NAMED_RECIPES = {
    "paper": {"train_batch_size": 8, "center_crop": True, "random_flip": True, "learning_rate": 1e-4, "lr_scheduler": "constant",
              "resolution": 512, "guidance_scale": 3.0},
}


class OptionError(ValueError):
    """An option value that cannot work; the message names the option."""


@dataclass
class Options:
    args: argparse.Namespace
    method_config: MethodConfig
    # Options the user left unset and a recipe filled in: name -> where the value came from.
    recipe: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """Every option as JSON-able values: what `from_dict` reads back (and what a config file holds)."""
        out = {k: v for k, v in vars(self.args).items() if k != "config"}
        out.update({k: v for k, v in self.method_config.to_dict().items() if k != "method"})
        return out


def _common(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--config", help="a JSON file of options (keys: the option names without dashes); flags given too override it")
    a("--method", default=DEFAULT_METHOD, help=f"how the U-Net is tuned: {', '.join(METHODS)}")
    a("--recipe", choices=tuple(NAMED_RECIPES), help="a named set of options, for those not given: 'paper', the paper's Table 11 "
      "(--train_batch_size 8 --center_crop --random_flip --learning_rate 1e-4 --lr_scheduler constant --resolution 512 "
      "--guidance_scale 3.0)")
    a("--pretrained_model_name_or_path", default=str(DEMO_MODEL),
      help="base model: a hub id, a local diffusers folder, or a single-file .safetensors checkpoint (default: the bundled demo model)")
    a("--instance_data_dir", help="folder of instance images (PNG, JPEG or WebP)")
    a("--instance_prompt", help="prompt naming the concept, e.g. 'a photo of sks dog'")
    a("--class_prompt", help="prompt of the concept's class, e.g. 'a photo of dog' (prior preservation)")
    a("--class_data_dir", help="folder of class images; default: a cache in the runs folder, keyed by base model, class prompt and resolution")
    a("--with_prior_preservation", action=argparse.BooleanOptionalAction, default=False,
      help="add the prior-preservation loss on class images generated by the base model")
    a("--num_class_images", type=int, default=100, help="class images for prior preservation (generated if fewer exist)")
    a("--sample_batch_size", type=int, default=4, help="images per pipeline call when generating class images")
    a("--prior_loss_weight", type=float, default=1.0, help="weight of the prior-preservation loss")
    a("--output_dir", help="the run folder: events.jsonl, samples/, checkpoints/, the weights and the model card "
                           "(default: the --config file's folder, else '<method>-dreambooth-model'); a folder this "
                           "trainer creates, or one it made before (to resume); an existing folder of other files "
                           "only with --overwrite_output_dir")
    a("--overwrite_output_dir", action="store_true",
      help="write into an existing --output_dir that this trainer did not make (files of the same names are replaced)")
    a("--seed", type=int, default=0, help="seed of data order, crops, noise and validation images")
    a("--resolution", type=int,
      help="training resolution in pixels, a multiple of 8 (default: the base model's own, its U-Net's sample size x the "
           "VAE's factor: 512 for SD 1.5, 768 for SD 2.1, 1024 for SDXL; 512 where its configs cannot be read offline)")
    a("--center_crop", action=argparse.BooleanOptionalAction, default=False, help="center-crop images (default: random crops)")
    a("--random_flip", action=argparse.BooleanOptionalAction, default=False, help="mirror images at random")
    a("--cache_latents", action=argparse.BooleanOptionalAction, default=True,
      help="encode each distinct view (image, crop, flip) with the VAE once and keep its posterior; "
           "each step still draws a fresh latent from it, so training is the same, only faster")
    a("--train_batch_size", type=int, default=1, help="instance images per step and process")
    a("--gradient_accumulation_steps", type=int, default=1, help="batches accumulated into one optimiser step")
    a("--max_train_steps", type=int, help="optimiser steps to train (default: from --num_train_epochs if given, else 400)")
    a("--learning_rate", type=float,
      help="peak learning rate (default: the method's recipe: the base model folder's demo_settings.json if it has one, "
           "else the registry's, e.g. 1e-4 for the tuners as in the paper, 5e-6 for full fine-tuning)")
    a("--lr_scheduler", choices=LR_SCHEDULERS, help="learning-rate schedule (diffusers.optimization; default: the method's "
      "recipe, else constant)")
    a("--lr_warmup_steps", type=int, help="warm-up steps of the schedule (default: the method's recipe, else 0)")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    a("--snr_gamma", type=float, help="min-SNR loss weighting with this gamma (5.0 is the usual value); off by default")
    a("--noise_offset", type=float, default=0.0, help="offset noise scale (e.g. 0.05 helps very dark or bright images)")
    a("--mixed_precision", choices=("no", "fp16", "bf16"),
      help="mixed precision; trainable weights stay fp32 (default: accelerate's configuration, else no)")
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
      help="recompute activations in the backward pass: less memory, slower steps")
    a("--use_8bit_adam", action=argparse.BooleanOptionalAction, default=False, help="8-bit AdamW from bitsandbytes")
    a("--enable_xformers_memory_efficient_attention", action=argparse.BooleanOptionalAction, default=False,
      help="xformers attention when CUDA and xformers work; otherwise PyTorch SDPA is used (and said)")
    a("--validation_prompt", nargs="+", help="prompt(s) sampled every --validation_steps into <run>/samples/")
    a("--num_validation_images", type=int, default=4, help="images per validation prompt")
    a("--validation_steps", type=int, default=100, help="steps between validation samples")
    a("--num_inference_steps", type=int,
      help="sampling steps for validation and class images (default: the model's demo_settings.json, else 25)")
    a("--guidance_scale", type=float, help="classifier-free guidance for validation and class images (default: demo_settings.json, else 7.5)")
    a("--checkpointing_steps", type=int,
      help="steps between resumable checkpoints (accelerate state); default: a quarter of --max_train_steps, at most 500")
    a("--checkpoints_total_limit", type=int, help="keep only the newest N checkpoints")
    a("--resume_from_checkpoint", help="'latest' or a checkpoint folder to continue from")


COMPAT_GROUP = "diffusers script options"
# torchvision's InterpolationMode names, lower-case, as diffusers' train_dreambooth_lora.py offers them (trainers.images
# resizes with PIL's filter of the same name, as torchvision does for PIL images; nearest_exact is PIL's nearest).
INTERPOLATION_MODES = ("nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
# Options of diffusers' train_dreambooth.py / train_dreambooth_lora.py that this trainer accepts
# so their command lines run, without acting on them; the reason is printed when one is given.
IGNORED = {
    "push_to_hub": "nothing is uploaded (the trainer makes no network calls): upload the run folder with "
                   "`huggingface-cli upload <repo> <output_dir>`",
    "hub_token": "nothing is uploaded (see --push_to_hub)",
    "hub_model_id": "nothing is uploaded (see --push_to_hub)",
    "dataloader_num_workers": "each image is decoded once and its VAE latents are cached: there is no data loader to parallelise",
    "pre_compute_text_embeddings": "always so while the text encoder is frozen: each prompt is encoded once "
                                   "(every step when it trains, --train_text_encoder)",
    "local_rank": "accelerate reads each process's rank from the launcher's environment",
    "set_grads_to_none": "always so",
    "skip_save_text_encoder": "the text encoder is never saved whole: a LoRA's text-encoder layers are part of its LoRA files",
    "validation_scheduler": "validation samples use the base model's own scheduler",
    # train_dreambooth_lora_sdxl.py's
    "output_kohya_format": "a LoRA run always writes kohya's format too (lora_kohya.safetensors; on SDXL with kohya's own "
                           "SGM block names) beside diffusers' pytorch_lora_weights.safetensors",
    "cache_dir": "models are read from the hub's own cache (HF_HOME / HF_HUB_CACHE); nothing else is downloaded",
}
# Options that would change what is trained in ways this trainer does not do: refused, with why.
REFUSED = {
    "tokenizer_name": "the tokenizer is the base model's own; a different one would not match its text encoder",
    "validation_images": "it is for image-conditioned pipelines (image variation, super-resolution); this trainer is text-to-image",
    "class_labels_conditioning": "it is for U-Nets with class-label conditioning (DeepFloyd IF's upscaler); SD U-Nets have none",
    # train_dreambooth_lora_sdxl.py's
    "do_edm_style_training": "the EDM formulation (Karras et al.'s preconditioning and sigma sampling, Playground v2.5) is "
                             "not implemented: the trainer follows the scheduler's DDPM epsilon or v objective",
    "use_dora": "a restuning LoRA is a plain LoRA (peft's use_dora is not exposed); DoRA files are not imported either",
    "dataset_name": "instance images come from --instance_data_dir; no dataset is downloaded",
    "dataset_config_name": "instance images come from --instance_data_dir; no dataset is downloaded",
    "image_column": "instance images come from --instance_data_dir; no dataset is downloaded",
    "caption_column": "every instance image has the one --instance_prompt (no per-image captions)",
    "prodigy_beta3": "only for --optimizer prodigy, which is refused",
    "prodigy_decouple": "only for --optimizer prodigy, which is refused",
    "prodigy_use_bias_correction": "only for --optimizer prodigy, which is refused",
    "prodigy_safeguard_warmup": "only for --optimizer prodigy, which is refused",
}
# Options refused only at values other than the one the trainer has: (the value it has, why).
REFUSED_VALUES = {
    "optimizer": ("adamw", "Prodigy (prodigyopt) is not a dependency here; AdamW (or --use_8bit_adam) is used"),
}
REPORT_TO = ("none", "tensorboard", "wandb", "comet_ml", "all")


def _compat(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(COMPAT_GROUP, "the rest of diffusers' DreamBooth options, so their command lines run")
    a = group.add_argument
    a("--revision", help="hub revision (branch, tag or commit) of the base model")
    a("--variant", help="weight variant of the base model's files, e.g. fp16")
    a("--num_train_epochs", type=int,
      help="epochs to train when --max_train_steps is not given (an epoch: every instance image, or class image if more, once)")
    a("--validation_epochs", type=int, help="epochs between validation samples (instead of --validation_steps)")
    a("--scale_lr", action="store_true", help="multiply the learning rate by batch size x accumulation steps x processes")
    a("--lr_num_cycles", type=int, default=1, help="hard restarts of the cosine_with_restarts schedule")
    a("--lr_power", type=float, default=1.0, help="power of the polynomial schedule")
    a("--prior_generation_precision", choices=("no", "fp32", "fp16", "bf16"),
      help="precision of class-image generation (default: the run's; fp16 needs a GPU)")
    a("--report_to", default="none", choices=REPORT_TO,
      help="trackers for the loss and learning rate, through accelerate (tensorboard writes to <output_dir>/<logging_dir>)")
    a("--logging_dir", default="logs", help="the trackers' folder inside the run folder (one that resolves outside is refused)")
    a("--allow_tf32", action="store_true", help="TF32 matrix products on Ampere or newer GPUs (faster, slightly less exact)")
    a("--tokenizer_max_length", type=int, help="cut prompts at this many tokens (default: the tokenizer's own maximum; at most "
      "the text encoder's positions)")
    a("--image_interpolation_mode", default="lanczos", choices=INTERPOLATION_MODES,
      help="how images are resized to --resolution (torchvision's modes, as diffusers' train_dreambooth_lora.py names them)")
    a("--text_encoder_use_attention_mask", action="store_true", help="pass the padding mask to the text encoder")
    a("--offset_noise", action="store_true", help="diffusers' switch for offset noise: --noise_offset 0.1 unless one is given")
    a("--train_text_encoder", action="store_true",
      help=f"LoRA only: LoRA on the text encoder's attention projections too ({TEXT_ENCODER_ATTENTION}), trained with the "
           "U-Net's, as diffusers' train_dreambooth_lora.py does (the lora option --text_encoder names other layers)")
    a("--text_encoder_lr", type=float,
      help="learning rate of what trains in the text encoder: a LoRA's layers, Res-Tuning's identifier embedding (default: "
           "the method's recipe, else --learning_rate, one rate for both as in diffusers' train_dreambooth_lora.py; its SDXL "
           "and Flux scripts name this option)")
    for name in ("push_to_hub", "pre_compute_text_embeddings", "set_grads_to_none", "skip_save_text_encoder"):
        a(f"--{name}", action="store_true", help=f"accepted for diffusers' command lines: {IGNORED.get(name) or 'refused: ' + REFUSED[name]}")
    for name, kind in (("hub_token", str), ("hub_model_id", str), ("dataloader_num_workers", int), ("local_rank", int),
                       ("validation_scheduler", str), ("tokenizer_name", str), ("class_labels_conditioning", str)):
        a(f"--{name}", type=kind, help=f"accepted for diffusers' command lines: {IGNORED.get(name) or 'refused: ' + REFUSED[name]}")
    a("--validation_images", nargs="+", help=f"refused: {REFUSED['validation_images']}")
    _compat_sdxl(group)


def _compat_sdxl(group) -> None:
    """train_dreambooth_lora_sdxl.py's options beyond train_dreambooth_lora.py's (and --prediction_type,
    train_text_to_image.py's), each acted on, accepted with a note (IGNORED) or refused by name."""
    a = group.add_argument
    a("--pretrained_vae_model_name_or_path",
      help="a VAE to use instead of the base model's (a diffusers folder or a hub id of an AutoencoderKL, e.g. an SDXL "
           "VAE that is stable in fp16); the base model's VAE otherwise, kept in fp32 where its config asks (SDXL's)")
    a("--prediction_type", choices=("epsilon", "v_prediction"),
      help="what the U-Net predicts, overriding the scheduler's config (an SD 2.x single file's is found from its weights)")
    a("--adam_weight_decay_text_encoder", type=float, help="weight decay of the text encoders' LoRA (default: --adam_weight_decay)")
    a("--repeats", type=int, default=1, help="how many times each instance image counts in an epoch (--num_train_epochs)")
    a("--optimizer", type=str.lower, default=None, help=f"AdamW only: {REFUSED_VALUES['optimizer'][1]}")
    for name in ("output_kohya_format", "do_edm_style_training", "use_dora"):
        a(f"--{name}", action="store_true", help=f"accepted for diffusers' command lines: {IGNORED.get(name) or 'refused: ' + REFUSED[name]}")
    for name in ("cache_dir", "dataset_name", "dataset_config_name", "image_column", "caption_column", "prodigy_beta3",
                 "prodigy_decouple", "prodigy_use_bias_correction", "prodigy_safeguard_warmup"):
        a(f"--{name}", help=f"accepted for diffusers' command lines: {IGNORED.get(name) or 'refused: ' + REFUSED[name]}")


def compat_notes(args: argparse.Namespace) -> list[str]:
    """One line per accepted-but-ignored option that was given."""
    return [f"--{name} is not used: {why}" for name, why in IGNORED.items() if _given(getattr(args, name, None))]


def _given(value) -> bool:
    return value is not None and value is not False  # 0 is a value given (--local_rank 0)


def _world_size() -> int:
    """Processes of the run, as the launcher (accelerate, torchrun) announces them before it starts."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def steps_per_epoch(args: argparse.Namespace) -> int:
    """diffusers' count: batches of the larger of the instance (x --repeats) and class sets, per process, per optimiser step."""
    from .images import image_files

    folder = Path(args.instance_data_dir or "")
    examples = (len(image_files(folder)) if folder.is_dir() else 0) * max(1, args.repeats)
    if args.with_prior_preservation:
        examples = max(examples, args.num_class_images)
    world = _world_size()
    batches = math.ceil(max(examples, 1) / args.train_batch_size)
    return max(1, math.ceil(batches / world / args.gradient_accumulation_steps))


def _field_type(cls: type, name: str) -> str:
    return str(typing.get_type_hints(cls)[name])


def method_fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Option name -> [(method, field)] for every method config field in the registry."""
    out: dict[str, list] = {}
    for method in METHODS.values():
        for f in dataclasses.fields(method.config):
            out.setdefault(f.name, []).append((method.name, f))
    return out


def _show(value) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def method_option_help(name: str, owners: list[tuple[str, dataclasses.Field]]) -> str:
    parts = []
    for method, f in owners:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = f.metadata.get("choices")
        extra = f"; from {', '.join(map(str, choices))}" if choices else ""
        parts.append(f"[{method}] {f.metadata.get('help', '')} (default {_show(default)}{extra})")
    return " ".join(parts)


class _Parser(argparse.ArgumentParser):
    # Malformed flags become an OptionError like every other bad value, so the caller can log a
    # `failed` event instead of argparse printing usage and exiting on its own.
    def error(self, message):
        raise OptionError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m trainers.dreambooth",
        description="DreamBooth-style training of a Res-Tuning (or baseline) tuner on a Stable Diffusion U-Net.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common(parser)
    _compat(parser)
    group = parser.add_argument_group("method options", "each applies to the methods named in brackets; lists are comma-separated")
    for name, owners in sorted(method_fields().items()):
        # Absent unless given, so the method's own default applies and an option given for a
        # method that does not have it can be refused.
        group.add_argument(f"--{name}", default=argparse.SUPPRESS, help=method_option_help(name, owners))
    return parser


def parse_value(cls: type, name: str, value):
    """A method option from its text form, as typed on the command line or in the studio's form
    (JSON values from a config file pass through)."""
    if not isinstance(value, str):
        return value
    kind = _field_type(cls, name)
    text = value.strip()
    try:
        if "dict" in kind:
            pairs = [p for p in text.split(",") if p.strip()]
            out = {}
            for pair in pairs:
                key, sep, val = pair.partition("=")
                if not sep:
                    raise ValueError(f"expected KEY=VALUE pairs separated by commas (OP=kind pairs like "
                                         f"attn1=adapter,ff=adapter), got {pair.strip()!r}")
                if key.strip() in out:
                    raise ValueError(f"{key.strip()} is given twice ({key.strip()}={out[key.strip()]} and "
                                     f"{key.strip()}={val.strip()}); one kind per OP")
                out[key.strip()] = val.strip()
            return out
        if "tuple" in kind or "list" in kind:
            return tuple(p.strip() for p in text.split(",") if p.strip())
        if "bool" in kind:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return text.lower() in ("true", "1", "yes")
        if "int" in kind:
            return int(text)
        if "float" in kind:
            return float(text)
    except ValueError as exc:
        raise OptionError(f"--{name} {value!r}: {exc}") from None
    return text


def _method_config(args: argparse.Namespace) -> MethodConfig:
    if args.method not in METHODS:
        raise OptionError(f"--method {args.method!r} is not a method; choose from {', '.join(METHODS)}")
    cls = METHODS[args.method].config
    own = {f.name for f in dataclasses.fields(cls)}
    given = {name: getattr(args, name) for name in method_fields() if getattr(args, name, None) is not None}
    foreign = sorted(set(given) - own)
    if foreign:
        theirs = ", ".join(f"--{n}" for n in sorted(own)) or "none"
        raise OptionError(f"{', '.join('--' + n for n in foreign)} not an option of {args.method} (its options: {theirs})")
    values = {name: parse_value(cls, name, value) for name, value in given.items()}
    try:
        config = cls.from_dict(values)
    except (ValueError, TypeError) as exc:
        raise OptionError(str(exc)) from None
    for f in dataclasses.fields(cls):  # sizes (dim, rank, heads): a tuner's weights grow with them
        value = getattr(config, f.name)
        if isinstance(value, int) and not isinstance(value, bool) and value > UPPER["method_size"]:
            raise OptionError(f"--{f.name} is at most {UPPER['method_size']}, got {value:,}")
        if len(json.dumps(config.to_dict()[f.name])) > MAX_OPTION_CHARS:
            raise OptionError(f"--{f.name} is longer than the {MAX_OPTION_CHARS} characters any layout needs")
    return config


def check(args: argparse.Namespace) -> None:
    """The value checks that need no model: each failure names the option and what would work."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise OptionError(message)

    need(bool(args.instance_data_dir), "--instance_data_dir is required: a folder of instance images")
    need(bool(args.instance_prompt and args.instance_prompt.strip()), "--instance_prompt is required, e.g. 'a photo of sks dog'")
    for name in ("learning_rate", "prior_loss_weight", "adam_epsilon", "max_grad_norm"):
        value = getattr(args, name)
        need(math.isfinite(value) and value > 0, f"--{name} must be a number above 0; got {value}")
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "num_validation_images",
                 "validation_steps", "checkpointing_steps", "num_class_images", "sample_batch_size"):
        value = getattr(args, name)
        need(value > 0, f"--{name} must be a whole number above 0; got {value}")
        if name in UPPER:
            need(value <= UPPER[name], f"--{name} is at most {UPPER[name]:,}, got {_shown(value)}")
    need(args.lr_warmup_steps >= 0, f"--lr_warmup_steps cannot be negative, got {args.lr_warmup_steps}")
    need(args.repeats >= 1, f"--repeats must be a whole number above 0; got {args.repeats}")
    need(args.adam_weight_decay_text_encoder is None or args.adam_weight_decay_text_encoder >= 0,
         "--adam_weight_decay_text_encoder cannot be negative")
    need(64 <= args.resolution <= UPPER["resolution"] and args.resolution % 8 == 0,
         f"--resolution must be a multiple of 8 and at least 64, at most {UPPER['resolution']} (e.g. 512), got {args.resolution}")
    need(0 <= args.seed < 2**32, f"--seed must be a whole number from 0 to {2**32 - 1}, got {args.seed}")
    need(args.num_inference_steps is None or args.num_inference_steps <= UPPER["num_inference_steps"],
         f"--num_inference_steps is at most {UPPER['num_inference_steps']}")
    need(args.guidance_scale is None or math.isfinite(args.guidance_scale),
         f"--guidance_scale must be a finite number (7.5 is usual), got {args.guidance_scale}")
    need(len(args.validation_prompt or []) <= UPPER["validation_prompts"],
         f"--validation_prompt: at most {UPPER['validation_prompts']} prompts")
    _check_output_dir(args.output_dir, need)
    _check_logging_dir(args, need)
    need(args.checkpoints_total_limit is None or args.checkpoints_total_limit > 0,
         f"--checkpoints_total_limit must be positive, got {args.checkpoints_total_limit}")
    need(args.num_inference_steps is None or args.num_inference_steps > 0, "--num_inference_steps must be positive")
    need(args.guidance_scale is None or args.guidance_scale >= 0, "--guidance_scale cannot be negative")
    need(args.snr_gamma is None or (math.isfinite(args.snr_gamma) and args.snr_gamma > 0), f"--snr_gamma must be positive, got {args.snr_gamma}")
    need(math.isfinite(args.noise_offset) and args.noise_offset >= 0, f"--noise_offset cannot be negative, got {args.noise_offset}")
    need(0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1, "--adam_beta1 and --adam_beta2 must be in [0, 1)")
    need(args.adam_weight_decay >= 0, "--adam_weight_decay cannot be negative")
    if args.with_prior_preservation:
        need(bool(args.class_prompt and args.class_prompt.strip()), "--with_prior_preservation needs --class_prompt, e.g. 'a photo of dog'")
    if args.validation_prompt is not None:
        need(all(p.strip() for p in args.validation_prompt), "--validation_prompt cannot be empty")
    _check_bounds(args, need)
    _check_text(args, need)


def _shown(value) -> str:
    """A number for a message: 1e300 given as a whole number is not printed with 300 digits."""
    return f"{value:,}" if abs(value) < 1e15 else f"{float(value):.3g}"


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise OptionError(message)


def _check_bounds(args: argparse.Namespace, need, names=None) -> None:
    """Every number given (of `names`, default all) within BOUNDS (tests/security/test_cli.py
    holds that every numeric option of the parser has an entry): a value beyond what any run
    needs is refused here, not found as a traceback or an exhausted machine later."""
    for name, (low, high, low_ok) in BOUNDS.items():
        if names is not None and name not in names:
            continue
        value = getattr(args, name, None)
        if value is None or isinstance(value, bool):
            continue
        ok = math.isfinite(value) and (value >= low if low_ok else value > low) and value <= high
        need(ok, f"--{name} must be {'from' if low_ok else 'above'} {low:,} {'to' if low_ok else 'and at most'} {high:,}, "
                 f"got {_shown(value)}")


def _check_text(args: argparse.Namespace, need) -> None:
    prompts = [("instance_prompt", args.instance_prompt), ("class_prompt", args.class_prompt),
               *(("validation_prompt", p) for p in args.validation_prompt or [])]
    for name, text in prompts:
        need(text is None or len(text) <= MAX_PROMPT_CHARS,
             f"--{name} is {len(text or ''):,} characters long; at most {MAX_PROMPT_CHARS:,} (the text encoder reads "
             "77 tokens, about 300 characters)")
    for name in ("instance_data_dir", "class_data_dir", "output_dir", "logging_dir", "revision", "variant"):
        value = getattr(args, name, None)
        need(not isinstance(value, str) or len(value) <= MAX_OPTION_CHARS, f"--{name} is over {MAX_OPTION_CHARS} characters long")
    if args.class_data_dir is not None:
        folder = Path(args.class_data_dir)
        need(bool(args.class_data_dir.strip()), "--class_data_dir is empty: give a folder, or leave it out")
        need(not folder.exists() or folder.is_dir(), f"--class_data_dir {folder} is a file, not a folder")
        nearest = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
        need(nearest.is_dir(), f"--class_data_dir {folder}: {nearest} is not a folder")


def _check_control(values: dict) -> None:
    """OptionError for a control character in any text value of `values` (option name -> value or
    list of values), before any message echoes it: the prompts' tabs and newlines aside."""
    for name, value in values.items():
        for text in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(text, str) and (CONTROL if name in PROMPTS else ANY_CONTROL).search(text):
                raise OptionError(f"--{name} holds control characters (an escape sequence, a NUL byte, ...); use plain text")


def _check_logging_dir(args: argparse.Namespace, need) -> None:
    """--logging_dir resolves inside --output_dir (`..`, an absolute path elsewhere or a symlink
    out would have the trackers write outside the run folder)."""
    need(isinstance(args.logging_dir, str), "--logging_dir must be a folder inside the run folder, e.g. logs")
    out = Path(args.output_dir)
    try:
        inside = (out / args.logging_dir).resolve().is_relative_to(out.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    need(inside, f"--logging_dir {args.logging_dir}: outside the run folder {out}; give a folder inside it, e.g. logs")


def _check_output_dir(output_dir, need) -> None:
    """A usable --output_dir, found here, not as a traceback when the trainer first writes its
    events there. Whether this trainer may write into it (a folder of someone else's files) and
    whether it can be created at all is settled by `claim_output_dir` when it starts."""
    need(isinstance(output_dir, str) and bool(output_dir.strip()),
         "--output_dir is empty: give a folder for the run (an unset shell variable?); the current folder is never "
         "used unless named")
    out = Path(output_dir)
    need(not out.exists() or out.is_dir(), f"--output_dir {out} is a file, not a folder")
    nearest = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    need(nearest.is_dir(), f"--output_dir {out}: {nearest} is not a folder")


# What marks a folder as a run this trainer (or the studio's runner) made: the marker it writes
# into a folder it creates, or, for runs made before there was one, their events file.
RUN_MARKERS = (".restuning-run", "events.jsonl")


def owns(folder: str | Path) -> bool:
    """Whether `folder` is a run this trainer (or the studio) made: it holds one of RUN_MARKERS."""
    return any((Path(folder) / marker).exists() for marker in RUN_MARKERS)


def is_run_folder(folder: Path, allowed: set[str] = frozenset()) -> bool:
    """An empty folder (but for `allowed` names), or one this trainer (or the studio) made: safe
    to write a run into."""
    try:
        names = {p.name for p in Path(folder).iterdir()} - set(allowed)
    except OSError:
        return False
    return not names or any(m in names for m in RUN_MARKERS)


def claim_output_dir(args: argparse.Namespace) -> Path:
    """Before the trainer writes anything: make sure --output_dir is a folder it may write into
    (one it creates, one it made before, to resume, an empty one but for the --config file it
    was given, or with --overwrite_output_dir any), create it and the class-image folder, and
    mark the run folder as this trainer's. OptionError when it may not, or when the path cannot
    be made a folder (/proc/x, a read-only mount, a file on the way): permission bits say
    nothing for root, so creating is the check."""
    out = Path(args.output_dir)
    given = Path(args.config) if getattr(args, "config", None) else None
    allowed = {given.name} if given is not None and given.absolute().parent == out.absolute() else set()
    if out.is_dir() and not args.overwrite_output_dir and not is_run_folder(out, allowed):
        found = sorted(p.name for p in out.iterdir() if p.name not in allowed)
        raise OptionError(f"--output_dir {out} already holds files this trainer did not write (e.g. {found[0]}); "
                          "choose a new folder, or pass --overwrite_output_dir to write into it anyway")
    folders = [("output_dir", out)] + ([("class_data_dir", Path(args.class_data_dir))]
                                       if args.class_data_dir and args.with_prior_preservation else [])
    for name, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OptionError(f"--{name} {folder}: cannot be created ({exc.strerror or exc})") from None
    marker = out / RUN_MARKERS[0]
    if not marker.exists():
        try:
            marker.write_text("a run folder of trainers.dreambooth\n", encoding="utf-8")
        except OSError as exc:
            raise OptionError(f"--output_dir {out}: cannot be written ({exc.strerror or exc})") from None
    return out


def _namespace(parser: argparse.ArgumentParser, argv: list[str], config: dict | None) -> argparse.Namespace:
    if config is not None:
        known = {a.dest for a in parser._actions} - {"help", "config"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise OptionError(f"unknown option(s) in the config: {', '.join(unknown)}")
        for action in parser._actions:
            if action.dest in config:
                _check_config_value(action, config[action.dest])
        parser.set_defaults(**config)
    return parser.parse_args(argv)


def _check_config_value(action: argparse.Action, value) -> None:
    """A config file's JSON value must have the option's type: argparse checks only the strings
    it converts itself. Method options are checked by their config class instead."""
    if value is None or action.default is argparse.SUPPRESS:
        return
    if isinstance(value, str) and action.type in (int, float):
        return
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:  # on/off flags, store_true too
        expected = (bool,)
    elif action.nargs == "+":
        expected = (list, str)
    elif action.type in (int, float):
        expected = (int,) if action.type is int else (int, float)
    else:
        expected = (str,)
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        raise OptionError(f"{action.dest} in the config: expected {' or '.join(t.__name__ for t in expected)}, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise OptionError(f"{action.dest} in the config: {value!r} is not one of {', '.join(action.choices)}")


MODEL_SETTINGS = "demo_settings.json"  # a model folder's own recommendations (the bundled demo model ships one)


def model_recipes(model: str) -> dict:
    """The "recipes" a local model folder recommends: {"default": {...}, "<method>": {...}}."""
    path = Path(model) / MODEL_SETTINGS
    try:
        found = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    recipes = found.get("recipes") if isinstance(found, dict) else None
    return recipes if isinstance(recipes, dict) else {}


def _recipe_value_fits(name: str, kind: type, value) -> bool:
    if kind is str:
        return name == "lr_scheduler" and value in LR_SCHEDULERS
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return kind is float or float(value).is_integer()


def fill_recipe(args: argparse.Namespace, trains_text: bool = False) -> dict:
    """Each recipe option the user left unset, from the first that has it: the model folder's
    recipe for this method, its default recipe, the registry's recipe for the method (the text
    encoder's rate only for a method that trains in it: `trains_text`). Returns {option: where
    its value came from}."""
    recipes = model_recipes(args.pretrained_model_name_or_path)
    sources = [(recipes.get(args.method), f"{MODEL_SETTINGS} of the base model, for {args.method}"),
               (recipes.get("default"), f"{MODEL_SETTINGS} of the base model"),
               (METHODS[args.method].recipe if args.method in METHODS else None, f"the {args.method} recipe (restuning.methods)")]
    filled = {}
    for name, kind in RECIPE_OPTIONS.items():
        if getattr(args, name) is not None or (name == "text_encoder_lr" and not trains_text):
            continue
        for recipe, where in sources:
            value = recipe.get(name) if isinstance(recipe, dict) else None
            if _recipe_value_fits(name, kind, value):
                setattr(args, name, kind(value))
                filled[name] = where
                break
    for name, value in RECIPE_FALLBACKS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.checkpointing_steps is None and isinstance(args.max_train_steps, int) and args.max_train_steps > 0:
        # A crash should cost at most a quarter of the run, and a default run must checkpoint at all.
        args.checkpointing_steps = max(1, min(500, math.ceil(args.max_train_steps / 4)))
        filled["checkpointing_steps"] = "a quarter of --max_train_steps"
    return filled


def native_resolution(model: str) -> tuple[int, str]:
    """(the base model's own resolution, where it came from): its U-Net's sample size x the VAE's
    factor, from its configs (a folder's, a single file's bundled ones, the hub cache's); 512 without."""
    folder = config_folder(model)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1), "the base model's own"
    except (TypeError, OSError, ValueError, KeyError):
        return 512, "512: the base model's configs cannot be read offline"


# Trainer options a recipe (the model folder's, the registry's) may set, with the type of value.
RECIPE_OPTIONS = {"learning_rate": float, "text_encoder_lr": float, "lr_scheduler": str, "lr_warmup_steps": int}
# What an option no recipe sets is, where argparse leaves it unset.
RECIPE_FALLBACKS = {"lr_scheduler": "constant", "lr_warmup_steps": 0}
# Method options a model folder's recipe for that method may set, with the form of value each
# takes (bench.quality --sweep records the U-Net blocks that trained best; the demo model names
# the Bypass's depth its U-Net needs): used where the user gives none and the method has the option.
RECIPE_METHOD_OPTIONS = {"blocks": "names", "depth": "whole"}


def method_recipe(model: str, method: str) -> dict:
    """The method options the model folder's recipe for `method` sets (never its "default":
    blocks mean different things per method), as the trainer's command line would give them."""
    recipe = model_recipes(model).get(method)
    if method not in METHODS or not isinstance(recipe, dict):
        return {}
    own = {f.name for f in dataclasses.fields(METHODS[method].config)}
    out = {}
    for name, form in RECIPE_METHOD_OPTIONS.items():
        value = recipe.get(name) if name in own else None
        if form == "names" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[name] = ",".join(value)
        elif form == "whole" and isinstance(value, int) and not isinstance(value, bool):
            out[name] = str(value)
    return out


def fill_method_recipe(args: argparse.Namespace) -> dict:
    """Each of RECIPE_METHOD_OPTIONS the user left unset, from method_recipe. Returns {option:
    where its value came from}."""
    filled = {}
    for name, value in method_recipe(args.pretrained_model_name_or_path, args.method).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
            filled[name] = f"{MODEL_SETTINGS} of the base model, for {args.method}"
    return filled


def fill_named_recipe(args: argparse.Namespace, given: set[str]) -> dict:
    """The --recipe's values for the options not in `given`. Returns {option: where its value came from}."""
    if not args.recipe:
        return {}
    filled = {name: f"--recipe {args.recipe}" for name in NAMED_RECIPES[args.recipe] if name not in given}
    for name in filled:
        setattr(args, name, NAMED_RECIPES[args.recipe][name])
    return filled


def lora_alpha_follows_rank(args: argparse.Namespace) -> dict:
    """diffusers' train_dreambooth_lora.py sets LoRA's alpha to --rank: a LoRA given --rank and no
    --alpha gets alpha = rank (LoraConfig's own default alpha is 4). Returns {option: why}."""
    if args.method == "lora" and getattr(args, "rank", None) is not None and getattr(args, "alpha", None) is None:
        args.alpha = args.rank
        return {"alpha": "--rank, as diffusers' train_dreambooth_lora.py sets it"}
    return {}


def _finish(args: argparse.Namespace, config_path: Path | None, given: set[str]) -> Options:
    _check_control(vars(args))
    if isinstance(args.validation_prompt, str):
        args.validation_prompt = [args.validation_prompt]
    if args.output_dir is None:
        args.output_dir = str(config_path.parent) if config_path else f"{args.method}-dreambooth-model"
    from_model = {**fill_method_recipe(args), **lora_alpha_follows_rank(args)}
    method_config = _method_config(args)
    for name, why in REFUSED.items():
        if _given(getattr(args, name, None)):
            raise OptionError(f"--{name} is refused: {why}")
    for name, (have, why) in REFUSED_VALUES.items():
        value = getattr(args, name, None)
        if value is not None and value != have:
            raise OptionError(f"--{name} {value} is refused: {why}")
    method_config = _text_encoder(args, method_config)
    for name in ("num_train_epochs", "validation_epochs", "train_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise OptionError(f"--{name} must be a whole number above 0; got {value}")
    _check_bounds(args, _need, ("num_train_epochs", "validation_epochs"))  # before steps are derived from them
    per_epoch = steps_per_epoch(args) if args.num_train_epochs or args.validation_epochs else None
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * per_epoch if args.num_train_epochs else DEFAULT_STEPS
    if args.validation_epochs is not None:
        args.validation_steps = args.validation_epochs * per_epoch
    if args.offset_noise and not args.noise_offset:
        args.noise_offset = 0.1
    method_config, identified = _identifier(args, method_config)
    named = fill_named_recipe(args, given)
    recipe = {**from_model, **identified, **named, **fill_recipe(args, trains_text_encoder(method_config))}
    if args.resolution is None:
        args.resolution, recipe["resolution"] = native_resolution(args.pretrained_model_name_or_path)
    if args.scale_lr and args.learning_rate is not None:
        factor = args.train_batch_size * args.gradient_accumulation_steps * _world_size()
        args.learning_rate *= factor
        args.scale_lr = False  # applied: a config written from these options must not scale again
        recipe["learning_rate"] = f"{recipe.get('learning_rate', 'given')}, scaled x{factor} (--scale_lr)"
    check(args)
    for name in method_fields():
        if hasattr(args, name):
            delattr(args, name)
    return Options(args, method_config, recipe)


# Why --train_text_encoder is refused for every method but LoRA.
TEXT_ENCODER_REFUSED = ("tunes the U-Net's blocks, not the text encoder's layers (the Res-Tuners, the Bypass and the bound "
                        "baselines are defined on them, as in the paper; full fine-tuning here is the U-Net's; Res-Tuning "
                        "trains its identifier word's embedding: --identifier); LoRA trains the text encoder too: --method lora")


def concept_words(instance_prompt: str, class_prompt: str | None) -> list[str]:
    """The instance prompt's words its class prompt lacks ("a photo of sks dog" against "a photo of
    dog": ["sks"]): what names the concept. Without a class prompt, none can be told apart."""
    if not class_prompt:
        return []
    known = {w.lower() for w in class_prompt.split()}
    return [w for w in dict.fromkeys(instance_prompt.split()) if w.lower() not in known]


def _identifier(args: argparse.Namespace, config: MethodConfig) -> tuple[MethodConfig, dict]:
    """A config's identifier 'auto' made the concept's words (concept_words), or '' where the
    prompts name none; returns (config, {option: why} for the recipe line)."""
    if getattr(config, "identifier", "") != "auto":
        return config, {}
    words = " ".join(concept_words(args.instance_prompt or "", args.class_prompt))
    why = ("the instance prompt's words the class prompt lacks" if words
           else "none: without a class prompt the concept's word cannot be told from the rest (give --identifier)")
    return dataclasses.replace(config, identifier=words), {"identifier": f"auto: {why}"}


def trains_text_encoder(config: MethodConfig) -> bool:
    """Whether the method trains something in the text encoder(s): a LoRA's layers there, or
    Res-Tuning's identifier embedding."""
    return bool(getattr(config, "text_encoder", "") or getattr(config, "text_encoder_2", "") or getattr(config, "identifier", ""))


def _text_encoder(args: argparse.Namespace, config: MethodConfig) -> MethodConfig:
    """--train_text_encoder as the LoRA config's text-encoder layers; --text_encoder_lr checked."""
    if args.train_text_encoder:
        if args.method != "lora":
            raise OptionError(f"--train_text_encoder is refused: {args.method} {TEXT_ENCODER_REFUSED}")
        if not config.text_encoder:
            config = dataclasses.replace(config, text_encoder=TEXT_ENCODER_ATTENTION)
    if args.text_encoder_lr is not None:
        if not getattr(config, "text_encoder", "") and not getattr(config, "identifier", ""):
            raise OptionError("--text_encoder_lr is for what trains in the text encoder: a LoRA with --train_text_encoder, or "
                              "Res-Tuning's identifier (--identifier)")
        if not (math.isfinite(args.text_encoder_lr) and args.text_encoder_lr > 0):
            raise OptionError(f"--text_encoder_lr must be a number above 0; got {args.text_encoder_lr}")
    return config


def parse(argv: list[str] | None = None) -> Options:
    """Options from the command line (and its --config file). Raises OptionError for values that
    cannot work; argparse itself exits with status 2 on malformed flags."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    _check_control(vars(first))  # before --config's path is echoed in a message
    config, config_path = None, None
    if first.config:
        config_path = Path(first.config)
        config = read_config(config_path)
    given = _named_on_command_line(parser, argv) | set(config or {})
    return _finish(_namespace(parser, argv, config), config_path, given)


def _named_on_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The options the command line names (argparse gives the others their defaults, so a value
    alone cannot tell a given --train_batch_size 1 from the default)."""
    defaults = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        named, _ = parser.parse_known_args(argv)
    finally:
        for action, default in defaults:
            action.default = default
    return set(vars(named))


def from_dict(values: dict) -> Options:
    """The same options and checks from a dict shaped like a config file."""
    return _finish(_namespace(build_parser(), [], dict(values)), None, set(values))


def read_config(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OptionError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OptionError(f"--config {path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise OptionError(f"--config {path}: expected one JSON object of options")
    return data


def method_options_markdown() -> str:
    """The method options as a Markdown table, from the registry (docs/trainer.md embeds it; a test
    keeps the two equal)."""
    rows = ["| option | method | meaning | default |", "|---|---|---|---|"]
    for name, owners in sorted(method_fields().items()):
        for method, f in owners:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            choices = f.metadata.get("choices")
            meaning = f.metadata.get("help", "") + (f" (from {', '.join(map(str, choices))})" if choices else "")
            rows.append(f"| `--{name}` | {method} | {meaning.replace('|', '/')} | `{_show(default)}` |")
    return "\n".join(rows)


def check_method_fits(method_config, model: str) -> None:
    """OptionError when the method's options cannot be attached to this base model (a Bypass
    deeper than the U-Net, LoRA layer names that match nothing): the check the trainer's attach
    would make after loading, made on a weightless copy built from the model's configs, so the
    form, the runner and the trainer refuse the same options before anything is queued or
    loaded. Nothing is checked when the model's configs cannot be read offline (the trainer's
    own attach still is)."""
    problem = _attach_problem(str(model), method_config.to_json())
    if problem:
        raise OptionError(f"{method_config.method}: its options do not fit this base model: {problem}")


@functools.lru_cache(maxsize=64)
def _attach_problem(model: str, method_json: str) -> str | None:
    import torch
    from diffusers import UNet2DConditionModel

    import restuning
    from restuning import AttachError, ConfigError

    folder = config_folder(model)
    if folder is None:
        return None
    config = restuning.config_from_dict(json.loads(method_json))
    if getattr(config, "identifier", ""):
        # Res-Tuning's identifier fits any CLIP text encoder (a word always has tokens); the
        # trainer's attach, with the real tokenizer, checks it again.
        config = dataclasses.replace(config, identifier="")
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8")))
            text = _meta_text_encoder(folder, "text_encoder") if getattr(config, "text_encoder", "") else None
            text_2 = _meta_text_encoder(folder, "text_encoder_2") if getattr(config, "text_encoder_2", "") else None
    except (OSError, ValueError, TypeError):
        return None  # configs unreadable here: the trainer's own attach decides
    try:
        restuning.attach(unet, config, text_encoder=text, text_encoder_2=text_2)
    except (AttachError, ConfigError, ValueError, TypeError) as exc:
        return str(exc)
    return None


def _meta_text_encoder(folder: Path, part: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kind = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
    return kind(CLIPTextConfig.from_pretrained(str(folder / part)))
