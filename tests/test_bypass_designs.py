"""The Bypass's ablation designs (bench.BYPASS_ABLATION): every one is the base model at attach and
trains every parameter; the straight-through gradients change the gradient, never the value;
the skip path is exactly what the frozen blocks compute once their residual branches are zero;
FiLM reads the time embedding the blocks read."""

import copy

import pytest
import torch

import restuning
from bench import BYPASS_ABLATION, bypass_config_options
from restuning.methods.bypass.model import skip_path
from restuning.arch import ARCHS
from tests.conftest import forward, frozen_run, run


def _arch_for(options: dict) -> str:
    """The tiny U-Net the row fits: "tiny" has 2 up blocks, "tiny-sdxl" 3 (the last without
    attention, as the demo model's)."""
    depth = options.get("depth", restuning.BypassConfig().depth)
    return "tiny" if depth <= len(ARCHS["tiny"]["up_block_types"]) else "tiny-sdxl"


DESIGNS = [pytest.param(bypass_config_options(options), _arch_for(options), id=case) for case, _, options in BYPASS_ABLATION]


def _perturb(handle, seed=9):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("options,arch", DESIGNS)
def test_every_design_is_the_base_model_at_attach(tiny_unet, unet_inputs, options):
    base = frozen_run(tiny_unet, unet_inputs)
    restuning.attach(tiny_unet, restuning.BypassConfig(**{"dim": 6, **options}))
    assert torch.equal(run(tiny_unet, unet_inputs), base)
    with torch.enable_grad():
        assert torch.equal(forward(tiny_unet, unet_inputs).sample.detach(), base)


@pytest.mark.parametrize("options,arch", [o for o in DESIGNS if o.values[0].get("output") != "gate"])
def test_every_design_trains_every_parameter(tiny_unet, unet_inputs, options):
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(**{"dim": 4, **options}))
    sample = unet_inputs[0]
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    target = torch.randn(sample.shape, generator=torch.Generator().manual_seed(0))
    for step in range(2):
        opt.zero_grad()
        (forward(tiny_unet, unet_inputs).sample - target).pow(2).mean().backward()
        if step == 0:
            opt.step()
    dead = [n for n, p in handle.modules["bypass"].named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not dead, dead


@pytest.mark.parametrize("gradient", ["skip-attention", "skip-path"])
def test_a_straight_through_gradient_changes_the_gradient_not_the_value(tiny_unet, unet_inputs, gradient):
    exact = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4), name="exact")
    _perturb(exact)
    straight = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4, gradient=gradient), name="straight")
    straight.load_state_dict(exact.state_dict())
    grads, values = {}, {}
    for name, handle in (("exact", exact), ("straight", straight)):
        with restuning.route([name, name]):
            out = tiny_unet(*unet_inputs).sample
        out.pow(2).mean().backward()
        values[name] = out.detach()
        grads[name] = torch.cat([p.grad.flatten() for p in handle.parameters()])
    assert torch.equal(values["exact"], values["straight"])
    assert all(p.grad is None for n, p in tiny_unet.named_parameters() if not n.startswith("restuning"))
    cosine = torch.nn.functional.cosine_similarity(grads["exact"], grads["straight"], dim=0)
    assert 0 < cosine < 0.999, cosine  # a descent direction, not the exact one


def test_skip_attention_runs_the_attention_after_the_injection_without_autograd(tiny_unet, unet_inputs):
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4, depth=2, gradient="skip-attention"))
    _perturb(handle)
    first = len(tiny_unet.up_blocks) - 2
    seen = {"attention": [], "resnet": []}
    for block in tiny_unet.up_blocks[first:]:
        for m in getattr(block, "attentions", None) or []:
            m.register_forward_pre_hook(lambda m, a: seen["attention"].append(torch.is_grad_enabled()))
        for m in block.resnets:
            m.register_forward_hook(lambda m, a, o: seen["resnet"].append(o.requires_grad))
    tiny_unet(*unet_inputs).sample.pow(2).mean().backward()
    assert seen["attention"] and not any(seen["attention"])
    assert seen["resnet"] and all(seen["resnet"])
    seen["attention"].clear()
    restuning.set_scale(tiny_unet, 0.0)  # no bypass in the call: the blocks run as they are
    tiny_unet(*unet_inputs)
    assert seen["attention"] and all(seen["attention"])


@pytest.mark.parametrize("first", [0, 1])
def test_the_skip_path_is_what_the_blocks_compute_with_their_residual_branches_at_zero(tiny_unet, first):
    """S is linear, and equals the difference of the frozen up blocks' outputs for two inputs once
    every resnet's second conv and every attention's output projection are zero (each block is then
    shortcut, identity, upsampler)."""
    unet = copy.deepcopy(tiny_unet)
    with torch.no_grad():
        for block in unet.up_blocks:
            for resnet in block.resnets:
                resnet.conv2.weight.zero_()
                resnet.conv2.bias.zero_()
            for attention in getattr(block, "attentions", None) or []:
                attention.proj_out.weight.zero_()
                attention.proj_out.bias.zero_()
    g = torch.Generator().manual_seed(3)
    channels = list(reversed(unet.config.block_out_channels))
    widths = [channels[0], *channels[:-1]]  # the hidden width each up block receives
    side = 2 * 2 ** first
    h0 = torch.randn(2, widths[first], side, side, generator=g)
    h1 = torch.randn(h0.shape, generator=g)
    temb = torch.randn(2, unet.time_embedding.linear_2.out_features, generator=g)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)

    def blocks(h):
        # the skip features each block concatenates, as the encoder would hand them over
        for i, block in enumerate(unet.up_blocks[first:], start=first):
            skips = tuple(torch.randn(2, r.in_channels - h.shape[1] if j == 0 else r.in_channels - r.out_channels, h.shape[-2], h.shape[-1],
                                      generator=torch.Generator().manual_seed(10 * i + j))
                          for j, r in enumerate(block.resnets))[::-1]
            kwargs = {"encoder_hidden_states": text} if hasattr(block, "attentions") else {}
            h = block(h, skips, temb, **kwargs)
        return h

    with torch.no_grad():
        difference = blocks(h1) - blocks(h0)
        size = difference.shape[-2:]
        torch.testing.assert_close(skip_path(unet, first, h1 - h0, size), difference, atol=1e-5, rtol=1e-4)
        a, b = skip_path(unet, first, h0, size), skip_path(unet, first, h1, size)
        torch.testing.assert_close(skip_path(unet, first, h0 + 2 * h1, size), a + 2 * b, atol=1e-5, rtol=1e-4)


def test_film_reads_the_time_embedding_the_blocks_read(tiny_unet, unet_inputs):
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4, depth=0, time="all"))
    network = handle.modules["bypass"]
    seen = {}
    tiny_unet.mid_block.register_forward_pre_hook(lambda m, args: seen.update(blocks=args[1]))
    network.out_film.register_forward_pre_hook(lambda m, args: seen.update(film=args[1]))
    run(tiny_unet, unet_inputs)
    torch.testing.assert_close(seen["film"], seen["blocks"])
    assert seen["blocks"].shape[0] == unet_inputs[0].shape[0]


def test_designs_that_cannot_work_are_refused(tiny_unet):
    for options, words in (({"into": "noise", "depth": 2}, "depth 0"), ({"gradient": "skip-path", "depth": 0}, "depth > 0"),
                           ({"refine": -1}, "refine")):
        with pytest.raises(restuning.ConfigError, match=words):
            restuning.attach(tiny_unet, restuning.BypassConfig(**options))
