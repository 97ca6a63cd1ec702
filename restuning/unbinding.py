"""The unbinding identities of Section 2.2 and Appendix A, in closed form.

Prefix tuning (Eq. 2-3, 9-10). Attention over keys/values extended by learned prefixes equals

    Attn(Q, [K_pre; K], [V_pre; V]) = (1 - λ) · Attn(Q, K, V) + λ · Attn(Q, K_pre, V_pre)

with, for every query row (and every head),

    λ = Σ_j exp(s·Q K_pre,jᵀ) / (Σ_i exp(s·Q K_iᵀ) + Σ_j exp(s·Q K_pre,jᵀ))           (Eq. 10)

where s = 1/sqrt(head_dim) is the same logit scale the softmax uses.

Prompt tuning (Eq. 4-5, 11-13). Appending prompt tokens x_pro to the sequence gives, for the
original tokens, the same form with K_pro = x_pro W_k, V_pro = x_pro W_v and λ of Eq. 12; the
prompt tokens' own outputs (D) never reach the original tokens.

Adapter (Eq. 6). A sequential adapter after the FFN is the parallel branch
FFN(x) + φ(FFN(x) W_down) W_up.

These functions are the reference the bound baselines are tested against; the bound baselines
themselves compute attention the original way (one softmax over the concatenation).
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(s·Q Kᵀ) V over the last two dims; q: (..., N, d), k, v: (..., M, d)."""
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def mixing_weight(q: Tensor, k: Tensor, k_extra: Tensor, scale: float) -> Tensor:
    """λ of Eq. 10 / Eq. 12, one value per query row: shape (..., N, 1).

    Computed as sigmoid(logsumexp(extra) - logsumexp(original)), which is the same ratio of sums
    of exponentials without overflow.
    """
    lse_original = torch.logsumexp((q @ k.transpose(-1, -2)) * scale, dim=-1, keepdim=True)
    lse_extra = torch.logsumexp((q @ k_extra.transpose(-1, -2)) * scale, dim=-1, keepdim=True)
    return torch.sigmoid(lse_extra - lse_original)


def unbound_attention(q: Tensor, k: Tensor, v: Tensor, k_extra: Tensor, v_extra: Tensor, scale: float, strength: float = 1.0) -> Tensor:
    """(1 - λ)·Attn(Q, K, V) + λ·Attn(Q, K_extra, V_extra): Eq. 3 (prefix) and Eq. 5 (prompt).

    `strength` scales λ; 1 is the exact identity, 0 the untouched attention. The bound prefix and
    prompt baselines use it for their inference-time strength.
    """
    lam = mixing_weight(q, k, k_extra, scale) * strength
    return (1 - lam) * attention(q, k, v, scale) + lam * attention(q, k_extra, v_extra, scale)


def parallel_adapter(ffn_out: Tensor, adapter) -> Tensor:
    """Eq. 6: the sequential adapter after an FFN, written as a branch beside it."""
    return ffn_out + adapter(ffn_out)
