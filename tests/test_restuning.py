"""Res-Tuners on a real diffusers U-Net: identity at attach, Mix-Tuning layouts, where they go,
what trains, strength, detach, and precision."""

import itertools

import pytest
import torch

import restuning
from restuning.arch import TINY_ARCHS
from restuning.core import resnet_blocks, transformer_blocks
from tests.conftest import cast, forward, frozen_run, run

KINDS = ("adapter", "prefix", "prompt")
OPS = ("attn1", "attn2", "ff", "block")


def _train_a_little(unet, inputs, steps=3):
    params = restuning.trainable_parameters(unet)
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        loss = forward(unet, inputs).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("kind,op", list(itertools.product(KINDS, OPS)) + [("adapter", "resnet")])
def test_identity_at_attach_for_every_kind_and_op(tiny_unet, unet_inputs, kind, op):
    base = frozen_run(tiny_unet, unet_inputs)
    restuning.attach(tiny_unet, restuning.ResTuningConfig(tuners={op: kind}))
    assert torch.equal(run(tiny_unet, unet_inputs), base)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tuners_go_to_every_block_by_default_and_to_the_chosen_parts_on_request(tiny_unet):
    handle = restuning.attach(tiny_unet, restuning.ResTuningConfig())
    everywhere = ("down", "mid", "up")
    n_blocks, n_resnets = len(transformer_blocks(tiny_unet, everywhere)), len(resnet_blocks(tiny_unet, everywhere))
    assert n_blocks and n_resnets
    assert len(handle.modules) == 3 * n_blocks  # Tri: attn1, ff, block in each transformer block
    assert {k.split(".")[0] for k in handle.modules} == {"down_blocks", "mid_block", "up_blocks"}
    restuning.attach(tiny_unet, restuning.ResTuningConfig(blocks=("mid", "up")), name="late")
    late = restuning.attached(tiny_unet)["late"].modules
    assert late and all(k.startswith(("mid_block.", "up_blocks.")) for k in late)
    assert len(late) == 3 * len(transformer_blocks(tiny_unet, ("mid", "up")))
    restuning.attach(tiny_unet, restuning.ResTuningConfig(tuners={"resnet": "adapter"}), name="conv")
    assert len(restuning.attached(tiny_unet)["conv"].modules) == n_resnets  # beside every ResNet on request


@pytest.mark.parametrize(
    "layout",
    [
        {"ff": "prompt"},  # Single
        {"attn1": "adapter", "ff": "adapter"},  # Dual, the paper's best for classification
        {"attn1": "adapter", "ff": "adapter", "block": "adapter"},  # Tri
        {"attn1": "prefix", "attn2": "prompt", "ff": "adapter", "block": "prefix"},
        {"resnet": "adapter"},  # conv adapters beside the ResNet blocks alone
    ],
)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_mix_tuning_layouts_train_only_their_tuners(tiny_unet, unet_inputs, layout):
    base = run(tiny_unet, unet_inputs)
    backbone = {n: p.detach().clone() for n, p in tiny_unet.named_parameters()}
    handle = restuning.attach(tiny_unet, restuning.ResTuningConfig(tuners=layout, blocks=("mid", "up")))
    n_blocks, n_resnets = len(transformer_blocks(tiny_unet, ("mid", "up"))), len(resnet_blocks(tiny_unet, ("mid", "up")))
    assert len(handle.modules) == sum(n_resnets if op == "resnet" else n_blocks for op in layout)
    trainable = {id(p) for p in restuning.trainable_parameters(tiny_unet)}
    assert trainable == {id(p) for p in handle.parameters()}
    _train_a_little(tiny_unet, unet_inputs)
    assert not torch.equal(run(tiny_unet, unet_inputs), base)
    for n, p in tiny_unet.named_parameters():
        if n in backbone:
            assert torch.equal(p, backbone[n]), f"backbone weight {n} changed"


def test_default_is_the_layout_that_learned_best():
    config = restuning.ResTuningConfig()
    assert config.tuners == {"attn1": "adapter", "ff": "adapter", "block": "adapter"}
    assert (config.dim, config.resnet_dim, config.blocks) == (32, 16, ("down", "mid", "up"))
    assert (config.identifier, config.off_concept_loss) == ("auto", 0.1)


def test_resnet_adapters_take_their_own_width(tiny_unet):
    handle = restuning.attach(tiny_unet, restuning.ResTuningConfig(tuners={"resnet": "adapter"}, resnet_dim=5))
    assert {m.down.out_channels for m in handle.modules.values()} == {5}


def test_dim_sets_every_tuner_length(tiny_unet):
    handle = restuning.attach(tiny_unet, restuning.ResTuningConfig(tuners={"attn1": "adapter", "attn2": "prefix", "ff": "prompt"}, dim=7))
    shapes = {type(m).__name__: m for m in handle.modules.values()}
    assert shapes["Adapter"].down.out_features == 7
    assert shapes["ResPrefix"].key.shape[0] == 7
    assert shapes["ResPrompt"].tokens.shape[0] == 7


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_scale_zero_and_detach_give_exactly_the_base_model(tiny_unet, unet_inputs):
    base = frozen_run(tiny_unet, unet_inputs)
    restuning.attach(tiny_unet, restuning.ResTuningConfig(tuners={"attn1": "prefix", "ff": "adapter", "block": "prompt"}))
    _train_a_little(tiny_unet, unet_inputs)
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
    assert not any("restuners" in n for n, _ in tiny_unet.named_modules())


def test_attaching_twice_is_refused_or_replaces_cleanly(tiny_unet, unet_inputs):
    restuning.attach(tiny_unet, restuning.ResTuningConfig())
    n = len(list(tiny_unet.parameters()))
    with pytest.raises(restuning.AttachError, match="already attached"):
        restuning.attach(tiny_unet, restuning.ResTuningConfig())
    restuning.attach(tiny_unet, restuning.ResTuningConfig(), replace=True)
    assert len(list(tiny_unet.parameters())) == n
    hooks = sum(len(m._forward_hooks) for m in tiny_unet.modules())
    assert hooks == len(restuning.attached(tiny_unet)["default"].modules)


def test_bad_layouts_are_refused_with_the_reason(tiny_unet):
    with pytest.raises(ValueError, match="unknown OP"):
        restuning.attach(tiny_unet, restuning.ResTuningConfig(tuners={"attn3": "adapter"}))
    with pytest.raises(ValueError, match="unknown tuner kind"):
        restuning.attach(tiny_unet, restuning.ResTuningConfig(tuners={"ff": "lora"}))
    with pytest.raises(ValueError, match="blocks"):
        restuning.attach(tiny_unet, restuning.ResTuningConfig(blocks=("middle",)))
    with pytest.raises(ValueError, match="positive"):
        restuning.attach(tiny_unet, restuning.ResTuningConfig(dim=0))
    assert restuning.attached(tiny_unet) == {}


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("layout", [{"attn1": "adapter", "ff": "adapter"}, {"attn2": "prefix", "block": "prompt"}])
def test_bf16_unet_with_fp32_tuners(tiny_unet, unet_inputs, layout):
    unet = tiny_unet.to(torch.bfloat16)
    inputs = cast(unet_inputs, torch.bfloat16)
    base = run(unet, inputs)
    handle = restuning.attach(unet, restuning.ResTuningConfig(tuners=layout))
    assert all(p.dtype == torch.float32 for p in handle.parameters())
    out = run(unet, inputs)
    assert out.dtype == torch.bfloat16 and torch.equal(out, base)
    loss = forward(unet, inputs).sample.float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in handle.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)


def test_autocast_bf16_keeps_tuner_weights_fp32(tiny_unet, unet_inputs):
    handle = restuning.attach(tiny_unet, restuning.ResTuningConfig(tuners={"attn1": "prefix", "ff": "adapter"}))
    _train_a_little(tiny_unet, unet_inputs, steps=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = forward(tiny_unet, unet_inputs).sample.float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 and p.grad is not None for p in handle.parameters())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_route_sends_each_sample_through_its_own_tuner(tiny_unet, unet_inputs):
    restuning.attach(tiny_unet, restuning.ResTuningConfig(), name="a")
    restuning.attach(tiny_unet, restuning.ResTuningConfig(tuners={"ff": "prefix"}), name="b")
    _train_a_little(tiny_unet, unet_inputs, steps=2)
    both = run(tiny_unet, unet_inputs)
    expected = []
    for only in ("a", "b", None):
        for other in ("a", "b"):
            restuning.set_scale(tiny_unet, 1.0 if other == only else 0.0, name=other)
        expected.append(run(tiny_unet, unet_inputs))
    restuning.set_scale(tiny_unet, 1.0)
    assert not torch.equal(both, expected[0])
    with restuning.route(["a", "b"]):
        routed = run(tiny_unet, unet_inputs)
    torch.testing.assert_close(routed[0], expected[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(routed[1], expected[1][1], atol=1e-5, rtol=0)
    with restuning.route([None, "a"]):
        routed = run(tiny_unet, unet_inputs)
    torch.testing.assert_close(routed[0], expected[2][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(routed[1], expected[0][1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_several_loras_stay_active_and_scale_independently(tiny_unet, unet_inputs):
    base = frozen_run(tiny_unet, unet_inputs)
    outputs = {}
    for name, seed in (("one", 1), ("two", 2)):
        handle = restuning.attach(tiny_unet, restuning.LoraConfig(), name=name)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in handle.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    restuning.set_scale(tiny_unet, 0.0, name="two")
    outputs["one"] = run(tiny_unet, unet_inputs)
    restuning.set_scale(tiny_unet, 1.0, name="two")
    restuning.set_scale(tiny_unet, 0.0, name="one")
    outputs["two"] = run(tiny_unet, unet_inputs)
    assert not torch.equal(outputs["one"], base) and not torch.equal(outputs["two"], base)
    assert not torch.equal(outputs["one"], outputs["two"])
    restuning.detach(tiny_unet, "one")
    assert torch.equal(run(tiny_unet, unet_inputs), outputs["two"])
    restuning.detach(tiny_unet)
    assert torch.equal(run(tiny_unet, unet_inputs), base)
