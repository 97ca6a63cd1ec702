"""Bound prefix tuning (Li & Liang; Eq. 2): every chosen attention attends over [K_pre; K] and
[V_pre; V], with `length` learned prefix keys and values per head (how the call is computed:
restuning/methods/attention.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ...core import Attached
from ..attention import bound_attention


class PrefixAttnProcessor(nn.Module):
    def __init__(self, heads: int, head_dim: int, length: int, handle: Attached):
        super().__init__()
        self.key = nn.Parameter(torch.randn(heads, length, head_dim) * head_dim**-0.5)
        self.value = nn.Parameter(torch.randn(heads, length, head_dim) * 0.02)
        self.handle = handle

    def extra(self, attn, context):
        b = context.shape[0]
        return self.key.to(context.dtype).expand(b, -1, -1, -1), self.value.to(context.dtype).expand(b, -1, -1, -1)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        return bound_attention(attn, hidden_states, encoder_hidden_states, attention_mask, [self])
