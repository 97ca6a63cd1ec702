"""trainers.data: decoded-once views give the pixels the image loader gives, the latent cache
encodes each view once and returns the VAE's own posterior, class images split across processes."""

import json
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


# -- class images a model folder ships ------------------------------------------------------------

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo-model"


def _shipping_model(tmp_path: Path, count: int = 3) -> tuple[Path, dict]:
    """A model folder with a U-Net weight file and `count` shipped class images made 'as' settings."""
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    shipped = model / data.SHIPPED_CLASS_IMAGES
    shipped.mkdir()
    for i in range(count):
        Image.new("RGB", (64, 64), (10 * i, 0, 0)).save(shipped / f"{i:05d}.png")
    settings = {"prompt": "a shape", "resolution": 64, "seed": 0, "precision": "float32", "num_inference_steps": 25,
                "guidance_scale": 2.5}
    (shipped / "class.json").write_text(json.dumps({**settings, "unet_sha256": data.weights_digest(model)}))
    return model, settings


def test_shipped_class_images_seed_the_cache_only_for_exactly_their_settings_and_weights(tmp_path):
    model, settings = _shipping_model(tmp_path)
    assert [p.name for p in data.shipped_class_images(model, settings)] == ["00000.png", "00001.png", "00002.png"]
    for key, other in (("prompt", "a dog"), ("resolution", 128), ("seed", 1), ("precision", "float16"),
                       ("num_inference_steps", 24), ("guidance_scale", 7.5)):
        assert data.shipped_class_images(model, {**settings, key: other}) == [], key
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"rebuilt")  # another model now
    assert data.shipped_class_images(model, settings) == []
    assert data.shipped_class_images(tmp_path / "nowhere", settings) == []
    (model / data.SHIPPED_CLASS_IMAGES / "class.json").write_text("{not json")
    assert data.shipped_class_images(model, settings) == []


def test_seeding_copies_only_the_images_asked_for_and_keeps_the_cache_s_own(tmp_path):
    model, settings = _shipping_model(tmp_path, count=3)
    shipped = data.shipped_class_images(model, settings)
    cache = tmp_path / "runs" / "class-images" / "abc"
    cache.mkdir(parents=True)
    Image.new("RGB", (64, 64), (0, 255, 0)).save(cache / "00000.png")  # made by an earlier run
    assert data.seed_class_cache(cache, shipped, 2) == 1  # image 0 kept, image 1 copied, image 2 not asked for
    assert sorted(p.name for p in cache.iterdir()) == ["00000.png", "00001.png"]
    assert Image.open(cache / "00000.png").getpixel((0, 0)) == (0, 255, 0)
    assert (cache / "00001.png").read_bytes() == (model / data.SHIPPED_CLASS_IMAGES / "00001.png").read_bytes()
    assert data.seed_class_cache(cache, shipped, 2) == 0


def test_the_demo_model_ships_the_examples_class_images():
    """What the studio's examples ask for (prior preservation on "a shape" at 64 px, seed 0, the
    model's sampling settings) is shipped for the demo model's weights as they are."""
    from trainers.dreambooth import sampling_settings
    from trainers.models import check_source

    sampling = sampling_settings(SimpleNamespace(num_inference_steps=None, guidance_scale=None), check_source(DEMO))
    made_as = {"prompt": "a shape", "resolution": 64, "seed": 0, "precision": "float32", **sampling}
    assert len(data.shipped_class_images(DEMO, made_as)) == 100
