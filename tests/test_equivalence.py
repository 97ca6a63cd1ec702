"""Table 1 / Appendix A: the original (bound) tuners equal their unbinding forms.

"Original" is always computed the original way by diffusers' own `Attention` module: attention
over the concatenated keys/values (prefix), or over the sequence with prompt tokens appended
(prompt). The unbound side is `restuning.unbinding`. The perturbation tests show that a wrong λ
(unscaled logits, no per-row normalisation, λ = 0) fails the same tolerance.
"""

import pytest
import torch
from diffusers.models.attention_processor import Attention

import restuning
from restuning import unbinding
from restuning.arch import TINY_ARCHS
from restuning.methods.attention import split_heads
from restuning.methods.prefix.layer import PrefixAttnProcessor
from restuning.methods.prompt.layer import PromptAttnProcessor
from restuning.core import Attached, transformer_blocks
from restuning.tuners import Adapter

TOL = 1e-5
# The attention shapes of each family's transformer blocks: (family, channels, heads, text width).
# SD v1.5: 8 heads of channels/8, 768-d text. SD 2.x: heads of 64 channels (attention_head_dim
# [5, 10, 20, 20]), 1024-d text, attention upcast to fp32. SDXL: heads of 64 channels at its two
# attention levels, 2048-d text (its two encoders side by side).
SHAPES = [("sd1", 320, 8, 768), ("sd1", 640, 8, 768), ("sd1", 1280, 8, 768),
          ("sd2", 320, 5, 1024), ("sd2", 640, 10, 1024), ("sd2", 1280, 20, 1024),
          ("sdxl", 640, 10, 2048), ("sdxl", 1280, 20, 2048)]
SHAPE_IDS = [f"{f}-{c}" for f, c, _, _ in SHAPES]


def _sd_attention(shape, cross: bool) -> Attention:
    family, channels, heads, text = shape
    torch.manual_seed(channels + cross)
    return Attention(query_dim=channels, cross_attention_dim=text if cross else None, heads=heads, dim_head=channels // heads,
                     upcast_attention=family == "sd2").eval()


def _inputs(shape, cross: bool, tokens: int = 64):
    _, channels, _, text = shape
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, tokens, channels, generator=g)
    context = torch.randn(2, 77, text, generator=g) if cross else None
    return x, context


def _unbound_prefix(attn, x, context, k_pre, v_pre, mixing=unbinding.mixing_weight):
    source = x if context is None else context
    q, k, v = (split_heads(attn, proj(t)) for proj, t in ((attn.to_q, x), (attn.to_k, source), (attn.to_v, source)))
    k_pre = k_pre.expand(q.shape[0], -1, -1, -1)
    v_pre = v_pre.expand(q.shape[0], -1, -1, -1)
    lam = mixing(q, k, k_pre, attn.scale)
    out = (1 - lam) * unbinding.attention(q, k, v, attn.scale) + lam * unbinding.attention(q, k_pre, v_pre, attn.scale)
    b, h, n, d = out.shape
    return attn.to_out[0](out.transpose(1, 2).reshape(b, n, h * d))


def _prefix_processor(attn, length=10):
    handle = Attached(name="default", config=None)
    torch.manual_seed(3)
    proc = PrefixAttnProcessor(attn.heads, attn.to_k.out_features // attn.heads, length, handle)
    with torch.no_grad():
        proc.value.normal_()  # a trained-looking prefix, so λ matters
    return proc


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("cross", [False, True], ids=["attn1", "attn2"])
def test_prefix_attention_equals_its_unbound_form(shape, cross):
    attn = _sd_attention(shape, cross)
    x, context = _inputs(shape, cross)
    proc = _prefix_processor(attn)
    attn.set_processor(proc)
    with torch.no_grad():
        original = attn(x, encoder_hidden_states=context)
        unbound = _unbound_prefix(attn, x, context, proc.key, proc.value)
    assert (original - unbound).abs().max().item() <= TOL


def _wrong_unscaled(q, k, k_extra, scale):
    return unbinding.mixing_weight(q, k, k_extra, 1.0)


def _wrong_unnormalised(q, k, k_extra, scale):
    # Σ exp over the prefix alone, without dividing by the total over both key sets.
    return torch.exp(q @ k_extra.transpose(-1, -2) * scale).sum(-1, keepdim=True) / k.shape[-2]


def _wrong_row_mean(q, k, k_extra, scale):
    return unbinding.mixing_weight(q, k, k_extra, scale).mean(dim=-2, keepdim=True).expand(*q.shape[:-1], 1)


@pytest.mark.parametrize("wrong", [_wrong_unscaled, _wrong_unnormalised, _wrong_row_mean, lambda q, k, e, s: torch.zeros(*q.shape[:-1], 1)],
                         ids=["unscaled-logits", "no-normalisation", "no-per-row", "lambda-zero"])
def test_prefix_test_fails_when_lambda_is_wrong(wrong):
    attn = _sd_attention(SHAPES[0], True)
    x, context = _inputs(SHAPES[0], True)
    proc = _prefix_processor(attn)
    attn.set_processor(proc)
    with torch.no_grad():
        original = attn(x, encoder_hidden_states=context)
        perturbed = _unbound_prefix(attn, x, context, proc.key, proc.value, mixing=wrong)
    assert (original - perturbed).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_prompt_tuning_original_tokens_equal_eq11_form(shape):
    """Self-attention over [x; x_pro] by an unmodified diffusers Attention; the first N outputs
    equal (1-λ)Attn(Q,K,V) + λAttn(Q,K_pro,V_pro) with K_pro = x_pro W_k, V_pro = x_pro W_v."""
    attn = _sd_attention(shape, cross=False)
    x, _ = _inputs(shape, cross=False)
    g = torch.Generator().manual_seed(11)
    x_pro = torch.randn(2, 10, shape[1], generator=g)
    with torch.no_grad():
        full = attn(torch.cat([x, x_pro], dim=1))
        original = full[:, : x.shape[1]]
        k_pro = split_heads(attn, attn.to_k(x_pro))
        v_pro = split_heads(attn, attn.to_v(x_pro))
        unbound = _unbound_prefix(attn, x, None, k_pro, v_pro)
        wrong = _unbound_prefix(attn, x, None, k_pro, v_pro, mixing=_wrong_unscaled)
    assert (original - unbound).abs().max().item() <= TOL
    assert (original - wrong).abs().max().item() > 100 * TOL
    # The disposable part D really is disposable: changing the prompt tokens' queries cannot
    # matter, because the original tokens' outputs are fully determined above.


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("cross", [False, True], ids=["attn1", "attn2"])
def test_prompt_baseline_processor_is_original_prompt_tuning(shape, cross):
    attn = _sd_attention(shape, cross)
    x, context = _inputs(shape, cross)
    torch.manual_seed(5)
    proc = PromptAttnProcessor(attn.to_k.in_features, 10, Attached(name="default", config=None))
    with torch.no_grad():
        source = x if context is None else context
        appended = torch.cat([source, proc.tokens.expand(2, -1, -1)], dim=1)
        if cross:
            original = attn(x, encoder_hidden_states=appended)
        else:
            original = attn(appended)[:, : x.shape[1]]
        attn.set_processor(proc)
        processed = attn(x, encoder_hidden_states=context)
    assert (original - processed).abs().max().item() <= TOL


def _houlsby(y, adapter):
    """The sequential adapter written out: y + GELU(y W_downᵀ + b_down) W_upᵀ + b_up."""
    hidden = y @ adapter.down.weight.T + adapter.down.bias
    return y + 0.5 * hidden * (1 + torch.erf(hidden / 2**0.5)) @ adapter.up.weight.T + adapter.up.bias


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_sequential_adapter_equals_parallel_form(tiny_unet):
    """Eq. 6 on a real U-Net block. The bound baseline must be the adapter *after* the FFN, on
    FFN(x) (whose values differ from x), equal to the sequential form written out by hand; the
    parallel form of `unbinding` must equal it too."""
    ff = transformer_blocks(tiny_unet, ("mid",))[0][1].ff
    x = torch.randn(2, 16, ff.net[0].proj.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = ff(x)
    assert (y - x).abs().max() > 0.1
    handle = restuning.attach(tiny_unet, restuning.AdapterConfig(blocks=("mid",)))
    adapter = next(iter(handle.modules.values()))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
        expected = _houlsby(y, adapter)
        torch.testing.assert_close(ff(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(unbinding.parallel_adapter(y, adapter), expected, atol=1e-5, rtol=1e-5)


def test_unbound_strength_interpolates_between_base_and_prefix():
    g = torch.Generator().manual_seed(0)
    q, k, v, ke, ve = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(5))
    scale = 8**-0.5
    base = unbinding.attention(q, k, v, scale)
    full = unbinding.attention(q, torch.cat([ke, k], 2), torch.cat([ve, v], 2), scale)
    assert torch.allclose(unbinding.unbound_attention(q, k, v, ke, ve, scale, 1.0), full, atol=1e-6)
    assert torch.equal(unbinding.unbound_attention(q, k, v, ke, ve, scale, 0.0), base)
    # Strength s scales λ of Eq. 10, written out: (1 - sλ)·Attn(Q,K,V) + sλ·Attn(Q,K_pre,V_pre).
    e_extra = torch.exp(q @ ke.transpose(-1, -2) * scale).sum(-1, keepdim=True)
    e_base = torch.exp(q @ k.transpose(-1, -2) * scale).sum(-1, keepdim=True)
    lam = 0.4 * e_extra / (e_extra + e_base)
    expected = (1 - lam) * base + lam * unbinding.attention(q, ke, ve, scale)
    torch.testing.assert_close(unbinding.unbound_attention(q, k, v, ke, ve, scale, 0.4), expected, atol=1e-6, rtol=1e-6)


def test_res_adapter_is_eq6_branch():
    adapter = Adapter(16, 4)
    with torch.no_grad():
        adapter.up.weight.normal_()
        adapter.up.bias.normal_()
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), _houlsby(x, adapter) - x, atol=1e-6, rtol=1e-6)
