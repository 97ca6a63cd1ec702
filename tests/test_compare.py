"""The Compare and Generate tabs' work, without a browser: finished runs become grid columns
(base + any method), the grid PNG records its rows and columns, a generated PNG's metadata
regenerates the same picture, and a visitor samples only runs they may see."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import restuning
from tests.tiny_pipeline import tiny_pipeline
from trainers.service.jobs import JobError, JobRunner
from trainers.sampling import Settings, read_png_settings
from webui import compare_tab, generate_tab, pipeline, visitors
from webui.model import describe

ALICE, BOB = visitors.owner_id("a" * 32), visitors.owner_id("b" * 32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny diffusers folder as the base model and two finished runs (Res-Tuning, LoRA) of Alice's."""
    root = tmp_path_factory.mktemp("compare")
    pipe = tiny_pipeline()
    pipe.save_pretrained(root / "model")
    base = describe(str(root / "model"))
    runner = JobRunner(root / "runs", devices=["cpu"])
    ids = {}
    for seed, config in enumerate([restuning.ResTuningConfig(), restuning.LoraConfig()]):
        handle = restuning.attach(pipe.unet, config, name="t")
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in handle.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        path = restuning.save(pipe.unet, root / f"{config.method}.safetensors", name="t")
        restuning.detach(pipe.unet, "t")
        ids[config.method] = runner.import_tuner(path, config.to_dict(), label=f"my-{config.method}", owner=ALICE)
    return runner, base, pipeline.StudioPipeline(base), ids


def rows(seeds, steps=3):
    return [Settings("a photo of sks dog", seed=s, steps=steps, guidance=3.0, scheduler="DDIM", height=32, width=32)
            for s in seeds]


def test_finished_runs_become_captioned_columns(world):
    runner, base, _, ids = world
    info = runner.info(ids["res-tuning"])
    kind, path = pipeline.weights(info)
    assert kind == "tuner" and path == info.dir / "tuner.safetensors"
    col = pipeline.column(info, 0.5)
    assert col.tuner == path and col.scale == 0.5
    assert col.caption[0] == "Res-Tuning" and col.caption[1].endswith("params") and col.caption[2] == "my-res-tuning"
    assert pipeline.base_column(base).tuner is None


def test_an_artifact_pointing_outside_its_run_is_ignored(world, tmp_path):
    runner, _, _, ids = world
    info = runner.info(ids["lora"])
    outside = tmp_path / "evil.safetensors"
    outside.write_bytes(b"x")
    info.events = [{"event": "artifact", "kind": "tuner", "path": str(outside)},
                   {"event": "artifact", "kind": "tuner", "path": "../" + ids["res-tuning"] + "/tuner.safetensors"},
                   {"event": "phase", "phase": "done"}]
    assert pipeline.weights(info) is None
    with pytest.raises(ValueError, match="no finished tuner"):
        pipeline.column(info)


@pytest.mark.slow
def test_grid_of_base_and_two_methods_with_two_seeds(world):
    runner, base, studio, ids = world
    seen = []
    path, seconds, shape = compare_tab.render_grid(runner, base, studio, ALICE, [ids["res-tuning"], ids["lora"]], True,
                                                   rows([0, 1]), [1.0, 0.8], progress=lambda f, label: seen.append(f))
    assert shape == (2, 3) and seconds > 0
    assert path.parent == runner.runs_dir / visitors.SCRATCH / ALICE / "compare"
    meta = read_png_settings(path)
    assert [c["caption"][0] for c in meta["columns"]] == ["Base model", "Res-Tuning", "LoRA"]
    assert [c["scale"] for c in meta["columns"]] == [1.0, 1.0, 0.8]
    assert [r["seed"] for r in meta["rows"]] == [0, 1]
    # progress comes from the sampler's step callback: rising, ending at 1 (one batched pass + one LoRA pass per row)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) > 4
    with Image.open(path) as grid:
        assert grid.width >= 3 * 256 and grid.height >= 2 * 256


@pytest.mark.slow
def test_a_generated_png_regenerates_the_same_picture(world):
    runner, base, studio, ids = world
    first = generate_tab.generate(runner, base, studio, ALICE, ids["res-tuning"], rows([7, 8]), 1.0)
    assert len(first) == 2 and "seed 7" in first[0][1]
    settings = read_png_settings(first[0][0])
    assert settings["tuner"] == ids["res-tuning"] and settings["seed"] == 7 and settings["prompt"] == "a photo of sks dog"
    fields = {k: settings[k] for k in ("prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler", "height", "width")}
    again = generate_tab.generate(runner, base, studio, ALICE, settings["tuner"], [Settings(**fields)], settings["scale"])
    pixels = [np.asarray(Image.open(p), dtype=np.int16) for p in (first[0][0], again[0][0])]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1
    untuned = generate_tab.generate(runner, base, studio, ALICE, None, [Settings(**fields)])
    assert read_png_settings(untuned[0][0])["tuner"] is None
    assert np.abs(np.asarray(Image.open(untuned[0][0]), dtype=np.int16) - pixels[0]).max() > 2, "the tuner must matter"


def test_a_visitor_samples_only_runs_they_may_see(world):
    runner, base, studio, ids = world
    with pytest.raises(JobError, match="no run"):
        generate_tab.generate(runner, base, studio, BOB, ids["lora"], rows([0], steps=1))
    assert ids["lora"] not in {v for _, v in generate_tab.tuner_choices(runner, BOB)}
    assert ids["lora"] in {v for _, v in generate_tab.tuner_choices(runner, ALICE)}
    assert ids["lora"] in {v for _, v in generate_tab.tuner_choices(runner, None)}, "local mode sees every run"
    runner.publish(ids["lora"])
    try:
        assert ids["lora"] in {v for _, v in generate_tab.tuner_choices(runner, BOB)}
        with pytest.raises(JobError, match="published by another visitor"):
            visitors.controlled(runner, ids["lora"], BOB)
    finally:
        runner.publish(ids["lora"], False)
    with pytest.raises(JobError, match="visitor id"):
        visitors.scratch_dir(runner, "../../etc", "generate")


@pytest.mark.parametrize("seeds, expected", [("0", [0]), ("1, 5,9", [1, 5, 9]), ("2-4", [2, 3, 4]), ("", [0])])
def test_seeds_parse(seeds, expected):
    assert compare_tab.parse_seeds(seeds) == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"seeds": "one"}, "not a whole number"), ({"seeds": "0-99"}, "not a whole number or a range"),
    ({"prompt": " "}, "prompt is empty"), ({"steps": 0}, "steps"), ({"seeds": "0-7", "more": "b\nc"}, "at most 8"),
    ({"scheduler": "Bogus"}, "unknown scheduler"),
])
def test_bad_compare_settings_get_a_message(kwargs, message):
    import gradio as gr

    args = {"prompt": "a", "more": "", "negative": "", "seeds": "0", "steps": 5, "guidance": 3.0, "scheduler": "DDIM"}
    args.update(kwargs)
    with pytest.raises(gr.Error, match=message):
        compare_tab.plan_rows(args["prompt"], args["more"], args["negative"], args["seeds"], args["steps"],
                              args["guidance"], args["scheduler"], 32, 32)


def test_defaults_come_from_the_models_settings_file(world, tmp_path):
    _, base, _, _ = world
    assert pipeline.StudioPipeline(base).defaults()["height"] == base.resolution
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / pipeline.SETTINGS_FILE).write_text(json.dumps({"scheduler": "EulerDiscreteScheduler",
                                                              "num_inference_steps": 30, "guidance_scale": 5.0}))
    d = pipeline.StudioPipeline(type(base)(str(folder), {}, 64)).defaults()
    assert (d["scheduler"], d["steps"], d["guidance"], d["height"]) == ("Euler", 30, 5.0, 64)


@pytest.mark.slow
def test_bench_compare_batched_quick_mode(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "assets" / "demo-model" / "model_index.json").exists():
        pytest.skip("assets/demo-model is missing")
    proc = subprocess.run([sys.executable, "-m", "bench.compare_batched", "--quick", "--out-dir", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "compare_batched.json").read_text())
    (row,) = result["rows"]
    assert row["k"] == 2 and len(row["methods"]) == 2 and result["steps"] == 2
    # the ratio is taken before the medians are rounded to 4 places
    assert row["ratio"] == pytest.approx(row["sequential_median_s"] / row["batched_median_s"], rel=5e-3)
    assert row["max_pixel_diff"] <= 2, "batched and sequential must draw the same pictures"
    assert "| 2 |" in (tmp_path / "compare_batched.md").read_text()


def test_a_strength_slider_names_its_run_as_the_lists_do_and_never_anothers(tmp_path):
    from PIL import Image

    from tests.e2e.conftest import stop_runs
    from tests.test_jobs import make_runner, wait_for
    from webui.compare_tab import run_names

    runner = make_runner(tmp_path / "runs", max_active_per_owner=2)
    Image.new("RGB", (64, 64), "white").save(tmp_path / "star.png")
    alice, bob = "a" * 64, "b" * 64
    try:
        run_id = runner.submit({"method": "lora", "max_train_steps": 1, "fake_step_seconds": 0},
                               [(tmp_path / "star.png", "a.png")], label="my star", owner=alice)
        wait_for(runner, run_id, {"done"})
        assert run_names(runner, alice, [run_id])[0].startswith("my star (LoRA) · 1 step · ")
        assert run_names(runner, bob, [run_id]) == [run_id], "another visitor's run: no name, only what was sent"
    finally:
        stop_runs(tmp_path / "runs")


def compare_component(runs, elem_id: str):
    """The component `elem_id` of a Compare tab built over an empty runs folder."""
    import gradio as gr

    from tests.test_jobs import make_runner
    from webui import compare_tab, pipeline
    from webui.model import describe

    base = describe(None)
    with gr.Blocks() as demo:
        with gr.Tab("Compare") as tab:
            compare_tab.build(make_runner(runs), base, pipeline.StudioPipeline(base), tab, gr.State(None))
    return next(c for c in demo.blocks.values() if getattr(c, "elem_id", None) == elem_id)


def test_nothing_floats_over_the_grids_captions(tmp_path):
    """Gradio puts an image's label and buttons over its top corners, where a grid's captions are."""
    grid = compare_component(tmp_path / "runs", "compare-grid")
    assert grid.show_label is False and grid.buttons == []


def test_an_empty_list_of_runs_says_how_to_fill_it(tmp_path):
    """A newcomer's Compare tab before any run has finished: the list says why it is empty."""
    from webui import compare_tab

    picks = compare_component(tmp_path / "runs", "compare-runs")
    assert picks.info == compare_tab.NO_RUNS and "Train tab" in picks.info
    assert compare_tab.runs_hint([("Res-Tuning · 300 steps", "run-1")]) == ""


def test_columns_that_would_read_alike_end_in_their_run_ids_last_part():
    """Two runs of one recipe trained in one minute caption alike: each gets its id's end, as the
    lists show it; the base column and a column unlike the others keep their captions."""
    from trainers.sampling import Column
    from webui.pipeline import told_apart

    alike = ["LoRA", "2,048 params", "300 steps · lr 0.01", "5 images · 07 Dec 11:21", "a sks shape"]
    columns = [Column("base", caption=["Base model", "no tuner", "demo"]),
               Column("20261207-112100-lora-ab12", caption=alike), Column("20261207-112130-lora-cd34", caption=alike),
               Column("20261207-112200-lora-ef56", caption=[*alike[:2], "600 steps · lr 0.01", *alike[3:]])]
    captions = [c.caption for c in told_apart(columns)]
    assert captions == [["Base model", "no tuner", "demo"], [*alike, "run …ab12"], [*alike, "run …cd34"], columns[3].caption]
