"""The two convolutional and attention blocks the bypass network is built of (layer.py) and its
ablation's variants reuse (variants.py)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Convpass(nn.Module):
    """A convolutional bypass (Convpass, Jie & Deng 2022, cited by the paper): 1x1 conv to `dim`
    channels, 3x3 conv at that width, 1x1 conv back, GELU between. The 3x3 conv gives the chain
    spatial reach at dim² instead of C² parameters; the last conv starts at zero."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.down = nn.Conv2d(channels, dim, 1)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.up = nn.Conv2d(dim, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(F.gelu(self.conv(F.gelu(self.down(x)))))



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
