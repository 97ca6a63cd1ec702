"""What the U-Net is conditioned on in training besides the noisy latent, per family.

- SD 1.x / 2.x: the prompt's text embedding (the text encoder's last hidden state), the U-Net's
  `encoder_hidden_states`.
- SDXL: the penultimate hidden states of both text encoders side by side (77 x 2048), and in
  `added_cond_kwargs` the pooled, projected embedding of the second encoder (`text_embeds`) and six
  numbers per image (`time_ids`): its original (height, width) before resizing, the top-left corner
  of the crop taken, and the target (height, width) — SDXL's size and crop "micro-conditioning", as
  diffusers' train_dreambooth_lora_sdxl.py computes them. That script gives a class image the
  instance image's numbers; here each image has its own.

A frozen text encoder's embeddings are computed once; a text encoder whose LoRA trains encodes
the (pre-tokenised) prompt every step.

Off- and on-concept prompts (a Bypass's off-concept loss): prompts that do not name the concept,
built from the tokenizer's own vocabulary so that nothing about the evaluation's prompts is
assumed: random words, the class prompt with random words inserted, the instance prompt with its
identifier (its words the class prompt lacks) replaced by a random word, and the empty prompt
(classifier-free guidance's); and prompts that do name it: the instance prompt with random words
inserted. Encoded once by prompt_encoders, as a frozen encoder's prompts are.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class Text:
    """One prompt's conditioning."""

    hidden: Tensor  # (1, tokens, width): encoder_hidden_states
    pooled: Tensor | None = None  # (1, width): SDXL's text_embeds; None for SD 1.x / 2.x


def is_xl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def family(pipe) -> str:
    """sd1, sd2 or sdxl of a loaded pipeline."""
    from restuning.arch import family as unet_family

    return "sdxl" if is_xl(pipe) else unet_family(pipe.unet.config)


def text_encoders(pipe) -> dict:
    """The pipeline's text encoders by attribute name (SDXL has two)."""
    return {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}


def prompt_encoders(pipe, prompts: list[str], device, *, max_length: int | None = None, use_attention_mask: bool = False,
                    trained: dict | None = None) -> list[Callable[[], Text]]:
    """Each prompt's conditioning as a call. `trained`: the text encoders whose LoRA trains, as
    accelerate prepared them (by attribute name), run every call; without, the embeddings are
    computed once here (no grad) and handed out every step."""
    if is_xl(pipe):
        calls = [_sdxl_encoder(pipe, prompt, device, trained) for prompt in prompts]
    else:
        encoder = (trained or {}).get("text_encoder", pipe.text_encoder)
        calls = [_sd_encoder(pipe, prompt, device, encoder, max_length, use_attention_mask) for prompt in prompts]
    if trained:
        return calls
    with torch.no_grad():
        frozen = [call() for call in calls]
    return [lambda t=t: t for t in frozen]


def _sd_encoder(pipe, prompt: str, device, encoder, max_length: int | None, use_attention_mask: bool) -> Callable[[], Text]:
    tokens = pipe.tokenizer(prompt, padding="max_length", max_length=max_length or pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    ids = tokens.input_ids.to(device)
    mask = tokens.attention_mask.to(device) if use_attention_mask else None
    return lambda: Text(encoder(ids, attention_mask=mask)[0])


def _sdxl_encoder(pipe, prompt: str, device, trained: dict | None) -> Callable[[], Text]:
    if not trained:
        def frozen() -> Text:
            hidden, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            return Text(hidden, pooled)

        return frozen
    # The pipeline's encode_prompt runs its own (unprepared) encoders; a training LoRA's must run as
    # accelerate prepared them (wrapped under several processes, so that their gradients are
    # synchronised). So the few lines of train_dreambooth_lora_sdxl.py's encode_prompt, on the
    # prepared encoders: penultimate hidden states side by side, the second encoder's projection pooled.
    encoders = [trained.get(name, model) for name, model in text_encoders(pipe).items()]
    ids = [tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)
           for tok in (pipe.tokenizer, pipe.tokenizer_2)]

    def encode() -> Text:
        outs = [encoder(i, output_hidden_states=True) for encoder, i in zip(encoders, ids)]
        return Text(torch.cat([o.hidden_states[-2] for o in outs], dim=-1), outs[-1][0])

    return encode


def size_ids(pipe, dataset, views, device) -> Tensor:
    """(batch, 6) SDXL time ids of the batch's views: original size, crop top-left, target size,
    through the pipeline's own _get_add_time_ids (which checks them against the U-Net's embedding)."""
    r = dataset.resolution
    rows = [pipe._get_add_time_ids(dataset.original_size(v.path), dataset.crop_top_left(v), (r, r), dtype=torch.float32,
                                   text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim) for v in views]
    return torch.cat(rows).to(device)


def unet_inputs(pipe, texts: list[Text], batch: dict, dataset, device) -> tuple[Tensor, dict | None]:
    """(encoder_hidden_states, added_cond_kwargs or None) of a batch: instance samples, then class
    samples, each prompt's conditioning repeated over its samples."""
    bs = batch["num_instance"]
    hidden = torch.cat([t.hidden.expand(bs, -1, -1) for t in texts])
    if texts[0].pooled is None:
        return hidden, None
    pooled = torch.cat([t.pooled.expand(bs, -1) for t in texts])
    return hidden, {"text_embeds": pooled, "time_ids": size_ids(pipe, dataset, batch["views"], device)}


OFF_CONCEPT_PROMPTS = 256  # encoded once: 60 MB of SD v1.5 embeddings, 160 MB of SDXL's
OFF_CONCEPT_ROWS = 2  # samples Res-Tuning's off-concept loss adds to each training step


def concept_prompts(tokenizer, instance_prompt: str, class_prompt: str | None, count: int, seed: int) -> tuple[list[str], list[str]]:
    """(`count` prompts that do not name the concept of `instance_prompt`, `count` that do). Its
    identifier is the words it has and `class_prompt` lacks; without a class prompt every word of
    the instance prompt is kept out of the random words, as any of them could be the identifier."""
    instance = instance_prompt.split()
    kept_out = {w.lower() for w in instance} - ({w.lower() for w in class_prompt.split()} if class_prompt else set())
    words = sorted({t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>") and t[:-4].isalpha() and len(t) > 6}
                   - {w.lower() for w in instance})
    if not words:  # a vocabulary of pieces only (a test's): the empty and the class prompt are what it has
        off = [""] + ([class_prompt] if class_prompt else [])
        return [off[i % len(off)] for i in range(count)], [instance_prompt] * count
    rng = random.Random(seed)

    def salted(base: list[str], least: int = 0) -> str:
        out = list(base)
        for _ in range(rng.randint(least, 4)):
            out.insert(rng.randint(0, len(out)), rng.choice(words))
        return " ".join(out)

    kinds = ["random"] + (["class"] if class_prompt else []) + (["swapped"] if class_prompt and kept_out else [])
    off = [""]
    while len(off) < count:
        kind = kinds[len(off) % len(kinds)]
        if kind == "random":
            off.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))))
        elif kind == "class":
            off.append(salted(class_prompt.split()))
        else:
            off.append(salted([rng.choice(words) if w.lower() in kept_out else w for w in instance]))
    return off, [salted(instance, least=1) for _ in range(count)]
