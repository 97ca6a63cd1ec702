"""The bundled demo model, its evaluator and the shapes world.

These tests load the shipped assets and never retrain anything. Missing assets are a
failure, not a skip: the studio's default model and the benchmark depend on them.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from scripts import shapes_world as W
from scripts.evaluator import Evaluator

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MODEL = ASSETS / "demo-model"
PROMPT = "a sks shape in green on a yellow background"


@pytest.fixture(scope="module")
def pipe():
    p = StableDiffusionPipeline.from_pretrained(str(MODEL), local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def test_pipeline_has_sd_components_and_attention_where_tuners_attach(pipe):
    unet = pipe.unet
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert sum(hasattr(b, "attentions") for b in unet.up_blocks) >= 2
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert pipe.safety_checker is None


def test_pipeline_makes_a_64px_image_in_a_few_steps(pipe):
    out = pipe("a red circle on a blue background", num_inference_steps=4, guidance_scale=3.5,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all() and out.std() > 0.01


def test_tokenizer_encodes_real_words(pipe):
    ids = pipe.tokenizer(PROMPT).input_ids
    words = PROMPT.split()
    assert len(ids) == len(words) + 2  # one token per word, plus BOS and EOS
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.eos_token_id not in ids[1:-1]
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings


def test_tokenizer_loads_from_vocab_and_merges_alone(tmp_path, pipe):
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(MODEL / "tokenizer" / f, tmp_path / f)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path), model_max_length=16)
    assert tok(PROMPT).input_ids == pipe.tokenizer(PROMPT).input_ids


def test_demo_settings_and_size():
    st = json.loads((MODEL / "demo_settings.json").read_text())
    assert st["height"] == st["width"] == 64
    assert st["num_inference_steps"] > 0 and st["guidance_scale"] > 1
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size < 40e6
    assert (MODEL / "README.md").read_text().count("PSNR") >= 1


def test_world_renders_deterministically_from_a_seed():
    a, _ = W.render("star", "red", "blue", rng=7)
    b, cap = W.render("star", "red", "blue", rng=7)
    c, _ = W.render("star", "red", "blue", rng=8)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert a.size == (64, 64) and a.mode == "RGB"
    assert cap == "a red star on a blue background"
    x1, attrs1, caps1 = W.sample_dataset(3, 50)
    x2, attrs2, caps2 = W.sample_dataset(3, 50)
    assert np.array_equal(x1, x2) and attrs1 == attrs2 and caps1 == caps2


def test_held_out_shapes_never_in_pretraining_sampler():
    _, attrs, caps = W.sample_dataset(0, 3000)
    assert not {s for s, _, _ in attrs} & set(W.HELD_OUT)
    assert {s for s, _, _ in attrs} == set(W.SHAPES)
    assert all(c != b for _, c, b in attrs)
    assert not any(h in cap.split() for cap in caps for h in W.HELD_OUT)
    assert sum(cap == "" for cap in caps) > 0  # empty captions for classifier-free guidance


def test_evaluator_classifies_clean_renders():
    ev = Evaluator.load(ASSETS / "evaluator")
    rng = np.random.default_rng(123)
    imgs, expected = [], []
    for i, shape in enumerate(W.ALL_SHAPES * 3):
        _, colour, bg = W.sample_attributes(rng)
        imgs.append(W.render(shape, colour, bg, rng=i)[0])
        expected.append((shape, colour, bg))
    s = ev.score(imgs, expected)
    assert s["n"] == 24
    assert s["shape"] >= 0.9 and s["colour"] >= 0.9 and s["background"] >= 0.9, s
    # An attribute left as None is not scored.
    assert ev.score(imgs[:2], [{"colour": expected[0][1]}, {"colour": expected[1][1]}])["shape"] is None


def test_example_concepts_and_sample_grid():
    ev = Evaluator.load(ASSETS / "evaluator")
    for shape in W.HELD_OUT:
        files = sorted((ASSETS / "concepts" / shape).glob("*.png"))
        assert 4 <= len(files) <= 6
        preds = ev.predict([Image.open(f) for f in files])
        assert [p["shape"] for p in preds] == [shape] * len(files)
    assert (ASSETS / "demo-samples.png").stat().st_size > 0
    report = json.loads((ASSETS / "evaluator" / "report.json").read_text())
    assert {"vae", "evaluator", "base_model"} <= set(report)
