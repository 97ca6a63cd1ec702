"""Tiny pipelines of each Stable Diffusion family, built from configs with random weights in
about a second, for tests that need the whole pipeline path without a real model:

    tiny_pipeline(seed, family)   # sd1 (StableDiffusionPipeline, the tiny U-Net restuning.arch names
                                  # "tiny", an f=2 VAE), sd2 (linear projections, 48-wide text, v-prediction)
                                  # or sdxl (StableDiffusionXLPipeline: two text encoders, the second
                                  # with a projection, pooled embeddings and size/crop conditioning)
    build_tiny(folder, family)    # the same with an f=8 VAE (64 px -> 8x8 latents, SD's ratio), saved
                                  # as a diffusers folder the trainer and the studio load
"""

import json
import tempfile
from pathlib import Path

import torch

from restuning.arch import TINY_SD2_UNET_CONFIG, TINY_SDXL_TEXT_WIDTHS, TINY_SDXL_UNET_CONFIG, TINY_UNET_CONFIG

WORDS = ["a", "photo", "of", "sks", "dog", "shape", "red", "blue", "on", "background"]
FAMILIES = ("sd1", "sd2", "sdxl")
UNETS = {"sd1": TINY_UNET_CONFIG, "sd2": TINY_SD2_UNET_CONFIG, "sdxl": TINY_SDXL_UNET_CONFIG}
# What each family's scheduler predicts: SD 2.x's 768-px models predict v.
PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}


def tiny_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(specials + [w + "</w>" for w in WORDS] + list("abcdefghijklmnopqrstuvwxyz"))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=16)


def _text_encoder(vocab: int, width: int, *, layers: int = 1, act: str = "quick_gelu", projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # the tiny vocabulary's special tokens (tiny_tokenizer): the pooled embedding is read at the end-of-text token
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                            num_attention_heads=2, max_position_embeddings=16, hidden_act=act, projection_dim=width,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(family: str, f8: bool):
    from diffusers import AutoencoderKL

    channels = (8, 8, 16, 16) if f8 else (8, 16)
    return AutoencoderKL(block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), latent_channels=4, norm_num_groups=8,
                         sample_size=64 if f8 else 32, **({"scaling_factor": 0.13025} if family == "sdxl" else {}))


def tiny_components(family: str = "sd1", seed: int = 0, *, f8: bool = False, prediction_type: str | None = None) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="tiny-tokenizer-") as folder:  # read into memory; the files can go
        tokenizer = tiny_tokenizer(Path(folder))
    parts = {"tokenizer": tokenizer}
    if family == "sdxl":
        parts["text_encoder"] = _text_encoder(len(tokenizer), TINY_SDXL_TEXT_WIDTHS[0], layers=2)
        parts["text_encoder_2"] = _text_encoder(len(tokenizer), TINY_SDXL_TEXT_WIDTHS[1], layers=2, act="gelu", projection=True)
        parts["tokenizer_2"] = tokenizer
    else:
        width = UNETS[family]["cross_attention_dim"]
        parts["text_encoder"] = _text_encoder(len(tokenizer), width, act="gelu" if family == "sd2" else "quick_gelu")
    parts["vae"] = _vae(family, f8)
    parts["unet"] = UNet2DConditionModel(**UNETS[family])
    # The plain SD 1.x pipeline keeps DDPM's defaults, as the tests written against it have them.
    plain = family == "sd1" and not f8 and prediction_type is None
    parts["scheduler"] = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                                       **({} if plain else {"prediction_type": prediction_type or PREDICTION[family],
                                                            "clip_sample": False, "steps_offset": 1}))
    return parts


def tiny_pipeline(seed: int = 0, family: str = "sd1", **kwargs):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = tiny_components(family, seed, **kwargs)
    if family == "sdxl":
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny(folder: Path, family: str = "sd1", prediction_type: str | None = None, seed: int = 0) -> Path:
    """A tiny pipeline of `family` with an f=8 VAE, saved to `folder` as a diffusers folder."""
    if family == "sd1":
        # the f=2 VAE drawn and replaced, as the folder the SD 1.x tests were written against was built
        from diffusers import StableDiffusionPipeline

        parts = tiny_components("sd1", seed, prediction_type=prediction_type or "epsilon")
        torch.manual_seed(seed)
        parts["vae"] = _vae("sd1", f8=True)
        StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
        return Path(folder)
    tiny_pipeline(seed, family, f8=True, prediction_type=prediction_type).save_pretrained(folder)
    return Path(folder)
