"""Issue 39, item 5: what the studio says, a non-expert can follow: form fields by their labels
(the command line keeps the option names), examples in the base model's own words, no library
noise in a run's log or the server's console, a refusal as one line, and Compare's note saying
what it refused."""

import json
import logging
import subprocess
import sys

import gradio as gr
import pytest

from tests.test_jobs import images, make_runner, wait_for  # noqa: F401 (images is a fixture)
from tests.test_webui import TRAINER, config as form_config
from trainers.service.jobs import redact
from trainers.options import OptionError, parse
from webui import compare_tab, forms, generate_tab, pipeline
from webui.errors import friendly
from webui.model import DEMO_MODEL, describe
PHOTO_PROMPTS = ("a photo of sks star", "a photo of a star")


def refusal(fn, *args, **kwargs) -> str:
    with pytest.raises(gr.Error) as refused:
        friendly(fn)(*args, **kwargs)
    assert refused.value.print_exception is False, "Gradio would print the refusal's traceback"
    return refused.value.message


@pytest.mark.parametrize("changes, said", [
    ({"max_train_steps": 0}, "Training steps must be a whole number above 0; got 0"),
    ({"learning_rate": "fast"}, "Learning rate must be a number; got 'fast'"),
    ({"max_train_steps": 2.5}, "Training steps must be a whole number; got 2.5"),
    ({"with_prior_preservation": True, "class_prompt": ""}, "prior preservation needs a class prompt"),
    ({"m_dim": 2.5}, "Tuner size must be a whole number; got 2.5"),
])
def test_the_studio_names_the_forms_fields_and_the_command_line_its_options(changes, said):
    message = refusal(form_config, **changes)
    assert message.startswith(said) and "--" not in message and "max_train_steps" not in message, message


def test_the_command_line_keeps_the_option_names():
    with pytest.raises(OptionError, match="^--max_train_steps must be a whole number above 0; got 0$"):
        parse(["--instance_data_dir", "x", "--instance_prompt", "a sks shape", "--output_dir", "out",
               "--max_train_steps", "0"])


def test_a_refusal_is_one_line_in_the_console(caplog):
    def refuse():
        raise gr.Error("the prompt is empty")

    def refuse_option():
        raise OptionError("--train_batch_size must be a whole number above 0; got 0")

    with caplog.at_level(logging.INFO, logger="restuning.studio"):
        assert refusal(refuse) == "the prompt is empty"
        assert refusal(refuse_option).startswith("Batch size must")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["studio handler refuse refused: the prompt is empty",
                     "studio handler refuse_option refused: Batch size must be a whole number above 0; got 0"]
    assert not any(r.exc_info for r in caplog.records)


def test_examples_come_from_the_models_own_settings(tmp_path):
    demo = describe(None)
    assert demo.prompts == ("a sks shape", "a shape")
    settings = json.loads((DEMO_MODEL / "demo_settings.json").read_text())["prompts"]
    assert demo.prompts == (settings["instance"], settings["class"])
    other = describe(None)
    other.source = str(tmp_path)  # a model folder without settings: a photo's words
    assert other.prompts == PHOTO_PROMPTS
    (tmp_path / "demo_settings.json").write_text(json.dumps({"prompts": {"instance": "a zwx bird", "class": "a bird"}}))
    assert other.prompts == ("a zwx bird", "a bird")
    (tmp_path / "demo_settings.json").write_text(json.dumps({"prompts": ["not", "a mapping"]}))
    assert other.prompts == PHOTO_PROMPTS


def _handler(demo, name):
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name)


def test_an_empty_prompt_is_answered_with_the_demo_models_example(tmp_path):
    base, runner = describe(None), make_runner(tmp_path / "runs")
    studio = pipeline.StudioPipeline(base)
    with gr.Blocks() as demo:
        with gr.Tab("Compare") as tab:
            compare_tab.build(runner, base, studio, tab, gr.State(None))
        with gr.Tab("Generate") as tab:
            generate_tab.build(runner, base, studio, tab, gr.State(None))
    generate = _handler(demo, "do_generate")
    said = refusal(generate, None, "base", "  ", "", -1, 1, 4, 2.5, "DPM++ 2M", 1.0, [])
    assert "e.g. 'a sks shape'" in said and "photo" not in said
    said = refusal(form_config, instance_prompt=" ")
    assert "photo of sks star" in said, "the form's helper is on no base model: a photo's words"
    said = refusal(forms.build_config, "lora", {**TRAINER, "with_prior_preservation": True, "class_prompt": " "}, {},
                   model=base.source, device="cpu", examples=base.prompts)
    assert said.endswith("e.g. 'a shape'"), said

    # Compare: the note under the grid says what was refused, not a bare "Error"
    grid, download, note = _handler(demo, "do_render")(None, [], True, " ", "", "", "0", 4, 2.5, "DPM++ 2M")
    assert note == "Not rendered: the prompt is empty: describe the picture, e.g. 'a sks shape'"
    grid, download, note = _handler(demo, "do_render")(None, [], False, "a sks shape", "", "", "0", 4, 2.5, "DPM++ 2M")
    assert note == "Not rendered: choose at least one run, or include the base model"
    assert runner.run_ids() == []


def test_the_log_says_the_run_folder_in_words(tmp_path):
    run = tmp_path / "runs" / "20261207-run-ab12"
    line = f"done: 250 steps; in {run}: tuner.safetensors (tuner), README.md (model-card)"
    assert redact(line, run) == "done: 250 steps; in the run folder: tuner.safetensors (tuner), README.md (model-card)"
    assert redact(f"cannot read {run}/instance/a.png", run) == "cannot read instance/a.png"


@pytest.mark.slow
def test_no_library_noise_at_a_start_or_in_a_runs_log():
    """What the studio and the trainer do at every start and run: read the model's configs, load its
    pipeline, cast it; nothing the libraries say about it that a user cannot act on reaches the
    console or a run's Log box (a real warning of those loggers still does)."""
    script = (
        "import trainers, torch, logging\n"
        "from webui.model import describe\n"
        "base = describe(None)\n"
        "from diffusers import StableDiffusionPipeline\n"
        "pipe = StableDiffusionPipeline.from_pretrained(base.source, safety_checker=None)\n"
        "pipe.to(dtype=torch.float32)\n"
        "logging.getLogger('diffusers.models.modeling_utils').warning('There are modules in X that should be kept "
        "in float32: [\"norm\"].')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    said = done.stdout + done.stderr
    for noise in ("pip install kernels", "requires torchvision (not installed)", "kept in float32: []"):
        assert noise not in said, said
    assert 'kept in float32: ["norm"]' in said, "only the lines that say nothing are dropped"


# -- issue 39, item 6: runs that can be told apart ------------------------------------------------


def test_compare_captions_and_run_lists_say_what_differs(tmp_path, images):
    runner = make_runner(tmp_path / "runs")
    more = images + [(images[0][0], "b.png"), (images[0][0], "c.png")]
    first = wait_for(runner, runner.submit({"method": "lora", "max_train_steps": 2, "learning_rate": 0.01}, images), {"done"})
    second = wait_for(runner, runner.submit({"method": "lora", "max_train_steps": 3, "learning_rate": 0.001}, more,
                                            label="my star"), {"done"})
    one, two = pipeline.caption(first), pipeline.caption(second)
    assert one[0] == two[0] == "LoRA"
    assert "2 steps · lr 0.01" in one and "3 steps · lr 0.001" in two
    assert one[one.index("2 steps · lr 0.01") + 1].startswith("1 images · ")
    assert two[two.index("3 steps · lr 0.001") + 1].startswith("3 images · ")
    assert "my star" in two and "lora" not in one, "the user's name, never the method's id as a name"
    assert all(len(line) <= 28 for line in one + two if line != first.prompt), "each line fits a grid column"
    labels = dict((v, k) for k, v in compare_tab.tuner_options(runner, None))
    assert labels[first.id].startswith("LoRA · 2 steps · ") and labels[second.id].startswith("my star (LoRA) · 3 steps · ")
    assert all(first.id not in label and len(label) <= 48 for label in labels.values()), labels


def _train_handler(demo, train):
    return next(f.fn for f in demo.fns.values() if any(t[0] == train._id and t[1] == "click" for t in f.targets))


@pytest.mark.parametrize("name, kept", [
    ("", None), ("   ", None), ("my star", "my star"), ("x" * 120, "x" * 120), ("x" * 121, False),
    ("star\x1b[2J", False), ("star\nline", False), ("../up", False),
])
def test_the_train_form_stores_a_run_name_checked_like_other_names(tmp_path, name, kept):
    from trainers.service.uploads import MAX_NAME_CHARS
    from webui import train_tab
    from webui.model import example_concepts

    assert MAX_NAME_CHARS == 120
    runner, base = make_runner(tmp_path / "runs"), describe(None)
    with gr.Blocks() as demo:
        train_tab.build(runner, base, "cpu", "CPU demo", "test")
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    train = by_id["train"]
    handler = _train_handler(demo, train)
    inputs = next(f for f in demo.fns.values() if f.fn is handler).inputs
    values = {c: c.value for c in inputs}
    values.update({by_id["concept-files"]: example_concepts()["star"], by_id["run-name"]: name,
                   by_id["instance-prompt"]: "a sks shape", by_id["method"]: "res-tuning",
                   by_id["opt-max_train_steps"]: 2})
    values.update({c: None for c in inputs if isinstance(c, gr.State)})
    if kept is False:
        with pytest.raises(gr.Error, match="the run name"):
            handler(values)
        assert runner.run_ids() == []
        return
    run_id = handler(values)[0]
    info = runner.info(run_id)
    caption = pipeline.caption(info)
    assert info.label == (kept or "res-tuning") and (caption[2] == kept if kept else caption[2] == "2 steps"), caption
    runner.cancel(run_id)


def test_the_log_box_names_options_by_the_forms_labels(tmp_path, images):
    """The trainer's recipe line names its options as a command line does; the Log box shows the
    form's labels (the command line's log keeps the option names)."""
    from webui import live

    runner = make_runner(tmp_path / "runs")
    run_id = runner.submit({"max_train_steps": 1, "fake_step_seconds": 0}, images)
    info = wait_for(runner, run_id, {"done"})
    with open(info.dir / "train.log", "a", encoding="utf-8") as log:
        log.write("recipe: --learning_rate 0.01 (demo_settings.json of the base model, for res-tuning); "
                  "--lr_warmup_steps 30 (demo_settings.json of the base model)\n")
    shown = live.log_text(runner.info(run_id))
    assert "recipe: Learning rate 0.01 (demo_settings.json" in shown, shown
    assert "--" not in shown.split("---", 1)[1] and "learning_rate" not in shown
