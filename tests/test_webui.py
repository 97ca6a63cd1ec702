"""The studio's logic without a browser: configs built from form values (refused exactly where
the trainer would refuse them), the method order, the generated form, the live view's data."""

import json

import pytest
import torch

from restuning.methods import METHODS
from trainers.events import EventLog
from trainers.jobs import JobRunner
from trainers.options import OptionError, from_dict
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


def test_the_layout_text_becomes_a_dict():
    assert config(m_tuners="attn1=prefix, ff=adapter")["tuners"] == {"attn1": "prefix", "ff": "adapter"}


@pytest.mark.parametrize("changes, message", [
    ({"instance_prompt": "  "}, "instance prompt is empty"),
    ({"with_prior_preservation": True, "class_prompt": ""}, "needs --class_prompt"),
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
    infos = " ".join(str(getattr(block, "info", "")) for block in demo.blocks.values())
    missing = [name for name in forms.trainer_actions() if f"(--{name})" not in infos and name not in forms.MAIN]
    assert not missing
    for method in METHODS.values():
        assert all(f"(--{f.name})" in infos for f in forms.dataclasses.fields(method.config))
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
