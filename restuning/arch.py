"""U-Net architectures the project builds from config, and the fingerprint a tuner file records.

`sd15` is Stable Diffusion v1.5's U-Net (859,520,964 parameters). diffusers' own
`UNet2DConditionModel()` defaults are not SD v1.5 (cross_attention_dim 1280), so the config is
spelled out here. `tiny` is a small U-Net with the same block types for fast tests.
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

ARCHS = {"sd15": SD15_UNET_CONFIG, "tiny": TINY_UNET_CONFIG}

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


def fingerprint(unet) -> dict:
    """The architecture facts a tuner file must match, as plain JSON-able data."""
    config = dict(unet.config)
    out = {}
    for field in FINGERPRINT_FIELDS:
        value = config.get(field)
        out[field] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def fingerprint_mismatch(saved: dict, unet) -> list[str]:
    """Human-readable differences between a saved fingerprint and a U-Net; empty when they match."""
    current = fingerprint(unet)
    # A field the file does not name is a mismatch too: fingerprint() always writes every field,
    # so only a crafted or truncated header lacks one, and it must not skip the check.
    return [
        f"{field}: file has {saved[field]!r}, model has {current.get(field)!r}" if field in saved
        else f"{field}: file does not say, model has {current.get(field)!r}"
        for field in FINGERPRINT_FIELDS
        if field not in saved or saved[field] != current[field]
    ]
