"""Res-Tuners (Section 3.1, Fig. 3a): self-contained modules that read an OP's input x and return
a residual, so that x' = OP(x) + Res-Tuner(x) (Eq. 7).

A Res-Tuner owns all its parameters and never touches the backbone's weights; that is what lets
any tuner sit beside any OP (attention, feed-forward, whole block) and is the paper's point.
Each one starts at exactly zero output, so attaching leaves the model's output unchanged
(bit for bit: a zero weight times anything finite is exactly zero).

- `Adapter`      φ(x W_down) W_up, bottleneck `length`, W_up zero-initialised (Eq. 6's branch).
- `ResPrefix`    Attn(x̂, K_pre, V_pre): the prefix half of Eq. 3 with `length` learned keys and
                 values per head; V_pre starts at zero. The query is x itself, layer-normalised
                 without parameters (x̂), because a Res-Tuner may not borrow the OP's W_q.
- `ResPrompt`    g ⊙ Attn(x̂, P, P): the prompt half of Eq. 5 with `length` learned prompt tokens P.
                 Prompt tokens live in the input space and the backbone's W_k, W_v are not
                 available to a detached tuner, so the tokens serve as keys and values directly; a
                 per-channel gate g (zero at start) gives the exact identity at attach.

The mixing weight λ of Eq. 10/12 depends on the OP's own keys; in the unbound framework it is
absorbed into the tuner's learned scale, which is why the Res-Tuners carry no λ.
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


def _heads_for(dim: int, heads: int) -> int:
    return heads if dim % heads == 0 else 1


class ResPrefix(nn.Module):
    def __init__(self, dim: int, length: int = 10, heads: int = 8):
        super().__init__()
        self.heads = _heads_for(dim, heads)
        self.key = nn.Parameter(torch.randn(length, dim))
        self.value = nn.Parameter(torch.zeros(length, dim))

    def forward(self, x: Tensor) -> Tensor:
        return _attend_learned_tokens(x, self.key, self.value, self.heads)


class ResPrompt(nn.Module):
    def __init__(self, dim: int, length: int = 10, heads: int = 8):
        super().__init__()
        self.heads = _heads_for(dim, heads)
        self.tokens = nn.Parameter(torch.randn(length, dim))
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.gate * _attend_learned_tokens(x, self.tokens, self.tokens, self.heads)


def _attend_learned_tokens(x: Tensor, key: Tensor, value: Tensor, heads: int) -> Tensor:
    """Multi-head attention of every token of x (…, N, C) to L learned tokens (L, C)."""
    *lead, n, c = x.shape
    d = c // heads
    q = F.layer_norm(x, (c,)).reshape(*lead, n, heads, d).transpose(-2, -3)
    k = key.to(q.dtype).reshape(-1, heads, d).transpose(0, 1)
    v = value.to(q.dtype).reshape(-1, heads, d).transpose(0, 1)
    out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
    return out.transpose(-2, -3).reshape(*lead, n, c)


TUNER_KINDS = {"adapter": Adapter, "prefix": ResPrefix, "prompt": ResPrompt}


def make_tuner(kind: str, dim: int, length: int, heads: int = 8) -> nn.Module:
    if kind not in TUNER_KINDS:
        raise ValueError(f"unknown tuner kind {kind!r}; choose from {', '.join(TUNER_KINDS)}")
    if kind == "adapter":
        return Adapter(dim, length)
    return TUNER_KINDS[kind](dim, length, heads)
