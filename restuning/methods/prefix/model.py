"""Bound prefix tuning (Li & Liang; Eq. 2): every chosen attention attends over
[K_pre; K] and [V_pre; V], with `dim` learned prefix keys and values per head.

At strength 1 this is computed the original way, one softmax over the concatenation. At other
strengths it uses the unbound form (Eq. 3) with λ scaled, which is the same thing at 1 and the
untouched attention at 0.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core import Attached, op_module, sample_mask, transformer_blocks
from ...unbinding import unbound_attention
from ..attention import check_supported, context_of, finish, sdpa, split_heads


class PrefixAttnProcessor(nn.Module):
    def __init__(self, heads: int, head_dim: int, length: int, handle: Attached):
        super().__init__()
        self.key = nn.Parameter(torch.randn(heads, length, head_dim) * head_dim**-0.5)
        self.value = nn.Parameter(torch.randn(heads, length, head_dim) * 0.02)
        self.handle = handle

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        check_supported(attn, attention_mask)
        context = context_of(attn, hidden_states, encoder_hidden_states)
        q = split_heads(attn, attn.to_q(hidden_states))
        k = split_heads(attn, attn.to_k(context))
        v = split_heads(attn, attn.to_v(context))
        b = q.shape[0]
        k_pre = self.key.to(q.dtype).expand(b, -1, -1, -1)
        v_pre = self.value.to(q.dtype).expand(b, -1, -1, -1)
        out = prefix_attention(attn, q, k, v, k_pre, v_pre, self.handle)
        return finish(attn, out, hidden_states.dtype)


def prefix_attention(attn, q, k, v, k_extra, v_extra, handle: Attached):
    """Attention with extra keys/values at the handle's strength and routing; shared with prompts."""
    strength = handle.scale
    mask = sample_mask(handle.name, q.shape[0], q.device)
    if strength == 0 or (mask is not None and not bool(mask.any())):
        return sdpa(attn, q, k, v)
    if strength == 1:
        out = sdpa(attn, q, torch.cat([k_extra, k], dim=2), torch.cat([v_extra, v], dim=2))
    else:
        out = unbound_attention(q, k, v, k_extra, v_extra, attn.scale, strength)
    if mask is not None and not bool(mask.all()):
        out = torch.where(mask.view(-1, 1, 1, 1), out, sdpa(attn, q, k, v))
    return out


def attach(unet: nn.Module, config, name: str) -> Attached:
    handle = Attached(name=name, config=config)
    device = next(unet.parameters()).device
    for path, block in transformer_blocks(unet, config.blocks):
        for op_name in config.ops:
            attn = op_module(block, op_name)
            if attn is None:
                continue
            head_dim = attn.to_k.out_features // attn.heads
            processor = PrefixAttnProcessor(attn.heads, head_dim, config.dim, handle).to(device)
            install_processor(attn, processor, handle)
            handle.modules[f"{path}.{op_name}"] = processor
    return handle


def install_processor(attn, processor, handle: Attached) -> None:
    previous = attn.get_processor()
    attn.set_processor(processor)
    handle.undo.append(lambda: attn.set_processor(previous))
