"""The Train tab: concept upload, prompts, method and where its tuners go, hardware preset,
"Advanced" (generated from the trainer's options), and the live view of a run.

The live view is a poll of the run's files (gr.Timer), never a handler that waits on training:
training runs in its own process, so a reload or a second tab re-attaches to the same run and
closing the browser stops nothing.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from restuning.methods import METHODS
from trainers import memory
from trainers.options import DEMO_MODEL, RECIPE_METHOD_OPTIONS, OptionError, check_method_fits, from_dict, method_recipe, parse_value
from trainers.service.jobs import JobError
from trainers.service.uploads import MAX_FILES, MAX_NAME_CHARS, UploadError, check_images, check_name, discard

from . import catalog, files as served, forms, live, visitors
from .errors import as_html, friendly
from .model import example_concepts
from .presets import PRESET_KEYS, PRESETS, preset_values

log = logging.getLogger("restuning.studio")
POLL_SECONDS = 1.0
# The learning rate is not here: left empty, each method gets its own from the model's recipes.
# 300 steps of batch 8 (+ 8 class images): the preselected Res-Tuning draws the examples in ~7 of 8
# samples and finishes in about a minute on 2 cores (docs/benchmarks.md, "First result").
EXAMPLE_RECIPE = {"max_train_steps": 300, "snr_gamma": 5.0, "train_batch_size": 8, "validation_steps": 100}
EXAMPLE_PROMPT = "a sks shape"
# Methods that learn the example better with other steps and batch: the Bypass drew the star in
# 0.59 of its samples at 600 steps of batch 4 and 0.40 at 300 of batch 8 (bench/results/quality_res_tuning).
EXAMPLE_METHOD_RECIPES = {"bypass": {"max_train_steps": 600, "train_batch_size": 4}}


def example_recipe(method: str) -> dict:
    """The example's trainer options for `method` on the demo model."""
    return {**EXAMPLE_RECIPE, **EXAMPLE_METHOD_RECIPES.get(method, {})}


def _pick_run(runner, who=None) -> str | None:
    """The run a fresh page shows: the running one, else the next queued, else the newest (of
    this visitor's runs on a shared studio)."""
    runs = [r for r in runner.list_runs() if visitors.can_control(r, who)]
    for status in ("running", "queued"):
        active = [r for r in runs if r.status == status]
        if active:
            return active[-1].id if status == "queued" else active[0].id
    return runs[0].id if runs else None


# The options the memory estimate reads (trainers/memory.py): the line beside Train follows them.
MEMORY_OPTIONS = ("resolution", "train_batch_size", "with_prior_preservation", "class_prompt", "mixed_precision",
                  "gradient_checkpointing", "use_8bit_adam", "num_validation_images", "validation_prompt", "sample_batch_size")


def queue_runs(runner, configs: list[tuple[str, dict]], images, who, *, group: str = "",
               name: str = "") -> tuple[list[str], list[str]]:
    """Queue one run per (label, config), all or none: each is checked for memory (a run that
    cannot fit on this device is refused with what to lower) and the visitor's limit is checked
    for all of them before any run folder exists. `name`: what the user named the run(s), stored
    as their label instead. Returns (run ids, warnings for runs that are close to what a run may use)."""
    verdicts = [runner.check_memory(config) for _, config in configs]  # JobError: nothing queued
    runner.check_owner_limit(who or "", len(configs))
    ids = [runner.submit(config, images, label=name or label, group=group, owner=who or "") for label, config in configs]
    warnings = [f"{label}: {v.message}" if len(configs) > 1 else v.message
                for (label, _), v in zip(configs, verdicts) if v.level == "close"]
    return ids, warnings


def memory_line(runner, model: str, method: str, trainer_values: dict, method_values: dict) -> str:
    """The Markdown line beside Train: the run's memory estimate against what a run may use here.
    Cheap: the model's configs and the method's trainable count are cached (trainers.memory)."""
    actions = forms.trainer_actions()
    try:
        config = {"method": method, "pretrained_model_name_or_path": model, "instance_prompt": "x"}
        for name, value in trainer_values.items():
            converted = forms.trainer_value(actions[name], value)
            if converted is not None:
                config[name] = converted
        config.setdefault("validation_prompt", ["x"])
        if config.get("with_prior_preservation"):
            # what the class prompt says does not change the memory a run needs; an empty one is
            # refused when Train is pressed, with its own message
            config.setdefault("class_prompt", "x")
        own = {name: forms.method_value(method, name, value) for name, value in method_values.items()}
        config.update(own)
        if config.get("mixed_precision") == "fp16" and runner.devices[0] == "cpu":
            return "Memory estimate: fp16 does not run on the CPU"
        method_config = from_dict({**config, "instance_data_dir": "instance", "output_dir": "run"}).method_config
    except (OptionError, ValueError, TypeError):
        return "Memory estimate: waiting for valid options"
    try:
        check_method_fits(method_config, model)
    except OptionError as exc:
        return f"Memory estimate: none, {html.escape(forms.plain(str(exc)))}"
    try:
        verdict = runner.memory_verdict(config)
    except Exception as exc:  # noqa: BLE001 - a line of text must never become Gradio's bare "Error"
        log.error("memory estimate failed: %s: %s", type(exc).__name__, exc)
        return "Memory estimate: not available for these options"
    if verdict.estimate is None:
        return "Memory estimate: not available (check the options, or the model's configs cannot be read offline)"
    return memory.line(verdict)


def _run_choices(runner, who=None) -> list[tuple[str, str]]:
    """(label, run id) of each run the live view may watch: its id (which names its method: the
    method again only where it does not) and its state in a word or two (a running run's phase),
    short enough for a phone's width; the line under it says the rest."""
    def state(r):
        return live.status_line(r).removeprefix("running: ").split(",")[0] if r.status == "running" else r.status

    return [(" · ".join([r.id, *([r.method] if r.method not in r.id else []), state(r)]), r.id)
            for r in visitors.visible_runs(runner, who)]


@dataclass
class Form:
    """The Train form's components: what the handlers read and update."""

    files: gr.File
    preview: gr.Gallery
    examples: dict  # example name -> its image paths
    example_buttons: dict  # example name -> its button
    trainer: dict  # trainer option -> its component
    name: gr.Textbox  # the run's name, optional
    method: gr.Radio
    summary: gr.HTML
    methods: dict  # method -> {config field -> its component}
    method_groups: dict  # method -> the group of its options, shown while it is chosen
    preset: gr.Radio
    train: gr.Button
    estimate: gr.Markdown
    compare_methods: gr.CheckboxGroup
    compare: gr.Button
    model: gr.Dropdown | None = None  # the base model (webui.catalog key)
    example_parts: tuple = ()  # the examples' text and buttons: offered on the demo model only


@dataclass
class LiveView:
    """The live view of the watched run, beside the form."""

    run_pick: gr.Dropdown
    progress: gr.HTML
    loss: gr.LinePlot
    samples: gr.Gallery
    cancel: gr.Button
    resume: gr.Button
    log: gr.Textbox


def build(runner, base, device: str, preset: str, detected: str, owner: gr.State | None = None, models=None):
    """`owner`: the page's visitor id (webui.visitors); None-valued on a local studio; `models`:
    the base models to pick (webui.catalog; `base` alone by default, `base` first). Returns the
    page-load handler and its outputs (the watched run and its live view), and the form's Memory
    (what a reload restores; what "train again" fills in)."""
    owner = owner if owner is not None else gr.State(None)
    models = models or catalog.single(base)
    watch = gr.State(None)
    shown = gr.State(None)  # what the live view shows, part by part, to skip unchanged updates
    # on a narrow screen the columns stack and CSS (webui.CSS) puts the live view first: a phone
    # shows the run, not the top of a long form
    with gr.Row(equal_height=False, elem_id="train-row"):
        with gr.Column(scale=5, elem_id="train-form"):
            model = model_input(models)
            form = _form(runner, base, preset, detected)
            form.model = model
        with gr.Column(scale=4, elem_id="train-live"):
            view = _live_view()
    _wire_form(form, models)
    _wire_model(models, form)
    _wire_submit(runner, models, device, form, owner, [watch, view.run_pick, shown])
    _wire_estimate(runner, models, form)
    attach, live_outputs = _wire_live(runner, view, watch, shown, owner)
    return attach, live_outputs, _memory(runner, form, models)


# -- the form ------------------------------------------------------------------------------------


def _form(runner, base, preset: str, detected: str) -> Form:
    actions = forms.trainer_actions()
    files, preview, examples, example_buttons, example_parts = _concept_inputs(base)
    trainer = _prompt_inputs(base, actions)
    method, summary, methods, method_groups = _method_inputs(base.source)
    with gr.Row():
        preset_radio = gr.Radio(choices=list(PRESETS), value=preset, label="Hardware preset",
                                info=f"detected: {detected}", elem_id="preset")
        for name in ("max_train_steps", "learning_rate"):
            trainer[name] = forms.component_for_action(actions[name])
    preset_now = preset_values(preset, base.resolution, base.family)
    with gr.Accordion("Advanced", open=False, elem_id="advanced"):
        for name, action in actions.items():
            if name not in forms.MAIN:
                trainer[name] = forms.component_for_action(action, preset_now.get(name))
    # the estimate for the form as it opens (the model's configs are read once, then cached)
    first = forms.method_names()[0]
    opening = memory_line(runner, base.source, first, {k: trainer[k].value for k in MEMORY_OPTIONS if k in trainer},
                          {k: c.value for k, c in methods[first].items()})
    name = gr.Textbox(label="Run name (optional)", placeholder="e.g. star, fewer steps", max_length=MAX_NAME_CHARS,
                      info="tells this run apart from others in Compare, Generate and the Runs tab", elem_id="run-name")
    with gr.Row(equal_height=True):
        train = gr.Button("Train", variant="primary", elem_id="train", scale=1)
        estimate = gr.Markdown(opening, elem_id="memory-estimate")
    with gr.Accordion("Train for comparison: the same images, prompts and settings under several methods",
                      open=False, elem_id="comparison"):
        # never more ticked than a visitor may queue at once on a shared studio: one click works
        ticked = forms.method_names()[:min(3, runner.limits.runs_per_owner or 3)]
        compare_methods = gr.CheckboxGroup(choices=forms.method_choices(), value=ticked, label="Methods",
                                           info=_comparison_info(runner.limits), elem_id="compare-methods")
        compare = gr.Button("Train for comparison", elem_id="compare")
    return Form(files, preview, examples, example_buttons, trainer, name, method, summary, methods, method_groups, preset_radio,
                train, estimate, compare_methods, compare, example_parts=example_parts)


def _comparison_info(limits) -> str:
    if limits.runs_per_owner is None:
        return "each method trains in its own run, one after the other"
    return (f"this studio is shared: at most {limits.runs_per_owner} runs of yours may be queued or running at once, "
            "so tick at most that many")


def model_input(models) -> gr.Dropdown:
    """The base model to train on: each model this studio knows by its label (webui.catalog)."""
    return gr.Dropdown(choices=models.choices(), value=models.default_key, label="Base model",
                       interactive=len(models.entries) > 1, elem_id="base-model",
                       info="the model the tuner learns on, and the one it is used with in Compare and Generate")


def chosen(models, key):
    """The base model of the form's `key`; the studio's own for a key not listed (for lines that
    only inform; Train refuses such a key)."""
    try:
        return models.base(key)
    except ValueError:
        return models.base(models.default_key)


def _wire_model(models, form: Form) -> None:
    """Picking a base model brings its preset values (its resolution), its method recipe's
    options and prompt examples, and offers the example concepts on the demo model only."""
    fields = {m: {f.name: f for f in forms.dataclasses.fields(METHODS[m].config)} for m in form.methods}
    blocks = [(m, n, c) for m, comps in form.methods.items() for n, c in comps.items() if n in RECIPE_METHOD_OPTIONS]
    prompts = [form.trainer["instance_prompt"], form.trainer["class_prompt"]]

    def recipe_value(method: str, name: str, recipe: dict):
        """What forms.component_for_field shows for the option under `recipe`."""
        f = fields[method][name]
        value = (parse_value(METHODS[method].config, name, recipe[name]) if name in recipe else
                 f.default_factory() if f.default_factory is not forms.dataclasses.MISSING else f.default)
        return list(value) if isinstance(value, tuple) else value

    def picked(key, preset):
        base = chosen(models, key)
        values = preset_values(preset, base.resolution, base.family)
        recipe = {m: method_recipe(base.source, m) for m in form.methods}
        return [values[k] for k in PRESET_KEYS] + [recipe_value(m, n, recipe[m]) for m, n, _ in blocks]

    def looks(key):
        base = chosen(models, key)
        return [gr.Textbox(placeholder=p) for p in base.prompts] + [gr.update(visible=base.is_demo) for _ in form.example_parts]

    # the user's pick brings the model's values; a restored or a run's model (train again) keeps
    # the values that came with it, and only the words and examples follow the model
    form.model.input(picked, [form.model, form.preset], [*(form.trainer[k] for k in PRESET_KEYS), *(c for _, _, c in blocks)],
                     show_progress="hidden")
    form.model.change(looks, form.model, [*prompts, *form.example_parts], show_progress="hidden")


def _concept_inputs(base):
    """(files box, preview of the accepted images, example concepts, a button for each, the
    examples' text and buttons row: shown on the demo model only, whose words they are)."""
    files = gr.File(label="Concept images (3-10 photos: PNG, JPEG or WebP)", file_count="multiple", elem_id="concept-files")
    preview = gr.Gallery(label="Accepted images", columns=5, height=180, visible=False, elem_id="concept-preview")
    examples, buttons = example_concepts(), {}
    if examples:
        text = gr.HTML("Or try an example: a shape the demo model has never seen. It turns on prior preservation, with "
                "the class images of ordinary shapes the demo model brings (drawn by it, so training starts at once), "
                "and trains"
                f" with the demo model's recipe: {EXAMPLE_RECIPE['max_train_steps']} steps of batch "
                f"{EXAMPLE_RECIPE['train_batch_size']} (the Bypass: 600 of batch 4), and each method's learning rate as "
                "measured on this model.", elem_id="examples-label", visible=base.is_demo)
        with gr.Row(elem_id="examples", visible=base.is_demo) as row:
            buttons = {name: gr.Button(f"{name} ({len(paths)} images)", size="sm", elem_id=f"example-{name}")
                       for name, paths in examples.items()}
    return files, preview, examples, buttons, ((text, row) if examples else ())


def _prompt_inputs(base, actions) -> dict:
    """The instance and class prompts and the prior-preservation switch, by trainer option."""
    with gr.Row():
        instance = gr.Textbox(label="Instance prompt", placeholder=base.prompts[0], elem_id="instance-prompt",
                              info="names the concept with a rare token (sks) plus its class")
        class_prompt = gr.Textbox(label="Class prompt (optional)", placeholder=base.prompts[1], info=actions["class_prompt"].help)
    return {"instance_prompt": instance, "class_prompt": class_prompt,
            "with_prior_preservation": forms.component_for_action(actions["with_prior_preservation"])}


def _method_inputs(model: str):
    """(method radio, its summary, each method's option components, showing the values the base
    `model`'s recipe sets, the group of each method's options: only the chosen method's is visible)."""
    names = forms.method_names()
    method = gr.Radio(choices=forms.method_choices(), value=names[0], label="Method", elem_id="method")
    summary = gr.HTML(forms.method_summary(names[0]), elem_id="method-summary")
    comps, groups = {}, {}
    with gr.Accordion("Method options: where the tuners go, their size", open=False, elem_id="method-options"):
        for name in names:
            with gr.Group(visible=name == names[0]) as group:
                recipe = method_recipe(model, name)
                comps[name] = {f.name: forms.component_for_field(name, f, recipe) for f in forms.dataclasses.fields(METHODS[name].config)}
                if not comps[name]:
                    gr.HTML("No options: every U-Net weight trains.")
            groups[name] = group
    return method, summary, comps, groups


def _live_view() -> LiveView:
    run_pick = gr.Dropdown(label="Watching run", choices=[], elem_id="live-run", allow_custom_value=False)
    progress = gr.HTML(live.progress_html(None), elem_id="live-progress")
    # shown once they have something to show: an empty plot or gallery tells the user
    # nothing and still costs every page load its code (the gallery ~0.1 s on 2 cores)
    loss = gr.LinePlot(x="step", y="loss", color="series", title="Training loss", height=220, visible=False,
                       elem_id="live-loss")
    samples = gr.Gallery(label="Validation samples", columns=4, height=220, visible=False, elem_id="live-samples")
    with gr.Row():
        cancel = gr.Button("Cancel run", variant="stop", visible=False, elem_id="live-cancel")
        resume = gr.Button("Resume from checkpoint", visible=False, elem_id="live-resume")
    log = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, elem_id="live-log")
    return LiveView(run_pick, progress, loss, samples, cancel, resume, log)


# -- the form's handlers ---------------------------------------------------------------------------


def on_upload(paths):
    """Preview what passed. A file refused for itself is named, taken out of the box and deleted
    from the server, and the good ones stay; a batch refused as a whole (too many files) is
    cleared, and nothing is previewed."""
    if not paths:
        return gr.skip(), gr.Gallery(value=None, visible=False)
    try:
        return gr.skip(), gr.Gallery(value=[p for p, _ in check_images(paths)], visible=True)
    except UploadError as exc:
        gr.Warning(as_html(str(exc)), duration=None)
        # only what is refused for itself: the same bytes uploaded by another visitor share its path
        discard(exc.refused, get_upload_folder())
        refused = {str(p) for p in exc.refused}
        good = [p for p in paths if str(p) not in refused]
        if not exc.refused or not good:
            return None, gr.Gallery(value=None, visible=False)
        try:
            kept = [str(p) for p, _ in check_images(good)]
        except UploadError:
            return None, gr.Gallery(value=None, visible=False)
        return kept, gr.Gallery(value=kept, visible=True)


def _wire_form(form: Form, models) -> None:
    """Uploads, the example buttons, the method's options and the hardware preset."""
    form.files.upload(on_upload, form.files, [form.files, form.preview], show_progress="hidden")
    if form.examples:
        # "sks" is the rare token and "shape" the class the demo model knows; prior preservation
        # keeps "a shape" meaning the shapes it already draws. On the demo model the example also
        # brings the recipe bench/quality.py measured for the tuners there (README): at the
        # form's 1e-4 a tuner leaves the demo model's samples unchanged.
        keys = list(EXAMPLE_RECIPE)
        trainer = form.trainer
        example_outputs = [form.files, form.preview, trainer["instance_prompt"], trainer["class_prompt"],
                           trainer["with_prior_preservation"], *(trainer[k] for k in keys)]
        for name, button in form.example_buttons.items():
            button.click(lambda method, paths=form.examples[name]: (paths, gr.Gallery(value=paths, visible=True), EXAMPLE_PROMPT,
                                                                    "a shape", True, *(example_recipe(method)[k] for k in keys)),
                         form.method, example_outputs, show_progress="hidden")
    form.files.clear(lambda: gr.Gallery(value=None, visible=False), None, form.preview)
    groups = form.method_groups
    form.method.change(lambda m: [gr.HTML(forms.method_summary(m))] + [gr.Group(visible=n == m) for n in groups],
                       form.method, [form.summary, *groups.values()], show_progress="hidden")
    if form.examples:
        # a method chosen after an example was loaded gets the example's steps and batch for it
        sized = ["max_train_steps", "train_batch_size"]
        # (on the user's choice only: a form restored or filled from a run keeps its own steps)
        form.method.input(lambda m, prompt: [example_recipe(m)[k] if prompt == EXAMPLE_PROMPT else gr.update() for k in sized],
                           [form.method, form.trainer["instance_prompt"]], [form.trainer[k] for k in sized], show_progress="hidden")
    def preset_for(p, key):
        base = chosen(models, key)
        return [preset_values(p, base.resolution, base.family)[k] for k in PRESET_KEYS]

    # the user's choice of preset sets its options; a restored preset leaves the restored options
    form.preset.input(preset_for, [form.preset, form.model], [form.trainer[k] for k in PRESET_KEYS], show_progress="hidden")


def _wire_submit(runner, models, device: str, form: Form, owner: gr.State, outputs: list) -> None:
    """Train and Train for comparison: every config checked, then queued all or none; `outputs`
    (watched run, its dropdown, the live view's state) then follow the first run queued."""
    all_inputs = {form.files, form.name, form.method, form.compare_methods, owner, form.model, *form.trainer.values(),
                  *(c for comps in form.methods.values() for c in comps.values())}

    def submit(values: dict, methods: list[str]):
        checked = check_images(values[form.files])
        name = check_name(values[form.name], "run name") if (values[form.name] or "").strip() else ""
        if not methods:
            raise forms.OptionError("choose at least one method to compare")
        try:
            chosen_base = models.base(values[form.model])
        except ValueError as exc:
            raise forms.OptionError(str(exc)) from None
        # every config checked before any run exists
        configs = [(m, form_config(form, values, m, chosen_base, device)) for m in methods]
        who = values[owner]
        group = secrets.token_hex(3) if len(configs) > 1 else ""
        ids, warnings = queue_runs(runner, configs, checked, who, group=group, name=name)
        for warning in warnings:
            gr.Warning(warning, duration=None)
        # one run: the live view, scrolled into sight, says it all (a toast over it hid its run's name)
        if len(ids) > 1:
            gr.Info(f"{len(ids)} runs queued for comparison; the live view shows the first, the others are in its list")
        return ids[0], gr.Dropdown(choices=_run_choices(runner, who), value=ids[0]), None

    # once queued, the new run's live view comes into sight: below the long form on a phone, and
    # on a desktop scrolled away by the time Train is reached
    form.train.click(friendly(lambda v: submit(v, [v[form.method]])), all_inputs, outputs,
                     concurrency_limit=1, concurrency_id="submit").success(None, js=SHOW_LIVE_VIEW)
    form.compare.click(friendly(lambda v: submit(v, list(v[form.compare_methods]))), all_inputs, outputs,
                       concurrency_limit=1, concurrency_id="submit").success(None, js=SHOW_LIVE_VIEW)


SHOW_LIVE_VIEW = "() => document.getElementById('train-live')?.scrollIntoView({block: 'start'})"


def form_config(form: Form, values: dict, method: str, base, device: str) -> dict:
    """The run config of `method` from the form's values (OptionError for a bad value)."""
    return forms.build_config(method, {k: values[c] for k, c in form.trainer.items()},
                              {k: values[c] for k, c in form.methods[method].items()}, model=base.source, device=device,
                              examples=base.prompts)


def _wire_estimate(runner, models, form: Form) -> None:
    """The memory line beside Train follows every option it reads, and the base model."""
    trainer = {k: form.trainer[k] for k in MEMORY_OPTIONS if k in form.trainer}
    memory_inputs = {form.method, form.model, *trainer.values(), *(c for comps in form.methods.values() for c in comps.values())}

    def estimate_line(values: dict) -> str:
        name = values[form.method]
        return memory_line(runner, chosen(models, values[form.model]).source, name, {k: values[c] for k, c in trainer.items()},
                           {k: values[c] for k, c in form.methods[name].items()})

    for comp in memory_inputs:
        comp.change(estimate_line, memory_inputs, form.estimate, show_progress="hidden", queue=False, trigger_mode="always_last")


# -- the live view's handlers ------------------------------------------------------------------------------


def live_update(runner, run_id, last, who=None) -> tuple:
    """The live view's outputs for `run_id` (progress, loss, samples, log, cancel, resume, run
    dropdown, the new `shown` state). Each part is sent only when what it shows changed: a tick
    that only adds a loss point redraws the plot and the progress bar, not the gallery (an open
    page that watches a run costs every other page load on the machine its redraws)."""
    if not run_id:
        return (gr.skip(),) * LIVE_OUTPUTS
    try:
        info = visitors.seen(runner, run_id, who)
    except ValueError:
        return (live.progress_html(None), gr.LinePlot(value=None, visible=False), gr.Gallery(value=None, visible=False),
                "", gr.Button(visible=False), gr.Button(visible=False),
                gr.Dropdown(choices=_run_choices(runner, who), value=None), None)
    mine = visitors.can_control(info, who)
    frame, images = live.loss_plot_frame(info), live.samples(info)
    wait = live.queue_words(runner, info)  # changes as the runs ahead train
    now = {"run": (run_id, info.status, info.phase, info.position, mine, info.resumable, wait), "events": len(info.events),
           "log": live.log_size(info), "loss": len(frame), "samples": len(images)}
    before = last if isinstance(last, dict) else {}
    if now == before:
        return (gr.skip(),) * LIVE_OUTPUTS

    def changed(*parts):
        return any(now[p] != before.get(p) for p in parts)

    return (live.progress_html(info, wait) if changed("run", "events") else gr.skip(),
            gr.LinePlot(value=frame, visible=not frame.empty) if changed("run", "loss") else gr.skip(),
            gr.Gallery(value=images, visible=bool(images)) if changed("run", "samples") else gr.skip(),
            live.log_text(info) if changed("run", "events", "log") else gr.skip(),
            gr.Button(visible=mine and info.status in ("queued", "running")) if changed("run") else gr.skip(),
            gr.Button(visible=mine and info.resumable) if changed("run") else gr.skip(),
            gr.Dropdown(choices=_run_choices(runner, who), value=run_id) if changed("run") else gr.skip(),
            now)


LIVE_OUTPUTS = 8  # live_update's outputs


def _wire_live(runner, view: LiveView, watch: gr.State, shown: gr.State, owner: gr.State):
    """The poll of the watched run, its dropdown, Cancel and Resume; returns the page-load handler
    (the run to show, and its live view at once rather than at the next tick) and its outputs."""
    live_outputs = [view.progress, view.loss, view.samples, view.log, view.cancel, view.resume, view.run_pick, shown]

    def refresh(run_id, last, who=None):
        return live_update(runner, run_id, last, who)

    timer = gr.Timer(POLL_SECONDS)
    timer.tick(refresh, [watch, shown, owner], live_outputs, show_progress="hidden", concurrency_limit=None, queue=False)
    view.run_pick.input(lambda r: (r, None), view.run_pick, [watch, shown], show_progress="hidden")

    def act(action, run_id, who):
        if run_id:
            gr.Info(action(visitors.controlled(runner, run_id, who).id))
        return None

    view.cancel.click(friendly(lambda r, w: act(runner.cancel, r, w)), [watch, owner], shown)
    view.resume.click(friendly(lambda r, w: act(runner.resume, r, w)), [watch, owner], shown)

    def attach(who=None):
        run_id = _pick_run(runner, who)
        if run_id is None:
            return (None, *(gr.skip(),) * len(live_outputs))
        return (run_id, *refresh(run_id, None, who))

    view.run_pick.focus(lambda r, w: gr.Dropdown(choices=_run_choices(runner, w), value=r), [view.run_pick, owner],
                        view.run_pick, show_progress="hidden")
    return attach, [watch, *live_outputs]


# -- the form kept across reloads, and filled from a run ("train again") ----------------------------

FORM_STORAGE_KEY = "restuning-form"
MAX_KEPT_TEXT = 20_000  # characters of a kept text box: far above what any option takes (a prompt: 1,000)


@dataclass
class Memory:
    """The form as this browser last left it (gr.BrowserState: its localStorage, per visitor),
    and two ways to fill the form: `restore(stored)` (a page load) and `from_run(run_id, who)`
    (a run's settings). Both return updates for `outputs`: the image preview, then the kept
    components."""

    state: gr.BrowserState
    outputs: list
    restore: Callable
    from_run: Callable


def _kept(form: Form) -> dict:
    """key -> component of everything the form keeps: images, the run's name, the base model,
    method, preset, every option."""
    kept = {"files": form.files, "name": form.name, "method": form.method, "preset": form.preset,
            "compare_methods": form.compare_methods}
    if form.model is not None:
        kept["model"] = form.model
    kept.update({f"trainer.{name}": comp for name, comp in form.trainer.items()})
    kept.update({f"{method}.{name}": comp for method, comps in form.methods.items() for name, comp in comps.items()})
    return kept


def _save_js(keys: list[str]) -> str:
    """The form's values by key, as the browser holds them: saved in the browser, with no round
    trip to the server, so a reload right after a change still finds it. (The page load reads what
    was kept before any change can be saved.)"""
    return f"(...values) => Object.fromEntries({json.dumps(keys)}.map((key, i) => [key, values[i]]))"


def _settable(comp, value):
    """`value` if `comp` can show it, else gr.skip(): what the browser kept is whatever the
    visitor's localStorage holds (its key is public), so nothing in it is trusted."""
    if isinstance(comp, (gr.Radio, gr.Dropdown, gr.CheckboxGroup)):
        allowed = {choice[1] if isinstance(choice, (tuple, list)) else choice for choice in comp.choices}
        many = isinstance(comp, gr.CheckboxGroup) or getattr(comp, "multiselect", False)
        ok = (isinstance(value, list) and all(isinstance(v, str) and v in allowed for v in value) if many
              else isinstance(value, (str, int, float)) and value in allowed)
    elif isinstance(comp, gr.Checkbox):
        ok = isinstance(value, bool)
    elif isinstance(comp, gr.Number):
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
    elif isinstance(comp, gr.Textbox):
        ok = isinstance(value, str) and len(value) <= MAX_KEPT_TEXT
    else:
        ok = False
    return value if ok else gr.skip()


def _shown(comp, value):
    """What `comp` shows for a run config's `value` (None: the option was not given)."""
    if value is None:
        if isinstance(comp, gr.Textbox):
            return ""
        return None if isinstance(comp, gr.Number) else "" if isinstance(comp, gr.Dropdown) else gr.skip()
    if isinstance(value, dict):  # the Res-Tuning layout: OP=kind pairs
        pairs = [f"{k}={v}" for k, v in value.items()]
        return pairs if isinstance(comp, gr.Dropdown) else ",".join(pairs)
    if isinstance(comp, gr.Textbox):
        return "\n".join(map(str, value)) if isinstance(value, list) else str(value)
    return list(value) if isinstance(comp, gr.CheckboxGroup) and isinstance(value, (list, tuple)) else value


def _kept_images(stored) -> tuple[list[str], int]:
    """(the images kept from an earlier visit that are still on the server and still pass the
    checks, how many are not). Only what lies in Gradio's own upload and cache folders (by its real
    path) counts: never a run's files, nor any other file on the server."""
    items = stored if isinstance(stored, list) else []
    paths = []
    for item in items[:MAX_FILES]:
        path = item.get("path") if isinstance(item, dict) else item
        if not isinstance(path, str) or "\0" in path:
            continue
        real = Path(os.path.realpath(path))
        if not served.inside(real, served.allowed_roots()):
            continue
        try:
            check_images([real])
        except UploadError:
            continue
        paths.append(str(real))
    return paths, len(items) - len(paths)


def _run_images(info) -> list[str]:
    """The checked images a run trained on (its instance/ folder), if it still holds them."""
    folder = info.dir / "instance"
    if not folder.is_dir() or folder.is_symlink():
        return []
    return [str(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()][:MAX_FILES]


def _memory(runner, form: Form, models=None) -> Memory:
    kept = _kept(form)
    comps = list(kept.values())
    state = gr.BrowserState(None, storage_key=FORM_STORAGE_KEY, secret=visitors.browser_state_key(runner.runs_dir))
    gr.on([c.change for c in comps], None, comps, state, js=_save_js(list(kept)), show_progress="hidden", queue=False)
    outputs = [form.preview, *comps]

    def updates(values: dict, images: list[str] | None) -> list:
        """`images`: image paths, or None to leave the images box as it is."""
        head = [gr.skip()] * 2 if images is None else [gr.Gallery(value=images or None, visible=bool(images)), images or None]
        return head + [_settable(comp, values[key]) if key in values else gr.skip()
                       for key, comp in kept.items() if key != "files"]

    def restore(stored):
        if not isinstance(stored, dict):
            return [gr.skip()] * len(outputs)
        images, lost = _kept_images(stored.get("files"))
        if lost:
            gr.Warning(f"{lost} of the images you had added are no longer on this server (uploads are kept for a day): "
                       "add them again.", duration=None)
        return updates(stored, images if images or lost else None)

    def from_run(run_id, who=None):
        if not run_id:
            raise JobError("choose a run first")
        info = visitors.seen(runner, run_id, who)
        method = info.method
        if method not in form.methods:
            raise JobError(f"run {run_id} used {method!r}, a method this studio does not offer")
        values = {"method": method}
        # a run that named no base trained on the trainer's default, the demo model
        source = info.config.get("pretrained_model_name_or_path") or str(DEMO_MODEL)
        key = models.key_of(source) if models and form.model is not None else None
        if key:
            values["model"] = key
        if not info.imported:
            values.update({f"trainer.{name}": _shown(comp, info.config.get(name)) for name, comp in form.trainer.items()})
        values.update({f"{method}.{name}": _shown(comp, info.config[name])
                       for name, comp in form.methods[method].items() if name in info.config})
        images = _run_images(info) if visitors.can_control(info, who) else []
        said = f"The form now holds the settings of {run_id} ({METHODS[method].label}"
        if images:
            said += f", with its {len(images)} image{'s' if len(images) > 1 else ''}). Press Train to train again."
        else:
            why = (" (an imported tuner brings its method's options only)" if info.imported else
                   " (they stay with the visitor who trained it)" if not visitors.can_control(info, who) else "")
            said += f"). Its images are not loaded{why}: add the concept images, then press Train."
        if form.model is not None and not key:
            said += " Its base model is not among this studio's models: the one chosen above stays."
        gr.Info(said)
        return updates(values, images or None)

    return Memory(state, outputs, restore, from_run)
