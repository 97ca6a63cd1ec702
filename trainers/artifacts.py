"""The model card (`README.md`) beside a run's weights: base model, method, prompt, settings,
sample images and the few lines of code that load each artefact into a StableDiffusionPipeline
(a StableDiffusionXLPipeline for SDXL), and what a run is downloaded as.

The weights themselves are written by the method's registry entry (`Method.export`); the card
only describes them, by artefact kind (the kinds of the events' `artifact` records). The card's
code runs from any folder holding the downloaded files: it names the base model as its user
would (the hub id, or their own path; a placeholder, explained, for the studio's bundled demo
model or a shared studio's own copy) and the tuner by its download name (`download_name`).
`bundle` zips the card with the weights and the samples it shows, under those names.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import zipfile
from pathlib import Path

from .options import DEMO_MODEL

# How to use each kind of artefact; {base}, {file}, {prompt} are filled in as Python literals,
# {loader} with the pipeline's constructor for the base model's kind, {pipeline} with its family's
# pipeline class.
LOADING = {
    "tuner": '''import restuning
from diffusers import {pipeline}

base_model = {base}
pipe = {pipeline}.{loader}(base_model)
restuning.load(pipe, {file})  # config from the file's header
image = pipe({prompt}).images[0]''',
    "lora-diffusers": '''from diffusers import {pipeline}

base_model = {base}
pipe = {pipeline}.{loader}(base_model)
pipe.load_lora_weights(".", weight_name={file})
image = pipe({prompt}).images[0]''',
    "unet": '''from diffusers import {pipeline}, UNet2DConditionModel

base_model = {base}
unet = UNet2DConditionModel.from_pretrained({file})
pipe = {pipeline}.{loader}(base_model, unet=unet)
image = pipe({prompt}).images[0]''',
}
NOTES = {
    "lora-kohya": "{file} is the same LoRA in kohya format: copy it into AUTOMATIC1111's `models/Lora` "
                  "or ComfyUI's `models/loras`.",
}
DEMO_PLACEHOLDER = "path/to/demo-model"
SHARED_PLACEHOLDER = "path/to/base-model"
# The kinds downloaded as single files; the tuner under its download name, the others as exported.
DOWNLOADABLE = ("tuner", "lora-diffusers", "lora-kohya")


def download_name(run_name: str, method: str) -> str:
    """What a run's tuner is called once downloaded: `<run-name>-<method>.safetensors`, without the
    method where the run's name already holds it (the studio's run ids do). In the run folder it
    stays `tuner.safetensors`."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", run_name).strip("-.") or "run"
    return f"{stem if method in stem else f'{stem}-{method}'}.safetensors"


def base_model_name(given: str, source) -> tuple[str, str, str]:
    """The base model as the card's reader names it in code, as the card's text names it, and a
    sentence for the card where the code's name is a placeholder: the hub id; the studio's bundled
    demo model or, on a shared studio (a Space), the server's own copy never by the server's path;
    else the user's own path."""
    if source.kind == "hub":
        return given, code_span(given), ""
    location = Path(getattr(source, "location", given))
    if location.resolve() == DEMO_MODEL.resolve():
        return DEMO_PLACEHOLDER, "the Res-Tuning Studio's bundled demo model", (
            f"`{DEMO_PLACEHOLDER}` stands for the Res-Tuning Studio's bundled demo model, `assets/demo-model` in its "
            "repository: set `base_model` to where your copy is.")
    if os.environ.get("SPACE_ID"):
        return SHARED_PLACEHOLDER, code_span(location.name), (
            f"`{SHARED_PLACEHOLDER}` stands for the base model this shared studio trained on, "
            f"{code_span(location.name)}: set `base_model` to your copy of it.")
    return str(location), code_span(str(location)), ""


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
    """`<output_dir>/README.md`, written atomically: front matter, what was trained on what, the
    settings, the samples (linked by their path in the run folder, which `bundle` keeps) and how to
    load each artefact in `written` ((kind, path) pairs)."""
    args, output_dir = options.args, Path(output_dir)
    base, base_text, base_note = base_model_name(args.pretrained_model_name_or_path, source)
    lines = _card_header(args, method, source) + _card_summary(args, options.method_config, method, step, base_text)
    if samples:
        prompts = ", ".join(code_span(p) for p in args.validation_prompt)
        lines += ["## Samples", "", f"Validation prompt(s): {prompts}, seed {args.seed}.", ""]
        lines += [f"![sample]({Path(p).relative_to(output_dir).as_posix()})" for p in samples] + [""]
    lines += _card_loading(output_dir, written, method, source, base, base_note, args.instance_prompt)
    path = output_dir / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _card_header(args, method, source) -> list[str]:
    header = ["---", "library_name: diffusers", "pipeline_tag: text-to-image",
              f"tags: [stable-diffusion, dreambooth, restuning, {method.name}]"]
    if source.kind == "hub":
        header.append(f"base_model: {args.pretrained_model_name_or_path}")
    return header + [f"instance_prompt: {json.dumps(args.instance_prompt)}", "---"]


def _card_summary(args, config, method, step: int, base_text: str) -> list[str]:
    prompt = args.instance_prompt
    return [
        f"# {method.label} tuner for {code_span(prompt)}",
        "",
        f"A {method.label} tuner trained DreamBooth-style for {step} steps on {base_text}: {method.summary}",
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


def _card_loading(output_dir: Path, written, method, source, base: str, base_note: str, prompt: str) -> list[str]:
    """The files, by the names they download under, and the code that loads each kind."""
    names = {kind: _download_file(output_dir, kind, path, method.name) for kind, path in written}
    lines = ["## Files and how to load them", ""]
    for kind, path in written:
        in_run = Path(path).relative_to(output_dir).as_posix()
        where = f"; {code_span(in_run)} in the run folder" if names[kind] != in_run else ""
        lines.append(f"- {code_span(names[kind])} ({kind}{where})")
    lines += ["", ("The code runs in the folder that holds the downloaded files. `import restuning` needs the "
                   "library: `pip install <the Res-Tuning Studio repository: a clone's folder or its git URL>`."), ""]
    if base_note:
        lines += [base_note, ""]
    loader = "from_single_file" if source.kind == "single-file" else "from_pretrained"
    xl = source.family == "sdxl"
    pipeline = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    for kind, _ in written:
        if kind in LOADING:
            code = LOADING[kind].format(base=repr(base), loader=loader, file=repr(names[kind]), prompt=repr(prompt),
                                        pipeline=pipeline)
            lines += [*code_block(code), ""]
        elif kind in NOTES:
            lines += [NOTES[kind].format(file=code_span(names[kind])), ""]
    return lines


def _download_file(output_dir: Path, kind: str, path, method: str) -> str:
    """The name an artefact has once downloaded (`bundle` writes it so): the tuner's download name,
    every other file or folder its path in the run folder."""
    if kind == "tuner":
        return download_name(Path(output_dir).name, method)
    return Path(path).relative_to(output_dir).as_posix()


def bundle(run_dir: Path, artifacts: dict[str, Path], method: str, target: Path) -> Path:
    """A zip at `target` of what the model card describes, under the names it uses: README.md, the
    downloadable weights (the tuner under its download name) and the sample images it links. Written
    under a temporary name and renamed, so a half-written zip is never served."""
    run_dir, target = Path(run_dir), Path(target)
    card = Path(artifacts["model-card"])
    members = {"README.md": card}
    for kind in DOWNLOADABLE:
        if kind in artifacts:
            members[_download_file(run_dir, kind, artifacts[kind], method)] = Path(artifacts[kind])
    members.update({name: run_dir / name for name in card_images(card.read_text(encoding="utf-8"), run_dir)})
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")  # two pages may ask at once
    # PNG and safetensors hardly compress: stored, the zip costs no CPU beyond the copy
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, source in members.items():
            zf.write(source, name)
    os.replace(tmp, target)
    return target


def card_images(text: str, run_dir: Path) -> list[str]:
    """The card's image links that are PNG files in the run's samples folder (a link in a prompt
    shown as code, or one leading elsewhere, is not one of them)."""
    samples = (Path(run_dir) / "samples").resolve()
    found = []
    for link in re.findall(r"^!\[[^\]]*\]\(([^)\s]+)\)$", text, flags=re.M):
        path = (Path(run_dir) / link).resolve()
        if path.parent == samples and path.suffix == ".png" and path.is_file() and link not in found:
            found.append(link)
    return found


DOWNLOADS_DIR = "downloads"


def downloads(run_dir: Path, artifacts: dict[str, Path], method: str) -> dict[str, Path]:
    """kind -> the file to hand out for it, named as the user should keep it, made in the run's
    `downloads/` folder when missing or older than what it copies: the tuner as
    `download_name(...)` (a hard link where the file system allows), the model card as a zip with
    what it describes (`bundle`), the LoRA files as they are. Cheap when nothing changed."""
    run_dir = Path(run_dir)
    out = {kind: Path(artifacts[kind]) for kind in DOWNLOADABLE[1:] if kind in artifacts}
    folder = run_dir / DOWNLOADS_DIR
    if "tuner" in artifacts:
        out["tuner"] = _fresh(folder / download_name(run_dir.name, method), [Path(artifacts["tuner"])],
                              lambda target: _link_or_copy(Path(artifacts["tuner"]), target))
    if "model-card" in artifacts:
        sources = [Path(artifacts[k]) for k in ("model-card", *DOWNLOADABLE) if k in artifacts]
        zip_name = download_name(run_dir.name, method).removesuffix(".safetensors") + ".zip"
        out["model-card"] = _fresh(folder / zip_name, sources, lambda target: bundle(run_dir, artifacts, method, target))
    return out


def _fresh(target: Path, sources: list[Path], make) -> Path:
    """`target`, made again by `make(target)` unless it is as new as every source."""
    newest = max(p.stat().st_mtime_ns for p in sources)
    if not (target.is_file() and target.stat().st_mtime_ns >= newest):
        target.parent.mkdir(exist_ok=True)
        make(target)
    return target


def _link_or_copy(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.link(source, tmp)  # the same bytes under a second name, no copy; keeps the source's mtime
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)
