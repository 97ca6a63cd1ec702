"""What a newcomer meets (issue 13, item 12): human labels with the option's name in the help,
a Generate gallery that does not invite uploads, a watched run that says what it is doing, and
example prompts in the demo model's own words. (tests/test_webui.py checks the labels.)"""

import gradio as gr

from tests.test_jobs import make_runner, wait_step
from webui import generate_tab, pipeline, train_tab
from webui.model import describe


def test_the_generate_gallery_shows_pictures_and_takes_none(tmp_path):
    base = describe(None)
    with gr.Blocks() as demo:
        with gr.Tab("Generate") as tab:
            generate_tab.build(make_runner(tmp_path / "runs"), base, pipeline.StudioPipeline(base), tab, gr.State(None))
    gallery = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "gen-gallery")
    assert gallery.interactive is False
    prompt = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "gen-prompt")
    assert prompt.placeholder == "a sks shape", "the demo model's captions, not a photo of a star"


def test_the_watched_run_says_it_trains_once_it_does(tmp_path, images):
    runner = make_runner(tmp_path / "runs")
    base = describe(None)
    with gr.Blocks() as demo:
        attach, outputs, _ = train_tab.build(runner, base, "cpu", "CPU demo", "test")
    refresh = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "refresh")
    run_id = runner.submit({"max_train_steps": 400, "fake_step_seconds": 0.05}, images)
    before = refresh(run_id, None)[-1]  # queued or starting
    wait_step(runner, run_id, 2)
    after = refresh(run_id, before)
    dropdown = after[outputs.index(next(o for o in outputs if getattr(o, "elem_id", None) == "live-run")) - 1]
    try:
        assert isinstance(dropdown, gr.Dropdown), "the dropdown is sent again once the phase changes"
        label = dict((v, k) for k, v in dropdown.choices)[run_id]
        assert label == f"{run_id} · training", "its phase, in a word"
    finally:
        runner.cancel(run_id)
