"""trainers.data: decoded-once views give the pixels the image loader gives, the latent cache
encodes each view once and returns the VAE's own posterior, class images split across processes."""

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from trainers import data
from trainers.images import load_image


def images(folder: Path, n: int, size=(96, 64)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = Image.new("RGB", size, (30 * i, 120, 200))
        ImageDraw.Draw(img).rectangle((5 + 7 * i, 4, 40, 50), fill=(250, 20 * i, 0))
        img.save(folder / f"{i}.png")
        out.append(folder / f"{i}.png")
    return out


@pytest.mark.parametrize("center_crop,random_flip", [(False, True), (True, False), (False, False)])
def test_views_give_what_the_loader_gives(tmp_path, center_crop, random_flip):
    files = images(tmp_path, 3)
    dataset = data.DreamBoothData(files, None, 48, center_crop, random_flip, seed=7)
    for index in range(9):
        view = dataset.view(files, "instance", index)
        rng = random.Random(f"7/instance/crop/{index}")  # the stream's own derivation, spelled out
        flip = random_flip and rng.random() < 0.5
        expected = np.asarray(load_image(view.path, 48, center_crop, flip, rng), dtype=np.float32) / 127.5 - 1.0
        got = dataset.pixels(view).permute(1, 2, 0).numpy()
        assert view.flip == flip
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_each_file_is_decoded_once(tmp_path, monkeypatch):
    files = images(tmp_path, 2)
    calls = []
    real = data.load_resized
    monkeypatch.setattr(data, "load_resized", lambda path, r, *mode: calls.append(path) or real(path, r, *mode))
    dataset = data.DreamBoothData(files, files, 48, False, True, seed=0)
    for first in range(0, 40, 4):
        dataset.batch(first, 4)
    assert sorted(calls) == sorted(files)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32).eval()


def test_latent_cache_encodes_each_view_once_and_matches_the_vae(tmp_path):
    files = images(tmp_path, 2, size=(64, 64))  # square: a view is a file and a flip, so views come round again
    dataset = data.DreamBoothData(files, None, 32, False, True, seed=0)
    vae = tiny_vae()
    cache = data.LatentCache(vae)
    views = [dataset.view(files, "instance", i) for i in range(6)]
    distinct = len(set(views))
    assert distinct < len(views)  # the test needs repeats to mean anything
    pixels = torch.stack([dataset.pixels(v) for v in views])
    posterior = cache.posterior(views, pixels, torch.float32)
    assert cache.encoded == distinct
    with torch.no_grad():
        fresh = vae.encode(pixels).latent_dist
    torch.testing.assert_close(posterior.mean, fresh.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(posterior.std, fresh.std, atol=1e-5, rtol=1e-5)
    again = cache.posterior(views[:3], pixels[:3], torch.float32)
    assert cache.encoded == distinct
    # Same generator, same draw: the sample comes from the cached posterior like from a fresh one.
    torch.testing.assert_close(again.sample(torch.Generator().manual_seed(3)),
                               fresh.sample(torch.Generator().manual_seed(3))[:3], atol=1e-5, rtol=1e-5)


def test_latent_cache_stops_storing_past_its_limit(tmp_path):
    files = images(tmp_path, 3)
    dataset = data.DreamBoothData(files, None, 32, True, False, seed=0)
    cache = data.LatentCache(tiny_vae(), limit=2)
    views = [dataset.view(files, "instance", i) for i in range(3)]
    pixels = torch.stack([dataset.pixels(v) for v in views])
    assert len(set(views)) == 3
    first = cache.posterior(views, pixels, torch.float32)
    assert len(cache.store) == 2 and cache.encoded == 3
    second = cache.posterior(views, pixels, torch.float32)
    assert cache.encoded == 4  # the view past the limit is encoded again, the others not
    torch.testing.assert_close(first.mean, second.mean)


def test_class_images_are_shared_between_processes(tmp_path):
    made = []

    class Pipe:
        unet = SimpleNamespace(device=torch.device("cpu"))

        def __call__(self, prompts, generator, **kwargs):
            made.extend(g.initial_seed() for g in generator)
            return SimpleNamespace(images=[Image.new("RGB", (64, 64), (g.initial_seed() * 20 % 256, 0, 0)) for g in generator])

    folder = tmp_path / "class"
    common = dict(prompt="a dog", count=5, resolution=64, seed=100, num_inference_steps=1, guidance_scale=1.0, batch_size=2)
    data.ensure_class_images(Pipe(), folder, shard=(1, 2), **common)
    assert sorted(made) == [101, 103]
    data.ensure_class_images(Pipe(), folder, shard=(0, 2), **common)
    assert sorted(made) == [100, 101, 102, 103, 104]
    assert [p.name for p in data.usable_images(folder)] == [f"{i:05d}.png" for i in range(5)]
    data.ensure_class_images(Pipe(), folder, **common)  # a full cache: nothing made again
    assert len(made) == 5
