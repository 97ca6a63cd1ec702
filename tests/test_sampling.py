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


def test_grid_and_png_metadata_round_trip(tmp_path):
    from PIL import Image

    cells = [[Image.new("RGB", (32, 32), c) for c in ("red", "blue")]]
    grid = compose_grid(cells, [["base"], ["res-tuning", "0.34M"]], row_labels=["seed 0"], scale=2)
    assert grid.height > 64 and grid.width >= 2 * 64
    settings = {"prompt": "a sks shape", "seed": 3, "steps": 25, "tuner": "run-1/tuner.safetensors"}
    path = save_png(cells[0][0], tmp_path / "x.png", settings)
    assert read_png_settings(path) == settings
    assert read_png_settings(save_png(cells[0][0], tmp_path / "y.png", {}) ) == {}
