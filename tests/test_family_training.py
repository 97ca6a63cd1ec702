"""Training on the tiny SD 2.x and SDXL pipelines the project builds (tests/tiny_pipeline.py):
Res-Tuning, the Bypass and LoRA from the command line and from the studio's runner, their files
loaded back and rendered; SDXL's conditioning (both text encoders, pooled embedding, size and
crop ids) as diffusers' train_dreambooth_lora_sdxl.py computes it; SD 2.x's v objective; the
SDXL DreamBooth README's command lines through the trainer."""

import shlex

import pytest
import torch

import restuning
from tests.test_trainer import argv, fresh_accelerate_state, make_images, run_train  # noqa: F401 - a fixture
from tests.tiny_pipeline import build_tiny, tiny_pipeline
from trainers import conditioning, dreambooth, models
from trainers.data import DreamBoothData
from trainers.events import read_events

FAMILIES = ("sd2", "sdxl")
METHODS = ("res-tuning", "bypass", "lora")
# Two of the six in make test; all six in make test-slow and CI.
QUICK = {("sdxl", "res-tuning"), ("sd2", "lora")}
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-models")
    return {name: build_tiny(root / name, name) for name in FAMILIES}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("family-data") / "instance")


def render(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images


def fresh(model):
    return models.load_pipeline(models.check_source(model))


@pytest.mark.parametrize("family,method", [pytest.param(f, m, marks=() if (f, m) in QUICK else pytest.mark.slow)
                                           for f in FAMILIES for m in METHODS])
def test_each_method_trains_on_each_family_and_its_files_load_back(family_models, images, tmp_path, family, method):
    """A few steps from the command line (LoRA with its text encoders too: both of SDXL's); the
    tuner file loads into a fresh pipeline of the family and renders what the trained pipeline
    renders; a LoRA's diffusers and kohya files render the same through diffusers' own loader."""
    out = tmp_path / "run"
    extra = ["--train_text_encoder"] if method == "lora" else []
    result = run_train(argv(family_models[family], images, out, "--method", method, "--max_train_steps", 3,
                            "--validation_prompt", PROMPT, "--num_validation_images", 1, *extra))
    assert result.step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    events = read_events(out)
    info = next(e for e in events if e["event"] == "info" and "method" in e)
    assert info["prediction_type"] == ("v_prediction" if family == "sd2" else "epsilon")
    assert [e["phase"] for e in events if e["event"] == "phase"][-1] == "done"
    expected = render(result.pipeline)
    pipe = fresh(family_models[family])
    base = render(pipe)
    handle = restuning.load(pipe.unet, out / "tuner.safetensors", **conditioning.text_encoders(pipe))
    assert handle.config.method == method
    got = render(pipe)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.equal(got, base)
    if method == "lora":
        assert handle.config.text_encoder and bool(handle.config.text_encoder_2) == (family == "sdxl")
        for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
            theirs = fresh(family_models[family])
            theirs.load_lora_weights(str(out), weight_name=name)
            torch.testing.assert_close(render(theirs), expected, atol=1e-5, rtol=0)
    card = (out / "README.md").read_text()
    assert ("StableDiffusionXLPipeline" in card) == (family == "sdxl")


# -- SDXL's conditioning ------------------------------------------------------------------------------


def test_a_training_sdxl_encoder_gives_diffusers_own_prompt_embeddings():
    """The few lines of train_dreambooth_lora_sdxl.py's encode_prompt (run on the encoders whose
    LoRA trains) give what the pipeline's encode_prompt gives (used while they are frozen)."""
    pipe = tiny_pipeline(0, "sdxl")
    frozen = conditioning.prompt_encoders(pipe, [PROMPT], "cpu")[0]()
    trained = conditioning.prompt_encoders(pipe, [PROMPT], "cpu", trained=conditioning.text_encoders(pipe))[0]()
    assert frozen.hidden.shape == (1, 16, 48) and frozen.pooled.shape == (1, 32)
    torch.testing.assert_close(trained.hidden, frozen.hidden)
    torch.testing.assert_close(trained.pooled, frozen.pooled)
    other = conditioning.prompt_encoders(pipe, ["a red shape"], "cpu")[0]()
    assert not torch.allclose(other.pooled, frozen.pooled)


def test_sdxl_size_and_crop_ids_are_each_images_own(tmp_path):
    """Original (height, width) before resizing, the crop's top-left in the resized image (a mirrored
    view's measured from the other side, as diffusers' script mirrors before cropping) and the
    target size; class images carry their own."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (200, 100), "red").save(folder / "wide.png")  # 200 wide, 100 high: resized to 128 x 64
    Image.new("RGB", (80, 160), "blue").save(folder / "tall.png")
    data = DreamBoothData([folder / "wide.png"], [folder / "tall.png"], 64, center_crop=False, random_flip=True, seed=2)
    batch = data.batch(0, 4)
    pipe = tiny_pipeline(0, "sdxl")
    ids = conditioning.size_ids(pipe, data, batch["views"], "cpu")
    for row, view in zip(ids.tolist(), batch["views"]):
        original = [100, 200] if view.path.name == "wide.png" else [160, 80]
        width = 128 if view.path.name == "wide.png" else 64
        left = width - 64 - view.left if view.flip else view.left
        assert row == [*original, view.top, left, 64, 64]
    assert {(v.flip, v.left > 0) for v in batch["views"][:4]} == {(True, True), (False, True)}  # both cases were checked
    assert ids[3].tolist()[2:4] == [0, 128 - 64 - 16]  # the mirrored wide view, cropped at 16 from the left before mirroring
    texts = [conditioning.Text(torch.ones(1, 16, 48), torch.ones(1, 32)), conditioning.Text(torch.zeros(1, 16, 48), torch.zeros(1, 32))]
    hidden, added = conditioning.unet_inputs(pipe, texts, batch, data, "cpu")
    assert hidden.shape == (8, 16, 48) and hidden[:4].eq(1).all() and hidden[4:].eq(0).all()
    assert added["text_embeds"].shape == (8, 32) and torch.equal(added["time_ids"], ids)


def test_the_sdxl_step_feeds_the_u_net_its_added_conditioning(family_models, images, tmp_path):
    """What the U-Net receives in a training step: SDXL's pooled text and the batch's size ids."""
    seen = []

    def watch(pipe, handle):
        pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("added_cond_kwargs")), with_kwargs=True)

    run_train(argv(family_models["sdxl"], images, tmp_path / "run", "--max_train_steps", 2, "--train_batch_size", 2), on_attached=watch)
    # per step: Res-Tuning's off-concept loss asks the frozen model about 2 rows (no grad), then the
    # step's own call holds the batch and those 2 rows again, with prompts that do not name the concept
    assert [a["text_embeds"].shape[0] for a in seen] == [2, 4, 2, 4]
    assert all(a["text_embeds"].shape[1:] == (32,) and a["time_ids"].shape[1:] == (6,) for a in seen)
    assert all(torch.equal(main["time_ids"][2:], frozen["time_ids"]) for frozen, main in zip(seen[::2], seen[1::2]))
    assert {tuple(r[:2]) for a in seen for r in a["time_ids"].tolist()} == {(64.0, 72.0)}  # the images are 72 x 64


def test_sd2_trains_on_the_v_objective_and_a_prediction_type_can_be_forced(family_models, images, tmp_path):
    result = run_train(argv(family_models["sd2"], images, tmp_path / "v", "--max_train_steps", 1))
    assert result.pipeline.scheduler.config.prediction_type == "v_prediction"
    forced = run_train(argv(family_models["sd2"], images, tmp_path / "eps", "--max_train_steps", 1, "--prediction_type", "epsilon"))
    assert forced.pipeline.scheduler.config.prediction_type == "epsilon"


# -- diffusers' SDXL DreamBooth README ------------------------------------------------------------------


def readme_command(model, instance, out, **changes):
    """README_sdxl.md's first command line (train_dreambooth_lora_sdxl.py), as written there with the
    paths swapped for the tiny SDXL model and sizes cut to fit a test: resolution 1024 -> 64,
    gradient_accumulation_steps 4 -> 2, max_train_steps 500 -> 2, validation_epochs 25 -> 1."""
    values = {"mixed_precision": "fp16", **changes}
    return shlex.split(f"""
      --pretrained_model_name_or_path={model}
      --instance_data_dir={instance}
      --pretrained_vae_model_name_or_path={model / "vae"}
      --output_dir={out}
      --mixed_precision="{values['mixed_precision']}"
      --instance_prompt="a photo of sks dog"
      --resolution=64
      --train_batch_size=1
      --gradient_accumulation_steps=2
      --learning_rate=1e-4
      --report_to="wandb"
      --lr_scheduler="constant"
      --lr_warmup_steps=0
      --max_train_steps=2
      --validation_prompt="A photo of sks dog in a bucket"
      --validation_epochs=1
      --seed="0"
      --push_to_hub
    """) + ["--method", "lora", "--num_inference_steps", "2"]


@pytest.mark.slow
def test_the_sdxl_readme_command_lines_run_or_refuse_by_name(family_models, images, tmp_path, capsys):
    model = family_models["sdxl"]
    # as written: fp16 needs a CUDA GPU, which a CPU machine refuses by name
    assert dreambooth.main(readme_command(model, images, tmp_path / "fp16")) == 2
    assert "--mixed_precision fp16 needs a CUDA GPU" in capsys.readouterr().err
    # the same with bf16, and the README's "< 16GB" flags (xformers falls back to SDPA on a CPU, and says so)
    out = tmp_path / "lora-trained-xl"
    low = ["--enable_xformers_memory_efficient_attention", "--gradient_checkpointing", "--use_8bit_adam", "--output_kohya_format",
           "--train_text_encoder"]
    assert dreambooth.main(readme_command(model, images, out, mixed_precision="bf16") + low) == 0
    printed = capsys.readouterr().out
    assert "--push_to_hub is not used" in printed and "--output_kohya_format is not used: a LoRA run always writes kohya's" in printed
    assert "attention: PyTorch SDPA (xformers not used" in printed
    assert {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors"} <= {p.name for p in out.iterdir()}
    theirs = fresh(model)
    theirs.load_lora_weights(str(out))  # diffusers' README's inference: pipe.load_lora_weights(<the output folder>)
    render(theirs)


@pytest.mark.parametrize("flag,message", [
    (["--do_edm_style_training"], "--do_edm_style_training is refused: the EDM formulation"),
    (["--use_dora"], "--use_dora is refused"),
    (["--optimizer", "prodigy"], "--optimizer prodigy is refused: Prodigy"),
    (["--dataset_name", "diffusers/dog-example"], "--dataset_name is refused: instance images come from --instance_data_dir"),
    (["--prodigy_beta3", "0.9"], "--prodigy_beta3 is refused: only for --optimizer prodigy"),
])
def test_the_sdxl_scripts_other_options_are_refused_by_name(family_models, images, tmp_path, capsys, flag, message):
    argv_ = readme_command(family_models["sdxl"], images, tmp_path / "x", mixed_precision="no") + flag
    assert dreambooth.main(argv_) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_sd1_options_sdxl_does_not_take_are_refused_by_name(family_models, images, tmp_path):
    from trainers.options import OptionError

    with pytest.raises(OptionError, match="--text_encoder_use_attention_mask is refused on SDXL"):
        run_train(argv(family_models["sdxl"], images, tmp_path / "a", "--max_train_steps", 1, "--text_encoder_use_attention_mask"))
    with pytest.raises(OptionError, match="--text_encoder_2 names layers of SDXL's second text encoder; this base model has one"):
        run_train(argv(family_models["sd2"], images, tmp_path / "b", "--max_train_steps", 1, "--method", "lora",
                       "--text_encoder_2", "q_proj"))


# -- the studio -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_the_studio_trains_each_method_and_compares_them_at_the_familys_resolution(family_models, images, tmp_path, family):
    """The studio's runner (accelerate launch of the trainer, as the Train button queues it) trains
    Res-Tuning, the Bypass and LoRA on the family's model; its Compare grid renders the three beside
    the base model at the model's own resolution."""
    from tests.test_jobs import wait_for
    from trainers.service.jobs import JobRunner
    from trainers.sampling import Settings
    from webui import pipeline
    from webui.model import describe

    model = family_models[family]
    runner = JobRunner(tmp_path / "runs", devices=["cpu"], poll_seconds=0.2)
    files = [(p, p.name) for p in sorted(images.glob("*.png"))]
    ids = {m: runner.submit({"method": m, "pretrained_model_name_or_path": str(model), "instance_prompt": PROMPT, "resolution": 64,
                             "max_train_steps": 2, "mixed_precision": "no", "num_inference_steps": 2}, files) for m in METHODS}
    for method, run_id in ids.items():
        info = wait_for(runner, run_id, {"done", "failed"}, timeout=900)
        assert info.status == "done", (method, info.log_tail)
    base = describe(str(model))
    assert (base.family, base.resolution) == (family, 64)
    studio = pipeline.StudioPipeline(base, "cpu")
    defaults = studio.defaults()
    assert (defaults["height"], defaults["width"]) == (base.resolution, base.resolution)
    columns = [pipeline.base_column(base)] + [pipeline.column(runner.info(i)) for i in ids.values()]
    grid = studio.sampler().render(columns, [Settings(PROMPT, steps=2, height=defaults["height"], width=defaults["width"])])[0]
    assert [im.size for im in grid] == [(64, 64)] * 4
    assert all(grid[0].tobytes() != im.tobytes() for im in grid[1:])


def test_the_memory_estimate_and_presets_follow_the_family(tmp_path):
    """A single file's estimate is built from its family's published configs (SDXL's U-Net and both
    its text encoders), and SDXL's presets keep the memory savers on."""
    from safetensors.torch import save_file

    from trainers import memory
    from webui.presets import preset_values

    files = {}
    for name, key in (("sd1", "cond_stage_model.transformer.x"), ("sd2", "cond_stage_model.model.x"),
                      ("sdxl", "conditioner.embedders.1.model.x")):
        files[name] = tmp_path / f"{name}.safetensors"
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), key: torch.zeros(1)}, str(files[name]))
    facts = {name: memory.model_facts(str(path)) for name, path in files.items()}
    assert [f.unet_params for f in facts.values()] == [859_520_964, 865_910_724, 2_567_463_684]
    assert facts["sdxl"].text_params == 123_060_480 + 694_659_840
    estimates = {name: memory.estimate_config({"pretrained_model_name_or_path": str(path), "method": "lora", "resolution": 1024,
                                               "mixed_precision": "fp16"}, "cuda").total for name, path in files.items()}
    assert estimates["sd1"] < estimates["sd2"] < estimates["sdxl"]
    assert facts["sdxl"].arch > 1.5 * facts["sd1"].arch  # 2- and 10-deep transformer stacks
    assert preset_values("16 GB GPU", 1024, "sdxl")["gradient_checkpointing"] and preset_values("8 GB GPU", 1024, "sdxl")["resolution"] == 512
    assert preset_values("16 GB GPU", 768, "sd2") == {**preset_values("16 GB GPU", 512), "resolution": 768}
