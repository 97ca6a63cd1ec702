"""LoRA's artefacts, in the two formats other tools load:

- diffusers: `pytorch_lora_weights.safetensors` (keys `unet.<path>.lora_A.weight`, and
  `text_encoder.<path>.lora_linear_layer.down.weight` (SDXL: `text_encoder_2.` too) when the text
  encoders were tuned, as diffusers' train_dreambooth_lora.py and train_dreambooth_lora_sdxl.py
  write them; the peft configs in the header so alpha survives), loaded by
  `pipe.load_lora_weights(folder)`;
- kohya / AUTOMATIC1111 / ComfyUI: `lora_kohya.safetensors` (keys `lora_unet_<path>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; `lora_te_text_model_<path>…` for the text encoder), converted by
  diffusers' `convert_state_dict_to_kohya`. On SDXL the U-Net's paths are the original (SGM)
  U-Net's, `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, and the text encoders
  `lora_te1_…` / `lora_te2_…`, as kohya's sd-scripts write SDXL LoRAs;
- restuning: `tuner.safetensors`, like every other method.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...arch import family
from ...io import save
from .model import lora_state

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
KOHYA_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # sd-scripts' ss_base_model_version


def export(pipeline, handle, folder: Path) -> list[tuple[str, Path]]:
    folder = Path(folder)
    unet = pipeline.unet

    def peft_state(model):
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state(model, handle.name).items()}

    unet_state = peft_state(unet)
    texts = {attr: (model, peft_state(model)) for attr, model in handle.text_encoders()}
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as tmp:
        _write_diffusers(Path(tmp), unet, unet_state, texts, handle)
        os.replace(Path(tmp) / DIFFUSERS_FILE, folder / DIFFUSERS_FILE)
        _write_kohya(Path(tmp) / KOHYA_FILE, unet, unet_state, texts, handle)
        os.replace(Path(tmp) / KOHYA_FILE, folder / KOHYA_FILE)
    # The restuning file too, so the studio's compare view and the benchmarks load every method
    # the same way (restuning.load), with its config in the header.
    tuner = save(unet, folder / "tuner.safetensors", handle.name)
    return [("lora-diffusers", folder / DIFFUSERS_FILE), ("lora-kohya", folder / KOHYA_FILE), ("tuner", tuner)]


def _write_diffusers(folder: Path, unet, unet_state: dict, texts: dict, handle) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    pipeline_class = StableDiffusionXLPipeline if family(unet.config) == "sdxl" else StableDiffusionPipeline
    extra = {}
    for attr, (model, state) in texts.items():
        if state:
            extra[f"{attr}_lora_layers"] = convert_state_dict_to_diffusers(state)
            extra[f"{attr}_lora_adapter_metadata"] = model.peft_config[handle.name].to_dict()
    pipeline_class.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(unet_state),
                                     unet_lora_adapter_metadata=unet.peft_config[handle.name].to_dict(),
                                     safe_serialization=True, **extra)


def _write_kohya(path: Path, unet, unet_state: dict, texts: dict, handle) -> None:
    from diffusers.utils import convert_state_dict_to_kohya

    xl = family(unet.config) == "sdxl"
    named = {f"unet.{sgm_path(k, unet.config) if xl else k}": v for k, v in unet_state.items()}
    for attr, (model, state) in texts.items():
        # transformers 5's CLIPTextModel has no `text_model.` level, but kohya's names keep it
        # (lora_te_text_model_encoder_…): AUTOMATIC1111 and ComfyUI look layers up by those names.
        prefix = f"{attr}.text_model." if not hasattr(model, "text_model") else f"{attr}."
        named.update({prefix + k: v for k, v in state.items()})
    kohya = convert_state_dict_to_kohya(named)
    if not xl:
        # diffusers names the text encoder `lora_te1_`, SDXL's first one's name; SD 1.x/2.x tools read `lora_te_`.
        kohya = {"lora_te_" + k.removeprefix("lora_te1_") if k.startswith("lora_te1_") else k: v for k, v in kohya.items()}
    # diffusers writes alpha = rank, right only when alpha == rank; the update is scaled by
    # alpha / rank, so store the alpha this LoRA was trained with.
    for key in kohya:
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(float(handle.config.alpha))
    info = {"ss_network_module": "networks.lora", "ss_network_dim": str(handle.config.rank),
            "ss_network_alpha": str(handle.config.alpha), "ss_base_model_version": KOHYA_BASE_VERSION[family(unet.config)]}
    save_file(kohya, str(path), metadata=info)


_CONV = re.compile(r"^conv(?=\.|$)")
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)$")


def sgm_path(key: str, config) -> str:
    """The original (SGM) U-Net's name of a diffusers U-Net weight path: down_blocks.b.attentions.j ->
    input_blocks.(b·(L+1) + j + 1).1, mid_block.attentions.0 -> middle_block.1, up_blocks.b.attentions.j
    -> output_blocks.(b·(L+1) + j).1, with L the layers per block (resnets in slot 0; down/upsamplers
    last in their level). It inverts diffusers' `_maybe_map_sgm_blocks_to_diffusers`, which only maps
    the other way (kohya's SDXL LoRAs use these names; diffusers' own SDXL script writes its own)."""
    per = config["layers_per_block"] + 1
    found = _BLOCK.match(key)
    if found:
        part, b, kind, j, rest = found.groups()
        b, j = int(b), int(j)
        if part == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{(b + 1) * per}.0.{_CONV.sub('op', rest)}"  # SGM's downsampler is a conv named op
            return f"input_blocks.{b * per + j + 1}.{0 if kind == 'resnets' else 1}.{rest}"
        if kind == "upsamplers":  # after the block's resnet and, where it has them, attention
            return f"output_blocks.{b * per + per - 1}.{2 if 'CrossAttn' in config['up_block_types'][b] else 1}.{rest}"
        return f"output_blocks.{b * per + j}.{0 if kind == 'resnets' else 1}.{rest}"
    for diffusers_name, index in (("mid_block.resnets.0.", "0"), ("mid_block.attentions.0.", "1"), ("mid_block.resnets.1.", "2")):
        if key.startswith(diffusers_name):
            return f"middle_block.{index}.{key[len(diffusers_name):]}"
    raise ValueError(f"{key}: not a layer inside the U-Net's down, mid or up blocks")
