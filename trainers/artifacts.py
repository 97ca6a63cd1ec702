"""The model card (`README.md`) beside a run's weights: base model, method, prompt, settings,
sample images and the few lines of code that load each artefact into a StableDiffusionPipeline.

The weights themselves are written by the method's registry entry (`Method.export`); the card
only describes them, by artefact kind (the kinds of the events' `artifact` records).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

# How to use each kind of artefact; {base}, {file}, {prompt} are filled in as Python literals.
LOADING = {
    "tuner": '''import restuning
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained({base})
restuning.load(pipe.unet, {file}, text_encoder=pipe.text_encoder)  # config from the file's header
image = pipe({prompt}).images[0]''',
    "lora-diffusers": '''from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained({base})
pipe.load_lora_weights(".", weight_name={file})
image = pipe({prompt}).images[0]''',
    "unet": '''from diffusers import StableDiffusionPipeline, UNet2DConditionModel

unet = UNet2DConditionModel.from_pretrained({file})
pipe = StableDiffusionPipeline.from_pretrained({base}, unet=unet)
image = pipe({prompt}).images[0]''',
}
NOTES = {
    "lora-kohya": "{file} is the same LoRA in kohya format: copy it into AUTOMATIC1111's `models/Lora` "
                  "or ComfyUI's `models/loras`.",
}


def code_span(text: str) -> str:
    """`text` as Markdown inline code on one line, whatever backticks it holds (CommonMark: a
    span opened by more backticks than any run inside it, padded when it starts or ends with one)."""
    text = " ".join(str(text).splitlines())
    ticks = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def table_cell(value) -> str:
    """A value as inline code in a GFM table cell: a pipe in it is escaped, not a column break."""
    return code_span(value).replace("|", "\\|")


def code_block(code: str, language: str = "python") -> list[str]:
    """A fenced block whose fence is longer than any backtick run in `code`, so nothing in it ends it."""
    fence = "`" * max(3, max((len(run) for run in re.findall("`+", code)), default=0) + 1)
    return [fence + language, code, fence]


SETTINGS = ("resolution", "max_train_steps", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "text_encoder_lr",
            "lr_scheduler", "lr_warmup_steps", "snr_gamma", "noise_offset", "mixed_precision", "seed")
PRIOR_SETTINGS = ("class_prompt", "num_class_images", "prior_loss_weight")


def write_model_card(output_dir: Path, options, method, source, step: int, samples: list[Path],
                     written: list[tuple[str, Path]]) -> Path:
    args, config = options.args, options.method_config
    output_dir = Path(output_dir)
    base = args.pretrained_model_name_or_path
    prompt = args.instance_prompt
    header = ["---", "library_name: diffusers", "pipeline_tag: text-to-image",
              f"tags: [stable-diffusion, dreambooth, restuning, {method.name}]"]
    if source.kind == "hub":
        header.append(f"base_model: {base}")
    header.append(f"instance_prompt: {json.dumps(prompt)}")
    header.append("---")
    lines = header + [
        f"# {method.label} tuner for {code_span(prompt)}",
        "",
        f"A {method.label} tuner trained DreamBooth-style for {step} steps on {code_span(base)}: {method.summary}",
        "",
        f"- Instance prompt: {code_span(prompt)}",
        f"- Method options: {code_span(config.to_json())}",
        "",
        "## Training settings",
        "",
        "| option | value |",
        "|---|---|",
        *(f"| {name} | {table_cell(getattr(args, name))} |"
          for name in SETTINGS + (PRIOR_SETTINGS if args.with_prior_preservation else ())
          if getattr(args, name, None) is not None),
        "",
    ]
    if samples:
        prompts = ", ".join(code_span(p) for p in args.validation_prompt)
        lines += ["## Samples", "", f"Validation prompt(s): {prompts}, seed {args.seed}.", ""]
        lines += [f"![sample]({Path(p).relative_to(output_dir).as_posix()})" for p in samples] + [""]
    lines += ["## Files and how to load them", ""]
    for kind, path in written:
        file = Path(path).relative_to(output_dir).as_posix()
        lines.append(f"- {code_span(file)} ({kind})")
    lines.append("")
    for kind, path in written:
        file = Path(path).relative_to(output_dir).as_posix()
        if kind in LOADING:
            lines += [*code_block(LOADING[kind].format(base=repr(base), file=repr(file), prompt=repr(prompt))), ""]
        elif kind in NOTES:
            lines += [NOTES[kind].format(file=code_span(file)), ""]
    path = output_dir / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path
