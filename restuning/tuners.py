"""Res-Tuners (Section 3.1, Fig. 3a): self-contained modules that read an OP's input x and return
a residual, so that x' = OP(x) + Res-Tuner(x) (Eq. 7).

A Res-Tuner owns all its parameters and never touches the backbone's weights; that is what lets
any tuner sit beside any OP (attention, feed-forward, whole block) and is the paper's point.
Each one ends in a zero-initialised layer (W_up, or an output projection W_o), so attaching leaves
the model's output unchanged bit for bit (a zero weight times anything finite is exactly zero),
while that layer gets gradient at the first step and every other parameter from the second on.

The kinds learn at one pace (issue #12; scripts/probe_tuners.py on the demo model, lr 1e-2, 8
steps, |R(x)|/|OP(x)| of the residual against its OP's output). Under Adam a zero-initialised
layer's output grows with what it reads: an adapter's W_up reads `length` hidden units (0.41
beside attn1, 0.33 beside ff). Res-Prefix with zero values was a near-constant bias: every value
row got the same gradient, so its keys got ~1/100 of the values' gradient and never learned to
select (0.15 after 12 steps). Res-Prompt's W_o reads PROMPT_WIDTH channels, 6.4x the adapter's
`length`, and its residual outgrew the OP itself (2.0 beside ff, 2.7 beside attn1). Hence the
fixed gains below, L / (the width W_o reads): length/C for Res-Prefix, length/PROMPT_WIDTH for
Res-Prompt.

With x̂ = LN(x) the parameter-free layer norm (mean 0, variance 1 per token, eps 1e-5), s = 1/sqrt(d)
the logit scale of heads of width d, and Attn(Q, K, V) = softmax(s·Q Kᵀ) V per head:

- `Adapter`   φ(x W_down + b_down) W_up + b_up, φ = GELU, bottleneck `length` (the branch of
              Eq. 6, here reading the OP's input x as Eq. 7 does); W_up, b_up start at zero.
- `ResPrefix` (L/C · Attn(x̂, K_pre, V_pre)) W_o + b_o: the prefix half of Eq. 3 with `length` = L
              free keys and values (L, C), split into `heads` heads of d = C/heads, both random
              at start, and an output projection W_o (C, C) that starts at zero (its gradient at
              the first step is the attention output; keys and values learn from the second step
              with gradients of one size). The query is x̂ itself, because a detached tuner may
              not borrow the OP's W_q; a learned query projection of its own was tried and
              learned no more beside attn1 (README, quality section). W_o is Eq. 3's output
              projection: it lets every head's values write to every channel, where a
              per-channel gate g (the form before format 3: (L·g) ⊙ Attn) kept each head on its
              own eighth of them; beside attn1 at length 80 the gate learned 0.19 of the concept
              in bench.quality's 600 steps, W_o 0.47 (one training each). It costs C² parameters
              per tuner (8.3M for attn1 on SD v1.5's mid and up blocks, against 0.16M gated); a
              rank-L W_o (a random C->L mix, then zero L->C) was tried and learned 0.14.
- `ResPrompt` (L/64 · Attn(x̂ W_q, P W_k, P W_v)) W_o: the prompt half of Eq. 5, where K_pro = x_pro W_k and
              V_pro = x_pro W_v come from one set of `length` prompt tokens P (L, C) living in the
              input space. The detached tuner cannot use the OP's W_q, W_k, W_v, so it carries its
              own, into an inner width of PROMPT_WIDTH channels (`heads` heads; 4·64·C + L·C
              parameters against Res-Prefix's 2·L·C + C² + C), and W_o (zero at start) brings the result
              back to C channels. W_q and W_k start as N(0, 1/C), so the logits start with std 1,
              as Res-Prefix's do. It is not a special case of Res-Prefix: its query is learned and
              its keys and values are tied through the shared tokens.

λ. In the unbound forms (Eq. 3, 5) the parallel branch is weighted by λ of Eq. 10/12, which
varies per query and depends on the OP's own keys, and the OP's output by 1 − λ. Res-Tuning does
not reproduce that: it keeps the OP's output at weight 1 and adds the tuner's output at weight 1
(Eq. 7); the tuner has no access to the OP's keys, so no λ is computed. What remains of the
weighting is only the magnitude the zero-initialised output layer learns, which is the same for
every query. The exact unbound forms, with λ, are `restuning.unbinding` and the bound baselines.
A per-query λ with a learned logit per head standing in for the OP's keys (a zero-valued "null"
key) was tried on the demo model and left out: it made both kinds learn less in 600 steps
(bench.quality, one training at 1e-2: beside ff, Res-Prefix 0.12 -> 0.08 and Res-Prompt 0.22 -> 0.02
concept fidelity).
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
        # nn.Linear's default init gave logits of std 0.33: near-uniform attention (entropy 0.98 of
        # the maximum) whose output hardly depended on the token, so the tuner first learnt one
        # shift for every token and prompt. N(0, 1/C) gives logits of std 1, as Res-Prefix's.
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
