"""Res-Tuners (Section 3.1, Fig. 3a): self-contained modules that read an OP's input x and return
a residual, so that x' = OP(x) + Res-Tuner(x) (Eq. 7).

A Res-Tuner owns all its parameters and never touches the backbone's weights; that is what lets
any tuner sit beside any OP (attention, feed-forward, whole block) and is the paper's point.
Each one ends in a zero-initialised layer (W_up, or an output projection W_o), so attaching leaves
the model's output unchanged bit for bit (a zero weight times anything finite is exactly zero),
while that layer gets gradient at the first step and every other parameter from the second on.

Under Adam a zero-initialised layer's output grows with the width it reads, so each kind scales
what its W_o reads by L / (that width): length/C for Res-Prefix, length/PROMPT_WIDTH for
Res-Prompt, the pace of an adapter whose W_up reads `length` hidden units. (The probe and the
trainings behind these choices: docs/benchmarks.md, "Res-Tuners".)

With x̂ = LN(x) the parameter-free layer norm (mean 0, variance 1 per token, eps 1e-5), s = 1/sqrt(d)
the logit scale of heads of width d, and Attn(Q, K, V) = softmax(s·Q Kᵀ) V per head:

- `Adapter`   φ(x W_down + b_down) W_up + b_up, φ = GELU, bottleneck `length` (the branch of
              Eq. 6, here reading the OP's input x as Eq. 7 does); W_up, b_up start at zero.
              2·length·C + length + C parameters.
- `ResPrefix` (L/C · Attn(x̂, K_pre, V_pre)) W_o + b_o: the prefix half of Eq. 3 with `length` = L
              free keys and values (L, C), split into `heads` heads of d = C/heads, both random
              at start, and Eq. 3's output projection W_o (C, C) + b_o, zero at start, which lets
              every head's values write to every channel. The query is x̂ itself, because a
              detached tuner may not borrow the OP's W_q. 2·L·C + C² + C parameters.
- `Convpass`  φ(conv3x3(φ(x W_down))) W_up, the adapter made convolutional for a convolutional OP (a
              ResNet block, whose input and output widths may differ): 1x1 convs down to `length`
              channels and up to the OP's output width (W_up zero at start), a 3x3 conv between
              for spatial reach at length² parameters (Convpass, Jie & Deng 2022, cited by the paper).
- `ResPrompt` (L/64 · Attn(x̂ W_q, P W_k, P W_v)) W_o + b_o: the prompt half of Eq. 5, where
              K_pro = x_pro W_k and V_pro = x_pro W_v come from one set of `length` prompt tokens
              P (L, C) living in the input space. The detached tuner cannot use the OP's W_q, W_k,
              W_v, so it carries its own, into an inner width of PROMPT_WIDTH channels (`heads`
              heads), and W_o (zero at start) brings the result back to C channels: 4·64·C + L·C
              + C parameters. W_q and W_k start as N(0, 1/C), so the logits start with std 1, as
              Res-Prefix's do. It is not a special case of Res-Prefix: its query is learned and
              its keys and values are tied through the shared tokens.

A head count that does not divide the width falls back to one head.

λ. In the unbound forms (Eq. 3, 5) the parallel branch is weighted by λ of Eq. 10/12, which
varies per query and depends on the OP's own keys, and the OP's output by 1 − λ. Res-Tuning does
not reproduce that: it keeps the OP's output at weight 1 and adds the tuner's output at weight 1
(Eq. 7); the tuner has no access to the OP's keys, so no λ is computed. What remains of the
weighting is only the magnitude the zero-initialised output layer learns, which is the same for
every query. The exact unbound forms, with λ, are `restuning.unbinding` and the bound baselines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Adapter(nn.Module):
    def __init__(self, dim: int, length: int = 10):
        super().__init__()
        self.down = nn.Linear(dim, length)
        self.up = nn.Linear(length, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(F.gelu(self.down(x)))


class Convpass(nn.Module):
    """The convolutional Res-Adapter (Convpass, Jie & Deng 2022): W_up GELU(conv3x3(GELU(W_down x)))
    on a feature map, 1x1 W_down to `dim` channels and 1x1 W_up (zero at start) to `out_channels`;
    beside a ResNet block, whose input and output widths may differ, it is Eq. 7 with that block
    as the OP."""

    def __init__(self, channels: int, dim: int, out_channels: int | None = None):
        super().__init__()
        self.down = nn.Conv2d(channels, dim, 1)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.up = nn.Conv2d(dim, out_channels or channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(F.gelu(self.conv(F.gelu(self.down(x)))))


def _heads_for(dim: int, heads: int) -> int:
    return heads if dim % heads == 0 else 1


class ResPrefix(nn.Module):
    def __init__(self, dim: int, length: int = 10, heads: int = 8):
        super().__init__()
        self.heads = _heads_for(dim, heads)
        self.key = nn.Parameter(torch.randn(length, dim))
        self.value = nn.Parameter(torch.randn(length, dim))
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.gain = length / dim

    def forward(self, x: Tensor) -> Tensor:
        x_hat = F.layer_norm(x, (x.shape[-1],))
        return self.out(_attend(x_hat, self.key.to(x.dtype), self.value.to(x.dtype), self.heads) * self.gain)


# Inner width of Res-Prompt's own attention: 8 heads of 8 channels at the default `heads`.
PROMPT_WIDTH = 64


class ResPrompt(nn.Module):
    def __init__(self, dim: int, length: int = 10, heads: int = 8):
        super().__init__()
        self.heads = _heads_for(PROMPT_WIDTH, heads)
        self.tokens = nn.Parameter(torch.randn(length, dim))
        self.query = nn.Linear(dim, PROMPT_WIDTH, bias=False)
        self.key = nn.Linear(dim, PROMPT_WIDTH, bias=False)
        self.value = nn.Linear(dim, PROMPT_WIDTH, bias=False)
        self.out = nn.Linear(PROMPT_WIDTH, dim)
        # nn.Linear's default init gives logits of std 1/3: near-uniform attention whose output
        # hardly depends on the token. N(0, 1/C) gives logits of std 1, as Res-Prefix's.
        nn.init.normal_(self.query.weight, std=dim ** -0.5)
        nn.init.normal_(self.key.weight, std=dim ** -0.5)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.gain = length / PROMPT_WIDTH

    def forward(self, x: Tensor) -> Tensor:
        x_hat = F.layer_norm(x, (x.shape[-1],))
        return self.out(_attend(self.query(x_hat), self.key(self.tokens), self.value(self.tokens), self.heads) * self.gain)


def _attend(q: Tensor, key: Tensor, value: Tensor, heads: int) -> Tensor:
    """Multi-head attention of every token of q (…, N, C) to L tokens (L, C): softmax(s·Q Kᵀ) V."""
    *lead, n, c = q.shape
    d = c // heads
    q = q.reshape(*lead, n, heads, d).transpose(-2, -3)
    k = key.reshape(-1, heads, d).transpose(0, 1)
    v = value.reshape(-1, heads, d).transpose(0, 1)
    out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
    return out.transpose(-2, -3).reshape(*lead, n, c)


TUNER_KINDS = {"adapter": Adapter, "prefix": ResPrefix, "prompt": ResPrompt}


def make_tuner(kind: str, dim: int, length: int, heads: int = 8) -> nn.Module:
    if kind not in TUNER_KINDS:
        raise ValueError(f"unknown tuner kind {kind!r}; choose from {', '.join(TUNER_KINDS)}")
    if kind == "adapter":
        return Adapter(dim, length)
    return TUNER_KINDS[kind](dim, length, heads)
