"""Res-Tuning-Bypass on a real diffusers U-Net: Eq. 8, exact identity at attach, no gradient
through the backbone, several bypasses on one backbone forward, save/load/scale/detach."""

import itertools
import threading

import pytest
import torch

import restuning
from restuning.arch import build_unet
from restuning.methods.bypass.layer import BypassNetwork
from tests.conftest import run

KINDS = ("adapter", "prefix", "prompt")


def _perturb(handle, seed=9):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def _taps(unet):
    """Record every tapped feature and the grad mode the backbone and the head ran in."""
    seen = {"features": [], "backbone_grad": [], "head_grad": []}
    for path in ("mid_block", *(f"up_blocks.{i}" for i in range(len(unet.up_blocks)))):
        unet.get_submodule(path).register_forward_hook(lambda m, a, out: seen["features"].append(out))
    unet.down_blocks[0].register_forward_hook(lambda m, a, out: seen["backbone_grad"].append(torch.is_grad_enabled()))
    unet.conv_out.register_forward_hook(lambda m, a, out: seen["head_grad"].append(torch.is_grad_enabled()))
    return seen


@pytest.mark.parametrize("horizontal,vertical", list(itertools.product(KINDS, KINDS)))
def test_identity_at_attach_for_every_tuner_pair(tiny_unet, unet_inputs, horizontal, vertical):
    base = run(tiny_unet, unet_inputs)
    restuning.attach(tiny_unet, restuning.BypassConfig(horizontal=horizontal, vertical=vertical, dim=6))
    assert torch.equal(run(tiny_unet, unet_inputs), base)
    with torch.enable_grad():
        assert torch.equal(tiny_unet(*unet_inputs).sample.detach(), base)


def test_taps_lambda_and_gate_at_start(tiny_unet):
    handle = restuning.attach(tiny_unet, restuning.BypassConfig())
    network = handle.modules["bypass"]
    assert len(network.stages) == 1 + len(tiny_unet.up_blocks)  # mid_block, then every up block
    assert all(float(torch.sigmoid(s.mix.detach())) == 0.5 for s in network.stages)
    assert torch.count_nonzero(network.gate) == 0
    only_up = restuning.attach(tiny_unet, restuning.BypassConfig(taps=("up",)), name="up")
    assert len(only_up.modules["bypass"].stages) == len(tiny_unet.up_blocks)


def test_eq8_on_feature_maps():
    """With zero tuners, x_l^b = λ·x_l + (1-λ)·R(x_{l-1}^b); at g = 1, Δ = x_L^b - x_L."""
    torch.manual_seed(0)
    net = BypassNetwork([8, 8, 4], "adapter", "adapter", dim=3, heads=1)
    x0, x1, x2 = torch.randn(2, 8, 2, 2), torch.randn(2, 8, 4, 4), torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        net.stages[0].mix.fill_(1.0)
        net.gate.fill_(1.0)
        delta = net(x0, [x1, x2])
    lam = torch.sigmoid(torch.tensor(1.0))
    s1 = lam * x1 + (1 - lam) * torch.nn.functional.interpolate(x0, size=(4, 4), mode="nearest")
    s2 = 0.5 * x2 + 0.5 * s1.view(2, 4, 2, 4, 4).mean(2)  # 8 -> 4 channels: pairs averaged at start
    torch.testing.assert_close(delta, s2 - x2)


def test_sd15_budget_is_near_the_papers_and_has_no_dense_3x3():
    unet = build_unet("sd15", device="meta")
    handle = restuning.attach(unet, restuning.BypassConfig())
    n = sum(p.numel() for p in handle.parameters())
    assert 3.0e6 < n < 4.5e6  # the paper's Table 6: 3.76M (0.44%)
    convs = [m for m in handle.modules["bypass"].modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.groups == m.in_channels for m in convs if m.kernel_size != (1, 1))
    channels = [s.horizontal.down.in_features for s in handle.modules["bypass"].stages]
    assert channels == [1280, 1280, 1280, 640, 320]


def test_backbone_runs_without_grad_and_only_the_bypass_trains(tiny_unet, unet_inputs):
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4))
    _perturb(handle)
    seen = _taps(tiny_unet)
    loss = tiny_unet(*unet_inputs).sample.pow(2).mean()
    loss.backward()
    own = {id(p) for p in handle.parameters()}
    assert all(p.grad is None for p in tiny_unet.parameters() if id(p) not in own)
    assert all(p.grad is not None for p in handle.parameters())
    assert seen["features"] and not any(f.requires_grad for f in seen["features"])
    assert not any(torch.is_inference(f) for f in seen["features"])
    assert seen["backbone_grad"] == [False] and seen["head_grad"] == [True]
    assert torch.is_grad_enabled()  # the caller's grad mode is restored


def test_gradients_equal_those_of_a_backbone_run_with_grad(tiny_unet, unet_inputs):
    """The no-grad backbone is a saving, not an approximation: forcing autograd through the
    backbone (an input that requires grad) gives the bypass exactly the same gradients."""
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4))
    _perturb(handle)
    sample, t, text = unet_inputs
    tiny_unet(sample, t, text).sample.pow(2).mean().backward()
    fast = [p.grad.clone() for p in handle.parameters()]
    for p in handle.parameters():
        p.grad = None
    seen = _taps(tiny_unet)
    text = text.clone().requires_grad_(True)
    tiny_unet(sample, t, text).sample.pow(2).mean().backward()
    assert seen["backbone_grad"] == [True] and text.grad is not None
    for a, p in zip(fast, handle.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)


def _head_input(unet, inputs):
    seen = []
    hook = unet.conv_norm_out.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    run(unet, inputs)
    hook.remove()
    return seen[0]


def test_taps_are_detached_so_no_bypass_gradient_reaches_the_backbone(tiny_unet, unet_inputs):
    """Beside a Res-Tuner the backbone runs with grad, so a tap left attached would send the
    bypass's gradient into the backbone and into that Res-Tuner. Reference: the same run with the
    bypass's correction Δ added at the head as a constant. The text input's gradient and the
    Res-Tuner's must be the reference's, value for value."""
    bypass = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4), name="bypass")
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
        tiny_unet(sample, t, needs).sample.pow(2).mean().backward()
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
    net = BypassNetwork([8, 8, 8], horizontal, vertical, dim=3, heads=1)
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


def test_training_changes_the_output_not_the_backbone(tiny_unet, unet_inputs):
    base = run(tiny_unet, unet_inputs)
    backbone = {n: p.detach().clone() for n, p in tiny_unet.named_parameters()}
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4))
    opt = torch.optim.AdamW(restuning.trainable_parameters(tiny_unet), lr=1e-2)
    for _ in range(3):
        loss = tiny_unet(*unet_inputs).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(run(tiny_unet, unet_inputs), base)
    assert torch.count_nonzero(handle.modules["bypass"].gate) > 0
    for n, p in tiny_unet.named_parameters():
        if n in backbone:
            assert torch.equal(p, backbone[n]), f"backbone weight {n} changed"


def test_scale_zero_and_detach_give_exactly_the_base_model(tiny_unet, unet_inputs):
    base = run(tiny_unet, unet_inputs)
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


@pytest.fixture
def two_bypasses(tiny_unet, unet_inputs):
    """Bypasses "a" and "b" with distinct weights, and each one's output alone (and the base's)."""
    _perturb(restuning.attach(tiny_unet, restuning.BypassConfig(dim=4), name="a"), seed=1)
    _perturb(restuning.attach(tiny_unet, restuning.BypassConfig(horizontal="prompt", dim=3), name="b"), seed=2)
    alone = {}
    for only in ("a", "b", None):
        for other in ("a", "b"):
            restuning.set_scale(tiny_unet, 1.0 if other == only else 0.0, name=other)
        alone[only] = run(tiny_unet, unet_inputs)
    restuning.set_scale(tiny_unet, 1.0)
    assert not torch.equal(alone["a"], alone["b"])
    return alone


def test_one_backbone_forward_feeds_several_bypasses(tiny_unet, unet_inputs, two_bypasses):
    calls = []
    tiny_unet.mid_block.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        outs = restuning.bypass_outputs(tiny_unet, ["a", "b", None, "a"], *unet_inputs)
    assert len(calls) == 1 and len(outs) == 4
    for name, out in zip(["a", "b", None, "a"], outs):
        torch.testing.assert_close(out, two_bypasses[name], atol=1e-5, rtol=0)
    with pytest.raises(restuning.AttachError, match="not attached"):
        restuning.bypass_outputs(tiny_unet, ["c"], *unet_inputs)


def test_several_bypasses_train_from_one_backbone_forward(tiny_unet, unet_inputs, two_bypasses):
    """Each bypass gets from the shared forward exactly the gradient it gets when run alone."""
    handles = restuning.attached(tiny_unet)
    assert all(p.requires_grad for h in handles.values() for p in h.parameters())  # attaching "b" left "a" trainable
    seen = _taps(tiny_unet)
    outs = restuning.bypass_outputs(tiny_unet, ["a", "b"], *unet_inputs)
    sum(o.pow(2).mean() for o in outs).backward()
    assert seen["backbone_grad"] == [False]
    shared = {n: [p.grad.clone() for p in h.parameters()] for n, h in handles.items()}
    for name in handles:
        for h in handles.values():
            for p in h.parameters():
                p.grad = None
        for other in handles:
            restuning.set_scale(tiny_unet, 1.0 if other == name else 0.0, name=other)
        tiny_unet(*unet_inputs).sample.pow(2).mean().backward()
        assert any(torch.count_nonzero(g) > 0 for g in shared[name])
        for got, p in zip(shared[name], handles[name].parameters(), strict=True):
            torch.testing.assert_close(got, p.grad, atol=1e-7, rtol=1e-5)


def test_route_sends_each_sample_through_its_own_bypass(tiny_unet, unet_inputs, two_bypasses):
    for names in (["a", "b"], [None, "a"], ["b", None]):
        with restuning.route(names):
            routed = run(tiny_unet, unet_inputs)
        for i, name in enumerate(names):
            torch.testing.assert_close(routed[i], two_bypasses[name][i], atol=1e-5, rtol=0)


def test_route_repeats_over_a_classifier_free_guidance_batch(tiny_unet, unet_inputs, two_bypasses):
    sample, t, text = unet_inputs
    doubled = (torch.cat([sample, sample]), torch.cat([t, t]), torch.cat([text, text]))
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


def test_bf16_unet_with_fp32_bypass(tiny_unet, unet_inputs):
    unet = tiny_unet.to(torch.bfloat16)
    inputs = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in unet_inputs]
    base = run(unet, inputs)
    handle = restuning.attach(unet, restuning.BypassConfig(dim=4))
    assert all(p.dtype == torch.float32 for p in handle.parameters())
    out = run(unet, inputs)
    assert out.dtype == torch.bfloat16 and torch.equal(out, base)
    unet(*inputs).sample.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in handle.parameters())


def test_bad_configs_are_refused_with_the_reason(tiny_unet):
    with pytest.raises(restuning.ConfigError, match="taps must include 'up'"):
        restuning.attach(tiny_unet, restuning.BypassConfig(taps=("mid",)))
    with pytest.raises(restuning.ConfigError, match="horizontal"):
        restuning.attach(tiny_unet, restuning.BypassConfig(horizontal="lora"))
    with pytest.raises(restuning.ConfigError, match="positive"):
        restuning.attach(tiny_unet, restuning.BypassConfig(dim=0))
    assert restuning.attached(tiny_unet) == {}
    assert restuning.config_from_dict(restuning.BypassConfig(vertical="prefix").to_dict()) == restuning.BypassConfig(vertical="prefix")
