"""The Compare tab: the paper's Fig. 6-7 view. Any finished runs (any method) and the untuned
base model side by side on the same prompt and seed, one column per tuner, one row per seed or
prompt. All routable tuners of a row go through the U-Net as ONE batched call
(trainers.sampling.Sampler); LoRA and full fine-tunes take a pass of their own. The progress bar
is fed by the sampler's per-step callback, so it shows denoising steps actually done."""

from __future__ import annotations

import dataclasses
import itertools
import secrets
import time

import gradio as gr

from trainers.options import CONTROL, MAX_PROMPT_CHARS
from trainers.sampling import SCHEDULERS, Settings, compose_grid, save_png
from trainers.service.jobs import JobError

from . import pipeline, visitors
from .errors import friendly

MAX_TUNERS = 8  # columns besides the base: one batch of 9 at most per row
MAX_ROWS = 8
MAX_STEPS = 150


def parse_seeds(text: str) -> list[int]:
    """'0, 1, 42' or '0-3' -> seeds; a clear message for anything else."""
    seeds = []
    for part in (text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo or hi - lo >= MAX_ROWS:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise gr.Error(f"seeds: {part!r} is not a whole number or a range like 0-3") from None
    if any(s < 0 or s >= 2**32 for s in seeds):
        raise gr.Error("seeds are whole numbers from 0 to 4294967295")
    return seeds or [0]


def check_prompts(prompts: list[str]) -> None:
    """The trainer's bound on a prompt's length, for what Compare and Generate render too."""
    longest = max((len(p) for p in prompts), default=0)
    if longest > MAX_PROMPT_CHARS:
        raise gr.Error(f"a prompt is {longest:,} characters long; at most {MAX_PROMPT_CHARS:,} (the text encoder reads "
                       "77 tokens, about 300 characters)")
    if any(CONTROL.search(p) for p in prompts):
        raise gr.Error("a prompt holds control characters (a NUL byte, ...); use plain text")


def plan_rows(prompt: str, more_prompts: str, negative: str, seeds: str, steps, guidance, scheduler,
              height: int | None, width: int | None, example: str = "a photo of sks star") -> list[Settings]:
    """One row per (prompt, seed): the main prompt plus one more per line. `example`: a prompt in
    the base model's words, for the message of an empty one."""
    prompts = [p.strip() for p in [prompt or "", *(more_prompts or "").splitlines()] if p.strip()]
    if not prompts:
        raise gr.Error(f"the prompt is empty: describe the picture, e.g. '{example}'")
    check_prompts([*prompts, negative or ""])
    if scheduler not in SCHEDULERS:
        raise gr.Error(f"unknown scheduler {scheduler!r}")
    steps = int(steps or 0)
    if not 1 <= steps <= MAX_STEPS:
        raise gr.Error(f"steps: choose 1 to {MAX_STEPS}")
    rows = [Settings(p, negative or "", s, steps, float(guidance), scheduler, height, width)
            for p, s in itertools.product(prompts, parse_seeds(seeds))]
    if len(rows) > MAX_ROWS:
        raise gr.Error(f"{len(rows)} rows (prompts x seeds): at most {MAX_ROWS} per grid")
    return rows


def grid_base(studio, infos, base):
    """The base model the runs `infos` were trained on (`base` for none); gr.Error for runs of
    different base models: a grid is rendered by one U-Net, its base column is their base, and
    each model has its own resolution."""
    found = {}
    for info in infos:
        try:
            model = studio.base_of(info)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        found.setdefault(model.source, (model, []))[1].append(info.label or info.id)
    if len(found) > 1:
        raise gr.Error("these runs were trained on different base models (" +
                       "; ".join(f"{model.label}: {', '.join(names)}" for model, names in found.values()) +
                       "): a grid compares runs of one base model, so pick runs of one")
    return next(iter(found.values()))[0] if found else base


def render_grid(runner, base, studio, who, ids: list[str], base_too: bool, rows: list[Settings], scales,
                progress=None) -> tuple:
    """Render and save the grid PNG (its metadata lists rows and columns); returns (path,
    seconds, (rows, columns)). Only runs this visitor may see are sampled, all of one base model,
    which the base column shows (`base`, the studio's, when no run is chosen); a row of no size
    renders at that model's own."""
    if len(ids) > MAX_TUNERS:
        raise gr.Error(f"{len(ids)} runs chosen: at most {MAX_TUNERS} per grid")
    if not ids and not base_too:
        raise gr.Error("choose at least one run, or include the base model")
    scales = list(scales) + [1.0] * (len(ids) - len(scales))
    infos = [visitors.seen(runner, run_id, who) for run_id in ids]
    base = grid_base(studio, infos, base)
    size = studio.defaults(base)
    rows = [dataclasses.replace(r, height=r.height or size["height"], width=r.width or size["width"]) for r in rows]
    columns = pipeline.told_apart(([pipeline.base_column(base)] if base_too else []) + [
        pipeline.column(info, scale) for info, scale in zip(infos, scales)])
    if progress is not None:
        progress(0.0, "loading the base model" if not studio.is_loaded(base) else "starting")
    sampler = studio.sampler(base)
    started = time.perf_counter()
    images = sampler.render(columns, rows, progress=progress)
    seconds = time.perf_counter() - started
    one_prompt = len({r.prompt for r in rows}) == 1
    row_labels = [f"seed {r.seed}" if one_prompt else f"{r.prompt} · seed {r.seed}" for r in rows]
    picture = compose_grid(images, [c.caption for c in columns], row_labels,
                           scale=max(1, 256 // max(images[0][0].width, 1)))
    settings = {"kind": "compare-grid", "base_model": base.label, "rows": [r.to_dict() for r in rows],
                "columns": [{"run": c.label, "scale": c.scale, "caption": c.caption} for c in columns]}
    name = f"grid-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}.png"
    path = save_png(picture, visitors.scratch_dir(runner, who, "compare") / name, settings)
    return path, seconds, (len(rows), len(columns))


def tuner_options(runner, who) -> list[tuple[str, str]]:
    """The runs this visitor may compare: finished ones with weights."""
    return pipeline.choices(r for r in visitors.visible_runs(runner, who) if pipeline.weights(r) is not None)


# an empty list of runs is otherwise a blank box
NO_RUNS = "no finished runs yet: train one in the Train tab (the base model renders alone meanwhile)"


def runs_hint(options: list) -> str:
    return "" if options else NO_RUNS


def default_picks(runner, who) -> list[str]:
    """What a first visit shows: the newest finished run and, when it was trained for comparison,
    the rest of its group (as many as a grid takes)."""
    finished = [r for r in visitors.visible_runs(runner, who) if pipeline.weights(r) is not None]
    if not finished:
        return []
    newest = max(finished, key=lambda r: r.created)
    group = [r for r in finished if newest.group and r.group == newest.group] or [newest]
    return [r.id for r in sorted(group, key=lambda r: r.created)][:MAX_TUNERS]


def run_names(runner, who, run_ids: list[str]) -> list[str]:
    """Each run as the lists of runs name it (its name or method, steps, date; the runs listed once
    for all of them); the id of one this visitor may not see."""
    listed = {run: label for label, run in tuner_options(runner, who)}

    def name(run_id):
        if run_id in listed:
            return listed[run_id]
        try:
            return pipeline.choice(visitors.seen(runner, run_id, who))[0]
        except JobError:
            return str(run_id)

    return [name(run_id) for run_id in run_ids]


def default_prompt(runner, picked: list[str], base) -> str:
    """The prompt of the runs picked (what they learned), else the model's example."""
    for run_id in picked:
        prompt = runner.info(run_id).prompt
        if prompt:
            return prompt
    return base.prompts[0]


def build(runner, base, studio: pipeline.StudioPipeline, tab, owner: gr.State, who=None):
    """The tab's content for visitor `who`; selecting the tab again refreshes the list of runs.
    It opens ready for one click: the last runs trained (a comparison group whole), their prompt
    and two seeds."""
    d = studio.defaults()
    picked = default_picks(runner, who)
    gr.Markdown("Pick finished runs of any method and compare them with the untuned base model on the same "
                "prompt and seed. Every Res-Tuner, Bypass and bound tuner of a row renders in one batched call.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            with gr.Row():
                options = tuner_options(runner, who)
                picks = gr.CheckboxGroup(label=f"Runs to compare (up to {MAX_TUNERS})", choices=options,
                                         info=runs_hint(options), value=picked, interactive=True, elem_id="compare-runs")
            with gr.Row():
                with_base = gr.Checkbox(value=True, label="Include the base model", interactive=True, elem_id="compare-base")
                reload = gr.Button("Refresh the list", size="sm", elem_id="compare-refresh")
            prompt = gr.Textbox(label="Prompt", value=default_prompt(runner, picked, base), placeholder=base.prompts[0],
                                interactive=True, elem_id="compare-prompt")
            more = gr.Textbox(label="More prompts, one per line (a row each)", lines=2, interactive=True, elem_id="compare-more")
            negative = gr.Textbox(label="Negative prompt", interactive=True, elem_id="compare-negative")
            with gr.Row():
                seeds = gr.Textbox(label="Seeds (a row each: 0, 1, 2 or 0-3)", value="0, 1", interactive=True,
                                   elem_id="compare-seeds")
                steps = gr.Slider(1, MAX_STEPS, value=d["steps"], step=1, label="Steps", interactive=True,
                                  elem_id="compare-steps")
            with gr.Row():
                guidance = gr.Slider(1.0, 15.0, value=d["guidance"], step=0.5, label="Guidance", interactive=True,
                                     elem_id="compare-guidance")
                scheduler = gr.Dropdown(list(SCHEDULERS), value=d["scheduler"], label="Scheduler", interactive=True,
                                        elem_id="compare-scheduler")
            names = run_names(runner, who, picked)
            scales = [gr.Slider(0.0, 2.0, value=1.0, step=0.05, visible=i < len(names),
                                label=f"strength of {names[i]}" if i < len(names) else f"strength {i + 1}",
                                interactive=True, elem_id=f"compare-scale-{i}") for i in range(MAX_TUNERS)]
            render = gr.Button("Render grid", variant="primary", elem_id="compare-render")
        with gr.Column(scale=3):
            # no label and no buttons: Gradio floats them over the picture's top corners, where the
            # captions are (on a phone, over the right column's); the grid downloads by the button below
            grid = gr.Image(label="Grid", show_label=False, buttons=[], type="filepath", format="png", interactive=False,
                            elem_id="compare-grid")
            download = gr.DownloadButton("Download grid PNG", visible=False, elem_id="compare-download")
            note = gr.Markdown(elem_id="compare-note")

    def choices(who, current):
        options = tuner_options(runner, who)
        ids = {v for _, v in options}
        return gr.CheckboxGroup(choices=options, info=runs_hint(options), value=[c for c in (current or []) if c in ids])

    def label_scales(who, ids):
        names = run_names(runner, who, list(ids or [])[:MAX_TUNERS])
        return [gr.Slider(visible=i < len(names), label=f"strength of {names[i]}" if i < len(names) else f"strength {i + 1}")
                for i in range(MAX_TUNERS)]

    def make_grid(who, ids, base_too, p, m, n, s, k, g, sch, *scale_values, progress=gr.Progress()):
        # at the runs' base model's own size
        rows = plan_rows(p, m, n, s, k, g, sch, None, None, example=base.prompts[0])
        path, seconds, shape = render_grid(runner, base, studio, who, list(ids or []), base_too, rows, scale_values,
                                           progress=lambda f, label: progress(f, desc=label))
        return (str(path), gr.DownloadButton(value=str(path), visible=True),
                f"{shape[0]} row(s) x {shape[1]} column(s) in {seconds:.1f} s.")

    def do_render(who, ids, base_too, p, m, n, s, k, g, sch, *scale_values, progress=gr.Progress()):
        """A refusal is said in the note under the grid too (as a failed handler, the note would
        read a bare "Error"); the grid already shown stays."""
        try:
            return friendly(make_grid)(who, ids, base_too, p, m, n, s, k, g, sch, *scale_values, progress=progress)
        except gr.Error as exc:
            gr.Warning(exc.message)
            return gr.skip(), gr.skip(), f"Not rendered: {exc.message}"

    picks.change(label_scales, [owner, picks], scales, show_progress="hidden", queue=False)
    reload.click(friendly(choices), [owner, picks], picks, show_progress="hidden", queue=False)
    render.click(do_render, [owner, picks, with_base, prompt, more, negative, seeds, steps, guidance, scheduler, *scales],
                 [grid, download, note], concurrency_limit=1, concurrency_id="compare")
    tab.select(friendly(choices), [owner, picks], picks, show_progress="hidden", queue=False)
