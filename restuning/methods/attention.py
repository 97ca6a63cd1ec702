"""The pieces of a diffusers attention call that the bound prefix and prompt baselines share.

They are attention processors (diffusers' own seam for changing how an `Attention` module
attends); these helpers do the projections the way diffusers' `AttnProcessor2_0` does.

Several bound tuners may sit on one attention (the sampler loads every column's tuner onto one
U-Net and routes each sample to one of them). The attention's processor is then a `BoundTuners`
holding all of them; with strengths s_t and λ_t of Eq. 10/12 it computes

    Attn(Q, K, V) + Σ_t [MHA_t(Q) − Attn(Q, K, V)],   MHA_t = (1 − s_t λ_t)·Attn(Q,K,V) + s_t λ_t·Attn(Q,K_t,V_t)

which is each tuner's own attention for a sample routed to one tuner (the usual case) and, with
one tuner, exactly that tuner's Eq. 2/4. With several tuners active on one sample their parallel
branches add up (the unbound reading of Eq. 3), which is not one softmax over all their keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AttachError, Attached, routing_of


def check_supported(attn, attention_mask) -> None:
    if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
        raise NotImplementedError("this processor supports the plain attention of SD's transformer blocks only")


def split_heads(attn, t: Tensor) -> Tensor:
    b, n, c = t.shape
    return t.view(b, n, attn.heads, c // attn.heads).transpose(1, 2)


def context_of(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None) -> Tensor:
    if encoder_hidden_states is None:
        return hidden_states
    return attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states


def sdpa(attn, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=attn.scale)


def finish(attn, out: Tensor, dtype) -> Tensor:
    b, h, n, d = out.shape
    out = out.transpose(1, 2).reshape(b, n, h * d).to(dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    return out / attn.rescale_output_factor


def extended_attention(attn, q, k, v, k_extra, v_extra, handle: Attached):
    """Attention with extra keys/values at the handle's strength s and routing.

    At s = 1 it is computed the original way, one softmax over the concatenation. At other
    strengths, the unbound form (Eq. 3) with λ scaled by s, (1 - sλ)·Attn(Q, K, V) + sλ·Attn(Q,
    K_extra, V_extra), is the same as base + s·(full - base) with full the attention over the
    concatenation and base the untouched one: two fused SDPA calls, never the N x N weights.
    """
    strength = handle.scale
    routing = routing_of(handle.name, q.shape[0], q.device)
    if strength == 0 or not routing.any:
        return sdpa(attn, q, k, v)
    out = sdpa(attn, q, torch.cat([k_extra, k], dim=2), torch.cat([v_extra, v], dim=2))
    base = None
    if strength != 1:
        base = sdpa(attn, q, k, v)
        out = base + strength * (out - base)
    if not routing.all:
        out = torch.where(routing.mask.view(-1, 1, 1, 1), out, base if base is not None else sdpa(attn, q, k, v))
    return out


def bound_attention(attn, hidden_states, encoder_hidden_states, attention_mask, tuners) -> Tensor:
    """One attention call with the bound tuners `tuners` (each has `.handle` and `.extra`)."""
    check_supported(attn, attention_mask)
    context = context_of(attn, hidden_states, encoder_hidden_states)
    q = split_heads(attn, attn.to_q(hidden_states))
    k = split_heads(attn, attn.to_k(context))
    v = split_heads(attn, attn.to_v(context))
    outs = [extended_attention(attn, q, k, v, *t.extra(attn, context), t.handle) for t in tuners]
    if len(outs) == 1:
        out = outs[0]
    else:
        base = sdpa(attn, q, k, v)
        out = base + sum(o - base for o in outs)
    return finish(attn, out, hidden_states.dtype)


class BoundTuners(nn.Module):
    """The processor of an attention that carries bound prefix/prompt tuners, by tuner name."""

    def __init__(self, previous):
        super().__init__()
        self.tuners = nn.ModuleDict()
        self.__dict__["previous"] = previous  # not a submodule: it is the backbone's, not ours

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        return bound_attention(attn, hidden_states, encoder_hidden_states, attention_mask, list(self.tuners.values()))


def install_processor(attn, processor: nn.Module, handle: Attached) -> None:
    """Add a bound tuner to the attention, and refuse any change of its processor while it has one.

    `unet.set_attn_processor`, `enable_xformers_memory_efficient_attention`, fused projections and
    the like all go through `Attention.set_processor`; letting them through would silently drop the
    tuners (their weights live in the processor) while `restuning.attached` still lists them.
    """
    holder = attn.get_processor()
    if not isinstance(holder, BoundTuners):
        holder = BoundTuners(holder)
        type(attn).set_processor(attn, holder)

        def refuse(*args, **kwargs):
            names = ", ".join(repr(n) for n in holder.tuners)
            raise AttachError(
                f"bound tuner(s) {names} live in this attention's processor; changing the processor "
                f"(set_attn_processor, xformers, fused projections) would remove them. Detach them first "
                f"(restuning.detach), or set the processor before attaching."
            )

        attn.__dict__["set_processor"] = refuse
    holder.tuners[handle.name] = processor

    def undo():
        del holder.tuners[handle.name]
        if len(holder.tuners) == 0:
            del attn.__dict__["set_processor"]
            type(attn).set_processor(attn, holder.previous)

    handle.undo.append(undo)


# The U-Net-wide ways to change processors. diffusers applies each attention by attention, so the
# per-attention refusal above would fire only when it reaches the first tuned attention, with the
# ones before it already changed.
_UNET_WIDE = ("set_attn_processor", "set_default_attn_processor", "set_use_memory_efficient_attention_xformers",
              "enable_xformers_memory_efficient_attention", "fuse_qkv_projections")


def guard_unet(unet: nn.Module) -> None:
    """Make the U-Net's processor-wide changes refuse up front, before touching any attention,
    while bound tuners live in its processors; with none they pass through unchanged."""
    if "_restuning_processor_guard" in unet.__dict__:
        return
    unet.__dict__["_restuning_processor_guard"] = True
    for name in _UNET_WIDE:
        original = getattr(unet, name, None)
        if original is not None:
            unet.__dict__[name] = _refusing(unet, original)


def _refusing(unet: nn.Module, original):
    def guarded(*args, **kwargs):
        names = sorted({n for m in unet.modules() if isinstance(getattr(m, "processor", None), BoundTuners) for n in m.processor.tuners})
        if names:
            raise AttachError(
                f"bound tuner(s) {', '.join(map(repr, names))} live in the U-Net's attention processors; "
                f"{original.__name__} would remove them. Detach them first (restuning.detach), or set the processor before attaching."
            )
        return original(*args, **kwargs)

    return guarded
