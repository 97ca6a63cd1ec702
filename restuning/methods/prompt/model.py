"""Bound prompt tuning (VPT-deep style; Eq. 4): `dim` learned tokens x_pro are appended to the
token sequence an attention reads its keys and values from (the hidden states for self-attention,
the text for cross-attention), and pass through the frozen W_k, W_v. The prompt tokens' own
outputs (D in Eq. 5) are discarded, so only the original tokens' queries are computed.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core import Attached, op_module, transformer_blocks
from ..attention import check_supported, context_of, finish, split_heads
from ..prefix.model import install_processor, prefix_attention


class PromptAttnProcessor(nn.Module):
    def __init__(self, source_dim: int, length: int, handle: Attached):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(length, source_dim))
        self.handle = handle

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        check_supported(attn, attention_mask)
        context = context_of(attn, hidden_states, encoder_hidden_states)
        q = split_heads(attn, attn.to_q(hidden_states))
        k = split_heads(attn, attn.to_k(context))
        v = split_heads(attn, attn.to_v(context))
        prompt = self.tokens.to(context.dtype).expand(context.shape[0], -1, -1)
        k_pro = split_heads(attn, attn.to_k(prompt))
        v_pro = split_heads(attn, attn.to_v(prompt))
        out = prefix_attention(attn, q, k, v, k_pro, v_pro, self.handle)
        return finish(attn, out, hidden_states.dtype)


def attach(unet: nn.Module, config, name: str) -> Attached:
    handle = Attached(name=name, config=config)
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
