"""The text attention the bypass network (layer.py) and its ablation's variants (variants.py) are
built of, beside Convpass (restuning.tuners)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class TextAttention(nn.Module):
    """t(x, c) = Attn(LN(x) W_q, c W_k, c W_v) W_o per pixel of x: a Res-Tuner beside the
    backbone's cross-attention, with its own projections into `width` channels."""

    def __init__(self, channels: int, text_channels: int, width: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads if width % heads == 0 else 1
        self.query = nn.Linear(channels, width, bias=False)
        self.key = nn.Linear(text_channels, width, bias=False)
        self.value = nn.Linear(text_channels, width, bias=False)
        self.out = nn.Linear(width, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = F.layer_norm(x.flatten(2).transpose(1, 2), (c,))

        def split(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(tokens)), split(self.key(text)), split(self.value(text)))
        out = self.out(out.transpose(1, 2).flatten(2))
        return out.transpose(1, 2).reshape(b, c, h, w)
