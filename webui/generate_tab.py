"""The Generate tab: prompt and generate with one tuner (or the base model), a batch of images
per click. Each picture is saved as a PNG whose metadata holds its prompt, seed, settings and
tuner (trainers.sampling.save_png), and the gallery keeps them with their captions; "Load
settings from a PNG" reads such a file back into the form, so a picture can be made again."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time

import gradio as gr

from trainers.options import MAX_PROMPT_CHARS
from trainers.sampling import SCHEDULERS, Settings, read_png_settings, save_png

from . import pipeline, visitors
from .compare_tab import MAX_STEPS, check_prompts, tuner_options
from .errors import friendly

BASE = "base"
MAX_BATCH = 8
GALLERY_KEEP = 48


def _number(settings: dict, key: str, default, low, high, kind=int):
    """A PNG's setting as a number within the form's range; the default for anything else (a
    PNG's text is whatever its maker wrote)."""
    value = settings.get(key, default)
    try:
        value = kind(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return value if low <= value <= high else default


def tuner_choices(runner, who) -> list[tuple[str, str]]:
    return [("Base model (no tuner)", BASE)] + tuner_options(runner, who)


def generate(runner, base, studio, who, run_id: str | None, rows: list[Settings], scale: float = 1.0,
             progress=None) -> list[tuple[str, str]]:
    """Render one image per row with the chosen tuner on the base model it was trained on (or
    `base`, the studio's, alone) and save each as a PNG whose metadata regenerates it; a row of
    no size renders at that model's own. Returns [(path, caption)]."""
    if run_id in (None, "", BASE):
        column, tuner_name = pipeline.base_column(base), None
    else:
        info = visitors.seen(runner, run_id, who)
        column, tuner_name = pipeline.column(info, scale), info.id
        try:
            base = studio.base_of(info)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
    size = studio.defaults(base)
    rows = [dataclasses.replace(r, height=r.height or size["height"], width=r.width or size["width"]) for r in rows]
    if progress is not None:
        progress(0.0, "loading the base model" if not studio.is_loaded(base) else "starting")
    images = studio.sampler(base).render([column], rows, progress=progress)
    folder = visitors.scratch_dir(runner, who, "generate")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    made = []
    for row, (image,) in zip(rows, images):
        settings = {**row.to_dict(), "tuner": tuner_name, "scale": column.scale if tuner_name else None,
                    "base_model": base.label}
        path = save_png(image, folder / f"{stamp}-{row.seed}-{secrets.token_hex(2)}.png", settings)
        made.append((str(path), f"seed {row.seed} · {tuner_name or 'base'}"))
    return made


def form_from_png(runner, d: dict, path, who) -> tuple:
    """The form's values (tuner, prompt, negative, seed, images per click, steps, guidance,
    scheduler, scale) from a PNG this tab saved; the base model where its tuner is not `who`'s."""
    if not path:
        return (gr.skip(),) * 9
    try:
        settings = read_png_settings(path)
    except (OSError, ValueError, SyntaxError):
        settings = None
    if not isinstance(settings, dict) or "prompt" not in settings:
        raise gr.Error("this PNG holds no studio settings (only pictures saved by this studio's Generate tab do)")
    options = {v for _, v in tuner_choices(runner, who)}
    wanted = settings.get("tuner") or BASE
    if wanted not in options:
        gr.Warning(f"the tuner {wanted} is not among your runs here; the base model is selected")
        wanted = BASE
    sch = settings.get("scheduler") if settings.get("scheduler") in SCHEDULERS else d["scheduler"]
    return (gr.Dropdown(choices=tuner_choices(runner, who), value=wanted), str(settings.get("prompt", ""))[:MAX_PROMPT_CHARS],
            str(settings.get("negative_prompt") or "")[:MAX_PROMPT_CHARS], _number(settings, "seed", -1, -1, 2**32 - 1),
            1, _number(settings, "steps", d["steps"], 1, MAX_STEPS), _number(settings, "guidance", d["guidance"], 1.0, 15.0, float),
            sch, _number(settings, "scale", 1.0, 0.0, 2.0, float))


def build(runner, base, studio: pipeline.StudioPipeline, tab, owner: gr.State, who=None):
    """The tab's content for visitor `who`; selecting the tab again refreshes the list of tuners."""
    d = studio.defaults()
    kept = gr.State([])  # this page's gallery: [(png path, caption)]
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            with gr.Row():
                # the run's name, steps and date fit the box (pipeline.choice); Refresh takes what it needs, and
                # goes below it on a phone
                tuner = gr.Dropdown(label="Tuner", choices=tuner_choices(runner, who), value=BASE, interactive=True,
                                    scale=4, min_width=300, elem_id="gen-tuner")
                reload = gr.Button("Refresh", size="sm", scale=1, min_width=80, elem_id="gen-refresh")
            prompt = gr.Textbox(label="Prompt", placeholder=base.prompts[0], interactive=True, elem_id="gen-prompt")
            negative = gr.Textbox(label="Negative prompt", interactive=True, elem_id="gen-negative")
            with gr.Row():
                seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0, interactive=True, elem_id="gen-seed")
                batch = gr.Slider(1, MAX_BATCH, value=2, step=1, label="Images per click", interactive=True, elem_id="gen-batch")
            with gr.Row():
                steps = gr.Slider(1, MAX_STEPS, value=d["steps"], step=1, label="Steps", interactive=True, elem_id="gen-steps")
                guidance = gr.Slider(1.0, 15.0, value=d["guidance"], step=0.5, label="Guidance", interactive=True,
                                     elem_id="gen-guidance")
            with gr.Row():
                scheduler = gr.Dropdown(list(SCHEDULERS), value=d["scheduler"], label="Scheduler", interactive=True,
                                        elem_id="gen-scheduler")
                scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Tuner scale", interactive=True, elem_id="gen-scale")
            go = gr.Button("Generate", variant="primary", elem_id="gen-go")
            with gr.Accordion("Load settings from a PNG", open=False):
                png = gr.File(label="a PNG made here", file_types=[".png"], interactive=True, elem_id="gen-load-png")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Generated (click one for its settings)", columns=4, height=480, format="png",
                                 interactive=False, elem_id="gen-gallery")
            # shown once a picture is clicked: an empty box beside an empty gallery said nothing
            chosen = gr.Code(label="Settings of the selected image", language="json", visible=False, elem_id="gen-settings")

    def refresh(who, current):
        options = tuner_choices(runner, who)
        return gr.Dropdown(choices=options, value=current if current in {v for _, v in options} else BASE)

    def do_generate(who, run_id, p, n, s, count, k, g, sch, sc, history, progress=gr.Progress()):
        if not (p or "").strip():
            raise gr.Error(f"the prompt is empty: describe the picture, e.g. '{base.prompts[0]}'")
        check_prompts([p, n or ""])
        if sch not in SCHEDULERS:
            raise gr.Error(f"unknown scheduler {sch!r}")
        count, k = int(count), int(k)
        if not (1 <= count <= MAX_BATCH and 1 <= k <= MAX_STEPS):
            raise gr.Error(f"images per click 1-{MAX_BATCH}, steps 1-{MAX_STEPS}")
        first = int(s) if s is not None and int(s) >= 0 else int.from_bytes(os.urandom(3), "little")
        # one row per image: each keeps its own seed, so each file regenerates alone
        rows = [Settings(p.strip(), n or "", first + i, k, float(g), sch) for i in range(count)]  # the tuner's base's size
        made = generate(runner, base, studio, who, run_id, rows, sc, progress=lambda f, label: progress(f, desc=label))
        history = (made + list(history or []))[:GALLERY_KEEP]
        return history, history

    def show(evt: gr.SelectData, history):
        if evt.index is None or not history or evt.index >= len(history):
            return gr.skip()
        return gr.Code(value=json.dumps(read_png_settings(history[evt.index][0]) or {}, indent=2), visible=True)

    def load_png(path, who):
        return form_from_png(runner, d, path, who)

    reload.click(friendly(refresh), [owner, tuner], tuner, show_progress="hidden", queue=False)
    go.click(friendly(do_generate), [owner, tuner, prompt, negative, seed, batch, steps, guidance, scheduler, scale, kept],
                   [gallery, kept], concurrency_limit=1, concurrency_id="generate")
    gallery.select(show, kept, chosen, show_progress="hidden")
    png.upload(friendly(load_png), [png, owner], [tuner, prompt, negative, seed, batch, steps, guidance, scheduler, scale],
               show_progress="hidden")
    tab.select(friendly(refresh), [owner, tuner], tuner, show_progress="hidden", queue=False)
