"""The Bypass's off-concept loss: inside `off_concept(off, on)` every text-reading bypass also
computes its correction for prompts that do not name the concept and for prompts that do, from the
same captured features, and reports E_off = mean(Δ(off)²)/mean(x_L²) and
E_on = mean((Δ(on) − Δ)²)/mean(x_L²); the call's own output is untouched. The trainer's prompts
without the concept never hold its identifier, those with it always do, and its loss trains on E."""

import pytest
import torch

import restuning
from restuning.methods.bypass import off_concept
from trainers import conditioning
from trainers.events import read_events
from tests.test_trainer import REPO, argv, fresh_accelerate_state, instance_dir, run_train, tiny_model  # noqa: F401 - fixtures


def _perturb(handle, seed=9):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def _record(unet, handle, depth):
    """The network's inputs and the injection point's input x_L, as the U-Net call passes them."""
    seen = {}
    network = handle.modules["bypass"]

    def network_input(module, args):
        seen.setdefault("net", args)

    def injection_input(module, args, kwargs):
        seen.setdefault("x", (args[0] if args else kwargs["hidden_states"]).detach())

    network.register_forward_pre_hook(network_input)
    unet.up_blocks[len(unet.up_blocks) - depth].register_forward_pre_hook(injection_input, with_kwargs=True, prepend=True)
    return seen


def test_the_energies_are_the_corrections_for_the_other_prompts_and_the_output_is_untouched(tiny_unet, unet_inputs):
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4))
    _perturb(handle)
    sample, t, text = unet_inputs
    other = torch.randn(text.shape, generator=torch.Generator().manual_seed(5))
    naming = torch.randn(text[:1].shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = tiny_unet(sample, t, text).sample
    seen = _record(tiny_unet, handle, handle.config.depth)
    with off_concept(other, naming) as energies:
        out = tiny_unet(sample, t, text).sample
    assert torch.equal(out.detach(), plain)
    assert len(energies) == 2 and all(e.requires_grad for e in energies)
    x0, features, mine, temb = seen["net"]
    assert torch.equal(mine, text)  # the call's own prompt for the output ...
    net, x = handle.modules["bypass"], seen["x"]
    with torch.no_grad():
        own = net(x0, features, text, temb)
        off = net(x0, features, other, temb).pow(2).mean() / x.pow(2).mean()
        on = (net(x0[:1], [f[:1] for f in features], naming, temb) - own[:1]).pow(2).mean() / x[:1].pow(2).mean()
    torch.testing.assert_close(energies[0].detach(), off)  # ... the other prompts for the energies
    torch.testing.assert_close(energies[1].detach(), on)
    assert not torch.allclose(off, own.pow(2).mean() / x.pow(2).mean()) and on > 0


def test_the_energy_trains_the_network_and_starts_at_zero(tiny_unet, unet_inputs):
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4))
    sample, t, text = unet_inputs
    other = torch.randn(text.shape, generator=torch.Generator().manual_seed(5))
    with off_concept(other, other[:1]) as energies:
        tiny_unet(sample, t, text)
    assert [e.item() for e in energies] == [0, 0]  # Z starts at zero: so does every correction
    _perturb(handle)
    with off_concept(other, other[:1]) as energies:
        tiny_unet(sample, t, text)
    sum(energies).backward()
    text_params = [p for n, p in handle.modules["bypass"].named_parameters() if ".text." in n]
    assert text_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in text_params)
    assert all(p.grad is None for n, p in tiny_unet.named_parameters() if not n.startswith("restuning"))


def test_nothing_is_computed_without_grad_or_without_text(tiny_unet, unet_inputs):
    sample, t, text = unet_inputs
    handle = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4), name="text")
    _perturb(handle)
    with off_concept(torch.zeros_like(text)) as energies, torch.no_grad():
        tiny_unet(sample, t, text)
    assert energies == []
    restuning.detach(tiny_unet)
    restuning.attach(tiny_unet, restuning.BypassConfig(dim=4, text=False))
    with off_concept(torch.zeros_like(text)) as energies:
        tiny_unet(sample, t, text)
    assert energies == []


def test_the_weight_is_checked():
    with pytest.raises(ValueError, match="off_concept_loss"):
        restuning.BypassConfig(off_concept_loss=-1).validate()
    with pytest.raises(ValueError, match="off_concept_loss"):
        restuning.BypassConfig(off_concept_loss=float("nan")).validate()
    with pytest.raises(ValueError, match="needs text"):
        restuning.BypassConfig(off_concept_loss=0.1, text=False).validate()


# -- the trainer's prompts and loss ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(REPO / "assets" / "demo-model" / "tokenizer"))


def test_prompts_without_the_concept_never_name_it_and_those_with_it_always_do(tokenizer):
    off, on = conditioning.concept_prompts(tokenizer, "a sks shape", "a shape", 256, seed=0)
    assert len(off) == len(on) == 256 and off[0] == ""
    assert not [p for p in off if "sks" in p.split()]
    assert all(p.split().count("sks") == 1 and len(p.split()) > 3 for p in on)  # the identifier among other words
    words = [set(p.split()) for p in off]
    assert sum("shape" in w for w in words) > 60  # the class prompt, salted, and the instance prompt with its identifier swapped
    assert len({len(p.split()) for p in off}) > 5 and len({len(p.split()) for p in on}) > 3  # a prompt's length says nothing
    assert (off, on) == conditioning.concept_prompts(tokenizer, "a sks shape", "a shape", 256, seed=0)
    assert off != conditioning.concept_prompts(tokenizer, "a sks shape", "a shape", 256, seed=1)[0]


def test_without_a_class_prompt_no_word_of_the_instance_prompt_is_used(tokenizer):
    off, on = conditioning.concept_prompts(tokenizer, "a sks shape", None, 64, seed=0)
    assert not [p for p in off if {"a", "sks", "shape"} & set(p.split())]
    assert all(p.split().count("sks") == 1 for p in on)


def test_the_trainer_adds_the_off_concept_loss(tiny_model, instance_dir, tmp_path):
    weights, messages = {}, {}
    for weight in (0, 5):
        out = tmp_path / f"w{weight}"
        result = run_train(argv(tiny_model, instance_dir, out, "--method", "bypass", "--max_train_steps", 3, "--dim", 4,
                                "--off_concept_loss", weight, "--checkpointing_steps", 10))
        weights[weight] = result.handle.state_dict()
        messages[weight] = [e["message"] for e in read_events(out) if "off-concept" in e.get("message", "")]
    assert not messages[0] and len(messages[5]) == 1
    differ = [k for k in weights[0] if not torch.equal(weights[0][k], weights[5][k])]
    assert any(".text." in k for k in differ), differ
