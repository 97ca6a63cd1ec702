"""trainers/dreambooth.py on a tiny Stable Diffusion pipeline (64 px images, 8x8 latents): every
method in the registry trains, changes only its own weights and exports artefacts that load back;
bad input fails early and cleanly; resume is exact; events tell the truth."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import restuning
from restuning.methods import METHODS
from trainers import dreambooth, models, options
from trainers.events import EventLog, last_phase, read_events
from tests.tiny_pipeline import build_tiny  # noqa: F401 - other test modules import it from here

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of sks dog"


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("models") / "tiny")


def make_images(folder: Path, n: int = 4, size=(72, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", size, (240, 240, 240))
        ImageDraw.Draw(img).ellipse((8 + 3 * i, 8, 56, 56), fill=(200, 40, 40))
        img.save(folder / f"dog{i}.png")
    return folder


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "instance")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # accelerate keeps one process-wide state; in-process runs with other settings need it cleared.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def argv(model, instance, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance), "--instance_prompt", PROMPT,
            "--resolution", "64", "--output_dir", str(out), "--learning_rate", "1e-3", "--num_inference_steps", "2", *map(str, extra)]


def run_train(args, on_attached=None):
    opts = options.parse(args)
    return dreambooth.train(opts, EventLog(opts.args.output_dir), dreambooth.StopFlag(), on_attached=on_attached)


def load_base(model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_output(unet, seed=3):
    g = torch.Generator().manual_seed(seed)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([50, 600]), text).sample


def phases(events):
    return [e["phase"] for e in events if e["event"] == "phase"]


def folder_snapshot(root: Path, skip: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if skip not in p.parents and p != skip}


# -- every method ----------------------------------------------------------------------------------

LOADERS = {
    "tuner": lambda pipe, path: restuning.load(pipe.unet, path),
    "lora-diffusers": lambda pipe, path: pipe.load_lora_weights(str(path.parent), weight_name=path.name),
    "lora-kohya": lambda pipe, path: pipe.load_lora_weights(str(path.parent), weight_name=path.name),
    "unet": lambda pipe, path: setattr(pipe, "unet", type(pipe.unet).from_pretrained(path)),
}


# res-tuning stays in the quick suite; the others take ~10 s each on a loaded 2-core machine.
@pytest.mark.parametrize("method", [m if m == "res-tuning" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS])
def test_every_method_trains_changes_only_its_weights_and_exports(method, tiny_model, instance_dir, tmp_path):
    out = tmp_path / "run"
    start = {}

    def snapshot(pipe, handle):
        start.update({k: v.detach().clone() for k, v in handle.state_dict().items()})

    result = run_train(argv(tiny_model, instance_dir, out, "--method", method, "--max_train_steps", 3,
                            "--validation_prompt", "a sks dog", "--num_validation_images", 1, "--validation_steps", 3),
                       on_attached=snapshot)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)

    trained = result.pipeline
    after = result.handle.state_dict()
    changed = [k for k in start if not torch.equal(start[k], after[k].to(start[k].dtype))]
    assert changed == list(start), f"{method}: unchanged trainable tensors {sorted(set(start) - set(changed))[:3]}"

    base = load_base(tiny_model)
    trainable = {id(p) for p in result.handle.parameters()}
    for part in ("vae", "text_encoder"):
        for (name, p), q in zip(getattr(trained, part).named_parameters(), getattr(base, part).parameters()):
            assert torch.equal(p, q), f"{method}: frozen {part}.{name} changed"
    base_unet = dict(base.unet.named_parameters())
    for name, p in trained.unet.named_parameters():
        if id(p) not in trainable and name in base_unet:
            assert torch.equal(p, base_unet[name]), f"{method}: frozen unet.{name} changed"
    expected = unet_output(trained.unet)
    assert not torch.allclose(expected, unet_output(base.unet)), f"{method}: training changed nothing"

    events = read_events(out)
    assert phases(events) == ["loading", "training", "saving", "done"]
    kinds = [(e["kind"], e["path"]) for e in events if e["event"] == "artifact"]
    assert kinds == [(k, str(p.relative_to(out))) for k, p in result.artifacts]
    assert kinds[-1] == ("model-card", "README.md")
    card = (out / "README.md").read_text()
    assert PROMPT in card and METHODS[method].label in card and "samples/step000003-p0-0.png" in card
    samples = [e for e in events if e["event"] == "sample"]
    assert samples and (out / samples[0]["paths"][0]).is_file()

    # each artefact loads back into a fresh base pipeline and gives the trained U-Net's output
    loadable = [(k, out / p) for k, p in kinds if k in LOADERS]
    assert loadable, f"{method}: no weights exported"
    for kind, path in loadable:
        assert path.exists()
        fresh = load_base(tiny_model)
        LOADERS[kind](fresh, path)
        assert torch.allclose(unet_output(fresh.unet), expected, atol=1e-5), f"{method}: {kind} does not load back"


def test_lora_kohya_keys(tiny_model, instance_dir, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "run"
    run_train(argv(tiny_model, instance_dir, out, "--method", "lora", "--rank", 2, "--alpha", 4, "--max_train_steps", 1))
    with safe_open(str(out / "lora_kohya.safetensors"), "pt") as f:
        keys = list(f.keys())
        alphas = {k: f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in keys} == {"lora_down", "lora_up", "alpha"}
    assert set(alphas.values()) == {4.0}  # the trained alpha, not diffusers' default (= rank)


# -- bad input: refused before any heavy loading, nothing outside the run folder changes ------------


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_INPUT = {
    "no images": (lambda d: None, [], "has no images"),
    "not an image": (lambda d: write(d / "x.png", b"hello"), [], "x.png: not an image"),
    "truncated": (lambda d: write(d / "t.jpg", (make_images(d / "_src", 1, (256, 256)) / "dog0.png").read_bytes()[:300]), [],
                  "t.png: the file is truncated"),
    "too small": (lambda d: Image.new("RGB", (40, 80)).save(d / "s.png"), [], "s.png: 40x80 is too small"),
    "lr zero": (lambda d: make_images(d, 1), ["--learning_rate", "0"], "--learning_rate must be a number above 0"),
    "steps zero": (lambda d: make_images(d, 1), ["--max_train_steps", "0"], "--max_train_steps must be a whole number above 0"),
    "resolution": (lambda d: make_images(d, 1), ["--resolution", "68"], "--resolution must be a multiple of 8"),
    "unknown method": (lambda d: make_images(d, 1), ["--method", "dora"], "--method 'dora' is not a method"),
    "bad method option": (lambda d: make_images(d, 1), ["--tuners", "ff=sideways"], "unknown tuner kind 'sideways'"),
    "foreign method option": (lambda d: make_images(d, 1), ["--rank", "4"], "--rank not an option of res-tuning"),
    "missing model": (lambda d: make_images(d, 1), ["--pretrained_model_name_or_path", "/nowhere/model"], "not found"),
    "pickle model": (lambda d: (make_images(d, 1), write(d.parent / "m.ckpt", b"x")),
                     ["--pretrained_model_name_or_path", "{tmp}/m.ckpt"], "pickle-based checkpoints are not loaded"),
    "fp16 on cpu": (lambda d: make_images(d, 1), ["--mixed_precision", "fp16"], "fp16 needs a CUDA GPU"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_early_and_cleanly(case, tiny_model, tmp_path, capsys):
    if case == "fp16 on cpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    prepare, extra, message = BAD_INPUT[case]
    images = tmp_path / "images"
    images.mkdir()
    prepare(images)
    out = tmp_path / "run"
    before = folder_snapshot(tmp_path, out)
    args = argv(tiny_model, images, out) + [e.replace("{tmp}", str(tmp_path)) for e in extra]
    code = dreambooth.main(args)
    assert code == 2
    events = read_events(out)
    assert phases(events) == ["failed"], "failed before loading anything"
    assert message.replace("t.png", "t.jpg") in events[-1]["error"] and events[-1]["hint"]
    assert "Traceback" not in capsys.readouterr().err
    assert folder_snapshot(tmp_path, out) == before
    assert sorted(p.name for p in out.iterdir()) == [".restuning-run", "events.jsonl"]


def test_bad_config_reports_into_the_config_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"instance_data_dir": str(tmp_path), "instance_prompt": "x", "resolution": 7}))
    assert dreambooth.main(["--config", str(run / "config.json")]) == 2
    assert last_phase(read_events(run)) == "failed" and "--resolution" in read_events(run)[-1]["error"]


def test_model_sources(tiny_model, tmp_path):
    assert models.check_source(tiny_model).kind == "folder"
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelError, match="model_index.json is missing"):
        models.check_source(tmp_path / "empty")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text("{}")
    (partial / "unet").mkdir()
    with pytest.raises(models.ModelError, match="incomplete: missing vae, text_encoder, tokenizer, scheduler"):
        models.check_source(partial)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(models.ModelError, match="pickle-based"):
        models.check_source(tmp_path / "weights.bin")
    (tmp_path / "model.safetensors").write_bytes(b"not really")
    with pytest.raises(models.ModelError, match="not a readable .safetensors file"):
        models.check_source(tmp_path / "model.safetensors")
    hub = models.check_source("someone/some-model")
    assert hub.kind == "hub"
    with pytest.raises(models.ModelError, match="the hub model someone/some-model is not downloaded"):
        models.load_pipeline(hub)


@pytest.mark.parametrize("error,hint", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "--method bypass"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), "--gradient_checkpointing"),
    (FloatingPointError("the loss became nan at step 3"), "lower --learning_rate"),
    (RuntimeError("something else"), "train.log"),
])
def test_failures_end_with_an_event_and_a_hint(error, hint, monkeypatch, tmp_path, instance_dir):
    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(dreambooth, "train", boom)
    out = tmp_path / "run"
    assert dreambooth.main(argv("unused", instance_dir, out)) == 1
    event = read_events(out)[-1]
    assert event["phase"] == "failed" and str(error) in event["error"] and hint in event["hint"]


# -- objective, precision and memory savers --------------------------------------------------------


def test_v_prediction_min_snr_noise_offset(tmp_path, instance_dir):
    model = build_tiny(tmp_path / "tiny-v", prediction_type="v_prediction")
    out = tmp_path / "run"
    args = argv(model, instance_dir, out, "--max_train_steps", 2, "--snr_gamma", 5, "--noise_offset", 0.05)
    args[args.index(PROMPT)] = "a photo of sks dog on a red background with a blue shape"  # over 16 tokens
    result = run_train(args)
    assert any("longer than the text encoder's 16 tokens" in e.get("message", "") for e in read_events(out))
    assert all(math.isfinite(x) for x in result.losses)
    info = next(e for e in read_events(out) if e["event"] == "info")
    assert info["prediction_type"] == "v_prediction"


def test_gradient_accumulation_steps_the_schedule_once_per_optimiser_step(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "run"
    result = run_train(argv(tiny_model, instance_dir, out, "--max_train_steps", 2, "--gradient_accumulation_steps", 2,
                            "--lr_scheduler", "linear"))
    assert len(result.losses) == 2
    lrs = [e["lr"] for e in read_events(out) if e["event"] == "step"]
    assert not [e for e in read_events(out) if "longer than the text encoder" in e.get("message", "")]
    assert lrs == pytest.approx([5e-4, 0.0])  # linear decay from 1e-3 over 2 optimiser steps, not 4 micro-batches


def test_loss_target_follows_the_scheduler():
    """The target is ε for epsilon models and v = sqrt(ᾱ)ε - sqrt(1-ᾱ)x0 for v-prediction: a U-Net
    that outputs exactly that target has zero loss."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    class Oracle(torch.nn.Module):
        def __init__(self, scheduler):
            super().__init__()
            self.scheduler = scheduler

        def forward(self, noisy, t, emb):
            self.seen = (noisy, t)
            return SimpleNamespace(sample=self.answer)

    args = SimpleNamespace(noise_offset=0.0, snr_gamma=None, prior_loss_weight=1.0)
    pixels = torch.randn(2, 4, 8, 8)
    for prediction in ("epsilon", "v_prediction"):
        sched = DDPMScheduler(prediction_type=prediction)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(pixels.shape, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        target = noise if prediction == "epsilon" else sched.get_velocity(pixels, noise, t)
        unet = Oracle(sched)
        unet.answer = target
        posterior = SimpleNamespace(sample=lambda generator: pixels)  # a point mass at `pixels`
        loss, _, _ = dreambooth.diffusion_loss(unet, posterior, 1.0, sched, torch.zeros(2, 3, 5), 2, args,
                                               torch.Generator().manual_seed(0), torch.float32)
        assert loss.item() < 1e-10, prediction
        unet.answer = target + 1
        assert abs(dreambooth.diffusion_loss(unet, posterior, 1.0, sched, torch.zeros(2, 3, 5), 2, args,
                                             torch.Generator().manual_seed(0), torch.float32)[0].item() - 1) < 1e-5


def test_memory_savers_on_cpu(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "run"
    dtypes = {}

    def look(pipe, handle):
        dtypes["trainable"] = {p.dtype for p in handle.parameters()}
        dtypes["frozen"] = pipe.unet.conv_in.weight.dtype

    result = run_train(argv(tiny_model, instance_dir, out, "--max_train_steps", 2, "--mixed_precision", "bf16",
                            "--gradient_checkpointing", "--use_8bit_adam", "--enable_xformers_memory_efficient_attention"),
                       on_attached=look)
    assert all(math.isfinite(x) for x in result.losses)
    assert dtypes == {"trainable": {torch.float32}, "frozen": torch.bfloat16}
    info = next(e for e in read_events(out) if e["event"] == "info")
    assert info["mixed_precision"] == "bf16"
    if not torch.cuda.is_available():
        lines = [line for line in capsys.readouterr().out.splitlines() if "attention" in line]
        assert lines == ["attention: PyTorch SDPA (xformers not used: no CUDA device)"]


@pytest.mark.slow
def test_prior_preservation_generates_then_reuses_class_images(tiny_model, instance_dir, tmp_path):
    runs = tmp_path / "runs"
    common = ["--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", 3, "--max_train_steps", 1]
    run_train(argv(tiny_model, instance_dir, runs / "a", *common))
    caches = list((runs / "class-images").iterdir())
    assert len(caches) == 1
    images = sorted(caches[0].glob("*.png"))
    assert [p.name for p in images] == ["00000.png", "00001.png", "00002.png"]
    stamps = [p.stat().st_mtime_ns for p in images]
    events = read_events(runs / "a")
    assert "class-images" in phases(events)
    said = next(e["message"] for e in events if e.get("phase") == "class-images" and e.get("message"))
    assert said == "3 class images of 'a photo of dog', kept in the runs folder for runs of this model, prompt and size", \
        "the cache in words, not its digest folder's server path"
    steps = [e for e in events if e["event"] == "step"]
    assert "instance_loss" in steps[-1] and steps[-1]["loss"] != steps[-1]["instance_loss"]

    run_train(argv(tiny_model, instance_dir, runs / "b", *common))
    assert [p.stat().st_mtime_ns for p in sorted(caches[0].glob("*.png"))] == stamps  # reused, not regenerated
    progress = [e for e in read_events(runs / "b") if e.get("phase") == "class-images" and "done" in e]
    assert progress[-1]["done"] == 3 and all(e["done"] == 3 for e in progress[1:])
    run_train(argv(tiny_model, instance_dir, runs / "c", *common[:2], "a photo of cat", *common[3:]))
    assert len(list((runs / "class-images").iterdir())) == 2  # another class prompt, another cache


def test_class_images_the_model_folder_ships_for_these_settings_are_copied_not_made(tiny_model, instance_dir, tmp_path):
    import json
    import shutil

    from trainers import data

    model = shutil.copytree(tiny_model, tmp_path / "model")
    shipped = model / data.SHIPPED_CLASS_IMAGES
    make_images(shipped, 3, size=(64, 64))
    for i, path in enumerate(sorted(shipped.glob("*.png"))):
        path.rename(shipped / f"{i:05d}.png")
    made_as = {"prompt": "a photo of dog", "resolution": 64, "seed": 0, "precision": "float32", "num_inference_steps": 2,
               "guidance_scale": 7.5}
    (shipped / "class.json").write_text(json.dumps({**made_as, "unet_sha256": data.weights_digest(model)}))
    common = ["--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", 3, "--max_train_steps", 1]
    run_train(argv(model, instance_dir, tmp_path / "runs" / "a", *common))
    cache = next((tmp_path / "runs" / "class-images").iterdir())
    assert [(shipped / p.name).read_bytes() == p.read_bytes() for p in sorted(cache.glob("*.png"))] == [True] * 3
    assert any("shipped" in e.get("message", "") for e in read_events(tmp_path / "runs" / "a") if e.get("phase") == "class-images")
    run_train(argv(model, instance_dir, tmp_path / "runs" / "b", *common[:2], "a photo of cat", *common[3:]))
    other = next(p for p in (tmp_path / "runs" / "class-images").iterdir() if p != cache)
    assert all((shipped / p.name).read_bytes() != p.read_bytes() for p in other.glob("*.png"))  # made: not what was shipped


def test_stop_during_class_images_keeps_the_finished_ones(tiny_model, instance_dir, tmp_path):
    import threading

    class SetOnThirdLook(threading.Event):
        looks = 0

        def is_set(self):  # asked after loading, then before each batch of 4 class images
            self.looks += 1
            return self.looks >= 3

    stop = dreambooth.StopFlag()
    stop.event = SetOnThirdLook()
    common = ["--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", 8, "--max_train_steps", 1]
    opts = options.parse(argv(tiny_model, instance_dir, tmp_path / "runs" / "a", *common))
    with pytest.raises(dreambooth.Cancelled):
        dreambooth.train(opts, EventLog(opts.args.output_dir), stop)
    cache = next((tmp_path / "runs" / "class-images").iterdir())
    first = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.png")}
    assert sorted(first) == [f"{i:05d}.png" for i in range(4)] and not list(cache.glob(".*"))
    run_train(argv(tiny_model, instance_dir, tmp_path / "runs" / "b", *common))
    after = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.png")}
    assert len(after) == 8 and all(after[name] == stamp for name, stamp in first.items())


# -- events ------------------------------------------------------------------------------------------


def test_step_events_are_throttled_but_keep_first_last_and_mean(tmp_path):
    log = EventLog(tmp_path)
    reporter = dreambooth.StepReporter(log, total=50, interval=3600)
    for step in range(1, 51):
        reporter.update(step, float(step), 1e-4, 0.1)
    steps = [e for e in read_events(tmp_path) if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 50]
    assert steps[1]["loss"] == sum(range(2, 51)) / 49  # the mean since the previous event
    assert steps[1]["sec_per_step"] == 0.1 and steps[0]["eta_sec"] == pytest.approx(4.9)
    assert set(steps[0]) >= {"step", "total", "loss", "lr", "sec_per_step", "eta_sec"}
    fast = dreambooth.StepReporter(EventLog(tmp_path / "b"), total=5, interval=0)
    for step in range(1, 6):
        fast.update(step, 1.0, 1e-4, 0.1)
    assert len([e for e in read_events(tmp_path / "b") if e["event"] == "step"]) == 5


# -- checkpoints and resume ----------------------------------------------------------------------------


def tuner_state(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_resume_reaches_the_same_weights(tiny_model, instance_dir, tmp_path):
    """20 steps straight against 10 steps, a stop (as the studio's Cancel: a checkpoint is saved),
    then --resume_from_checkpoint latest for the other 10."""
    common = ["--method", "res-tuning", "--random_flip", "--lr_scheduler", "cosine", "--lr_warmup_steps", 3,
              "--max_train_steps", 20]
    straight = tmp_path / "straight"
    full = run_train(argv(tiny_model, instance_dir, straight, *common, "--checkpointing_steps", 5, "--checkpoints_total_limit", 2))

    class StopBeforeStep11(dreambooth.StopFlag):
        calls = 0

        def agreed(self, accelerator=None):  # asked once after loading, then before every step
            self.calls += 1
            return self.calls == 12

    split = tmp_path / "split"
    opts = options.parse(argv(tiny_model, instance_dir, split, *common, "--checkpointing_steps", 1000))
    with pytest.raises(dreambooth.Cancelled):
        dreambooth.train(opts, EventLog(split), StopBeforeStep11())
    assert [p.name for p in (split / "checkpoints").iterdir()] == ["checkpoint-10"]
    assert not (split / "tuner.safetensors").exists()
    resumed = run_train(argv(tiny_model, instance_dir, split, *common, "--resume_from_checkpoint", "latest"))
    assert len(resumed.losses) == 10
    assert resumed.losses == pytest.approx(full.losses[10:], rel=1e-5)
    a, b = tuner_state(straight / "tuner.safetensors"), tuner_state(split / "tuner.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the last M checkpoints are kept, none half-written
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-15"]
    assert {p.name for p in (straight / "checkpoints" / "checkpoint-15").iterdir()} >= {
        "tuner_state.safetensors", "optimizer.bin", "scheduler.bin"}


def test_resume_latest_without_checkpoints_starts_fresh(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "run"
    result = run_train(argv(tiny_model, instance_dir, out, "--max_train_steps", 1, "--resume_from_checkpoint", "latest"))
    assert result.step == 1
    assert any("no checkpoint to resume from" in e.get("message", "") for e in read_events(out))
    with pytest.raises(options.OptionError, match="no such checkpoint"):
        run_train(argv(tiny_model, instance_dir, tmp_path / "other", "--resume_from_checkpoint", str(tmp_path)))
    run_train(argv(tiny_model, instance_dir, out, "--max_train_steps", 2, "--checkpointing_steps", 1))
    with pytest.raises(options.OptionError, match="cannot resume: no checkpoint loads \\(checkpoint-1: .*other options"):
        run_train(argv(tiny_model, instance_dir, out, "--max_train_steps", 2, "--dim", 4, "--resume_from_checkpoint", "latest"))


# -- processes: SIGTERM and two processes -----------------------------------------------------------------


def subprocess_env():
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return env


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_ends_cancelled(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainers.dreambooth", *argv(tiny_model, instance_dir, out, "--max_train_steps", 100000,
                                                               "--checkpointing_steps", 100000)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(e["event"] == "step" and e["step"] >= 2 for e in read_events(out)):
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-2000:]
    events = read_events(out)
    assert last_phase(events) == "cancelled"
    checkpoint = [e for e in events if e["event"] == "checkpoint"][-1]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert checkpoint["step"] >= steps[-1] and (out / checkpoint["path"] / "tuner_state.safetensors").is_file()
    assert "Traceback" not in output
    assert not (out / "tuner.safetensors").exists()


@pytest.mark.slow
def test_two_processes_write_one_set_of_artifacts(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "run"
    # accelerate's multi-process launcher (torchrun); ACCELERATE_USE_CPU makes it gloo on CPUs.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainers.dreambooth",
           *argv(tiny_model, instance_dir, out, "--max_train_steps", 3, "--checkpointing_steps", 2, "--method", "bypass")]
    env = dict(subprocess_env(), ACCELERATE_USE_CPU="1")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    events = read_events(out)
    assert phases(events) == ["loading", "training", "saving", "done"]  # one writer: the main process
    info = next(e for e in events if e["event"] == "info")
    assert info["num_processes"] == 2
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 3
    assert [e["kind"] for e in events if e["event"] == "artifact"] == ["tuner", "model-card"]
    assert sorted(p.name for p in out.iterdir()) == [".restuning-run", "README.md", "checkpoints", "events.jsonl", "tuner.safetensors"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]
    # both processes' RNG states are in the checkpoint; only one wrote the rest
    assert sorted(p.name for p in (out / "checkpoints" / "checkpoint-2").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert done.stdout.count("attention: ") == 1
    restuning.read_config(out / "tuner.safetensors")


def test_processes_that_accelerate_did_not_join_are_refused(tiny_model, instance_dir, tmp_path, monkeypatch):
    # e.g. `accelerate launch --multi_gpu` on a machine without GPUs and without ACCELERATE_USE_CPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    assert dreambooth.main(argv(tiny_model, instance_dir, out)) == 2
    assert "launched as 2 processes but accelerate set up 1" in read_events(out)[-1]["error"]


# -- learning: the instance loss falls ------------------------------------------------------------------


@pytest.mark.slow
# The Bypass at its default depth 2 corrects the input of the tiny U-Net's first up block, so its
# correction passes two frozen random up blocks: measured over 100 steps, its loss falls 1.9% at
# lr 1e-3 and 5.5% at 1e-2, the demo model's recipe for tuners (at depth 0: 40% at 1e-3).
@pytest.mark.parametrize("method,lr", [("res-tuning", "1e-3"), ("bypass", "1e-2")])
def test_instance_loss_falls_over_100_steps(method, lr, tiny_model, instance_dir, tmp_path):
    assert method in METHODS
    result = run_train(argv(tiny_model, instance_dir, tmp_path / "run", "--method", method, "--max_train_steps", 100,
                            "--train_batch_size", 2, "--center_crop", "--checkpointing_steps", 1000, "--learning_rate", lr))
    losses = result.instance_losses
    windows = [sum(losses[i:i + 25]) / 25 for i in range(0, 100, 25)]
    # a trend over averaged windows (single steps are noisy: each draws its own t and noise)
    assert windows[-1] < 0.97 * windows[0] and min(windows[2:]) < windows[0], windows


def test_cached_latents_train_as_fresh_encoding_does(tiny_model, instance_dir, tmp_path):
    # The same draws from the same posteriors: only where the VAE runs differs (once per view, or every step).
    runs = {}
    for flag in ("--cache_latents", "--no-cache_latents"):
        runs[flag] = run_train(argv(tiny_model, instance_dir, tmp_path / flag, "--max_train_steps", 4, "--train_batch_size", 2,
                                    "--random_flip", "--method", "res-tuning", flag)).losses
    assert len(runs["--cache_latents"]) == 4
    assert runs["--cache_latents"] == pytest.approx(runs["--no-cache_latents"], rel=1e-4, abs=1e-6)



@pytest.mark.parametrize("method", ["prefix", "prompt", "res-tuning", "lora"])
def test_xformers_set_first_keeps_every_method_working(method, tiny_unet):
    # What the trainer does on a GPU where xformers works (diffusers' XFormersAttnProcessor, as
    # enable_xformers_memory_efficient_attention sets it), without its kernels: the method's
    # own processors replace xformers where it needs them, and the summary says how many.
    from diffusers.models.attention_processor import XFormersAttnProcessor

    import restuning
    from restuning.methods import METHODS

    tiny_unet.set_attn_processor(XFormersAttnProcessor())
    restuning.attach(tiny_unet, METHODS[method].config())
    kinds = [type(p).__name__ for p in tiny_unet.attn_processors.values()]
    own = sum("XFormers" not in k for k in kinds)
    summary = dreambooth.attention_summary(tiny_unet, "xformers")
    if method in ("prefix", "prompt"):
        assert 0 < own < len(kinds)
        assert summary == f"xformers ({own} of {len(kinds)} attention layers run the method's own processor on PyTorch SDPA)"
    else:
        assert own == 0 and summary == "xformers"
    assert dreambooth.attention_summary(tiny_unet, "PyTorch SDPA") == "PyTorch SDPA"


def _checkpoint(path, *keys):
    from safetensors.torch import save_file

    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


def test_single_file_checkpoints_are_recognised_from_their_header(tmp_path):
    unet_key = "model.diffusion_model.input_blocks.0.0.weight"
    sd1 = models.check_source(_checkpoint(tmp_path / "sd1.safetensors", unet_key, "cond_stage_model.transformer.text_model.x"))
    assert (sd1.kind, sd1.family) == ("single-file", "sd1")
    sd2 = models.check_source(_checkpoint(tmp_path / "sd2.safetensors", unet_key, "cond_stage_model.model.transformer.x"))
    assert sd2.family == "sd2"
    with pytest.raises(models.ModelError, match="tried converting the single-file checkpoint .*Stable Diffusion 2.x .*predict v"):
        models.load_pipeline(sd2)  # names what it is even where the conversion fails (here: no weights, no hub)
    xl = models.check_source(_checkpoint(tmp_path / "xl.safetensors", unet_key, "conditioner.embedders.1.model.x"))
    assert (xl.kind, xl.family) == ("single-file", "sdxl")
    other = models.check_source(_checkpoint(tmp_path / "lora.safetensors", "lora_unet_down.weight"))
    with pytest.raises(models.ModelError, match="not a Stable Diffusion checkpoint"):
        models.load_pipeline(other)


def test_pipelines_load_in_the_asked_dtype_and_never_from_pickles(tiny_model, tmp_path):
    import shutil

    pipe = models.load_pipeline(models.check_source(tiny_model), torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == torch.bfloat16
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    weights = next((pickled / "unet").glob("*.safetensors"))
    torch.save({}, weights.with_suffix(".bin"))
    weights.unlink()
    with pytest.raises(models.ModelError, match=r"holds pickle weights \(unet/diffusion_pytorch_model.bin\).*not loaded"):
        models.load_pipeline(models.check_source(pickled))



def test_a_diffusers_readme_command_line_runs_to_completion(tmp_path, capsys, monkeypatch):
    # diffusers' examples/dreambooth/README.md, "Training with LoRA" (train_dreambooth_lora.py), as
    # written there with the paths swapped for the demo model and the sizes cut to fit a test
    # (resolution 512 -> 64, max_train_steps 500 -> 4, checkpointing_steps 100 -> 2, validation_epochs 50 -> 1).
    # It asks for wandb and a push to the Hub: neither exists here, and each gets one line saying so.
    out = tmp_path / "lora-dreambooth"
    demo = Path(__file__).resolve().parents[1] / "assets"
    command = f"""
      --pretrained_model_name_or_path={demo / "demo-model"}
      --instance_data_dir={demo / "concepts" / "star"}
      --output_dir={out}
      --instance_prompt="a sks shape"
      --resolution=64
      --train_batch_size=1
      --gradient_accumulation_steps=1
      --checkpointing_steps=2
      --learning_rate=1e-4
      --report_to="wandb"
      --lr_scheduler="constant"
      --lr_warmup_steps=0
      --max_train_steps=4
      --validation_prompt="A sks shape on a blue background"
      --validation_epochs=1
      --seed="0"
      --push_to_hub
    """
    import shlex

    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert dreambooth.main(shlex.split(command) + ["--method", "lora", "--num_inference_steps", "2"]) == 0
    printed = capsys.readouterr()
    assert "--report_to wandb: wandb is not installed" in printed.out
    assert "--push_to_hub is not used: nothing is uploaded" in printed.out
    summary = next(line for line in printed.out.splitlines() if line.startswith("done: "))
    assert summary.startswith(f"done: 4 steps; in {out}: ")
    assert "pytorch_lora_weights.safetensors (lora-diffusers)" in summary and "tuner.safetensors (tuner)" in summary
    assert "training: 100%" in printed.err and "4/4" in printed.err  # the terminal's progress bar
    events = read_events(out)
    assert last_phase(events) == "done"
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2]
    # validation every epoch: 5 star images at batch 1 make 5 steps an epoch, so only at the end
    assert sorted({e["step"] for e in events if e["event"] == "sample"}) == [4]


def test_tensorboard_gets_the_loss_and_background_logs_get_no_bar(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run_train(argv(tiny_model, instance_dir, out, "--max_train_steps", 3, "--report_to", "tensorboard"))
    logs = list((out / "logs").rglob("events.out.tfevents.*"))
    assert logs, "tensorboard wrote no event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logs[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    err = capsys.readouterr().err
    assert "training:" not in err and "\r" not in err  # not a terminal: no progress bar redraws


def test_a_run_log_does_not_open_with_bitsandbytes_kernels_warning():
    code = "import trainers.dreambooth, peft, bitsandbytes, bitsandbytes.optim"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "kernels" not in proc.stderr


def test_bundled_sd1_configs_describe_sd15_and_its_tokenizer():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = models.SD1_CONFIG
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]  # SD v1.5's U-Net, VAE and CLIP ViT-L/14 text encoder
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's own ids


def test_a_single_sd1_file_is_converted_with_the_bundled_configs_and_no_hub(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs, path=path)
        return "pipeline"

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", fake)
    path = _checkpoint(tmp_path / "sd1.safetensors", "model.diffusion_model.input_blocks.0.0.weight",
                       "cond_stage_model.transformer.text_model.x")
    assert models.load_pipeline(models.check_source(path), torch.float16) == "pipeline"
    assert (seen["config"], seen["local_files_only"], seen["dtype"]) == (str(models.SD1_CONFIG), True, torch.float16)


def test_a_single_sd1_file_without_a_component_is_a_message_and_asks_no_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "unet-only.safetensors"
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 768)}, str(path))
    with pytest.raises(models.ModelError, match="(?i)with the bundled SD 1.x configs.*weights for this component appear to be missing"):
        models.load_pipeline(models.check_source(path))

