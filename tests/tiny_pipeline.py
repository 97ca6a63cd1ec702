"""A tiny StableDiffusionPipeline built from configs, for tests that need the whole pipeline
path without the bundled demo model."""

import json
import tempfile
from pathlib import Path

import torch

from restuning.arch import TINY_UNET_CONFIG

WORDS = ["a", "photo", "of", "sks", "dog", "shape", "red", "blue", "on", "background"]


def tiny_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(specials + [w + "</w>" for w in WORDS] + list("abcdefghijklmnopqrstuvwxyz"))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=16)


def tiny_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    folder = Path(tempfile.mkdtemp(prefix="tiny-tokenizer-"))
    tokenizer = tiny_tokenizer(folder)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16))
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
