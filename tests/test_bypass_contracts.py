"""The Bypass's wiring, checked where a wrong version would still train (issue 29, item 2): what
the network reads (by hooks on the backbone, not by "it has a gradient"), where the strength s
enters, what the resamplers and channel maps do at start, how the tuners behind Z wake, and its
exact size on SD v1.5."""

import pytest
import torch
import torch.nn.functional as F

import restuning
from restuning.arch import build_unet
from restuning.methods.bypass import layer as bypass_layer
from restuning.methods.bypass.layer import BypassNetwork, ChannelMap, Resampler, _wake
from restuning.tuners import ResPrefix
from tests.conftest import run


def _perturb(handle, seed=9):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_the_network_reads_x0_and_each_tap_where_the_docstring_says(tiny_unet, unet_inputs, depth, monkeypatch):
    """x_0 is the first tapped block's input (mid_block's), x_1..x_L the outputs of mid_block and of
    the up blocks before the injection point, c the U-Net's text input, e the time embedding the
    blocks read."""
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4, depth=depth, time="out"))
    paths = ["mid_block", *(f"up_blocks.{i}" for i in range(len(tiny_unet.up_blocks) - depth))]
    backbone = {}
    tiny_unet.mid_block.register_forward_pre_hook(lambda m, args: backbone.update(x0=args[0], temb=args[1]))
    for path in paths:
        tiny_unet.get_submodule(path).register_forward_hook(lambda m, a, out, path=path: backbone.update({path: out}))
    read = {}
    original = BypassNetwork.forward

    def spy(self, x0, features, text=None, temb=None):
        read.update(x0=x0, features=features, text=text, temb=temb)
        return original(self, x0, features, text, temb)

    monkeypatch.setattr(BypassNetwork, "forward", spy)
    run(tiny_unet, unet_inputs)
    assert torch.equal(read["x0"], backbone["x0"])
    assert len(read["features"]) == len(paths) == len(handle.modules["bypass"].stages)
    for got, path in zip(read["features"], paths):
        assert torch.equal(got, backbone[path]), path
    assert torch.equal(read["text"], unet_inputs[2]) and torch.equal(read["temb"], backbone["temb"])


@pytest.mark.parametrize("depth", [0, 2])
def test_strength_s_gives_the_input_of_the_injection_point_base_plus_s_times_the_change(tiny_unet, unet_inputs, depth):
    """x_L + s·Δ at the injection point, for s between 0 and 1: the reference interpolation of the
    base (s = 0) and the tuned (s = 1) inputs there."""
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4, depth=depth))
    _perturb(handle)
    point = tiny_unet.conv_norm_out if depth == 0 else tiny_unet.up_blocks[len(tiny_unet.up_blocks) - depth]
    seen = []
    point.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()),
                                     with_kwargs=True)
    inputs = {}
    for s in (0.0, 1.0, 0.3, 0.75):
        restuning.set_scale(tiny_unet, s)
        seen.clear()
        run(tiny_unet, unet_inputs)
        inputs[s] = seen[0]
    for s in (0.3, 0.75):
        torch.testing.assert_close(inputs[s], inputs[0.0] + s * (inputs[1.0] - inputs[0.0]), atol=1e-6, rtol=1e-5)
    assert not torch.equal(inputs[1.0], inputs[0.0])


def test_resampling_keeps_a_constant_field_constant_and_is_bilinear_up_and_mean_pooled_down():
    g = torch.Generator().manual_seed(0)
    for c_in, c_out in ((64, 32), (32, 64), (48, 48), (1280, 640), (640, 1280)):
        resampler = Resampler(c_in, c_out)
        field = torch.full((2, c_in, 4, 4), 1.7)
        out = resampler(field, torch.Size((8, 8)))
        torch.testing.assert_close(out, torch.full((2, c_out, 8, 8), 1.7)), (c_in, c_out)
        torch.testing.assert_close(resampler(field, torch.Size((2, 2))), torch.full((2, c_out, 2, 2), 1.7))
    same = Resampler(8, 8)
    x = torch.randn(2, 8, 4, 4, generator=g)
    torch.testing.assert_close(same(x, torch.Size((8, 8))), F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False))
    torch.testing.assert_close(same(x, torch.Size((2, 2))), F.adaptive_avg_pool2d(x, (2, 2)))


def test_a_channel_map_averages_groups_down_and_repeats_them_up():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 6, 3, 3, generator=g)
    down = ChannelMap(6, 3)(x)
    torch.testing.assert_close(down, x.unflatten(1, (3, 2)).mean(dim=2))
    up = ChannelMap(3, 6)(down)
    torch.testing.assert_close(up, down.repeat_interleave(2, dim=1))


def test_behind_z_res_prefix_wakes_to_pass_its_mixture_as_it_is():
    """Res-Prefix ends in W_o applied to (L/C)·Attn(...); woken behind Z, W_o = I / gain, so the
    tuner outputs the attention's mixture of its values unscaled."""
    tuner = ResPrefix(16, length=6, heads=4)
    _wake(tuner)
    torch.testing.assert_close(tuner.out.weight * tuner.gain, torch.eye(16))
    assert torch.count_nonzero(tuner.out.bias) == 0
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    mixture = tuner.out.weight.new_zeros(())
    with torch.no_grad():
        seen = {}
        tuner.out.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
        out = tuner(x)
        mixture = seen["x"] / tuner.gain
    torch.testing.assert_close(out, mixture)


@pytest.mark.parametrize("depth,trainable,kernel", [(2, 3_025_795, 1), (0, 3_823_045, 3)])
def test_sd15_size_is_pinned_and_z_is_3x3_up_to_320_channels(depth, trainable, kernel):
    unet = build_unet("sd15", device="meta")
    handle = restuning.attach(unet, restuning.BypassConfig(depth=depth))
    assert sum(p.numel() for p in handle.parameters()) == trainable
    z = handle.modules["bypass"].out[2]
    assert z.kernel_size == (kernel, kernel)
    assert bypass_layer.DENSE_3X3_MAX == 320 and z.in_channels == (1280 if depth else 320)
