"""The studio's web UI: a Train tab (upload, options, live view), a Runs tab (results), a Compare
tab (tuners side by side) and a Generate tab (prompt and generate with one tuner).
`build(...)` returns the Blocks; `launch_options(...)` what `launch()` needs (Gradio 6 takes
theme and css there, and serves files only from `allowed_paths`: the runs folder and the
example concepts)."""

from __future__ import annotations

import html

import gradio as gr

from trainers.service.uploads import MAX_TUNER_BYTES, SHARED_MAX_UPLOAD_BYTES

from . import catalog, compare_tab, files, generate_tab, pipeline, runs_tab, train_tab, visitors
from .model import EXAMPLE_CONCEPTS

CSS = """
.rt-progress { height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden; }
.rt-progress-bar { height: 100%; background: var(--color-accent); transition: width 0.5s; }
.rt-progress-text { margin-top: 4px; font-size: 0.9em; }
.rt-banner { padding: 8px 12px; border-radius: 6px; background: var(--color-accent-soft); margin-bottom: 4px; }
/* a message's lines (webui.errors.as_html): one problem per line */
.toast-message-text { white-space: pre-line; }
/* a gallery's label floats over its grid's top left: the pictures start below it, not under it */
.block:has(> label[data-testid="block-label"]) .gallery-container .grid-container { padding-top: 40px; }
/* gallery captions wrap instead of being cut at one line */
#live-samples .caption-label, #runs-samples .caption-label { white-space: normal; overflow: visible; text-overflow: clip;
  font-size: 0.75em; }
@media (max-width: 768px) {
  /* a phone: the live view above the form, every tab's name in the bar */
  #train-row { flex-direction: column; }
  #train-live { order: -1; }
  #train-live, #train-form { width: 100% !important; min-width: 0 !important; max-width: 100%; }
  /* the watched run's id and state in one line beside the dropdown's arrow */
  #live-run input { font-size: 0.8em; }
}
"""

# Soft, in the system's fonts: its web fonts (~200 kB, three files) cost a page load ~0.1 s on 2 cores
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build(runner, base, *, device: str, preset: str, detected: str, shared: bool = False,
          sample_device: str = "cpu", persistent: bool = True, models=None) -> gr.Blocks:
    """`base`: the studio's own model; `models`: the base models the Train form offers
    (webui.catalog.Catalog, `base` first; default `base` alone); `shared`: many visitors (a
    Space), each sees only their own and published runs; `persistent`: the runs folder outlives
    a restart."""
    models = models or catalog.single(base)
    studio = pipeline.StudioPipeline(base, sample_device, models)
    # uploads and cached copies older than a day go, checked hourly: a visitor who uploads and
    # leaves does not fill the disk (a copy handed out again is touched, so it stays)
    with gr.Blocks(title="Res-Tuning Studio", delete_cache=(3600, 86400)) as demo:
        # who this page is: None on a local machine (one user, every run); on a shared server the
        # owner id proven by a secret kept in the browser's localStorage, "" until the page has
        # loaded it (webui.visitors; the BrowserState's own key is public)
        remembered = gr.BrowserState(None, storage_key="restuning-visitor",
                                     secret=visitors.browser_state_key(runner.runs_dir) if shared else None)
        owner = gr.State("" if shared else None)
        others = " or another base model of the list below" if len(models.entries) > 1 else ""
        gr.HTML(f"<h1>Res-Tuning Studio</h1><p>Teach <b>{html.escape(base.name)}</b> "
                f"(<span id='base-family'>{html.escape(base.family_label)}, {base.resolution} px</span>){others} "
                "a new concept from a few images; a run keeps going when this page closes.</p>")
        if shared:
            gr.HTML(shared_banner(runner.limits, persistent), elem_id="shared-banner")
        # "wrap": on a phone the four tabs take two lines rather than hiding behind a "⋯" menu
        with gr.Tabs(overflow_behavior="wrap") as tabs:
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                attach_live, live_outputs, kept = train_tab.build(runner, base, device, preset, detected, owner, models)
            with gr.Tab("Runs / tuners", id="runs", elem_id="tab-runs") as runs:
                on_first_visit(runs, owner, lambda who: runs_tab.build(runner, base, runs, owner, who, shared,
                                                                       train_again=(kept, tabs)))
            with gr.Tab("Compare", id="compare", elem_id="tab-compare") as compare:
                on_first_visit(compare, owner, lambda who: compare_tab.build(runner, base, studio, compare, owner, who))
            with gr.Tab("Generate", id="generate", elem_id="tab-generate") as generate:
                on_first_visit(generate, owner, lambda who: generate_tab.build(runner, base, studio, generate, owner, who))
        # the form as this browser left it (it is saved on every change)
        demo.load(kept.restore, kept.state, kept.outputs, show_progress="hidden", queue=False)
        # re-attach on every page load: a reload or a second tab shows the same live run (once the
        # page knows its visitor, on a shared studio)
        if shared:
            demo.load(identify, remembered, [remembered, owner], queue=False).then(
                attach_live, owner, live_outputs, show_progress="hidden", queue=False)
        else:
            demo.load(attach_live, owner, live_outputs, show_progress="hidden", queue=False)
    return demo


def shared_banner(limits, persistent: bool) -> str:
    """What a visitor of a shared studio needs to know before training: it is shared, what one
    visitor may take (trainers.service.limits), and how long what they make is kept."""
    caps = []
    if limits.runs_per_owner:
        caps.append(f"{limits.runs_per_owner} runs queued or running at once")
    if limits.max_steps:
        caps.append(f"{limits.max_steps:,} steps per run")
    if limits.max_run_seconds:
        caps.append(f"{limits.max_run_seconds / 60:.0f} minutes of training per run (then it pauses, resumable)")
    if limits.disk_per_owner:
        caps.append(f"{limits.disk_per_owner / 2**30:.0f} GB of runs and pictures")
    storage = ("Runs are kept on this studio's storage until you delete them." if persistent else
               "Storage is temporary: everything here is deleted when the studio restarts, so download what you want to keep.")
    return (f"<div class='rt-banner'><b>This studio is shared.</b> Other visitors cannot see your runs unless you publish "
            f"them. Each visitor may have {', '.join(caps) or 'what the server allows'}. {storage}</div>")


def on_first_visit(tab: gr.Tab, owner: gr.State, build_content) -> None:
    """Build a tab's content the first time the tab is selected, not with the page.

    What the browser does on a page load grows with every component in the page's config, even
    ones in tabs not shown (these three tabs cost ~0.3 s of a page load on 2 cores), and a page
    load competes with training for the same cores. The first selection sets `opened`, whose
    change renders the content once, with the data of that moment; the content keeps itself
    current from then on (each tab's own select and timer listeners). `opened` is set through
    the queue because a State's change event is only seen there. A component made in a render
    is not known to the page as an event's input, so Gradio would show one that has a value as
    read-only: the tabs' inputs say `interactive=True`."""
    opened = gr.State(False)
    tab.select(lambda: True, None, opened, show_progress="hidden")

    @gr.render(inputs=[opened, owner], triggers=[opened.change], show_progress="hidden")
    def content(is_open, who):
        if is_open:
            build_content(who)


def identify(stored):
    """(the secret this browser remembers, or a new one it will remember; the owner id it proves)."""
    secret = visitors.checked_secret(stored) or visitors.new_secret()
    return secret, visitors.owner_id(secret)


def launch_options(runner, host: str, port: int, shared: bool = False, proxy_hops: int = 0) -> dict:
    """`shared`: the upload route takes at most SHARED_MAX_UPLOAD_BYTES per file (every tuner but
    a full fine-tune), not a full fine-tune's 4 GB, and at most the runner's upload caps per
    client (`proxy_hops` trusted proxies in front name the client: webui.files) and in all.
    The web server is told to trust no X-Forwarded-For of its own (webui.files.trust_no_forwarding):
    `proxy_hops` alone says who the client is."""
    files.trust_no_forwarding()
    # the runs folder is allowed so that handlers' files may be copied into Gradio's cache, and
    # private so that nothing in it is served directly (webui.files)
    return {"server_name": host, "server_port": port, "allowed_paths": [str(runner.runs_dir), str(EXAMPLE_CONCEPTS)],
            "app_kwargs": {"middleware": files.middleware(runner.runs_dir, [EXAMPLE_CONCEPTS],
                                                          runner.limits if shared else None, proxy_hops)},
            "max_file_size": SHARED_MAX_UPLOAD_BYTES if shared else MAX_TUNER_BYTES,
            "css": CSS, "theme": THEME, "show_error": False,
            "footer_links": ["gradio"]}
