"""Res-Tuning's off-concept loss (trainers.dreambooth.OffConcept) held to its formula written here:
with x_t, t the step's noisy latents and timesteps, R the batch's last k rows, c̃ the k prompts
that do not name the concept, f_θ the tuned U-Net and f_0 the same U-Net at strength 0,

    loss = diffusion loss of the batch + w · mean over R, C, H, W of (f_θ(x_t[R], t[R], c̃) − f_0(x_t[R], t[R], c̃))²

and only f_θ's term carries gradient (f_0 is the frozen model's answer). And conditioning's
off-concept prompts from a vocabulary with no whole words."""

from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

import restuning
from trainers import conditioning
from trainers.dreambooth import OffConcept, diffusion_loss


class Posterior:
    def __init__(self, mean):
        self.mean = mean

    def sample(self, generator):
        return self.mean + 0.1 * torch.randn(self.mean.shape, generator=generator)


def setup(weight: float):
    from diffusers import DDPMScheduler

    from restuning.arch import build_unet

    unet = build_unet("tiny", seed=0).train()
    handle = restuning.attach(unet, restuning.ResTuningConfig(tuners={"ff": "adapter", "resnet": "adapter"}, dim=4, resnet_dim=4))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # tuned: f_θ differs from f_0
    text = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(1))
    prompts = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    posterior = Posterior(torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(4)))

    def frozen(noisy, timesteps, embeddings, added):
        restuning.set_scale(unet, 0.0)
        try:
            return unet(noisy, timesteps, embeddings).sample
        finally:
            restuning.set_scale(unet, 1.0)

    args = SimpleNamespace(noise_offset=0.0, snr_gamma=None, prior_loss_weight=1.0)
    off = OffConcept(prompts, None, frozen, weight)
    return unet, handle, posterior, text, args, off, DDPMScheduler(num_train_timesteps=1000)


def loss_of(unet, posterior, text, args, scheduler, off, seen=None):
    hook = unet.register_forward_pre_hook(lambda m, a: seen.append([x.detach().clone() for x in a])) if seen is not None else None
    try:
        return diffusion_loss(unet, posterior, 1.0, scheduler, text, 2, args, torch.Generator().manual_seed(9), torch.float32,
                              off_concept=off)
    finally:
        if hook is not None:
            hook.remove()


@pytest.mark.parametrize("weight", [0.1, 0.7])
def test_the_off_concept_term_is_the_formula_on_the_batch_s_last_rows(weight):
    unet, handle, posterior, text, args, off, scheduler = setup(weight)
    seen = []
    plain, instance, prior = loss_of(unet, posterior, text, args, scheduler, None, seen)
    noisy, timesteps, _ = seen[0]
    total, instance_with, prior_with = loss_of(unet, posterior, text, args, scheduler, off)
    assert torch.allclose(instance_with, instance, rtol=1e-5) and torch.allclose(prior_with, prior, rtol=1e-5)
    rows = slice(2, 4)  # the last k = 2 rows: the class images with prior preservation
    with torch.no_grad():
        student = unet(noisy[rows], timesteps[rows], off.prompts).sample
        restuning.set_scale(unet, 0.0)
        teacher = unet(noisy[rows], timesteps[rows], off.prompts).sample
        restuning.set_scale(unet, 1.0)
    expected = weight * F.mse_loss(student, teacher)
    assert expected > 1e-6  # the tuned and the frozen model differ there
    assert (total - plain).item() == pytest.approx(expected.item(), rel=1e-4)


def test_only_the_tuned_model_s_answer_carries_gradient():
    unet, handle, posterior, text, args, off, scheduler = setup(1.0)
    total, _, _ = loss_of(unet, posterior, text, args, scheduler, off)
    plain, _, _ = loss_of(unet, posterior, text, args, scheduler, None)
    params = list(handle.parameters())
    grads_total = torch.autograd.grad(total, params, allow_unused=True)
    grads_plain = torch.autograd.grad(plain, params, allow_unused=True)
    moved = [g1 is not None and g0 is not None and not torch.allclose(g1, g0) for g1, g0 in zip(grads_total, grads_plain)]
    assert any(moved)
    assert not any(p.grad is not None for p in unet.parameters() if not p.requires_grad)


def test_off_concept_prompts_from_a_vocabulary_of_pieces_are_the_empty_and_the_class_prompt():
    vocab = SimpleNamespace(get_vocab=lambda: {"a</w>": 0, "s": 1, "k": 2})
    off, on = conditioning.concept_prompts(vocab, "a sks shape", "a shape", 5, seed=0)
    assert off == ["", "a shape", "", "a shape", ""] and on == ["a sks shape"] * 5
    off, _ = conditioning.concept_prompts(vocab, "a sks shape", None, 3, seed=0)
    assert off == ["", "", ""]


def test_the_trainer_s_frozen_answer_is_the_u_net_at_strength_0_and_its_prompts_are_drawn_from_the_list():
    from trainers.dreambooth import off_concept_rows

    unet, handle, posterior, text, args, _, scheduler = setup(0.3)
    prompts = torch.randn(6, 5, 32, generator=torch.Generator().manual_seed(7))
    training = SimpleNamespace(off_concept=(prompts, None, prompts[:1]), tuning=SimpleNamespace(handle=handle),
                               base=SimpleNamespace(pipe=SimpleNamespace(unet=unet)))
    off = off_concept_rows(training, torch.Generator().manual_seed(0))
    assert off.weight == handle.config.off_concept_loss and off.prompts.shape == (conditioning.OFF_CONCEPT_ROWS, 5, 32)
    assert all(any(torch.equal(row, p) for p in prompts) for row in off.prompts)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        answer = off.frozen(x, t, off.prompts, None)
        restuning.set_scale(unet, 0.0)
        base = unet(x, t, off.prompts).sample
        restuning.set_scale(unet, 1.0)
        tuned = unet(x, t, off.prompts).sample
    assert torch.equal(answer, base) and not torch.allclose(answer, tuned)
    assert handle.scale == 1.0  # the strength is back for the step's own call
    training.tuning.handle = SimpleNamespace(config=SimpleNamespace(method="bypass", off_concept_loss=0.3), name="default")
    assert off_concept_rows(training, torch.Generator()) is None  # a Bypass's off-concept loss is another one
