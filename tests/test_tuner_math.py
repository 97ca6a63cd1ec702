"""The Res-Tuners' formulas against references written out by hand here (explicit layer norm,
explicit 1/sqrt(d) logit scale, explicit softmax and GELU, raw weight matrices), the hook's
x' = OP(x) + s·Res-Tuner(x) (Eq. 7) on OPs whose input and output differ, and gradient flow from
the first optimiser steps. tests/mutations.py checks that a wrong formula fails here."""

import math

import pytest
import torch

import restuning
from restuning.arch import TINY_ARCHS
from restuning.core import transformer_blocks
from restuning.tuners import PROMPT_WIDTH, Adapter, ResPrefix, ResPrompt
from tests.conftest import forward

KINDS = ("adapter", "prefix", "prompt")
TOL = 1e-5


def layer_norm(x):
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    return (x - mean) / torch.sqrt(var + 1e-5)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def attention(q, k, v, heads):
    """Per head h: softmax((q_h k_hᵀ) / sqrt(d)) v_h, written with exp and a row sum."""
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        logits = q[..., cols] @ k[:, cols].T / math.sqrt(d)
        weights = torch.exp(logits - logits.amax(-1, keepdim=True))
        outs.append(weights / weights.sum(-1, keepdim=True) @ v[:, cols])
    return torch.cat(outs, dim=-1)


def adapter_reference(t, x):
    return gelu(x @ t.down.weight.T + t.down.bias) @ t.up.weight.T + t.up.bias


def prefix_reference(t, x, heads):
    length, channels = t.key.shape
    return (attention(layer_norm(x), t.key, t.value, heads) * (length / channels)) @ t.out.weight.T + t.out.bias


def prompt_reference(t, x, heads):
    q = layer_norm(x) @ t.query.weight.T
    k, v = t.tokens @ t.key.weight.T, t.tokens @ t.value.weight.T
    length = t.tokens.shape[0]
    return (attention(q, k, v, heads) * (length / PROMPT_WIDTH)) @ t.out.weight.T + t.out.bias


def reference(t, x, heads=8):
    if isinstance(t, Adapter):
        return adapter_reference(t, x)
    if isinstance(t, ResPrefix):
        return prefix_reference(t, x, heads)
    return prompt_reference(t, x, heads)


def _trained_looking(module, seed=0):
    """Every weight random, the zero-initialised output layers included, so every term counts."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


def _tokens(channels, seed=1):
    # Off-centre and off-scale, so that a missing layer norm changes the result.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, channels, generator=g) * 3 + 1.5


@pytest.mark.parametrize("make", [lambda c: Adapter(c, 5), lambda c: ResPrefix(c, 5, heads=8), lambda c: ResPrompt(c, 5, heads=8)],
                         ids=KINDS)
@pytest.mark.parametrize("channels", [32, 320])
def test_each_kind_matches_its_hand_written_formula(make, channels):
    tuner = _trained_looking(make(channels))
    x = _tokens(channels)
    with torch.no_grad():
        got = tuner(x)
        expected = reference(tuner, x)
    assert got.shape == x.shape
    assert (got - expected).abs().max().item() <= TOL * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_starts_at_exactly_zero(kind):
    tuner = {"adapter": Adapter(32, 5), "prefix": ResPrefix(32, 5), "prompt": ResPrompt(32, 5)}[kind]
    assert torch.count_nonzero(tuner(_tokens(32))) == 0


def test_heads_split_the_channels_as_configured():
    assert ResPrefix(320, 5, heads=8).heads == 8
    assert ResPrompt(320, 5, heads=8).heads == 8 and ResPrompt(320, 5).query.out_features == PROMPT_WIDTH
    one_head, eight = _trained_looking(ResPrefix(32, 5, heads=1)), ResPrefix(32, 5, heads=8)
    eight.load_state_dict(one_head.state_dict())
    x = _tokens(32)
    with torch.no_grad():
        assert not torch.allclose(eight(x), one_head(x), atol=1e-3)
        torch.testing.assert_close(one_head(x), prefix_reference(one_head, x, 1), atol=TOL, rtol=0)


def test_res_prompt_is_not_a_res_prefix_of_its_tokens():
    """The old form Attn(x̂, P, P): values equal to keys. Res-Prompt's keys and values are two
    different projections of one token set."""
    t = _trained_looking(ResPrompt(32, 5))
    x = _tokens(32)
    with torch.no_grad():
        q = layer_norm(x) @ t.query.weight.T
        keys = t.tokens @ t.key.weight.T
        tied = (attention(q, keys, keys, 8) * (5 / PROMPT_WIDTH)) @ t.out.weight.T + t.out.bias
        got = t(x)
    assert not torch.allclose(got, tied, atol=1e-3)



def _attention_entropy(q, k, heads):
    """Mean entropy of each head's attention rows, as a fraction of the uniform rows' log L."""
    d = q.shape[-1] // heads
    q = q.reshape(*q.shape[:-1], heads, d).transpose(-2, -3)
    k = k.reshape(-1, heads, d).transpose(0, 1)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return float(-(p * p.log()).sum(-1).mean() / math.log(k.shape[-2]))


@pytest.mark.parametrize("channels", [64, 320])
def test_res_prompt_attention_selects_from_the_start(channels):
    """Issue #12: with nn.Linear's default init, Res-Prompt's attention was near-uniform at attach
    (entropy 0.98 of the maximum), so its output was about the same for every token and it first
    learnt one shift for all prompts (Single ff=prompt: concept 0.06, preservation falling). Its
    query and key projections start where Res-Prefix's free keys do: logits of std about 1."""
    torch.manual_seed(0)
    x_hat = layer_norm(_tokens(channels))
    prompt, prefix = ResPrompt(channels, 10), ResPrefix(channels, 10)
    with torch.no_grad():
        prompt_entropy = _attention_entropy(x_hat @ prompt.query.weight.T, prompt.tokens @ prompt.key.weight.T, prompt.heads)
        prefix_entropy = _attention_entropy(x_hat, prefix.key, prefix.heads)
    assert prompt_entropy < 0.92 and abs(prompt_entropy - prefix_entropy) < 0.06, (prompt_entropy, prefix_entropy)

# -- the hook: x' = OP(x) + s·Res-Tuner(x), with x the OP's input (Eq. 7) ---------------------------


def _call(op, op_name, x, text):
    return op(x, encoder_hidden_states=text) if op_name in ("attn2", "block") else op(x)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("op_name", ["attn1", "attn2", "ff", "block"])
@pytest.mark.parametrize("kind", KINDS)
def test_hook_adds_the_tuner_of_the_ops_input(tiny_unet, op_name, kind):
    path, block = transformer_blocks(tiny_unet, ("mid",))[-1]  # SDXL's: the last of a deep stack
    op = block if op_name == "block" else getattr(block, op_name)
    channels = block.norm1.normalized_shape[0]
    x = torch.randn(2, 16, channels, generator=torch.Generator().manual_seed(4))
    text = torch.randn(2, 7, tiny_unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = _call(op, op_name, x, text)
    assert (base - x).abs().max() > 0.1  # input and output differ, so reading the wrong one shows
    handle = restuning.attach(tiny_unet, restuning.ResTuningConfig(tuners={op_name: kind}, dim=5, blocks=("mid",)))
    tuner = _trained_looking(handle.modules[f"{path}.{op_name}"])
    with torch.no_grad():
        expected = reference(tuner, x, heads=8 if channels % 8 == 0 else 1)
        torch.testing.assert_close(_call(op, op_name, x, text), base + expected, atol=TOL, rtol=TOL)
        restuning.set_scale(tiny_unet, 0.3)
        torch.testing.assert_close(_call(op, op_name, x, text), base + 0.3 * expected, atol=TOL, rtol=TOL)


# -- gradient flow ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_has_gradient_after_one_step(tiny_unet, unet_inputs, kind):
    """At attach only the zero-initialised output layer can have gradient (everything before it
    is multiplied by zero); after one optimiser step every parameter of the tuner must."""
    handle = restuning.attach(tiny_unet, restuning.ResTuningConfig(tuners={"attn1": kind, "ff": kind}))
    named = [(f"{key}.{n}", p) for key, m in handle.modules.items() for n, p in m.named_parameters()]
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-2)

    def step():
        opt.zero_grad()
        (forward(tiny_unet, unet_inputs).sample - target).pow(2).mean().backward()

    step()
    output_layer = {"adapter": ("up.weight",), "prefix": ("out.weight",), "prompt": ("out.weight",)}[kind]
    assert all(torch.count_nonzero(p.grad) > 0 for n, p in named if n.endswith(output_layer))
    opt.step()
    step()
    dead = [n for n, p in named if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not dead, f"no gradient after one step: {dead[:5]}"


def test_res_prefix_keys_learn_as_fast_as_its_values():
    """Issue #12: with zero-initialised values every value row got the same gradient, so the keys
    got ~1/100 of the values' (0.007 here) and the prefix stayed a near-constant bias. Random values
    behind a zero output projection: after one step the keys' gradient is of the values' size."""
    torch.manual_seed(0)
    t = ResPrefix(64, 10, heads=8)
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(4, 64, 64, generator=g) * 3 + 1.5, torch.randn(4, 64, 64, generator=g)
    opt = torch.optim.AdamW(t.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        (t(x) - target).pow(2).mean().backward()
        opt.step()
    assert t.key.grad.norm() > 0.3 * t.value.grad.norm() > 0


def test_every_kind_starts_at_the_same_pace_under_adam():
    """Issue #12: Res-Prompt's W_o reads 64 channels where an adapter's W_up reads `length`, and its
    residual outgrew its OP's output within 8 steps; L/64 on what W_o reads brings it to an adapter's
    pace. Same input, target and optimiser, 8 steps: each kind's residual within 3x of an adapter's."""
    sizes = {}
    for kind in KINDS:
        torch.manual_seed(0)
        t = {"adapter": Adapter(320, 10), "prefix": ResPrefix(320, 10), "prompt": ResPrompt(320, 10)}[kind]
        g = torch.Generator().manual_seed(1)
        x, target = torch.randn(4, 64, 320, generator=g), torch.randn(4, 64, 320, generator=g)
        opt = torch.optim.AdamW(t.parameters(), lr=1e-2)
        for _ in range(8):
            opt.zero_grad()
            (t(x) - target).pow(2).mean().backward()
            opt.step()
        with torch.no_grad():
            sizes[kind] = float(t(x).norm() / x.norm())
    assert all(sizes["adapter"] / 3 < size < sizes["adapter"] * 3 for size in sizes.values()), sizes
