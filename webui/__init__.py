"""The studio's web UI: a Train tab (upload, options, live view), a Runs tab (results), a Compare
tab (tuners side by side) and a Generate tab (prompt and generate with one tuner).
`build(...)` returns the Blocks; `launch_options(...)` what `launch()` needs (Gradio 6 takes
theme and css there, and serves files only from `allowed_paths`: the runs folder and the
example concepts)."""

from __future__ import annotations

import gradio as gr

from trainers.uploads import MAX_TUNER_BYTES

from . import compare_tab, generate_tab, pipeline, runs_tab, train_tab, visitors
from .model import EXAMPLE_CONCEPTS

CSS = """
.rt-progress { height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden; }
.rt-progress-bar { height: 100%; background: var(--color-accent); transition: width 0.5s; }
.rt-progress-text { margin-top: 4px; font-size: 0.9em; }
"""


def build(runner, base, *, device: str, preset: str, detected: str, shared: bool = False,
          sample_device: str = "cpu") -> gr.Blocks:
    """`shared`: many visitors (a Space), each sees only their own and published runs."""
    studio = pipeline.StudioPipeline(base, sample_device)
    with gr.Blocks(title="Res-Tuning Studio") as demo:
        # who this page is: None on a local machine (one user, every run); on a shared server a
        # random id kept in the browser's localStorage, "" until the page has loaded it
        remembered = gr.BrowserState(None, storage_key="restuning-owner")
        owner = gr.State("" if shared else None)
        gr.Markdown(f"# Res-Tuning Studio\nTeach **{base.name}** a new concept from a few images; "
                    f"runs live in `{runner.runs_dir}` and keep going when this page closes.")
        with gr.Tabs():
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                attach_live, live_outputs = train_tab.build(runner, base, device, preset, detected, owner)
            with gr.Tab("Runs / tuners", id="runs", elem_id="tab-runs") as runs:
                refresh_runs, runs_outputs = runs_tab.build(runner, base, owner, shared)
            with gr.Tab("Compare", id="compare", elem_id="tab-compare") as compare:
                refresh_compare, compare_picks = compare_tab.build(runner, base, studio, owner)
            with gr.Tab("Generate", id="generate", elem_id="tab-generate") as generate:
                refresh_generate, generate_tuner = generate_tab.build(runner, base, studio, owner)
        # re-attach on every page load: a reload or a second tab shows the same live run (once the
        # page knows its visitor, on a shared studio)
        if shared:
            demo.load(identify, remembered, [remembered, owner], queue=False).then(
                attach_live, owner, live_outputs, show_progress="hidden", queue=False)
        else:
            demo.load(attach_live, owner, live_outputs, show_progress="hidden", queue=False)
        runs.select(refresh_runs, owner, runs_outputs, show_progress="hidden", queue=False)
        compare.select(refresh_compare, [owner, compare_picks], compare_picks, show_progress="hidden", queue=False)
        generate.select(refresh_generate, [owner, generate_tuner], generate_tuner, show_progress="hidden", queue=False)
    return demo


def identify(stored):
    """The visitor's owner id: the one this browser remembers, or a new one it will remember."""
    who = visitors.checked_owner(stored) or visitors.new_owner()
    return who, who


def launch_options(runner, host: str, port: int) -> dict:
    return {"server_name": host, "server_port": port, "allowed_paths": [str(runner.runs_dir), str(EXAMPLE_CONCEPTS)],
            "max_file_size": MAX_TUNER_BYTES, "css": CSS, "theme": gr.themes.Soft(), "show_error": False,
            "footer_links": ["gradio"]}
