"""The studio's logic without a browser: configs built from form values (refused exactly where
the trainer would refuse them), the method order, the generated form, the live view's data."""

import json
import re

import pytest
import torch

from restuning.methods import METHODS
from trainers.events import EventLog
from trainers.service.jobs import JobRunner
from trainers.options import OptionError, from_dict, method_recipe
from webui import forms, live
from webui.presets import PRESETS, preset_values

TRAINER = {"instance_prompt": "a sks star", "max_train_steps": 20, "learning_rate": 1e-4, "resolution": 64,
           "mixed_precision": "no", "validation_prompt": ""}


def config(method="res-tuning", device="cpu", **changes):
    method_values = {f.name: forms._default(f) for f in forms.dataclasses.fields(METHODS[method].config)}
    method_values = {k: (",".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else v)
                     for k, v in method_values.items()}
    trainer = {**TRAINER, **{k: v for k, v in changes.items() if not k.startswith("m_")}}
    method_values.update({k[2:]: v for k, v in changes.items() if k.startswith("m_")})
    return forms.build_config(method, trainer, method_values, model="assets/demo-model", device=device)


def test_paper_methods_come_first_then_every_registered_method():
    names = forms.method_names()
    assert names[0] == "res-tuning" and sorted(names) == sorted(METHODS)
    if "bypass" in METHODS:
        assert names[1] == "bypass"


@pytest.mark.parametrize("method", list(METHODS))
def test_a_valid_form_gives_a_config_the_trainer_accepts(method):
    cfg = config(method)
    assert cfg["method"] == method and cfg["validation_prompt"] == ["a sks star"]
    options = from_dict({**cfg, "instance_data_dir": "x", "output_dir": "y"})
    assert options.method_config.method == method


def test_the_preselected_method_says_why_in_one_line_and_only_it():
    from webui import wording

    assert wording.PRESELECTED in forms.method_summary(forms.method_names()[0])
    assert all(wording.PRESELECTED not in forms.method_summary(m) for m in forms.method_names()[1:])
    assert "benchmarks.md" in wording.PRESELECTED and "\n" not in wording.PRESELECTED


def test_the_layout_offers_only_a_convolutional_adapter_beside_the_resnets():
    from restuning.methods.res_tuning.config import ResTuningConfig

    dropdown = forms.component_for_field("res-tuning", next(f for f in forms.dataclasses.fields(ResTuningConfig) if f.name == "tuners"))
    values = [v for _, v in dropdown.choices]
    assert "resnet=adapter" in values and not any(v.startswith("resnet=") and v != "resnet=adapter" for v in values)
    assert "resnet=adapter" not in dropdown.value and "block=adapter" in dropdown.value and "attn1=prefix" in values


def test_an_optional_choice_left_at_the_recipe_is_not_given():
    actions = forms.trainer_actions()
    dropdown = forms.component_for_action(actions["lr_scheduler"])
    assert dropdown.value == "" and ("the method's recipe", "") in dropdown.choices
    assert forms.trainer_value(actions["lr_scheduler"], "") is None
    assert forms.trainer_value(actions["lr_scheduler"], "cosine") == "cosine"


def test_the_layout_text_becomes_a_dict():
    assert config(m_tuners="attn1=prefix, ff=adapter")["tuners"] == {"attn1": "prefix", "ff": "adapter"}


@pytest.mark.parametrize("changes, message", [
    ({"instance_prompt": "  "}, "instance prompt is empty"),
    ({"with_prior_preservation": True, "class_prompt": ""}, "prior preservation needs a class prompt"),
    ({"mixed_precision": "fp16"}, "fp16 does not run on the CPU"),
    ({"m_tuners": "attn1"}, "OP=kind pairs"),
    ({"m_tuners": "attn1=lasagna"}, "unknown tuner kind"),
    ({"m_blocks": []}, "choose at least one"),
    ({"resolution": 30}, "resolution"),
    ({"max_train_steps": 2.5}, "whole number"),
])
def test_bad_forms_are_refused_with_a_message_naming_the_problem(changes, message):
    with pytest.raises((OptionError, ValueError), match=message):
        config(**changes)


def test_presets_cap_resolution_at_the_models_own():
    assert preset_values("CPU demo", 64)["resolution"] == 64
    assert preset_values("CPU demo", 512)["resolution"] == 256
    assert preset_values("24 GB+ GPU", 512) == {**PRESETS["24 GB+ GPU"], "resolution": 512}


def test_the_ui_offers_every_trainer_option_and_every_method_field(tmp_path):
    import webui
    from webui.model import describe

    runner = JobRunner(tmp_path / "runs", devices=["cpu"])
    demo = webui.build(runner, describe(None), device="cpu", preset="CPU demo", detected="test")
    labels = {getattr(block, "label", None) for block in demo.blocks.values()}
    by_id = {getattr(block, "elem_id", None): block for block in demo.blocks.values()}
    shown = [f"opt-{name}" for name in forms.trainer_actions() if name not in ("instance_prompt", "class_prompt")]
    shown += [f"opt-{m}-{f.name}" for m, method in METHODS.items() for f in forms.dataclasses.fields(method.config)]
    assert not [i for i in shown if i not in by_id]
    # each option says what it does in plain words: no flag names, formulas or internal sources
    for elem_id in shown:
        info = str(getattr(by_id[elem_id], "info", "") or "")
        assert info and not re.search(r"\(--|--[a-z]|Eq\.|Δ|demo_settings|registry", info), (elem_id, info)
    assert not {"with_prior_preservation", "max_train_steps", "learning_rate"} & labels, "human labels"
    assert {"Prior preservation", "Training steps", "Learning rate"} <= labels


def test_the_page_holds_the_train_tab_and_builds_the_others_on_their_first_visit(tmp_path):
    import webui
    from webui.model import describe

    runner = JobRunner(tmp_path / "runs", devices=["cpu"])
    demo = webui.build(runner, describe(None), device="cpu", preset="CPU demo", detected="test")
    config = demo.get_config_file()
    ids = {c["props"].get("elem_id") for c in config["components"]}
    assert {"train", "concept-files", "live-progress", "tab-runs", "tab-compare", "tab-generate"} <= ids
    assert not ids & {"runs-table", "compare-runs", "gen-tuner"}, "built on the tab's first visit, not with the page"
    folded = {c["props"].get("elem_id"): c["props"]["open"] for c in config["components"] if c["type"] == "accordion"}
    assert folded == {"method-options": False, "advanced": False, "comparison": False}


def _info(tmp_path, events):
    runner = JobRunner(tmp_path / "runs", devices=["cpu"])
    run_id, path = runner.new_run_dir("x")
    (path / "job.json").write_text(json.dumps({"created": 1}))
    (path / "config.json").write_text(json.dumps({"max_train_steps": 10}))
    log = EventLog(path)
    for kind, fields in events:
        log.emit(kind, **fields)
    return runner.info(run_id)


def test_live_view_data_comes_from_the_events(tmp_path):
    (tmp_path / "secret.png").write_bytes(b"x")
    info = _info(tmp_path, [
        ("phase", {"phase": "training"}),
        *[("step", {"step": s, "total": 10, "loss": 1.0 / s, "lr": 1e-4, "sec_per_step": 0.5, "eta_sec": 5}) for s in (1, 2, 3)],
        ("phase", {"phase": "queued"}),  # resumed from a checkpoint at step 2
        ("step", {"step": 3, "total": 10, "loss": 0.25, "lr": 1e-4, "sec_per_step": 0.5, "eta_sec": 3.5}),
        ("sample", {"step": 3, "prompt": "p", "paths": ["../../secret.png", "samples/missing.png"]}),
        ("phase", {"phase": "failed", "error": "out of memory", "hint": "lower the resolution"}),
    ])
    assert info.status == "failed" and info.error == "out of memory"
    frame = live.loss_frame(info)
    assert frame["step"].tolist() == [1, 2, 3] and frame["loss"].tolist()[-1] == 0.25
    assert live.samples(info) == []  # outside the run folder or missing: never served
    html = live.progress_html(info)
    assert "step 3/10" in html and "failed: out of memory" in html and "width:30.0%" in html


def test_optional_numbers_are_left_out_when_empty_and_refused_when_not_numbers():
    assert "checkpoints_total_limit" not in config(checkpoints_total_limit="")
    assert config(checkpoints_total_limit="3")["checkpoints_total_limit"] == 3
    with pytest.raises(OptionError, match="must be a number"):
        config(checkpoints_total_limit="three")


def test_base_model_facts_come_from_its_configs(tmp_path):
    from webui.model import DEMO_MODEL, describe

    demo = describe(None)
    assert demo.source == str(DEMO_MODEL) and demo.resolution == 64 and demo.name == "the bundled demo model"
    from safetensors.torch import save_file

    unet_key = "model.diffusion_model.input_blocks.0.0.weight"
    for name, text_key, family, resolution in (("v1-5", "cond_stage_model.transformer.x", "sd1", 512),
                                               ("v2-1", "cond_stage_model.model.x", "sd2", 768),
                                               ("xl", "conditioner.embedders.1.model.x", "sdxl", 1024)):
        checkpoint = tmp_path / f"{name}.safetensors"
        save_file({unet_key: torch.zeros(1), text_key: torch.zeros(1)}, str(checkpoint))
        base = describe(str(checkpoint))
        assert (base.family, base.resolution) == (family, resolution)
        assert set(base.text_encoders_on_meta()) == ({"text_encoder", "text_encoder_2"} if family == "sdxl" else {"text_encoder"})
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        describe(str(tmp_path / "empty.safetensors"))
    with pytest.raises(ValueError, match="no such checkpoint file"):
        describe(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="cannot read its unet/vae configs"):
        describe(str(tmp_path))


def test_class_image_generation_shows_its_own_progress(tmp_path):
    info = _info(tmp_path, [("phase", {"phase": "class-images", "done": 12, "total": 100})])
    info.status = "running"  # as while its process lives
    assert live.status_line(info) == "running: generating class images 12/100"


def test_example_concepts_are_offered_and_served(tmp_path):
    import webui
    from webui.model import EXAMPLE_CONCEPTS, example_concepts

    examples = example_concepts()
    assert set(examples) == {"star", "heart"}
    assert all(4 <= len(files) <= 6 for files in examples.values())
    runner = JobRunner(tmp_path / "runs", devices=["cpu"])
    assert str(EXAMPLE_CONCEPTS) in webui.launch_options(runner, "127.0.0.1", 7860)["allowed_paths"]


def test_the_form_shows_the_depth_the_base_models_recipe_sets(tmp_path):
    """The demo model's recipe sets the Bypass's depth (3); the form shows it there, and
    BypassConfig's default (2) for a model folder without one; the run's config carries it."""
    depth = next(f for f in forms.dataclasses.fields(METHODS["bypass"].config) if f.name == "depth")
    assert forms.component_for_field("bypass", depth, method_recipe("assets/demo-model", "bypass")).value == 3
    assert forms.component_for_field("bypass", depth, method_recipe(str(tmp_path), "bypass")).value == 2
    assert forms.component_for_field("bypass", depth).value == 2
    config = forms.build_config("bypass", {**TRAINER, "instance_prompt": "a sks shape"}, {"depth": 3}, model="assets/demo-model", device="cpu")
    assert config["depth"] == 3


def _choices(method, f):
    """Every value one of a method's options offers in the form (all of them where several may be ticked)."""
    component = forms.component_for_field(method, f)
    offered = [v for _, v in component.choices] if getattr(component, "choices", None) else []
    if isinstance(component.value, list):  # ticked one at a time, and (but for the layout's pairs) all at once
        return [[v] for v in offered] + ([] if getattr(component, "multiselect", False) else [offered])
    if offered:
        return offered
    if isinstance(component.value, bool):
        return [True, False]
    return [component.value]


def test_the_estimate_is_shown_for_every_method_and_option_the_form_accepts(tmp_path):
    """Item 4 of issue 30: each method, each choice of each option, with and without prior
    preservation; wherever the form would queue the run, the line beside Train gives a figure."""
    from webui.train_tab import memory_line

    runner = JobRunner(tmp_path / "runs", devices=["cpu"])
    trainer = {k: v for k, v in TRAINER.items() if k != "instance_prompt"}
    walked = 0
    for method, entry in METHODS.items():
        defaults = {f.name: forms.component_for_field(method, f).value for f in forms.dataclasses.fields(entry.config)}
        sets = [dict(defaults)] + [{**defaults, f.name: v} for f in forms.dataclasses.fields(entry.config) for v in _choices(method, f)]
        for values in sets:
            for prior in (False, True):
                options = {**trainer, "with_prior_preservation": prior, "class_prompt": ""}
                try:
                    forms.build_config(method, {**options, "class_prompt": "a shape" if prior else "", "instance_prompt": "a sks star"},
                                       values, model="assets/demo-model", device="cpu")
                except (OptionError, ValueError):
                    continue
                line = memory_line(runner, "assets/demo-model", method, options, values)
                assert "GiB" in line, (method, values, prior, line)
                walked += 1
    assert walked > 60


def test_a_bad_file_in_a_batch_is_refused_alone(tmp_path, monkeypatch):
    from PIL import Image
    from webui import train_tab

    monkeypatch.setattr(train_tab.gr, "Warning", lambda *a, **k: None)
    monkeypatch.setattr(train_tab, "get_upload_folder", lambda: str(tmp_path))
    good = []
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 60, 0, 0)).save(tmp_path / f"ok{i}.png")
        good.append(str(tmp_path / f"ok{i}.png"))
    bad = tmp_path / "holiday.png"
    bad.write_text("not an image")
    kept, preview = train_tab.on_upload([good[0], str(bad), *good[1:]])
    assert kept == good and [p for p in preview.value] and not bad.exists()
    assert train_tab.on_upload([str(bad)])[0] is None


def test_class_images_show_their_own_bar_and_eta_and_a_finished_run_its_duration(tmp_path):
    info = _info(tmp_path, [("phase", {"phase": "loading"}),
                            ("phase", {"phase": "class-images", "message": "100 class images"})])
    info.status = "running"
    for done in (10, 20):
        info.events.append({"t": info.events[-1]["t"] + 5, "event": "phase", "phase": "class-images", "done": done, "total": 100})
    shown = live.progress_html(info)
    assert "making class images 20/100" in shown and "ETA 40s" in shown and "data-kind='class-images'" in shown
    assert "class images: 20/100 made" in live.log_text(info) and "10/100" not in live.log_text(info)
    info.events.append({"t": info.events[-1]["t"] + 95, "event": "phase", "phase": "done"})
    info.status = "done"
    shown = live.progress_html(info)
    assert "done in 1m 45s" in shown and "Compare" in shown


def test_the_loss_plot_draws_a_smoothed_line_over_the_steps(tmp_path):
    info = _info(tmp_path, [("step", {"step": s, "total": 4, "loss": loss}) for s, loss in ((1, 1.0), (2, 0.0), (3, 1.0), (4, 0.0))])
    frame = live.loss_plot_frame(info)
    raw, smooth = frame[frame.series == "per step"], frame[frame.series == "smoothed"]
    assert raw["loss"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert smooth["step"].tolist() == [1, 2, 3, 4] and 0.3 < smooth["loss"].iloc[-1] < 0.7


def test_the_log_never_shows_the_launchers_command_line(tmp_path):
    from trainers.service.jobs import log_tail

    info = _info(tmp_path, [("phase", {"phase": "cancelled"})])
    (info.dir / "train.log").write_text("$ /usr/bin/python -m accelerate.commands.launch /srv/runs/x/config.json\nstep 1\n")
    assert log_tail(info.dir) == ["step 1"]


def test_a_shared_studio_says_so_with_its_limits_and_ticks_no_more_than_a_visitor_may_queue(tmp_path):
    import webui
    from trainers.service.limits import SHARED
    from webui.model import describe

    runner = JobRunner(tmp_path / "runs", devices=["cpu"], limits=SHARED)
    demo = webui.build(runner, describe(None), device="cpu", preset="CPU demo", detected="test", shared=True,
                       persistent=False)
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    banner = by_id["shared-banner"].value
    assert "shared" in banner and "2 runs queued or running" in banner and "temporary" in banner
    assert len(by_id["compare-methods"].value) == SHARED.runs_per_owner
    header = " ".join(str(getattr(b, "value", "")) for b in demo.blocks.values() if type(b).__name__ == "HTML")
    assert str(runner.runs_dir) not in header and str(tmp_path) not in header


def _run(run_id, status, *, phase=None, position=None, steps=100, step=None, pace=1.0, t=1000.0, method="lora", created=0.0):
    from trainers.service.jobs import RunInfo

    events = [{"t": t, "event": "step", "step": step, "total": steps, "loss": 0.1, "sec_per_step": pace}] if step else []
    config = {"method": method, "max_train_steps": steps, "resolution": 64, "train_batch_size": 1,
              "pretrained_model_name_or_path": "assets/demo-model"}
    return RunInfo(id=run_id, dir=None, status=status, phase=phase or ("training" if status == "running" else status),
                   position=position, config=config, events=events, created=created)


def test_a_queued_run_with_nothing_ahead_should_start_at_once():
    me = _run("me", "queued", position=1)
    assert live.start_in(me, [me], now=1000.0) == 0.0
    done = _run("old", "done", step=100)  # a finished run holds no place
    assert live.start_in(me, [done, me], now=1000.0) == 0.0
    assert live.start_words(0.0) == "should start within a minute"


def test_a_run_ahead_without_a_step_is_estimated_from_a_like_run_or_not_at_all():
    me = _run("me", "queued", position=1)
    loading = _run("ahead", "running", phase="loading", steps=100)
    assert live.start_in(me, [loading, me], now=1000.0) is None
    assert live.start_words(None) == "no start time yet: the run ahead has not made its first step"
    measured = _run("old", "done", step=100, pace=2.0, created=-1)
    assert live.start_in(me, [measured, loading, me], now=1000.0) == 200.0  # 100 steps x 2 s, measured on a like run
    other = _run("old", "done", step=100, pace=2.0, method="full", created=-1)  # another method: not alike
    assert live.start_in(me, [other, loading, me], now=1000.0) is None
    # still making its class images: their ETA first, then its steps
    making = _run("ahead", "running", phase="class-images", steps=100)
    making.events = [{"t": 900.0, "event": "phase", "phase": "class-images", "done": 0, "total": 20},
                     {"t": 910.0, "event": "phase", "phase": "class-images", "done": 10, "total": 20}]
    assert live.start_in(me, [measured, making, me], now=1000.0) == 210.0


def test_several_runs_ahead_add_up_per_place_and_runs_behind_do_not_count():
    now = 1000.0
    running = _run("a", "running", step=50, steps=100, pace=1.0, t=now - 30)  # 50 steps left, 30 s of them gone
    first = _run("b", "queued", position=1, steps=200)  # paced like the running run: 1 s/step
    me = _run("me", "queued", position=2)
    behind = _run("c", "queued", position=3, steps=10_000)
    runs = [running, first, me, behind]
    assert live.start_in(me, runs, now=now) == 20 + 200
    assert live.start_words(live.start_in(me, runs, now=now)) == "should start in about 4 min"
    assert live.start_in(me, runs, slots=2, now=now) == 20  # b takes the free place, me the running run's
    assert live.start_in(first, runs, now=now) == 20
    assert live.start_in(me, runs, slots=3, now=now) == 0.0
    stopping = _run("a", "running", phase="done", step=50)  # writing its last files: it ends any moment
    assert live.start_in(first, [stopping, first], now=now) == 0.0
    # a place frees only when as many runs have ended as hold places beyond the slots
    long = _run("d", "running", step=1, steps=101, pace=1.0, t=now)
    assert live.start_in(first, [running, long, first], slots=1, now=now) == 100


@pytest.mark.parametrize("seconds, words", [(59, "should start within a minute"), (60, "should start in about 1 min"),
                                            (61, "should start in about 2 min"), (89 * 60, "should start in about 89 min"),
                                            (90 * 60, "should start in about 1.5 h"), (7200, "should start in about 2 h")])
def test_the_start_time_reads_in_plain_words(seconds, words):
    assert live.start_words(seconds) == words


def test_the_live_view_of_a_queued_run_says_when_it_should_start(tmp_path):
    from tests.e2e.conftest import stop_runs
    from tests.test_jobs import make_runner

    runner = make_runner(tmp_path / "runs")  # ticked only by submit: the first run starts, the second waits
    (tmp_path / "a.png").write_bytes(b"png bytes")
    images = [(tmp_path / "a.png", "a.png")]
    config = {"method": "lora", "max_train_steps": 100, "instance_prompt": "a sks star", "fake_step_seconds": 60}
    try:
        first = runner.submit(config, images)
        info = runner.info(runner.submit(config, images))
        assert runner.info(first).status == "running" and live.status_line(info) == "queued, place 1 in the queue"
        assert "queued, place 1 in the queue · no start time yet" in live.progress_html(info, live.queue_words(runner, info))
        assert live.queue_words(runner, runner.info(first)) == ""
    finally:
        stop_runs(tmp_path / "runs")


def _form_memory(runner):
    """(the Train form's Memory, component by elem_id) of a studio page over `runner`."""
    import gradio as gr

    from webui import train_tab
    from webui.model import describe

    with gr.Blocks():
        _, _, kept = train_tab.build(runner, describe(None), "cpu", "CPU demo", "test")
    return kept, {c.elem_id: c for c in kept.outputs}


def _by_id(kept, updates) -> dict:
    """elem_id -> the update restore or from_run gave its component (gr.skip(): none)."""
    return {c.elem_id: (None if isinstance(u, dict) and u.get("__type__") == "update" and len(u) == 1 else u)
            for c, u in zip(kept.outputs, updates)}


def test_a_kept_form_is_restored_only_with_what_the_form_can_take(tmp_path, monkeypatch):
    """What the browser kept is the visitor's to forge (the BrowserState's key is public): only
    images in Gradio's upload folder that pass the checks, choices the form offers and values of
    each box's type come back; a run's files never do."""
    from PIL import Image

    from tests.e2e.conftest import stop_runs
    from tests.test_jobs import make_runner

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    runner = make_runner(tmp_path / "runs")
    (tmp_path / "gradio" / "abc").mkdir(parents=True)
    kept_image, outside = tmp_path / "gradio" / "abc" / "star.png", tmp_path / "elsewhere.png"
    for path in (kept_image, outside):
        Image.new("RGB", (64, 64), "white").save(path)
    (tmp_path / "gradio" / "abc" / "notes.png").write_text("not an image")
    try:
        run_id = runner.submit({"method": "lora", "max_train_steps": 1, "instance_prompt": "a sks star", "fake_step_seconds": 0},
                               [(outside, "00-star.png")])
        kept, _ = _form_memory(runner)
        run_image = str(runner.run_dir(run_id) / "instance" / "00-star.png")
        stored = {"files": [{"path": str(kept_image)}, {"path": run_image}, str(outside), "/etc/passwd",
                            str(tmp_path / "gradio" / "abc" / "notes.png"), str(tmp_path / "gradio" / "gone.png"), 5,
                            str(tmp_path / "gradio" / "abc" / ".." / ".." / "elsewhere.png")],
                  "method": "lora", "preset": "no such preset", "trainer.instance_prompt": "a sks star",
                  "trainer.max_train_steps": "300", "trainer.learning_rate": "x" * 20_001, "trainer.validation_prompt": "x" * 20_000, "trainer.resolution": True,
                  "trainer.with_prior_preservation": "yes", "trainer.num_class_images": 7, "lora.rank": 8,
                  "lora.blocks": ["mid", "nowhere"], "res-tuning.tuners": ["ff=adapter"], "compare_methods": ["lora"]}
        out = _by_id(kept, kept.restore(stored))
        assert out["concept-files"] == [str(kept_image.resolve())]
        assert (out["method"], out["instance-prompt"]) == ("lora", "a sks star")
        assert (out["opt-num_class_images"], out["opt-lora-rank"], len(out["opt-validation_prompt"])) == (7, 8, 20_000)
        assert (out["opt-res-tuning-tuners"], out["compare-methods"]) == (["ff=adapter"], ["lora"])
        for refused in ("preset", "opt-max_train_steps", "opt-learning_rate", "opt-resolution", "opt-with_prior_preservation",
                        "opt-lora-blocks"):
            assert out[refused] is None, refused
        assert all(u is None for u in _by_id(kept, kept.restore("not a dict")).values())
    finally:
        stop_runs(tmp_path / "runs")


def test_train_again_brings_a_runs_images_only_to_whoever_controls_it(tmp_path):
    from PIL import Image

    from tests.e2e.conftest import stop_runs
    from tests.test_jobs import make_runner, wait_for
    from trainers.service.jobs import JobError

    runner = make_runner(tmp_path / "runs")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "star.png")
    alice, bob = "a" * 64, "b" * 64
    config = {"method": "lora", "max_train_steps": 1, "instance_prompt": "a sks star", "rank": 8, "learning_rate": 0.003,
              "validation_prompt": ["a sks star", "a sks star on grass"], "fake_step_seconds": 0}
    try:
        run_id = runner.submit(config, [(tmp_path / "star.png", "00-star.png")], owner=alice)
        wait_for(runner, run_id, {"done", "failed"})
        kept, _ = _form_memory(runner)
        mine = _by_id(kept, kept.from_run(run_id, alice))
        assert mine["concept-files"] == [str(runner.run_dir(run_id) / "instance" / "00-star.png")]
        assert (mine["method"], mine["opt-lora-rank"], mine["opt-learning_rate"], mine["opt-validation_prompt"]) == (
            "lora", 8, "0.003", "a sks star\na sks star on grass")
        # an option the run was not given: an empty box
        assert (mine["opt-num_inference_steps"], mine["opt-seed"], mine["opt-max_train_steps"]) == ("", None, 1)
        with pytest.raises(JobError, match="no run"):
            kept.from_run(run_id, bob)  # not published: no such run, for bob
        runner.publish(run_id)
        theirs = _by_id(kept, kept.from_run(run_id, bob))
        assert theirs["concept-files"] is None and theirs["opt-lora-rank"] == 8
        with pytest.raises(JobError, match="choose a run"):
            kept.from_run(None, alice)
    finally:
        stop_runs(tmp_path / "runs")


def test_train_again_brings_the_runs_base_model_when_the_studio_lists_it(tmp_path):
    """A run's settings bring its base model back into the form's list; a base the studio does not
    list leaves the model chosen as it is (the message says so)."""
    import gradio as gr
    from PIL import Image

    from tests.e2e.conftest import stop_runs
    from tests.test_jobs import make_runner, wait_for
    from webui import train_tab
    from webui.catalog import DEMO_KEY, Catalog, Entry
    from webui.model import describe

    runner = make_runner(tmp_path / "runs")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "star.png")
    demo, other = describe(None), tmp_path / "other-model"
    models = Catalog([Entry(DEMO_KEY, "demo model", demo.source), Entry("file:other", "other (SD 1.x)", str(other))], demo)
    with gr.Blocks():
        _, _, kept = train_tab.build(runner, demo, "cpu", "CPU demo", "test", models=models)
    try:
        run_id = runner.submit({"method": "lora", "max_train_steps": 1, "instance_prompt": "a sks star", "fake_step_seconds": 0},
                               [(tmp_path / "star.png", "00-star.png")])
        wait_for(runner, run_id, {"done", "failed"})
        assert _by_id(kept, kept.from_run(run_id))["base-model"] == DEMO_KEY
        config_file = runner.run_dir(run_id) / "config.json"
        config = json.loads(config_file.read_text())
        for source, key in ((str(other), "file:other"), (str(tmp_path / "unlisted"), None)):
            config_file.write_text(json.dumps({**config, "pretrained_model_name_or_path": source}))
            assert _by_id(kept, kept.from_run(run_id))["base-model"] == key, source
    finally:
        stop_runs(tmp_path / "runs")


def test_the_runs_table_tells_runs_of_one_method_apart_by_name_recipe_and_base(tmp_path, request):
    """Two LoRA runs on two base models: the rows differ in the columns a user reads them by (name,
    recipe: steps, rate, images; base model by its name, never its path), not only in the id."""
    from tests.e2e.conftest import stop_runs
    from tests.test_jobs import make_runner
    from webui.model import DEMO_MODEL

    runner = make_runner(tmp_path / "runs")
    request.addfinalizer(lambda: stop_runs(tmp_path / "runs"))
    pictures = []
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"png bytes")
        pictures.append((tmp_path / f"{i}.png", f"{i}.png"))
    other = tmp_path / "models" / "my-sd21"
    first = runner.submit({"method": "lora", "max_train_steps": 300, "learning_rate": 0.01,
                           "pretrained_model_name_or_path": str(DEMO_MODEL)}, pictures, label="my star")
    second = runner.submit({"method": "lora", "max_train_steps": 600, "learning_rate": 0.0001,
                            "pretrained_model_name_or_path": str(other)}, pictures[:2])
    rows = {run_id: dict(zip(live.RUN_COLUMNS, live.run_row(runner.info(run_id)))) for run_id in (first, second)}
    assert len(live.RUN_COLUMNS) == len(rows[first])
    assert (rows[first]["name"], rows[second]["name"]) == ("my star", "")
    assert rows[first]["recipe"] == "300 steps · lr 0.01 · 3 images"
    assert rows[second]["recipe"] == "600 steps · lr 0.0001 · 2 images"
    assert (rows[first]["base model"], rows[second]["base model"]) == ("the bundled demo model", "my-sd21")
    assert rows[first]["method"] == rows[second]["method"] == "lora"
    assert str(tmp_path) not in json.dumps(rows), "no server path in the table"
    from webui import runs_tab

    details = runs_tab._details(runner.info(first))  # the selected run's details say the same
    assert "<b>name</b>: my star" in details and "<b>recipe</b>: 300 steps · lr 0.01 · 3 images" in details


def test_runs_that_would_read_alike_in_the_lists_end_in_their_ids_last_part(tmp_path, monkeypatch, request):
    """Two LoRA runs of 300 steps queued in one minute read alike by name, steps and minute: the
    lists (Compare, Generate, a strength slider) add the last part of each id; a third run that
    differs keeps its short label."""
    from tests.e2e.conftest import stop_runs
    from tests.test_jobs import make_runner
    from webui import pipeline

    runner = make_runner(tmp_path / "runs")
    request.addfinalizer(lambda: stop_runs(tmp_path / "runs"))
    (tmp_path / "0.png").write_bytes(b"png bytes")
    monkeypatch.setattr("time.time", lambda: 1_790_000_000.0)  # every run created in the same second
    alike = [runner.submit({"method": "lora", "max_train_steps": 300}, [(tmp_path / "0.png", "0.png")]) for _ in range(2)]
    other = runner.submit({"method": "lora", "max_train_steps": 600}, [(tmp_path / "0.png", "0.png")])
    labels = dict((run, label) for label, run in pipeline.choices(runner.info(r) for r in (*alike, other)))
    short = pipeline.choice(runner.info(alike[0]))[0]
    assert [labels[r] for r in alike] == [f"{short} · {r.rsplit('-', 1)[-1]}" for r in alike]
    assert labels[alike[0]] != labels[alike[1]]
    assert labels[other] == pipeline.choice(runner.info(other))[0], "a run unlike the others keeps its short label"
