"""The base models a studio offers (webui.catalog): the demo model, the models folder's diffusers
folders and single files, the hub cache's whole pipelines, each by a label that is never a server
path; a hub id neither cached nor downloadable said plainly; and Compare and Generate sampling
each run on the base model it was trained on."""

import json

import gradio as gr
import pytest
import torch

import restuning
from restuning.arch import TINY_SD2_UNET_CONFIG, TINY_UNET_CONFIG
from trainers.models import FOLDER_PARTS, ModelError, check_source, hub_offline, load_pipeline
from webui import catalog
from webui.model import DEMO_MODEL, describe

UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"


def config_folder(path, unet_config, pipeline="StableDiffusionPipeline", weights=True):
    """A diffusers folder of configs only (what discovery reads), with a U-Net weight file or not."""
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    for part in FOLDER_PARTS:
        (path / part).mkdir()
    (path / "unet" / "config.json").write_text(json.dumps(unet_config))
    if weights:
        (path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"{}")
    return path


def checkpoint(path, text_key):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({UNET_KEY: torch.zeros(1), text_key: torch.zeros(1)}, str(path))
    return path


def tiny_model(folder, family):
    """tests.tiny_pipeline.build_tiny, its scratch tokenizer folder under `folder` (not the system temp)."""
    import tempfile
    from unittest import mock

    from tests.tiny_pipeline import build_tiny

    scratch = folder.parent / f".{folder.name}-scratch"
    scratch.mkdir(parents=True)
    with mock.patch.object(tempfile, "tempdir", str(scratch)):
        return describe(str(build_tiny(folder, family)))


def test_the_models_folder_offers_folders_and_single_files_and_nothing_else(tmp_path):
    models = tmp_path / "models"
    config_folder(models / "my-sd2", TINY_SD2_UNET_CONFIG)
    checkpoint(models / "v1-5.safetensors", "cond_stage_model.transformer.x")
    checkpoint(models / "xl.safetensors", "conditioner.embedders.1.model.x")
    from safetensors.torch import save_file

    save_file({"lora_unet_down.lora_up.weight": torch.zeros(1)}, str(models / "a-lora.safetensors"))  # not a model
    (models / "broken.safetensors").write_bytes(b"not safetensors")
    (models / "old.ckpt").write_bytes(b"pickle")  # never unpickled
    (models / "notes.txt").write_text("hello")
    (models / "empty-folder").mkdir()
    config_folder(models / "refiner", TINY_UNET_CONFIG, pipeline="StableDiffusionXLImg2ImgPipeline")
    outside = config_folder(tmp_path / "elsewhere" / "outside-model", TINY_UNET_CONFIG)
    (models / "linked-out").symlink_to(outside)  # a symlink out of the models folder
    (models / "linked-out.safetensors").symlink_to(checkpoint(tmp_path / "elsewhere" / "out.safetensors",
                                                              "cond_stage_model.transformer.x"))
    (models / "linked-in.safetensors").symlink_to(models / "v1-5.safetensors")  # stays inside: offered

    found = catalog.local_models(models)
    assert [(e.key, e.label) for e in found] == [
        ("file:linked-in.safetensors", "linked-in.safetensors (SD 1.x)"),
        ("file:my-sd2", "my-sd2 (SD 2.x)"),
        ("file:v1-5.safetensors", "v1-5.safetensors (SD 1.x)"),
        ("file:xl.safetensors", "xl.safetensors (SDXL)"),
    ]
    assert found[1].source == str((models / "my-sd2").resolve())
    assert not any(str(tmp_path) in e.label for e in found)
    assert catalog.local_models(tmp_path / "missing") == []


def test_the_studio_offers_its_own_model_first_then_the_demo_then_the_rest(tmp_path, monkeypatch):
    demo = describe(None)
    models = tmp_path / "models"
    checkpoint(models / "v1-5.safetensors", "cond_stage_model.transformer.x")
    monkeypatch.setenv(catalog.MODELS_DIR_ENV, str(models))
    assert catalog.models_dir() == models and catalog.models_dir(str(tmp_path)) == tmp_path
    monkeypatch.delenv(catalog.MODELS_DIR_ENV)
    assert catalog.models_dir() == catalog.DEFAULT_MODELS_DIR

    on_demo = catalog.discover(demo, models, cache_dir=tmp_path / "no-cache")
    assert on_demo.choices() == [("the bundled demo model (SD 1.x)", "demo"),
                                 ("v1-5.safetensors (SD 1.x)", "file:v1-5.safetensors")]
    assert on_demo.base("demo") is demo and on_demo.base("file:v1-5.safetensors").family == "sd1"
    for forged in (str(models / "v1-5.safetensors"), "v1-5.safetensors", "file:../models/v1-5.safetensors",
                   "file:v1-5.safetensors/", "hub:someone/not-listed", "default", "", None):
        with pytest.raises(ValueError, match="choose a base model from the list"):
            on_demo.base(forged)  # only a listed key names a model, never a path

    # --model naming a file of the folder: listed once, first
    own = describe(str(models / "v1-5.safetensors"))
    assert own.label == "v1-5.safetensors (SD 1.x)" and str(tmp_path) not in own.name
    listed = catalog.discover(own, models, cache_dir=tmp_path / "no-cache")
    assert [key for _, key in listed.choices()] == ["default", "demo"]
    assert listed.entry("default").source == own.source and listed.entry("demo").source == str(DEMO_MODEL)
    assert listed.key_of(str(DEMO_MODEL)) == "demo" and listed.key_of("/nowhere") is None


def hub_repo(cache, repo_id, files: dict, kind="models"):
    """A repo in a Hugging Face cache layout (snapshots/<commit>/..., refs/main), as hf download leaves it."""
    commit = "0" * 40
    repo = cache / f"{kind}--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()


def pipeline_files(unet_config, weights=True) -> dict:
    files = {"model_index.json": json.dumps({"_class_name": "StableDiffusionPipeline"}),
             "unet/config.json": json.dumps(unet_config)}
    files.update({f"{part}/config.json": "{}" for part in FOLDER_PARTS if part != "unet"})
    if weights:
        files["unet/diffusion_pytorch_model.safetensors"] = "{}"
    return files


def test_hub_models_already_in_the_cache_are_offered_and_nothing_is_downloaded(tmp_path):
    cache = tmp_path / "hub"
    hub_repo(cache, "someone/sd2-model", pipeline_files(TINY_SD2_UNET_CONFIG))
    hub_repo(cache, "someone/configs-only", pipeline_files(TINY_UNET_CONFIG, weights=False))  # a probe, no weights
    hub_repo(cache, "someone/a-lora", {"pytorch_lora_weights.safetensors": "{}"})
    hub_repo(cache, "someone/a-dataset", pipeline_files(TINY_UNET_CONFIG), kind="datasets")
    assert catalog.cached_hub_models(cache) == [catalog.Entry("hub:someone/sd2-model", "someone/sd2-model (SD 2.x)",
                                                              "someone/sd2-model")]
    assert catalog.cached_hub_models(tmp_path / "no-cache") == []


def test_a_hub_model_neither_cached_nor_reachable_is_said_plainly(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as refused:
        describe("someone/not-downloaded")
    for words in ("someone/not-downloaded is not downloaded", "this machine is offline", "hf download someone/not-downloaded"):
        assert words in str(refused.value)
    assert "config.json" not in str(refused.value)
    with pytest.raises(ModelError, match="not downloaded .* and this machine is offline") as refused:
        load_pipeline(check_source("someone/not-downloaded"))
    assert "model_index.json" not in str(refused.value)

    # online: an id the hub may still serve is the hub's to answer, unless the connection failed
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert hub_offline("someone/not-downloaded", OSError("Repository Not Found")) is None
    unreachable = hub_offline("someone/not-downloaded", OSError("We couldn't connect to 'https://huggingface.co'"))
    assert "not downloaded" in unreachable and "the hub cannot be reached" in unreachable
    # cached: never this message, whatever the error
    hub_repo(tmp_path / "hub", "someone/cached", pipeline_files(TINY_UNET_CONFIG))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline("someone/cached", OSError("couldn't connect")) is None


def test_app_help_names_every_family_and_the_models_folder(capsys):
    import app

    with pytest.raises(SystemExit):
        app.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "SD 1.x, 2.x or XL" in text and "--models-dir" in text and catalog.MODELS_DIR_ENV in text
    assert "never downloaded" in text


def test_the_page_on_another_model_shows_no_server_path_and_no_demo_example(tmp_path):
    import webui
    from trainers.service.jobs import JobRunner

    base = tiny_model(tmp_path / "models" / "tiny-sd2", "sd2")
    models = catalog.discover(base, tmp_path / "models", cache_dir=tmp_path / "no-cache")
    demo = webui.build(JobRunner(tmp_path / "runs", devices=["cpu"]), base, device="cpu", preset="CPU demo",
                       detected="test", models=models)
    config = demo.get_config_file()
    assert str(tmp_path) not in json.dumps(config, default=str)
    by_id = {c.get("props", {}).get("elem_id"): c["props"] for c in config["components"]}
    assert [tuple(c) for c in by_id["base-model"]["choices"]] == [("tiny-sd2 (SD 2.x)", "default"),
                                                                ("the bundled demo model (SD 1.x)", "demo")]
    assert by_id["base-model"]["value"] == "default"
    assert not by_id["examples-label"]["visible"] and not by_id["examples"]["visible"]
    assert "a photo of sks star" == by_id["instance-prompt"]["placeholder"]


# -- Compare and Generate: each run on its own base model ---------------------------------------


@pytest.fixture(scope="module")
def two_bases(tmp_path_factory):
    """Two tiny base models (SD 1.x, the studio's own; SD 2.x) and a finished Res-Tuning run on each."""
    from trainers.service.jobs import JobRunner
    from webui import pipeline

    root = tmp_path_factory.mktemp("bases")
    sd1, sd2 = tiny_model(root / "models" / "tiny-sd1", "sd1"), tiny_model(root / "models" / "tiny-sd2", "sd2")
    runner = JobRunner(root / "runs", devices=["cpu"])
    ids = {}
    for base in (sd1, sd2):
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(base.source, subfolder="unet")
        config = restuning.ResTuningConfig(identifier="")
        restuning.attach(unet, config, name="t")
        path = restuning.save(unet, root / f"{base.family}.safetensors", name="t")
        ids[base.family] = runner.import_tuner(path, {**config.to_dict(), "pretrained_model_name_or_path": base.source},
                                               label=f"on-{base.family}")
    models = catalog.discover(sd1, root / "models", cache_dir=root / "no-cache")
    return runner, sd1, sd2, pipeline.StudioPipeline(sd1, catalog=models), ids


def test_each_run_is_sampled_on_its_own_base_model(two_bases):
    from trainers.sampling import Settings, read_png_settings
    from webui import compare_tab, generate_tab

    runner, sd1, sd2, studio, ids = two_bases
    assert studio.base_of(runner.info(ids["sd2"])).source == sd2.source
    assert studio.base_of(runner.info(ids["sd1"])) is sd1
    rows = [Settings("a photo of sks dog", seed=0, steps=2, guidance=3.0, scheduler="DDIM")]
    made = generate_tab.generate(runner, sd1, studio, None, ids["sd2"], rows)
    assert studio.is_loaded(sd2) and not studio.is_loaded(sd1)
    settings = read_png_settings(made[0][0])
    assert settings["base_model"] == "tiny-sd2 (SD 2.x)" and (settings["height"], settings["width"]) == (sd2.resolution,) * 2

    path, _, shape = compare_tab.render_grid(runner, sd1, studio, None, [ids["sd1"]], True, rows, [1.0])
    meta = read_png_settings(path)
    assert studio.is_loaded(sd1) and shape == (1, 2) and meta["base_model"] == "tiny-sd1 (SD 1.x)"
    assert meta["columns"][0]["caption"][2] == "tiny-sd1 (SD 1.x)"

    with pytest.raises(gr.Error, match="trained on different base models .*tiny-sd1 \\(SD 1.x\\): on-sd1.*"
                                       "tiny-sd2 \\(SD 2.x\\): on-sd2.*pick runs of one"):
        compare_tab.render_grid(runner, sd1, studio, None, [ids["sd1"], ids["sd2"]], True, rows, [1.0, 1.0])


def test_a_run_whose_base_model_is_gone_is_refused_without_its_path(two_bases, tmp_path, monkeypatch):
    from trainers.sampling import Settings
    from webui import generate_tab

    runner, sd1, _, studio, ids = two_bases
    info = runner.info(ids["sd2"])
    info.config = {**info.config, "pretrained_model_name_or_path": str(tmp_path / "deleted-model")}
    with pytest.raises(ValueError, match="deleted-model cannot be read on this server") as refused:
        studio.base_of(info)
    assert str(tmp_path) not in str(refused.value)
    monkeypatch.setattr(runner, "info", lambda run_id, **kw: info)  # the run as Generate reads it
    with pytest.raises(gr.Error, match="deleted-model cannot be read"):
        generate_tab.generate(runner, sd1, studio, None, ids["sd2"], [Settings("a photo of sks dog", steps=1)])


def test_an_imported_tuner_is_a_run_on_the_model_it_was_checked_against(two_bases, tmp_path):
    from webui import runs_tab

    runner, _, sd2, studio, ids = two_bases
    tuner = runner.info(ids["sd2"]).dir / "tuner.safetensors"
    run_id, _, _ = runs_tab.import_tuner(runner, sd2, str(tuner), "again", None)
    info = runner.info(run_id)
    assert info.config["pretrained_model_name_or_path"] == sd2.source and studio.base_of(info).source == sd2.source
    details = runs_tab._details(info)  # the Runs tab names it, not its path
    assert "<b>base model</b>: tiny-sd2</li>" in details and sd2.source not in details
