"""Side-by-side sampling: one batched call with per-sample routing gives the same pictures as
rendering each tuner on its own."""

import numpy as np
import pytest
import torch

import restuning
from tests.tiny_pipeline import tiny_pipeline
from trainers.sampling import Column, Sampler, Settings, compose_grid, read_png_settings, save_png


def _tuner(tmp_path, pipe, config, name, seed):
    handle = restuning.attach(pipe.unet, config, name=name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    path = restuning.save(pipe.unet, tmp_path / f"{name}.safetensors", name=name)
    restuning.detach(pipe.unet, name)
    return path


def _alone(pipe, path, settings):
    """The reference: a fresh attach of just this tuner, batch of one, no routing."""
    if path is not None:
        restuning.load(pipe.unet, path, name="alone")
    try:
        return np.asarray(pipe(settings.prompt, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                               generator=torch.Generator().manual_seed(settings.seed), height=32, width=32).images[0], dtype=np.int16)
    finally:
        if path is not None:
            restuning.detach(pipe.unet, "alone")


@pytest.mark.slow
def test_batched_grid_equals_each_tuner_alone(tmp_path):
    pipe = tiny_pipeline()
    paths = [
        _tuner(tmp_path, pipe, restuning.ResTuningConfig(), "rt", 1),
        _tuner(tmp_path, pipe, restuning.ResTuningConfig(tuners={"attn2": "prefix", "block": "prompt"}), "mix", 2),
        _tuner(tmp_path, pipe, restuning.PrefixConfig(), "prefix", 3),
        _tuner(tmp_path, pipe, restuning.LoraConfig(), "lora", 4),
    ]
    columns = [Column("base")] + [Column(p.stem, tuner=p) for p in paths]
    rows = [Settings("a photo of sks dog", seed=s, steps=3, guidance=3.0, scheduler="DDIM", height=32, width=32) for s in (0, 1)]
    seen = []
    grid = Sampler(pipe).render(columns, rows, progress=lambda f, label: seen.append(f))
    assert len(grid) == 2 and all(len(r) == 5 for r in grid)
    assert seen == sorted(seen) and 0 < seen[-1] <= 1.0
    assert restuning.attached(pipe.unet), "tuners stay loaded for the next render"
    for r, settings in enumerate(rows):
        pipe.scheduler = __import__("trainers.sampling", fromlist=["x"]).scheduler_from_name("DDIM", pipe.scheduler.config)
        for name in list(restuning.attached(pipe.unet)):
            restuning.set_scale(pipe.unet, 0.0, name=name)
        for c, column in enumerate(columns):
            expected = _alone(pipe, column.tuner, settings)
            got = np.asarray(grid[r][c], dtype=np.int16)
            assert np.abs(got - expected).max() <= 2, f"row {r} column {column.label}"
        base, tuned = (np.asarray(grid[r][i], dtype=np.int16) for i in (0, 1))
        assert np.abs(base - tuned).max() > 2, "a tuner must change the picture, or the test proves nothing"


def test_a_lora_of_an_earlier_grid_stays_out_of_the_next(tmp_path):
    """The Sampler keeps tuners loaded between grids; a LoRA applies to every sample whatever the
    routing, so one left switched on would render the next grid's columns (bench.quality's sweep
    found it: three cells after a wrecking LoRA's grid scored the LoRA's figures)."""
    pipe = tiny_pipeline()
    lora = _tuner(tmp_path, pipe, restuning.LoraConfig(), "lora", 4)
    adapter = _tuner(tmp_path, pipe, restuning.AdapterConfig(), "adapter", 5)
    row = [Settings("a photo of sks dog", seed=0, steps=3, guidance=3.0, scheduler="DDIM", height=32, width=32)]
    sampler = Sampler(pipe)
    first = sampler.render([Column("base"), Column("lora", tuner=lora)], row)[0]
    assert np.abs(np.asarray(first[0], dtype=np.int16) - np.asarray(first[1], dtype=np.int16)).max() > 2
    again = sampler.render([Column("base"), Column("adapter", tuner=adapter)], row)[0]
    # The same grid from a sampler that never loaded the LoRA, in the same batch shapes (a batch
    # of 2 need not round like a batch of 1, so `first` is no reference for `again`).
    fresh = Sampler(tiny_pipeline()).render([Column("base"), Column("adapter", tuner=adapter)], row)[0]
    assert np.array_equal(np.asarray(again[0]), np.asarray(fresh[0]))
    assert np.array_equal(np.asarray(again[1]), np.asarray(fresh[1]))
    assert len(restuning.attached(pipe.unet)) == 2, "the LoRA stays loaded for a later grid"
    for name in list(restuning.attached(pipe.unet)):
        restuning.set_scale(pipe.unet, 0.0, name=name)
    pipe.scheduler = __import__("trainers.sampling", fromlist=["x"]).scheduler_from_name("DDIM", pipe.scheduler.config)
    assert np.abs(np.asarray(again[1], dtype=np.int16) - _alone(pipe, adapter, row[0])).max() <= 2


def test_grid_and_png_metadata_round_trip(tmp_path):
    from PIL import Image

    cells = [[Image.new("RGB", (32, 32), c) for c in ("red", "blue")]]
    grid = compose_grid(cells, [["base"], ["res-tuning", "0.34M"]], row_labels=["seed 0"], scale=2)
    assert grid.height > 64 and grid.width >= 2 * 64
    settings = {"prompt": "a sks shape", "seed": 3, "steps": 25, "tuner": "run-1/tuner.safetensors"}
    path = save_png(cells[0][0], tmp_path / "x.png", settings)
    assert read_png_settings(path) == settings
    assert read_png_settings(save_png(cells[0][0], tmp_path / "y.png", {}) ) == {}


def test_a_full_fine_tune_is_read_once_per_render_and_rows_keep_their_order(tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    tuned = tiny_pipeline(seed=5).unet
    tuned.save_pretrained(tmp_path / "unet")
    reads = []
    real = UNet2DConditionModel.from_pretrained
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", lambda *a, **k: reads.append(a) or real(*a, **k))
    rows = [Settings(f"a photo of {w} dog", seed=0, steps=2, height=32, width=32) for w in ("sks", "red", "blue")]
    base = pipe.unet
    grid = Sampler(pipe).render([Column("base"), Column("full", unet_dir=tmp_path / "unet")], rows)
    assert len(reads) == 1
    assert pipe.unet is base  # the base U-Net is back
    pipe_full = tiny_pipeline()  # the reference: the fine-tuned U-Net in a pipeline of its own
    pipe_full.unet = tuned
    pipe_full.set_progress_bar_config(disable=True)
    expected = Sampler(pipe_full).render([Column("full alone")], rows)
    for r in range(len(rows)):
        assert np.abs(np.asarray(grid[r][1], dtype=np.int16) - np.asarray(expected[r][0], dtype=np.int16)).max() <= 2, f"row {r}"
        assert np.abs(np.asarray(grid[r][1], dtype=np.int16) - np.asarray(grid[r][0], dtype=np.int16)).max() > 2, "base = full?"


def test_running_out_of_memory_says_what_to_change(monkeypatch):
    from trainers import sampling

    pipe = tiny_pipeline()
    sampler = Sampler(pipe)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sampler, "_call", no_memory)
    with pytest.raises(sampling.SamplingError, match="ran out of memory while sampling.*wait for it to finish or cancel it"):
        sampler.render([Column("base")], [Settings("a photo of sks dog", steps=1, height=32, width=32)])


def test_sampling_runs_in_half_precision_on_a_gpu(monkeypatch):
    from trainers.sampling import inference_dtype

    assert inference_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert inference_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert inference_dtype("cuda:0") == torch.float16


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_every_routable_kind_samples_in_half_precision(tmp_path, dtype):
    # The CUDA path's dtype, run on the CPU: tuners load into a half-precision U-Net and render.
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    paths = [_tuner(tmp_path, pipe, config, name, i) for i, (config, name) in enumerate([
        (restuning.ResTuningConfig(tuners={"attn1": "adapter", "attn2": "prefix", "ff": "prompt"}), "rt"),
        (restuning.BypassConfig(), "bypass"), (restuning.LoraConfig(), "lora")])]
    pipe.to(dtype)
    grid = Sampler(pipe).render([Column("base")] + [Column(p.stem, tuner=p) for p in paths],
                                [Settings("a photo of sks dog", steps=2, height=32, width=32)])
    assert all(np.isfinite(np.asarray(image, dtype=np.float32)).all() for image in grid[0])
    assert pipe.unet.conv_in.weight.dtype == dtype  # the backbone; tuners keep their own dtype and cast their output


def test_routing_decides_on_the_host_and_copies_each_mask_once():
    from restuning.core import routing_of

    with restuning.route(["a", None, "a", "b"]):
        first = routing_of("a", 8, torch.device("cpu"))  # classifier-free guidance: the batch doubled
        assert routing_of("a", 8, torch.device("cpu")) is first  # cached for the whole block
        assert (first.any, first.all) == (True, False)
        assert first.mask.tolist() == [True, False, True, False] * 2 and first.rows.tolist() == [0, 2, 4, 6]
        assert routing_of("c", 4, "cpu").any is False and routing_of("c", 4, "cpu").mask is None
    with restuning.route(["a", "a"]):
        every = routing_of("a", 2, "cpu")
        assert every.all and every.mask is None
    assert routing_of("a", 3, "cpu").all  # outside a route block every sample goes through every tuner
