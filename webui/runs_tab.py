"""The Runs tab: every run in the runs folder with method, trainable parameters, tuner size,
prompt, status and samples; downloads of what it saved; cancel, resume, delete (confirmed);
import of a tuner file checked against the base model. On a shared studio a visitor sees only
their own runs and the published ones, controls only their own, and publishes explicitly."""

from __future__ import annotations

import html
import tempfile
from dataclasses import dataclass

import gradio as gr
from gradio.utils import get_upload_folder

from trainers import artifacts
from trainers.options import MAX_PROMPT_CHARS
from trainers.service.uploads import UploadError, check_name, check_tuner_file, discard, lora_as_tuner_file

from . import live, visitors
from .errors import friendly
from .model import source_name

# of live.RUN_COLUMNS, in pixels: Gradio sizes the header and the body alike from these, and a
# narrower screen scrolls the table sideways (shares of a phone's width broke words mid-way)
RUN_COLUMN_WIDTHS = ["250px", "140px", "100px", "210px", "170px", "170px", "120px", "100px", "260px"]
DOWNLOADS = (("tuner", "tuner (.safetensors)"), ("model-card", "model card, tuner and samples (.zip)"),
             ("lora-diffusers", "LoRA, diffusers format"), ("lora-kohya", "LoRA, kohya/A1111 format"))


def _details(info, wait: str = "") -> str:
    """HTML with every run-supplied string escaped: a prompt, name or tuner header is whatever
    a visitor typed or a file held, and shows to other visitors once published; as Markdown an
    image link in it would make their browsers fetch an outside address. `wait`: when a queued
    run should start (live.queue_words)."""
    facts = live.facts(info)
    tuner = live.weights_file(info)
    params = facts.get("trainable_params")
    items = [("status", live.status_line(info) + (f"; {wait}" if wait else "")),
             ("method", info.method + (f" (comparison group {info.group})" if info.group else "")),
             ("trainable parameters", f"{params:,}" if isinstance(params, int) else "not reported yet"),
             ("weights file", f"{tuner.name}, {live.human_size(tuner.stat().st_size)}" if tuner else "not saved yet"),
             ("prompt", info.prompt or "(none)")]
    base = info.config.get("pretrained_model_name_or_path")
    if isinstance(base, str) and base:
        items.insert(2, ("base model", source_name(base)))
    recipe = live.recipe_facts(info)
    if recipe:
        items.insert(2, ("recipe", " · ".join(recipe.values())))
    name = live.run_name(info)
    if name:
        items.insert(0, ("name", name))
    step = live.last_step(info)
    if step:
        items.append(("steps", f"{step['step']}/{step['total']}, last loss {step['loss']:.4f}"))
    if info.checkpoint:
        items.append(("last checkpoint", info.checkpoint))
    if info.hint:
        items.append(("hint", info.hint))
    if info.skipped_events:
        items.append(("events.jsonl", f"{info.skipped_events} malformed line(s) skipped"))
    parts = [f"<h3>{html.escape(info.id)}</h3>", "<ul>",
             *(f"<li><b>{name}</b>: {html.escape(str(value))}</li>" for name, value in items), "</ul>"]
    if info.log_tail:
        parts += ["<p>Last log lines:</p>", f"<pre>{html.escape(chr(10).join(info.log_tail[-12:]))}</pre>"]
    return "\n".join(parts)


def _downloads(info) -> dict:
    """kind -> the file its download button hands out, under the name the user should keep
    (trainers.artifacts.downloads); the files as they are if those cannot be made (a full disk)."""
    found = live.artifacts(info)
    try:
        return artifacts.downloads(info.dir, found, info.method)
    except OSError:
        return found


def view(runner, run_id, who, shared: bool):
    """What the tab shows: table rows, run ids, the selected run, the other widgets' values and
    visibility (its controls only for a visitor who controls it), and a signature of it all."""
    runs = visitors.visible_runs(runner, who)
    table_rows, ids = [live.run_row(r) for r in runs], [r.id for r in runs]
    run_id = run_id if run_id in ids else (ids[0] if ids else None)
    info = runner.info(run_id) if run_id else None
    mine = bool(info) and visitors.can_control(info, who)
    files = _downloads(info) if info else {}
    wait = live.queue_words(runner, info) if info else ""
    widgets = {"details": {"value": _details(info, wait) if info else "No runs yet."},
               "samples": {"value": live.samples(info) if info else None},
               **{kind: {"value": str(files[kind]) if kind in files else None, "visible": kind in files}
                  for kind, _ in DOWNLOADS},
               "cancel": {"visible": mine and info.status in ("queued", "running")},
               "resume": {"visible": mine and info.resumable},
               "delete": {"visible": mine and info.status not in ("queued", "running")},
               "again": {"visible": bool(info) and info.status != "damaged"},
               "publish": {"value": bool(info) and info.published, "visible": shared and mine}}
    signature = (tuple(map(tuple, table_rows)), run_id,
                 (info.status, len(info.events), info.published, mine, wait) if info else None)
    return table_rows, ids, run_id, widgets, signature


@dataclass
class Tab:
    """The tab's components."""

    table: gr.Dataframe
    pick: gr.Dropdown
    details: gr.HTML
    samples: gr.Gallery
    downloads: dict  # artefact kind -> its download button
    cancel: gr.Button
    resume: gr.Button
    delete: gr.Button
    again: gr.Button
    publish: gr.Checkbox
    confirm_box: gr.Group
    confirm_text: gr.Markdown
    confirm: gr.Button
    keep: gr.Button
    upload: gr.File
    import_name: gr.Textbox
    import_button: gr.Button


def build(runner, base, tab, owner: gr.State, who=None, shared: bool = False, train_again=None):
    """The tab's content for visitor `who`, filled with the runs as they are now; selecting the
    tab again and a 2 s timer keep it current. `train_again`: (the Train form's
    train_tab.Memory, the page's tabs), for the button that fills the form with a run's settings."""
    table_rows, ids, run_id, now, signature = view(runner, None, who, shared)
    selected = gr.State(run_id)
    shown = gr.State(signature)
    ui = _layout(table_rows, ids, run_id, now)
    outputs = [ui.table, ui.pick, selected, ui.details, ui.samples, *ui.downloads.values(), ui.cancel, ui.resume, ui.delete,
               ui.again, ui.publish, shown]

    def refresh(run_id, last, who=None):
        table_rows, ids, run_id, now, signature = view(runner, run_id, who, shared)
        if signature == last:
            return (gr.skip(),) * (len(outputs))
        return (table_rows, gr.Dropdown(choices=ids, value=run_id), run_id, now["details"]["value"],
                now["samples"]["value"], *(gr.DownloadButton(**now[kind]) for kind, _ in DOWNLOADS),
                gr.Button(**now["cancel"]), gr.Button(**now["resume"]), gr.Button(**now["delete"]),
                gr.Button(**now["again"]), gr.Checkbox(**now["publish"]), signature)

    timer = gr.Timer(2.0)
    timer.tick(friendly(refresh), [selected, shown, owner], outputs, show_progress="hidden", concurrency_limit=None, queue=False)
    ui.pick.input(friendly(refresh), [ui.pick, gr.State(None), owner], outputs, show_progress="hidden")

    def select_row(evt: gr.SelectData, data):
        return data.iloc[evt.index[0], 0] if evt.index is not None else gr.skip()

    ui.table.select(select_row, ui.table, ui.pick).then(friendly(refresh), [ui.pick, gr.State(None), owner], outputs,
                                                        show_progress="hidden")
    _wire_controls(runner, ui, selected, owner, shown)
    _wire_import(runner, base, ui, selected, owner, shown)
    if train_again is not None:
        kept, tabs = train_again
        # the form filled with the run's settings (as kohya_ss loads a config), then shown
        ui.again.click(friendly(lambda r, w: [gr.Tabs(selected="train"), *kept.from_run(r, w)]), [selected, owner],
                       [tabs, *kept.outputs], show_progress="hidden")
    tab.select(friendly(refresh), [selected, gr.State(None), owner], outputs, show_progress="hidden", queue=False)


def _layout(table_rows, ids, run_id, now: dict) -> Tab:
    # the run id wraps within its share: on a phone it would otherwise take the whole screen's width
    table = gr.Dataframe(headers=live.RUN_COLUMNS, value=table_rows, interactive=False, wrap=True, elem_id="runs-table",
                         column_widths=RUN_COLUMN_WIDTHS)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            pick = gr.Dropdown(label="Run", choices=ids, value=run_id, interactive=True, elem_id="runs-pick")
            details = gr.HTML(elem_id="runs-details", **now["details"])
            samples = gr.Gallery(label="Samples", columns=4, height=200, interactive=False, elem_id="runs-samples",
                                 **now["samples"])
        with gr.Column(scale=2):
            downloads = {kind: gr.DownloadButton(f"Download {label}", elem_id=f"download-{kind}", **now[kind])
                         for kind, label in DOWNLOADS}
            with gr.Row():
                cancel = gr.Button("Cancel", variant="stop", elem_id="runs-cancel", **now["cancel"])
                resume = gr.Button("Resume", elem_id="runs-resume", **now["resume"])
                delete = gr.Button("Delete…", elem_id="runs-delete", **now["delete"])
            again = gr.Button("Train again with these settings", elem_id="runs-train-again", **now["again"])
            publish = gr.Checkbox(label="Published: every visitor of this studio may see, sample and download it",
                                  interactive=True, elem_id="runs-publish", **now["publish"])
            with gr.Group(visible=False) as confirm_box:
                confirm_text = gr.Markdown()
                with gr.Row():
                    confirm = gr.Button("Yes, delete it", variant="stop", elem_id="runs-delete-confirm")
                    keep = gr.Button("Keep it", elem_id="runs-delete-keep")
            with gr.Accordion("Import a tuner file", open=False):
                upload = gr.File(label="tuner .safetensors for this base model: a restuning file, or a diffusers or kohya LoRA",
                                 file_count="single", interactive=True, elem_id="import-file")
                import_name = gr.Textbox(label="Name", placeholder="my-star", interactive=True, elem_id="import-name")
                import_button = gr.Button("Import", elem_id="import")
    return Tab(table, pick, details, samples, downloads, cancel, resume, delete, again, publish, confirm_box, confirm_text,
               confirm, keep, upload, import_name, import_button)


def _wire_controls(runner, ui: Tab, selected: gr.State, owner: gr.State, shown: gr.State) -> None:
    """Cancel, Resume, Publish and Delete (confirmed), each for a visitor who controls the run."""

    def act(action, run_id, who):
        gr.Info(action(visitors.controlled(runner, run_id, who).id) or "done")
        return None

    ui.cancel.click(friendly(lambda r, w: act(runner.cancel, r, w)), [selected, owner], shown)
    ui.resume.click(friendly(lambda r, w: act(runner.resume, r, w)), [selected, owner], shown)

    def do_publish(run_id, on, who):
        runner.publish(visitors.controlled(runner, run_id, who).id, on)
        gr.Info(f"{run_id} is {'published: every visitor can see it' if on else 'private again'}")
        return None

    ui.publish.input(friendly(do_publish), [selected, ui.publish, owner], shown)
    ui.delete.click(lambda r: (gr.Group(visible=True), f"Delete **{r}**? Its tuner, samples and checkpoints go for good."),
                    selected, [ui.confirm_box, ui.confirm_text])
    ui.keep.click(lambda: gr.Group(visible=False), None, ui.confirm_box)

    def do_delete(run_id, who):
        runner.delete(visitors.controlled(runner, run_id, who).id)
        gr.Info(f"deleted {run_id}")
        return gr.Group(visible=False), None, None

    ui.confirm.click(friendly(do_delete), [selected, owner], [ui.confirm_box, selected, shown])


def checked_tuner(base, path, workdir):
    """(tuner file, method config, header) of an uploaded file; UploadError naming the file in
    .refused when it is refused for what it is (then no visitor can use those bytes)."""
    encoders = base.text_encoders_on_meta()
    try:
        # a diffusers or kohya LoRA file becomes a restuning tuner file first, so it is listed,
        # sampled in the Compare grid and downloaded like a LoRA trained here
        tuner = lora_as_tuner_file(path, base.unet_on_meta(), encoders["text_encoder"], encoders.get("text_encoder_2"),
                                   workdir=workdir)
        config, header = check_tuner_file(tuner, base.unet_on_meta(), base_text_encoder=encoders["text_encoder"],
                                          base_text_encoder_2=encoders.get("text_encoder_2"), tokenizers=base.tokenizers())
    except UploadError as exc:
        raise UploadError(str(exc), refused=[path]) from None
    return tuner, config, header


def import_tuner(runner, base, path, name, who):
    """A tuner file (or a diffusers or kohya LoRA) checked against the base model and imported as
    a run of `who` on that model; returns (run id, None, None) for (selected, shown, upload box)."""
    if not path:
        raise gr.Error("choose a .safetensors tuner file first")
    label = check_name(name, "name") if name and name.strip() else ""
    with tempfile.TemporaryDirectory(prefix="restuning-import-") as workdir:
        tuner, config, header = checked_tuner(base, path, workdir)
        prompt = str(header.get("instance_prompt", ""))[:MAX_PROMPT_CHARS]
        # the model it was checked against: Compare and Generate sample it there
        run_id = runner.import_tuner(tuner, {**config.to_dict(), "instance_prompt": prompt,
                                             "pretrained_model_name_or_path": base.source},
                                     label=label or "imported", owner=who or "")
    kind = header.get("imported_from") if header.get("imported_from") in ("kohya", "diffusers") else None
    gr.Info(f"imported as {run_id}" + (f" (a {kind} LoRA file)" if kind else ""))
    return run_id, None, None


def _wire_import(runner, base, ui: Tab, selected: gr.State, owner: gr.State, shown: gr.State) -> None:
    def try_import(path, name, who):
        """A file refused for what it is is named in a warning, deleted and cleared from the box,
        ready for the next try; one refused for another reason (a cap, the name) stays."""
        refused = []

        def attempt():
            try:
                return import_tuner(runner, base, path, name, who)
            except UploadError as exc:
                refused.extend(exc.refused)
                raise

        try:
            return friendly(attempt)()
        except gr.Error as exc:
            gr.Warning(exc.message)
            discard(refused, get_upload_folder())
            return gr.skip(), gr.skip(), None if refused else gr.skip()

    ui.import_button.click(try_import, [ui.upload, ui.import_name, owner], [selected, shown, ui.upload])
