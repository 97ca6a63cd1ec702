"""A copy of a base model whose identifier token has a distinct input embedding.

    python -m scripts.distinct_identifier --out /tmp/demo-distinct [--base assets/demo-model] [--token sks]
    python -m scripts.distinct_identifier --out /tmp/demo-inverted --learn assets/concepts/heart [--steps 300]

The bundled demo model's text encoder never trained on "sks": its embedding row is still the
random initialisation, as small as a position embedding, so the token's hidden state is mostly its
place in the prompt (docs/bypass.md). SD v1.5's CLIP did train on "sks". This copy replaces that one
row with a random direction of a trained content word's norm (0.5: "circle" 0.47, "red" 0.56, the
untrained rows about 0.23), so benchmarks can ask what a method does when the identifier is
distinct, as on a real base model (`bench.quality --base OUT`). Nothing else in the copy changes.

With `--learn DIR` the row is learned instead, by textual inversion on DIR's images (the denoising
loss of "a <token> shape" with everything frozen but that row): the first stage of pivotal tuning,
after which a tuner trains on the copy (docs/bypass.md, "The identifier"). diffusers has textual
inversion only as an example script, not as a library call, so its few lines are here.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
EMBEDDING = "embeddings.token_embedding.weight"


def _token_id(base: Path, out: Path, token: str) -> int:
    """`token`'s id in `base`'s tokenizer, once `out` is known to be new and `token` one token."""
    from transformers import CLIPTokenizer

    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder")
    ids = CLIPTokenizer.from_pretrained(base / "tokenizer").encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens for this tokenizer; the identifier must be one")
    return ids[0]


def _copy_with_row(base: Path, out: Path, token_id: int, make_row) -> tuple[float, float]:
    """Copy `base` to `out` with the text encoder's embedding row `token_id` replaced by
    `make_row(old row)`; returns the row's norm before and after."""
    weights = Path("text_encoder") / "model.safetensors"
    state = load_file(base / weights)
    key = next((k for k in state if k.endswith(EMBEDDING)), None)
    if key is None:
        raise ValueError(f"{base / weights} has no {EMBEDDING}: not a CLIP text encoder")
    table = state[key]
    before = float(table[token_id].norm())
    table[token_id] = make_row(table[token_id]).to(table.dtype)
    shutil.copytree(base, out)
    save_file(state, out / weights, metadata={"format": "pt"})
    return before, float(table[token_id].norm())


def distinct_identifier(base: Path, out: Path, token: str = "sks", norm: float = 0.5, seed: int = 0) -> dict:
    """Copy `base` to `out` (which must not exist) with `token`'s embedding row replaced; returns
    the token's id and the row's norm before and after."""
    token_id = _token_id(base, out, token)

    def random_direction(old: torch.Tensor) -> torch.Tensor:
        direction = torch.randn(old.shape[0], generator=torch.Generator().manual_seed(seed))
        return direction / direction.norm() * norm

    before, after = _copy_with_row(base, out, token_id, random_direction)
    return {"token_id": token_id, "norm_before": before, "norm_after": after}


def learned_identifier(base: Path, out: Path, images: Path, token: str = "sks", steps: int = 300, lr: float = 0.01,
                       batch_size: int = 4, seed: int = 0) -> dict:
    """Copy `base` to `out` (which must not exist) with `token`'s embedding row learned from the
    images in `images` by textual inversion; returns the token's id, the row's norm before and
    after, and the loss on one fixed batch of the images (fixed noise and time steps) before and after."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from trainers.data import DreamBoothData

    token_id = _token_id(base, out, token)
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise ValueError(f"{images} holds no images")
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, local_files_only=True)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.requires_grad_(False)
    table = pipe.text_encoder.get_input_embeddings()
    row = torch.nn.Parameter(table.weight[token_id].detach().clone())
    # the trained row put in the token's place of every looked-up embedding
    table.register_forward_hook(lambda module, inputs, found: torch.where((inputs[0] == token_id)[..., None], row, found))
    prompt = pipe.tokenizer(f"a {token} shape", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    data = DreamBoothData(files, None, pipe.unet.config.sample_size * pipe.vae_scale_factor, False, True, seed)
    optimizer = torch.optim.AdamW([row], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)

    def loss_of(batch, noise=None, t=None):
        with torch.no_grad():
            latents = pipe.vae.encode(batch["pixel_values"]).latent_dist.mode() * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator) if noise is None else noise
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator) if t is None else t
        text = pipe.text_encoder(prompt)[0].expand(len(latents), -1, -1)
        return F.mse_loss(pipe.unet(noise_scheduler.add_noise(latents, noise, t), t, text).sample, noise)

    # one fixed batch (every image at four time steps, fixed noise) measures the loss before and after
    held = data.batch(0, 4 * len(files))
    held_noise = torch.randn((4 * len(files), pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size),
                             generator=torch.Generator().manual_seed(seed + 1))
    held_t = torch.linspace(50, noise_scheduler.config.num_train_timesteps - 50, 4 * len(files)).long()
    with torch.no_grad():
        loss_before = loss_of(held, held_noise, held_t).item()
    for step in range(steps):
        loss = loss_of(data.batch((step + 1) * batch_size, batch_size))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        loss_after = loss_of(held, held_noise, held_t).item()
    before, after = _copy_with_row(base, out, token_id, lambda old: row.detach())
    return {"token_id": token_id, "norm_before": before, "norm_after": after, "loss_before": loss_before, "loss_after": loss_after}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=REPO / "assets" / "demo-model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--token", default="sks")
    parser.add_argument("--norm", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learn", type=Path, metavar="DIR", help="learn the row from DIR's images (textual inversion)")
    parser.add_argument("--steps", type=int, default=300, help="--learn: optimiser steps (batch 4)")
    parser.add_argument("--lr", type=float, default=0.01, help="--learn: learning rate")
    args = parser.parse_args(argv)
    if args.learn:
        found = learned_identifier(args.base, args.out, args.learn, args.token, args.steps, args.lr, seed=args.seed)
        print(f"textual inversion: loss on the images {found['loss_before']:.4f} before, {found['loss_after']:.4f} after")
    else:
        found = distinct_identifier(args.base, args.out, args.token, args.norm, args.seed)
    print(f"{args.out}: {args.token!r} (id {found['token_id']}) embedding norm {found['norm_before']:.3f} -> {found['norm_after']:.3f}")


if __name__ == "__main__":
    main()
