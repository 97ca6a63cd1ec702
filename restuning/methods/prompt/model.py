"""Attach bound prompt tuning (layer.py) to the chosen attentions of a U-Net's transformer blocks."""

from __future__ import annotations

from torch import nn

from ...core import Attached, op_module, transformer_blocks
from ..attention import guard_unet, install_processor
from .layer import PromptAttnProcessor


def attach(unet: nn.Module, config, name: str) -> Attached:
    handle = Attached(name=name, config=config)
    guard_unet(unet)
    device = next(unet.parameters()).device
    for path, block in transformer_blocks(unet, config.blocks):
        for op_name in config.ops:
            attn = op_module(block, op_name)
            if attn is None:
                continue
            processor = PromptAttnProcessor(attn.to_k.in_features, config.dim, handle).to(device)
            install_processor(attn, processor, handle)
            handle.modules[f"{path}.{op_name}"] = processor
    return handle
