"""The studio's web UI: a Train tab (upload, options, live view) and a Runs tab (results).
`build(...)` returns the Blocks; `launch_options(...)` what `launch()` needs (Gradio 6 takes
theme and css there, and serves files only from `allowed_paths`: the runs folder)."""

from __future__ import annotations

import gradio as gr

from trainers.uploads import MAX_TUNER_BYTES

from . import runs_tab, train_tab

CSS = """
.rt-progress { height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden; }
.rt-progress-bar { height: 100%; background: var(--color-accent); transition: width 0.5s; }
.rt-progress-text { margin-top: 4px; font-size: 0.9em; }
"""


def build(runner, base, *, device: str, preset: str, detected: str) -> gr.Blocks:
    with gr.Blocks(title="Res-Tuning Studio") as demo:
        gr.Markdown(f"# Res-Tuning Studio\nTeach **{base.name}** a new concept from a few images; "
                    f"runs live in `{runner.runs_dir}` and keep going when this page closes.")
        with gr.Tabs():
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                attach_live, live_outputs = train_tab.build(runner, base, device, preset, detected)
            with gr.Tab("Runs / tuners", id="runs", elem_id="tab-runs") as runs:
                refresh_runs, runs_outputs = runs_tab.build(runner, base)
        # re-attach on every page load: a reload or a second tab shows the same live run
        demo.load(attach_live, None, live_outputs, show_progress="hidden", queue=False)
        runs.select(refresh_runs, None, runs_outputs, show_progress="hidden", queue=False)
    return demo


def launch_options(runner, host: str, port: int) -> dict:
    return {"server_name": host, "server_port": port, "allowed_paths": [str(runner.runs_dir)],
            "max_file_size": MAX_TUNER_BYTES, "css": CSS, "theme": gr.themes.Soft(), "show_error": False,
            "footer_links": ["gradio"]}
