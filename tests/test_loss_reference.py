"""The trainer's loss and gradients held to a reference written here from the published formulas,
not from the trainer's code.

The reference is diffusers' DreamBooth objective (examples/dreambooth/train_dreambooth.py and
train_dreambooth_lora.py), with the min-SNR weights of Hang et al. 2023 (arXiv 2303.09556, Sec. 3.4
and 4.2) and diffusers' per-channel offset noise (train_text_to_image.py's --noise_offset). With
ᾱ_t the scheduler's cumulative alpha product, s the VAE's scaling factor and SNR_t = ᾱ_t / (1 − ᾱ_t):

    x_0    = s · z,   z ~ VAE posterior of the image
    ε      = n + offset · m,   n ~ N(0, I) of the latent's shape, m ~ N(0, I) of shape (B, C, 1, 1)
    x_t    = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε
    target = ε (epsilon)   or   √ᾱ_t · ε − √(1 − ᾱ_t) · x_0 (v-prediction)
    ℓ_i    = w_i · mean over (C, H, W) of (U-Net(x_t, t, c) − target)²
    w_i    = min(SNR, γ) / SNR (epsilon)   or   min(SNR, γ) / (SNR + 1) (v-prediction);  1 without γ
    loss   = mean of ℓ over the instance images + prior_loss_weight · mean of ℓ over the class images

and with --gradient_accumulation_steps k the optimiser step's gradient is that of the mean of the k
micro-batch losses. Every sample is weighted by its own timestep's SNR, class images included
(diffusers' train_dreambooth.py weights the instance half only).

Same inputs: the reference reads the images of the trainer's data stream at the positions it
expects (micro-batch m of step k reads positions (k·accum + m)·batch onwards), and draws from the
generator `dreambooth.step_generator(seed, k, m, 0)` (one per micro-batch, so that a resumed run
draws what an uninterrupted one would) in the order diffusers' scripts draw: the posterior's
sample, then n, then m, then the timesteps. It sees the tuner weights the trainer had at
the start of each step (recorded by a hook), so each step is checked on its own, whatever the
optimiser then did. What is compared: each step's loss and the accumulated gradient of every tuner
weight (recorded when it is final, before clipping).

diffusers' own script as the oracle was considered: it needs torchvision (not a dependency here),
draws its noise from the global RNG inside a 1,400-line main(), and its LoRA script has neither
min-SNR nor offset noise; aligning its draws with the trainer's would mean patching torch itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import restuning
from tests.test_trainer import fresh_accelerate_state, make_images  # noqa: F401 (autouse fixture)
from trainers import data, dreambooth, options
from trainers.events import EventLog
from trainers.images import check_folder

PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"
SCALING_FACTOR = 0.3  # neither 1 nor SD's 0.18215 (AutoencoderKL's default), so neither can stand in for it
GAMMA = 0.4  # SNR_t = 0.4 near t = 500 of SD's schedule: the draws below fall on both sides of the clamp
STEPS = 2


def build_model(folder: Path, prediction_type: str) -> Path:
    """tests/tiny_pipeline.py with an f=8 VAE whose scaling factor is SCALING_FACTOR, saved to `folder`."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    from tests.tiny_pipeline import tiny_pipeline

    parts = tiny_pipeline(seed=0).components
    torch.manual_seed(0)
    parts["vae"] = AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                                 sample_size=64, scaling_factor=SCALING_FACTOR)
    parts["scheduler"] = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    StableDiffusionPipeline(**parts).save_pretrained(folder)
    return folder


class Models(dict):
    """The two models, each built when a test first asks for it (a single case runs alone in
    scripts.mutate, where building both would double its cost)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, prediction_type: str) -> Path:
        self[prediction_type] = build_model(self.root / prediction_type, prediction_type)
        return self[prediction_type]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory.mktemp("loss-models"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("loss-data")
    instance = make_images(root / "instance", n=4)
    classes = root / "class"
    classes.mkdir()
    for i in range(3):  # class images unlike the instance ones: the two halves of a batch must differ
        Image.new("RGB", (64, 64), (30 + 60 * i, 120, 200 - 50 * i)).save(classes / f"{i:05d}.png")
    return instance, classes


class Recorder:
    """on_attached: perturbs the tuners (so that every weight has a gradient from the first step),
    then records the tuner weights at every U-Net call and every weight's gradient after every
    backward pass."""

    def __init__(self):
        self.states: list[dict] = []
        self.grads: dict[str, list] = {}
        self.config = None

    def __call__(self, pipe, handle):
        self.config = handle.config
        self.named = tuner_weights(pipe.unet, handle)
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in self.named.values():
                p.add_(torch.randn(p.shape, generator=generator).to(p.device, p.dtype) * 0.05)
        pipe.unet.register_forward_pre_hook(lambda module, args: self.states.append(
            {k: p.detach().clone() for k, p in self.named.items()}))
        for name, p in self.named.items():
            self.grads[name] = []
            p.register_post_accumulate_grad_hook(lambda p, name=name: self.grads[name].append(p.grad.detach().clone()))


def train(model, instance, out, *extra):
    recorder = Recorder()
    argv = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance), "--instance_prompt", PROMPT,
            "--resolution", "64", "--output_dir", str(out), "--learning_rate", "1e-2", "--max_train_steps", str(STEPS),
            "--seed", "7", "--checkpointing_steps", "100", *map(str, extra)]
    if "--method" not in extra:  # diffusers' objective: Res-Tuning without its off-concept term and identifier
        argv += ["--off_concept_loss", "0", "--identifier", ""]
    parsed = options.parse(argv)
    result = dreambooth.train(parsed, EventLog(parsed.args.output_dir), dreambooth.StopFlag(), on_attached=recorder)
    return parsed.args, result, recorder


def tuner_weights(unet, handle) -> dict:
    """The method's weights by their path in the U-Net (the same in the trainer's and the reference's)."""
    ids = {id(p) for p in handle.parameters()}
    return {n: p for n, p in unet.named_parameters() if id(p) in ids}


# -- the reference ---------------------------------------------------------------------------------


def embedding(pipe, prompt):
    """diffusers' tokenize_prompt + encode_prompt: padded to the tokenizer's length, no attention mask."""
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def reference_loss(pipe, pixels, num_instance, text, args, generator, dtype):
    """One micro-batch's loss, from the formulas in the module docstring; also returns its timesteps."""
    scheduler = pipe.scheduler
    with torch.no_grad():
        z = pipe.vae.encode(pixels.to(dtype)).latent_dist.sample(generator=generator)
    x0 = (z * pipe.vae.config.scaling_factor).float()
    b, c = x0.shape[:2]
    eps = torch.randn(x0.shape, generator=generator)
    if args.noise_offset:
        eps = eps + args.noise_offset * torch.randn((b, c, 1, 1), generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    alpha_bar = scheduler.alphas_cumprod[t].float().view(b, 1, 1, 1)
    noisy = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0 if v_prediction else eps
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        prediction = pipe.unet(noisy.to(dtype), t, text.to(dtype)).sample
    per_sample = ((prediction.float() - target) ** 2).mean(dim=(1, 2, 3))
    if args.snr_gamma is not None:
        snr = (alpha_bar / (1 - alpha_bar)).view(b)
        per_sample = per_sample * torch.minimum(snr, torch.full_like(snr, args.snr_gamma)) / (snr + 1 if v_prediction else snr)
    loss = per_sample[:num_instance].mean()
    if num_instance < b:
        loss = loss + args.prior_loss_weight * per_sample[num_instance:].mean()
    return loss, t


def reference_pipeline(model, config, dtype):
    """The base model in `dtype` with the method attached, its tuners in fp32."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), local_files_only=True, safety_checker=None, dtype=dtype)
    named = tuner_weights(pipe.unet, restuning.attach(pipe.unet, config))
    for p in named.values():
        p.data = p.data.float()  # trainable weights in fp32 whatever the frozen ones' dtype
    pipe.unet.train()
    return pipe, named


def reference_step(pipe, named, args, recorder, step, dtype):
    """(loss, {weight name: gradient}, timesteps and pixels of each micro-batch) of optimiser step `step`."""
    accum, bs = args.gradient_accumulation_steps, args.train_batch_size
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(recorder.states[step * accum][name])
            p.grad = None
    class_files = data.usable_images(Path(args.class_data_dir))[: args.num_class_images] if args.with_prior_preservation else None
    stream = data.DreamBoothData([i.path for i in check_folder(args.instance_data_dir)], class_files, args.resolution,
                                 args.center_crop, args.random_flip, args.seed, args.image_interpolation_mode)
    texts = [embedding(pipe, PROMPT)] + ([embedding(pipe, CLASS_PROMPT)] if class_files else [])
    total, drawn, seen = 0.0, [], []
    for micro in range(accum):
        batch = stream.batch((step * accum + micro) * bs, bs)
        text = torch.cat([t.expand(bs, -1, -1) for t in texts])
        loss, t = reference_loss(pipe, batch["pixel_values"], batch["num_instance"], text, args,
                                 dreambooth.step_generator(args.seed, step, micro, 0), dtype)
        total = total + loss / accum
        drawn.append(t)
        seen.append(batch["pixel_values"])
    total.backward()
    return total.item(), {k: p.grad for k, p in named.items()}, drawn, seen


CASES = {
    "epsilon": ("epsilon", ()),
    "epsilon min-SNR": ("epsilon", ("--snr_gamma", GAMMA, "--train_batch_size", 2)),
    "v-prediction min-SNR": ("v_prediction", ("--snr_gamma", GAMMA, "--train_batch_size", 2)),
    "prior preservation": ("epsilon", ("--with_prior_preservation", "--class_prompt", CLASS_PROMPT, "--prior_loss_weight", 0.4,
                                       "--num_class_images", 3, "--train_batch_size", 2)),
    "noise offset": ("epsilon", ("--noise_offset", 0.5)),
    "gradient accumulation": ("v_prediction", ("--gradient_accumulation_steps", 3, "--snr_gamma", GAMMA)),
    # LoRA: peft makes its weights in the frozen layers' dtype, so the trainer must bring them to fp32
    "bf16 autocast": ("epsilon", ("--mixed_precision", "bf16", "--method", "lora", "--snr_gamma", GAMMA, "--gradient_accumulation_steps", 2,
                                  "--with_prior_preservation", "--class_prompt", CLASS_PROMPT, "--prior_loss_weight", 0.4,
                                  "--num_class_images", 3, "--no-cache_latents")),
}
# bf16 runs the frozen U-Net in bf16 on both sides; the two differ in the order of a few float
# operations before the cast (the trainer's add_noise against the formula), which bf16 rounding
# then amplifies. Every wrong formula moves the loss by more than 1e-2.
TOLERANCE = {"bf16 autocast": 2e-3}


@pytest.mark.parametrize("case", list(CASES))
def test_losses_and_gradients_equal_the_reference(case, models, images, tmp_path):
    prediction, extra = CASES[case]
    instance, classes = images
    if "--with_prior_preservation" in extra:
        extra = (*extra, "--class_data_dir", classes)
    args, result, recorder = train(models[prediction], instance, tmp_path / "run", *extra)
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    rtol = TOLERANCE.get(case, 1e-5)
    accum = args.gradient_accumulation_steps
    assert len(result.losses) == STEPS and len(recorder.states) == STEPS * accum
    timesteps = []
    reference = reference_pipeline(models[prediction], recorder.config, dtype)
    for step in range(STEPS):
        loss, grads, drawn, seen = reference_step(*reference, args, recorder, step, dtype)
        assert result.losses[step] == pytest.approx(loss, rel=rtol), f"{case}: step {step} loss"
        for name, expected in grads.items():
            got = recorder.grads[name][step * accum + accum - 1]
            assert got.dtype == torch.float32, f"{case}: {name}'s gradient is {got.dtype}"
            scale = expected.abs().max().item()
            assert scale > 0, f"{case}: {name} has no gradient in the reference"
            assert torch.allclose(got, expected, rtol=0, atol=rtol * 10 * scale), (
                f"{case}: step {step} gradient of {name} is off by {(got - expected).abs().max().item() / scale:.2e} of its size")
        timesteps += drawn
        if accum > 1:  # micro-batches that read the same images or draw the same timesteps would pass unseen
            assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(seen[0], seen[1])
    if args.snr_gamma is not None:  # a weight clamped the wrong way would pass unseen
        from diffusers import DDPMScheduler

        alpha_bar = DDPMScheduler.from_pretrained(str(models[prediction]), subfolder="scheduler").alphas_cumprod[torch.cat(timesteps)]
        snr = alpha_bar / (1 - alpha_bar)
        assert (snr < args.snr_gamma).any() and (snr > args.snr_gamma).any(), "the draws test only one side of the clamp"
