"""The pieces of a diffusers attention call that the bound prefix and prompt baselines share.

They are attention processors (diffusers' own seam for changing how an `Attention` module
attends); these helpers do the projections the way diffusers' `AttnProcessor2_0` does.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def check_supported(attn, attention_mask) -> None:
    if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
        raise NotImplementedError("this processor supports the plain attention of SD's transformer blocks only")


def split_heads(attn, t: Tensor) -> Tensor:
    b, n, c = t.shape
    return t.view(b, n, attn.heads, c // attn.heads).transpose(1, 2)


def context_of(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None) -> Tensor:
    if encoder_hidden_states is None:
        return hidden_states
    return attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states


def sdpa(attn, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=attn.scale)


def finish(attn, out: Tensor, dtype) -> Tensor:
    b, h, n, d = out.shape
    out = out.transpose(1, 2).reshape(b, n, h * d).to(dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    return out / attn.rescale_output_factor
