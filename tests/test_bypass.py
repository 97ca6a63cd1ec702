"""Res-Tuning-Bypass on a real diffusers U-Net: Eq. 8, exact identity at attach, gradient for
every parameter after one step, no gradient through the backbone, the text tuners, injection
depth, several bypasses on one backbone forward, save/load/scale/detach."""

import itertools
import threading

import pytest
import torch

import restuning
from restuning.arch import TINY_ARCHS, build_unet

from restuning.methods.bypass.layer import BypassNetwork
from tests.conftest import cast, forward, frozen_run, repeat, run, with_text

KINDS = ("convpass", "adapter", "prefix", "prompt")


def _perturb(handle, seed=9):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def _taps(unet, depth=0):
    """Record every feature a bypass at `depth` taps and the grad mode the backbone and the head ran in."""
    seen = {"features": [], "backbone_grad": [], "head_grad": []}
    for path in ("mid_block", *(f"up_blocks.{i}" for i in range(len(unet.up_blocks) - depth))):
        unet.get_submodule(path).register_forward_hook(lambda m, a, out: seen["features"].append(out))
    unet.down_blocks[0].register_forward_hook(lambda m, a, out: seen["backbone_grad"].append(torch.is_grad_enabled()))
    unet.conv_out.register_forward_hook(lambda m, a, out: seen["head_grad"].append(torch.is_grad_enabled()))
    return seen


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("horizontal,vertical", list(itertools.product(KINDS, KINDS)))
def test_identity_at_attach_for_every_tuner_pair(tiny_unet, unet_inputs, horizontal, vertical):
    base = frozen_run(tiny_unet, unet_inputs)
    restuning.attach(tiny_unet, restuning.BypassConfig(horizontal=horizontal, vertical=vertical, dim=6))
    assert torch.equal(run(tiny_unet, unet_inputs), base)
    with torch.enable_grad():
        assert torch.equal(forward(tiny_unet, unet_inputs).sample.detach(), base)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("options", [{"output": "gate"}, {"text": False}, {"depth": 1}, {"taps": ("mid",)}])
def test_identity_at_attach_for_every_design(tiny_unet, unet_inputs, options):
    if options.get("taps") == ("mid",):  # the correction enters the first up block, whose input the mid block makes
        options = {**options, "depth": len(tiny_unet.up_blocks)}
    base = frozen_run(tiny_unet, unet_inputs)
    restuning.attach(tiny_unet, restuning.BypassConfig(dim=6, **options))
    assert torch.equal(run(tiny_unet, unet_inputs), base)
    with torch.enable_grad():
        assert torch.equal(forward(tiny_unet, unet_inputs).sample.detach(), base)


def test_taps_lambda_and_output_at_start(tiny_unet):
    default = restuning.attach(tiny_unet, restuning.BypassConfig(), name="default")
    # depth 2: the correction enters up_blocks[-2]; the taps are the blocks before it
    assert len(default.modules["bypass"].stages) == 1 + len(tiny_unet.up_blocks) - 2
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(depth=0), name="head")
    network = handle.modules["bypass"]
    assert len(network.stages) == 1 + len(tiny_unet.up_blocks)  # mid_block, then every up block
    assert all(float(torch.sigmoid(s.mix.detach())) == 0.5 for s in network.stages)
    assert torch.count_nonzero(network.out[2].weight) == 0 and torch.count_nonzero(network.out[2].bias) == 0
    # behind Z nothing starts at zero: the tuners' output layers are live
    assert all(torch.count_nonzero(s.horizontal.up.weight) > 0 and torch.count_nonzero(s.text.out.weight) > 0 for s in network.stages)
    only_up = restuning.attach(tiny_unet, restuning.BypassConfig(taps=("up",), depth=0), name="up")
    assert len(only_up.modules["bypass"].stages) == len(tiny_unet.up_blocks)
    deep = restuning.attach(tiny_unet, restuning.BypassConfig(depth=1), name="deep")
    assert len(deep.modules["bypass"].stages) == len(tiny_unet.up_blocks)  # the last up block is after the injection
    gate = restuning.attach(tiny_unet, restuning.BypassConfig(output="gate", depth=0), name="gate")
    assert torch.count_nonzero(gate.modules["bypass"].gate) == 0


def _one_step_then_grads(unet, inputs, handle, seed=0):
    """One AdamW step from attach, then the gradient of one more backward, per parameter."""
    sample, t, text = inputs
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    torch.manual_seed(seed)
    target = torch.randn_like(sample)
    for step in range(2):
        opt.zero_grad()
        (unet(sample, t, text, **inputs.kwargs).sample - target).pow(2).mean().backward()
        if step == 0:
            opt.step()
    return {n: p.grad for n, p in handle.modules["bypass"].named_parameters()}


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("options", [{}, {"horizontal": "adapter", "vertical": "prefix"}, {"horizontal": "prompt"}, {"depth": 1}])
def test_every_parameter_has_gradient_after_one_step(tiny_unet, unet_inputs, options):
    """Issue 11's test: lambda, the tuners, the text tuners, the resamplers and Z all receive a
    non-zero gradient on the second backward."""
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4, **options))
    grads = _one_step_then_grads(tiny_unet, unet_inputs, handle)
    dead = [n for n, g in grads.items() if g is None or torch.count_nonzero(g) == 0]
    assert not dead, f"no gradient after one step: {dead}"


def test_the_first_design_fails_the_gradient_test(tiny_unet, unet_inputs):
    """What the zero-conv output fixes: behind g = 0, one step later the tuners' inner layers
    still have exactly zero gradient."""
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(output="gate", horizontal="adapter", vertical="adapter", dim=4, text=False))
    grads = _one_step_then_grads(tiny_unet, unet_inputs, handle)
    dead = [n for n, g in grads.items() if torch.count_nonzero(g) == 0]
    assert any(n.endswith("horizontal.down.weight") for n in dead) and "gate" not in dead


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_the_prompt_reaches_the_correction_and_no_gradient_reaches_the_text(tiny_unet, unet_inputs):
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4))
    _perturb(handle)
    network = handle.modules["bypass"]
    sample, t, text = unet_inputs
    seen = []
    tiny_unet.conv_norm_out.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    run(tiny_unet, unet_inputs)
    run(tiny_unet, with_text(unet_inputs, text + 1.0))
    restuning.set_scale(tiny_unet, 0.0)
    run(tiny_unet, unet_inputs)
    run(tiny_unet, with_text(unet_inputs, text + 1.0))
    # the correction itself (not only the backbone's features) changes with the prompt
    assert not torch.allclose(seen[1] - seen[3], seen[0] - seen[2], atol=1e-4)
    restuning.set_scale(tiny_unet, 1.0)
    for stage in network.stages:
        stage.text.out.weight.grad = None
    tiny_unet(sample, t, text, **unet_inputs.kwargs).sample.pow(2).mean().backward()
    assert all(torch.count_nonzero(s.text.key.weight.grad) > 0 for s in network.stages)


@pytest.mark.parametrize("depth,widths", [(2, [1280, 1280, 1280]), (0, [1280, 1280, 1280, 640, 320])])
def test_sd15_budget_is_near_the_papers_and_has_no_dense_3x3_at_the_backbones_width(depth, widths):
    unet = build_unet("sd15", device="meta")
    handle = restuning.attach(unet, restuning.BypassConfig(depth=depth))
    n = sum(p.numel() for p in handle.parameters())
    assert 2.9e6 < n < 4.1e6  # the paper's Table 6: 3.76M (0.44%)
    network = handle.modules["bypass"]
    dense = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1]
    assert dense and all(m.in_channels <= 320 for m in dense)  # Convpass at width dim; Z 3x3 only at <= 320 channels
    assert [s.horizontal.down.in_channels for s in network.stages] == widths


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_backbone_runs_without_grad_and_only_the_bypass_trains(tiny_unet, unet_inputs, depth):
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4, depth=depth))
    _perturb(handle)
    seen = _taps(tiny_unet, depth)
    loss = forward(tiny_unet, unet_inputs).sample.pow(2).mean()
    loss.backward()
    own = {id(p) for p in handle.parameters()}
    assert all(p.grad is None for p in tiny_unet.parameters() if id(p) not in own)
    assert all(p.grad is not None for p in handle.parameters())
    assert seen["features"] and not any(f.requires_grad for f in seen["features"])
    assert not any(torch.is_inference(f) for f in seen["features"])
    assert seen["backbone_grad"] == [False] and seen["head_grad"] == [True]
    assert torch.is_grad_enabled()  # the caller's grad mode is restored


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("depth", [0, 1])
def test_gradients_equal_those_of_a_backbone_run_with_grad(tiny_unet, unet_inputs, depth):
    """The no-grad backbone is a saving, not an approximation: forcing autograd through the
    backbone (an input that requires grad) gives the bypass exactly the same gradients, also
    when the correction enters before the last up block and its gradient flows through it."""
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4, depth=depth))
    _perturb(handle)
    sample, t, text = unet_inputs
    tiny_unet(sample, t, text, **unet_inputs.kwargs).sample.pow(2).mean().backward()
    fast = [p.grad.clone() for p in handle.parameters()]
    for p in handle.parameters():
        p.grad = None
    seen = _taps(tiny_unet)
    text = text.clone().requires_grad_(True)
    tiny_unet(sample, t, text, **unet_inputs.kwargs).sample.pow(2).mean().backward()
    assert seen["backbone_grad"] == [True] and text.grad is not None
    for a, p in zip(fast, handle.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)


def _head_input(unet, inputs):
    seen = []
    hook = unet.conv_norm_out.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    run(unet, inputs)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_taps_are_detached_so_no_bypass_gradient_reaches_the_backbone(tiny_unet, unet_inputs):
    """Beside a Res-Tuner the backbone runs with grad, so a tap left attached would send the
    bypass's gradient into the backbone and into that Res-Tuner. Reference: the same run with the
    bypass's correction Δ added at the head as a constant. The text input's gradient and the
    Res-Tuner's must be the reference's, value for value."""
    bypass = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4, depth=0), name="bypass")
    restuners = restuning.attach(tiny_unet, restuning.ResTuningConfig(tuners={"ff": "adapter"}), name="rt")
    _perturb(bypass)
    _perturb(restuners, seed=4)
    sample, t, text = unet_inputs

    with_bypass = _head_input(tiny_unet, unet_inputs)
    restuning.set_scale(tiny_unet, 0.0, name="bypass")
    delta = with_bypass - _head_input(tiny_unet, unet_inputs)
    assert delta.abs().max() > 1e-3

    def grads(extra_hook):
        hook = tiny_unet.conv_norm_out.register_forward_pre_hook(lambda m, args: (args[0] + delta,)) if extra_hook else None
        for p in restuners.parameters():
            p.grad = None
        needs = text.clone().requires_grad_(True)
        tiny_unet(sample, t, needs, **unet_inputs.kwargs).sample.pow(2).mean().backward()
        if hook is not None:
            hook.remove()
        return [needs.grad, *(p.grad.clone() for p in restuners.parameters())]

    reference = grads(extra_hook=True)
    restuning.set_scale(tiny_unet, 1.0, name="bypass")
    actual = grads(extra_hook=False)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in bypass.parameters() if p.requires_grad)
    for got, want in zip(actual, reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("horizontal,vertical", [("adapter", "adapter"), ("prefix", "prompt"), ("prompt", "prefix")])
def test_eq8_with_trained_tuners_against_the_chain_written_out(horizontal, vertical):
    """x_l^b = λ_l·(x_l + h_l(x_l)) + (1-λ_l)·(s + v_l(s)), s = x_{l-1}^b (R_l is the identity
    here: same channels and size, identity smoothing); Δ = g ⊙ (x_L^b - x_L)."""
    from tests.test_tuner_math import reference

    torch.manual_seed(0)
    net = BypassNetwork([8, 8, 8], horizontal, vertical, dim=3, heads=1, output="gate")
    with torch.no_grad():
        for stage in net.stages:
            for p in (*stage.horizontal.parameters(), *stage.vertical.parameters()):
                p.copy_(torch.randn_like(p) * 0.5)
        net.stages[0].mix.fill_(0.7)
        net.stages[1].mix.fill_(-0.4)
        net.gate.copy_(torch.randn(8))
    x0, x1, x2 = (torch.randn(2, 8, 3, 3) for _ in range(3))

    def tuner(module, x):
        tokens = x.flatten(2).transpose(1, 2)
        return reference(module, tokens, heads=1).transpose(1, 2).reshape(x.shape)

    state = x0
    for stage, x in zip(net.stages, (x1, x2)):
        lam = 1 / (1 + torch.exp(-stage.mix.detach()))
        state = lam * (x + tuner(stage.horizontal, x)) + (1 - lam) * (state + tuner(stage.vertical, state))
    expected = net.gate.detach().view(1, -1, 1, 1) * (state - x2)
    with torch.no_grad():
        torch.testing.assert_close(net(x0, [x1, x2]), expected, atol=1e-5, rtol=1e-5)


def test_zero_conv_output_and_convpass_and_text_against_the_chain_written_out():
    """x_l^b = λ(x + cp_h(x) + t(x, c)) + (1-λ)(s + cp_v(s)); Δ = Z(SiLU(GN(x_L^b))), with
    Convpass cp(x) = W_up * GELU(W_3x3 * GELU(W_down * x)) and t a hand-written cross-attention."""
    import math

    F = torch.nn.functional
    torch.manual_seed(0)
    net = BypassNetwork([8, 8, 8], "convpass", "convpass", dim=4, heads=2, text_channels=6)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x0, x1, x2 = (torch.randn(2, 8, 3, 3) for _ in range(3))
    c = torch.randn(2, 5, 6)

    def convpass(m, x):
        return F.conv2d(F.gelu(F.conv2d(F.gelu(F.conv2d(x, m.down.weight, m.down.bias)), m.conv.weight, m.conv.bias, padding=1)),
                        m.up.weight, m.up.bias)

    def text(m, x):
        tokens = x.flatten(2).transpose(1, 2)
        tokens = (tokens - tokens.mean(-1, keepdim=True)) / torch.sqrt(tokens.var(-1, unbiased=False, keepdim=True) + 1e-5)
        q, k, v = tokens @ m.query.weight.T, c @ m.key.weight.T, c @ m.value.weight.T
        heads, d = [], q.shape[-1] // 2
        for h in range(2):
            sl = slice(d * h, d * h + d)
            heads.append(torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), -1) @ v[..., sl])
        out = torch.cat(heads, -1) @ m.out.weight.T + m.out.bias
        return out.transpose(1, 2).reshape(x.shape)

    state = x0
    for stage, x in zip(net.stages, (x1, x2)):
        lam = torch.sigmoid(stage.mix)
        s_in = F.conv2d(state, stage.resample.smooth.weight, stage.resample.smooth.bias, padding=1, groups=8)
        state = lam * (x + convpass(stage.horizontal, x) + text(stage.text, x)) + (1 - lam) * (s_in + convpass(stage.vertical, s_in))
    norm, z = net.out[0], net.out[2]
    expected = F.conv2d(F.silu(F.group_norm(state, norm.num_groups, norm.weight, norm.bias)), z.weight, z.bias, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(net(x0, [x1, x2], c), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_training_changes_the_output_not_the_backbone(tiny_unet, unet_inputs):
    base = run(tiny_unet, unet_inputs)
    backbone = {n: p.detach().clone() for n, p in tiny_unet.named_parameters()}
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4))
    opt = torch.optim.AdamW(restuning.trainable_parameters(tiny_unet), lr=1e-2)
    for _ in range(3):
        loss = forward(tiny_unet, unet_inputs).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(run(tiny_unet, unet_inputs), base)
    assert torch.count_nonzero(handle.modules["bypass"].out[2].weight) > 0
    for n, p in tiny_unet.named_parameters():
        if n in backbone:
            assert torch.equal(p, backbone[n]), f"backbone weight {n} changed"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_scale_zero_and_detach_give_exactly_the_base_model(tiny_unet, unet_inputs):
    base = frozen_run(tiny_unet, unet_inputs)
    n_params = len(list(tiny_unet.parameters()))
    _perturb(restuning.attach(tiny_unet, restuning.BypassConfig(dim=4)))
    tuned = run(tiny_unet, unet_inputs)
    assert not torch.equal(tuned, base)
    restuning.set_scale(tiny_unet, 0.5)
    half = run(tiny_unet, unet_inputs)
    assert not torch.equal(half, base) and not torch.equal(half, tuned)
    restuning.set_scale(tiny_unet, 0.0)
    assert torch.equal(run(tiny_unet, unet_inputs), base)
    restuning.set_scale(tiny_unet, 1.0)
    assert torch.equal(run(tiny_unet, unet_inputs), tuned)
    restuning.detach(tiny_unet)
    assert torch.equal(run(tiny_unet, unet_inputs), base)
    assert len(list(tiny_unet.parameters())) == n_params
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_unet.modules()) == 0


def test_save_then_load_on_a_fresh_unet_reproduces_outputs_exactly(tmp_path, unet_inputs):
    config = restuning.BypassConfig(horizontal="prefix", vertical="adapter", dim=5)
    unet = build_unet("tiny", seed=0).eval()
    _perturb(restuning.attach(unet, config))
    expected = run(unet, unet_inputs)
    path = restuning.save(unet, tmp_path / "bypass.safetensors")
    assert restuning.read_header(path)["method"] == "bypass"
    assert restuning.read_config(path) == config

    fresh = build_unet("tiny", seed=0).eval()
    base = run(fresh, unet_inputs)
    restuning.load(fresh, path)
    assert torch.equal(run(fresh, unet_inputs), expected)
    restuning.detach(fresh)
    assert torch.equal(run(fresh, unet_inputs), base)


def _each_alone(unet, inputs, names):
    """The output with only bypass n switched on, for each n in `names` and for None (the base)."""
    alone = {}
    for only in (*names, None):
        for other in names:
            restuning.set_scale(unet, 1.0 if other == only else 0.0, name=other)
        alone[only] = run(unet, inputs)
    restuning.set_scale(unet, 1.0)
    return alone


@pytest.fixture
def two_bypasses(tiny_unet, unet_inputs):
    """Bypasses "a" and "b" with distinct weights, and each one's output alone (and the base's)."""
    _perturb(restuning.attach(tiny_unet, restuning.BypassConfig(dim=4), name="a"), seed=1)
    _perturb(restuning.attach(tiny_unet, restuning.BypassConfig(horizontal="prompt", dim=3), name="b"), seed=2)
    alone = _each_alone(tiny_unet, unet_inputs, ("a", "b"))
    assert not torch.equal(alone["a"], alone["b"])
    return alone


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_one_backbone_forward_feeds_several_bypasses(tiny_unet, unet_inputs, two_bypasses):
    calls = []
    tiny_unet.mid_block.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        outs = restuning.bypass_outputs(tiny_unet, ["a", "b", None, "a"], *unet_inputs, **unet_inputs.kwargs)
    assert len(calls) == 1 and len(outs) == 4
    for name, out in zip(["a", "b", None, "a"], outs):
        torch.testing.assert_close(out, two_bypasses[name], atol=1e-5, rtol=0)
    with pytest.raises(restuning.AttachError, match="not attached"):
        restuning.bypass_outputs(tiny_unet, ["c"], *unet_inputs, **unet_inputs.kwargs)


def test_at_depth_1_the_last_up_block_runs_with_grad_and_its_weights_get_none(tiny_unet, unet_inputs):
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4, depth=1))
    _perturb(handle)
    grad_modes = {}
    for path in ("mid_block", "up_blocks.0", "up_blocks.1"):
        tiny_unet.get_submodule(path).register_forward_pre_hook(lambda m, a, p=path: grad_modes.__setitem__(p, torch.is_grad_enabled()))
    forward(tiny_unet, unet_inputs).sample.pow(2).mean().backward()
    assert grad_modes == {"mid_block": False, "up_blocks.0": False, "up_blocks.1": True}
    own = {id(p) for p in handle.parameters()}
    assert all(p.grad is None for p in tiny_unet.parameters() if id(p) not in own)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("depth", [1, 2])
def test_fan_out_below_the_head_matches_separate_calls(tiny_unet, unet_inputs, depth):
    for name, seed in (("a", 1), ("b", 2)):
        _perturb(restuning.attach(tiny_unet, restuning.BypassConfig(dim=4, depth=depth), name=name), seed=seed)
    alone = _each_alone(tiny_unet, unet_inputs, ("a", "b"))
    with torch.no_grad():
        outs = restuning.bypass_outputs(tiny_unet, ["a", None, "b"], *unet_inputs, **unet_inputs.kwargs)
    for name, out in zip(["a", None, "b"], outs):
        torch.testing.assert_close(out, alone[name], atol=1e-5, rtol=0)
    restuning.attach(tiny_unet, restuning.BypassConfig(dim=4, depth=0), name="head")
    with pytest.raises(restuning.AttachError, match="one depth"):
        restuning.bypass_outputs(tiny_unet, ["a", "head"], *unet_inputs, **unet_inputs.kwargs)


def test_several_bypasses_train_from_one_backbone_forward(tiny_unet, unet_inputs, two_bypasses):
    """Each bypass gets from the shared forward exactly the gradient it gets when run alone."""
    handles = restuning.attached(tiny_unet)
    assert all(p.requires_grad for h in handles.values() for p in h.parameters())  # attaching "b" left "a" trainable
    seen = _taps(tiny_unet)
    outs = restuning.bypass_outputs(tiny_unet, ["a", "b"], *unet_inputs, **unet_inputs.kwargs)
    sum(o.pow(2).mean() for o in outs).backward()
    assert seen["backbone_grad"] == [False]
    shared = {n: [p.grad.clone() for p in h.parameters()] for n, h in handles.items()}
    for name in handles:
        for h in handles.values():
            for p in h.parameters():
                p.grad = None
        for other in handles:
            restuning.set_scale(tiny_unet, 1.0 if other == name else 0.0, name=other)
        forward(tiny_unet, unet_inputs).sample.pow(2).mean().backward()
        assert any(torch.count_nonzero(g) > 0 for g in shared[name])
        for got, p in zip(shared[name], handles[name].parameters(), strict=True):
            torch.testing.assert_close(got, p.grad, atol=1e-7, rtol=1e-5)


def test_route_sends_each_sample_through_its_own_bypass(tiny_unet, unet_inputs, two_bypasses):
    for names in (["a", "b"], [None, "a"], ["b", None]):
        with restuning.route(names):
            routed = run(tiny_unet, unet_inputs)
        for i, name in enumerate(names):
            torch.testing.assert_close(routed[i], two_bypasses[name][i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_route_repeats_over_a_classifier_free_guidance_batch(tiny_unet, unet_inputs, two_bypasses):
    doubled = repeat(unet_inputs, 2)
    with restuning.route(["a", "b"]):
        routed = run(tiny_unet, doubled)
    for i, name in enumerate(["a", "b", "a", "b"]):
        torch.testing.assert_close(routed[i], two_bypasses[name][i % 2], atol=1e-5, rtol=0)


def test_concurrent_calls_do_not_share_captured_features(tiny_unet, unet_inputs, two_bypasses):
    errors = []

    def worker(name):
        try:
            for _ in range(15):
                with restuning.route([name, name]):
                    out = run(tiny_unet, unet_inputs)
                torch.testing.assert_close(out, two_bypasses[name], atol=1e-5, rtol=0)
        except AssertionError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b", None)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]


def test_inside_an_ordinary_pipeline_call():
    from tests.tiny_pipeline import tiny_pipeline

    pipe = tiny_pipeline()

    def image():
        return pipe("a photo of sks dog", num_inference_steps=3, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = image()
    _perturb(restuning.attach(pipe.unet, restuning.BypassConfig(dim=4)), seed=3)
    tuned = image()
    assert not (tuned == base).all()
    restuning.set_scale(pipe.unet, 0.0)
    assert (image() == base).all()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_bf16_unet_with_fp32_bypass(tiny_unet, unet_inputs):
    unet = tiny_unet.to(torch.bfloat16)
    inputs = cast(unet_inputs, torch.bfloat16)
    base = run(unet, inputs)
    handle = restuning.attach(unet, restuning.BypassConfig(dim=4))
    assert all(p.dtype == torch.float32 for p in handle.parameters())
    out = run(unet, inputs)
    assert out.dtype == torch.bfloat16 and torch.equal(out, base)
    forward(unet, inputs).sample.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in handle.parameters())


def test_bad_configs_are_refused_with_the_reason(tiny_unet):
    with pytest.raises(restuning.ConfigError, match="taps must include 'up'"):
        restuning.attach(tiny_unet, restuning.BypassConfig(taps=("mid",), depth=0))
    with pytest.raises(restuning.AttachError, match="only 2 up blocks"):
        restuning.attach(tiny_unet, restuning.BypassConfig(depth=3))
    with pytest.raises(restuning.ConfigError, match="depth must be"):
        restuning.attach(tiny_unet, restuning.BypassConfig(depth=-1))
    with pytest.raises(restuning.AttachError, match=r"enters up_blocks.1, whose input is the untapped output of up_blocks.0.*depth 2"):
        restuning.attach(tiny_unet, restuning.BypassConfig(taps=("mid",), depth=1))
    with pytest.raises(restuning.ConfigError, match="horizontal"):
        restuning.attach(tiny_unet, restuning.BypassConfig(horizontal="lora"))
    with pytest.raises(restuning.ConfigError, match="positive"):
        restuning.attach(tiny_unet, restuning.BypassConfig(dim=0))
    assert restuning.attached(tiny_unet) == {}
    assert restuning.config_from_dict(restuning.BypassConfig(vertical="prefix").to_dict()) == restuning.BypassConfig(vertical="prefix")
