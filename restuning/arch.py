"""U-Net architectures the project builds from config, their families, and the fingerprint a
tuner file records.

Families (what `family(config)` reads off a `UNet2DConditionModel` config):

- `sd1`   Stable Diffusion 1.x: convolutional proj_in/proj_out, 768-wide text (CLIP ViT-L).
- `sd2`   Stable Diffusion 2.x: linear proj_in/proj_out, 1024-wide text (OpenCLIP ViT-H), heads
          given per level (`attention_head_dim` [5, 10, 20, 20]); the 768 px models predict v.
- `sdxl`  Stable Diffusion XL: three levels, the first without attention, 2- and 10-deep
          transformer stacks (`transformer_layers_per_block` [1, 2, 10], the mid block 10 deep),
          2048-wide text (two encoders' outputs side by side) and a second conditioning on the
          pooled text embedding and six size/crop numbers (`addition_embed_type` "text_time",
          passed as `added_cond_kwargs={"text_embeds", "time_ids"}`).

`sd15`, `sd2`, `sdxl` are the published U-Nets (859,520,964 / 865,910,724 / 2,567,463,684
parameters; diffusers' own `UNet2DConditionModel()` defaults are none of them, so each config is
spelled out). `tiny`, `tiny-sd2`, `tiny-sdxl` are the same block types at a tiny size, for tests.
"""

from __future__ import annotations

import torch

SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# stabilityai/stable-diffusion-2-1 (768 px, v-prediction); 2-base differs only in sample_size 64
# and upcast_attention false, which change no weight.
SD2_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "upcast_attention": True,
}

# stabilityai/stable-diffusion-xl-base-1.0
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # the pooled text (1280) + 6 time ids x 256
}

TINY_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
}

# SD 2.x's differences at the tiny size: linear projections, heads per level, wider text.
TINY_SD2_UNET_CONFIG = {
    **TINY_UNET_CONFIG,
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "upcast_attention": True,
    "cross_attention_dim": 48,
}

# SDXL's layout at the tiny size: three levels (the first without attention), 2- and 3-deep
# transformer stacks, two text encoders of widths 16 and 32 side by side, pooled text of width 32.
TINY_SDXL_TEXT_WIDTHS = (16, 32)
TINY_SDXL_TIME_EMBED = 8
TINY_SDXL_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [8, 16, 32],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 3],
    "norm_num_groups": 8,
    "cross_attention_dim": sum(TINY_SDXL_TEXT_WIDTHS),
    "attention_head_dim": [1, 2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TINY_SDXL_TIME_EMBED,
    "projection_class_embeddings_input_dim": TINY_SDXL_TEXT_WIDTHS[1] + 6 * TINY_SDXL_TIME_EMBED,
}

ARCHS = {"sd15": SD15_UNET_CONFIG, "sd2": SD2_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG,
         "tiny": TINY_UNET_CONFIG, "tiny-sd2": TINY_SD2_UNET_CONFIG, "tiny-sdxl": TINY_SDXL_UNET_CONFIG}
TINY_ARCHS = ("tiny", "tiny-sd2", "tiny-sdxl")

FAMILIES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}

# The config fields that decide which tuner weights fit which U-Net.
FINGERPRINT_FIELDS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "transformer_layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
)
# Recorded since SDXL and SD 2.x were supported; a file written before has none of them and was
# written for a U-Net with the value given here (no SDXL could be loaded then), so only a value the
# file does state is compared. They name the family; the weights' fit is the fields above.
LATER_FIELDS = {"addition_embed_type": None, "use_linear_projection": None}


def build_unet(arch: str = "sd15", *, seed: int = 0, device: str | torch.device | None = None):
    """A `UNet2DConditionModel` of a named architecture with random weights (device "meta" allocates none)."""
    from diffusers import UNet2DConditionModel

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    torch.manual_seed(seed)
    if device is None:
        return UNet2DConditionModel(**ARCHS[arch])
    with torch.device(device):
        return UNet2DConditionModel(**ARCHS[arch])


def family(config) -> str:
    """'sdxl', 'sd2' or 'sd1' from a U-Net config (or a fingerprint that records LATER_FIELDS)."""
    config = dict(config)
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("use_linear_projection") else "sd1"


def family_label(config) -> str:
    return FAMILIES[family(config)]


def added_cond_kwargs(config, batch: int, *, size: int | None = None, generator: torch.Generator | None = None,
                      device=None) -> dict:
    """A U-Net call's `added_cond_kwargs` for an SDXL-family U-Net `config` ({} for the others):
    random pooled text embeddings and the six size/crop ids of a `size`-px image, uncropped
    (original size, crop top-left (0, 0), target size, as diffusers' SDXL pipeline builds them).
    For tests and benchmarks, where no text encoder runs."""
    config = dict(config)
    if config.get("addition_embed_type") != "text_time":
        return {}
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    size = size or config.get("sample_size", 128) * 8
    text_embeds = torch.randn(batch, pooled, generator=generator).to(device)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32, device=device)
    return {"text_embeds": text_embeds, "time_ids": time_ids}


def fingerprint(unet) -> dict:
    """The architecture facts a tuner file must match, as plain JSON-able data."""
    config = dict(unet.config)
    out = {}
    for field in (*FINGERPRINT_FIELDS, *LATER_FIELDS):
        value = config.get(field, LATER_FIELDS.get(field))
        out[field] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def fingerprint_mismatch(saved: dict, unet) -> list[str]:
    """Human-readable differences between a saved fingerprint and a U-Net; empty when they match."""
    current = fingerprint(unet)
    # A field the file does not name is a mismatch too: fingerprint() always writes every field,
    # so only a crafted or truncated header lacks one, and it must not skip the check.
    out = [
        f"{field}: file has {saved[field]!r}, model has {current.get(field)!r}" if field in saved
        else f"{field}: file does not say, model has {current.get(field)!r}"
        for field in FINGERPRINT_FIELDS
        if field not in saved or saved[field] != current[field]
    ]
    out += [f"{field}: file has {saved[field]!r}, model has {current[field]!r}"
            for field in LATER_FIELDS if field in saved and saved[field] != current[field]]
    return out


def mismatch_message(saved: dict, unet) -> str:
    """Why a file with fingerprint `saved` does not fit `unet`, naming both families where the
    file records its own; empty when it fits."""
    problems = fingerprint_mismatch(saved, unet)
    if not problems:
        return ""
    details = "; ".join(problems)
    if all(field in saved for field in LATER_FIELDS):
        theirs, ours = family_label(saved), family_label(fingerprint(unet))
        if theirs != ours:
            return f"it was trained for an {theirs} U-Net and this base model is {ours}, which it cannot be used on ({details})"
    return f"it was trained for another U-Net architecture ({details})"

