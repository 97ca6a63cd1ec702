"""Bound prompt tuning (VPT-deep style; Eq. 4): `length` learned tokens x_pro are appended to the
token sequence an attention reads its keys and values from (the hidden states for self-attention,
the text for cross-attention), and pass through the frozen W_k, W_v. The prompt tokens' own
outputs (D in Eq. 5) are discarded, so only the original tokens' queries are computed.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core import Attached
from ..attention import bound_attention, split_heads


class PromptAttnProcessor(nn.Module):
    def __init__(self, source_dim: int, length: int, handle: Attached):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(length, source_dim))
        self.handle = handle

    def extra(self, attn, context):
        prompt = self.tokens.to(context.dtype).expand(context.shape[0], -1, -1)
        return split_heads(attn, attn.to_k(prompt)), split_heads(attn, attn.to_v(prompt))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        return bound_attention(attn, hidden_states, encoder_hidden_states, attention_mask, [self])
