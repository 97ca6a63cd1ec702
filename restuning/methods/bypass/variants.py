"""Optional parts of the bypass network, each one row of the design ablation
(bench.bypass_ablation): none is in the default design, each is one BypassConfig option away.

    Film       x·(1 + γ(e)) + β(e) per channel, [γ; β] = W_2 W_1 SiLU(e), e the U-Net's time
               embedding (the one its resnets read); W_2 zero (the identity) where nothing
               zero follows it, else live (Film.wake)
    Refine     r(s) = s + Convpass(FiLM(s)) + t(FiLM(s), c): a residual block at the output's
               resolution, after the chain (t: the text tuner, layer.TextAttention)
    Rearrange  Z(Attn(s W_q, s W_k, x_L) − x_L): the bypass state s places the backbone's own
               features x_L (values, split in channel groups per head); Z zero at start
    Readouts   Σ_l up(Z_l(SiLU(GN(x_l^b)))) over the stages before the last: every stage's
               state reaches the output directly (bilinear up to the output's size); Z_l zero

    TokenGate  g(c) = σ(max_t (w·LN(c_t) + b)): the correction is scaled per sample by how much
               the prompt's most concept-like token looks like the one it was trained on

Every one of them is zero or the identity at attach, so the output stays the base model's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...tuners import Convpass
from .blocks import TextAttention

FILM_RANK = 64  # W_1's width: a full-rank map from SD's 1280-wide embedding would cost 2·1280·C per FiLM


class Film(nn.Module):
    def __init__(self, time_channels: int, channels: int, rank: int = FILM_RANK):
        super().__init__()
        self.down = nn.Linear(time_channels, rank)
        self.up = nn.Linear(rank, 2 * channels)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def wake(self) -> None:
        """Behind the network's zero-initialised Z the FiLM need not start as the identity: live
        from the start, so that the first step that moves Z reaches W_1 too."""
        self.up.reset_parameters()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.up(self.down(F.silu(temb))).to(x.dtype)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + scale) + shift


class Refine(nn.Module):
    def __init__(self, channels: int, dim: int, heads: int, text_channels: int | None, time_channels: int | None):
        super().__init__()
        self.film = Film(time_channels, channels) if time_channels else None
        self.conv = Convpass(channels, dim)
        self.text = TextAttention(channels, text_channels, heads=heads) if text_channels else None

    def forward(self, state: Tensor, text: Tensor | None, temb: Tensor | None) -> Tensor:
        x = self.film(state, temb) if self.film is not None else state
        out = state + self.conv(x)
        if self.text is not None:
            out = out + self.text(x, text)
        return out


class Rearrange(nn.Module):
    def __init__(self, channels: int, heads: int = 8, width: int = 64):
        super().__init__()
        self.heads = heads if channels % heads == 0 and width % heads == 0 else 1
        self.query = nn.Conv2d(channels, width, 1, bias=False)
        self.key = nn.Conv2d(channels, width, 1, bias=False)
        for layer in (self.query, self.key):
            nn.init.normal_(layer.weight, std=channels ** -0.5)  # logits of std ~1 at start
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, state: Tensor, values: Tensor) -> Tensor:
        b, c, h, w = values.shape
        values = values.to(state.dtype)

        def tokens(t):
            return t.flatten(2).transpose(1, 2).unflatten(-1, (self.heads, -1)).transpose(1, 2)

        moved = F.scaled_dot_product_attention(tokens(self.query(state)), tokens(self.key(state)), tokens(values))
        moved = moved.transpose(1, 2).flatten(2).transpose(1, 2).reshape(b, c, h, w)
        return self.out(moved - values)


def readout(channels: int, out_channels: int) -> nn.Sequential:
    head = nn.Sequential(nn.GroupNorm(math.gcd(32, channels), channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 1))
    nn.init.zeros_(head[2].weight)
    nn.init.zeros_(head[2].bias)
    return head


class TokenGate(nn.Module):
    def __init__(self, text_channels: int):
        super().__init__()
        self.score = nn.Linear(text_channels, 1)
        nn.init.normal_(self.score.weight, std=text_channels ** -0.5)
        nn.init.zeros_(self.score.bias)

    def forward(self, text: Tensor) -> Tensor:
        scores = self.score(F.layer_norm(text, text.shape[-1:])).squeeze(-1)
        return torch.sigmoid(scores.amax(dim=1))[:, None, None, None]
