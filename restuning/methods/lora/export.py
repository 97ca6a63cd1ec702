"""LoRA's artefacts, in the two formats other tools load:

- diffusers: `pytorch_lora_weights.safetensors` (keys `unet.<path>.lora_A.weight`, and
  `text_encoder.<path>.lora_linear_layer.down.weight` when the text encoder was tuned, as diffusers'
  train_dreambooth_lora.py writes them; the peft configs in the header so alpha survives), loaded by
  `pipe.load_lora_weights(folder)`;
- kohya / AUTOMATIC1111 / ComfyUI: `lora_kohya.safetensors` (keys `lora_unet_<path>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; `lora_te_text_model_<path>…` for the text encoder), converted by
  diffusers' `convert_state_dict_to_kohya`;
- restuning: `tuner.safetensors`, like every other method.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...io import save
from .model import lora_state

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"


def export(pipeline, handle, folder: Path) -> list[tuple[str, Path]]:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    folder = Path(folder)
    unet, text_encoder = pipeline.unet, handle.text_encoder

    def peft_state(model):
        return {k: v.detach().to("cpu", torch.float32).contiguous()
                for k, v in lora_state(model, handle.name).items()}

    unet_state = peft_state(unet)
    text_state = peft_state(text_encoder) if text_encoder is not None else {}
    text = {"text_encoder_lora_layers": convert_state_dict_to_diffusers(text_state),
            "text_encoder_lora_adapter_metadata": text_encoder.peft_config[handle.name].to_dict()} if text_state else {}

    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=convert_state_dict_to_diffusers(unet_state),
                                                  unet_lora_adapter_metadata=unet.peft_config[handle.name].to_dict(),
                                                  safe_serialization=True, **text)
        os.replace(Path(tmp) / DIFFUSERS_FILE, folder / DIFFUSERS_FILE)

        # transformers 5's CLIPTextModel has no `text_model.` level, but kohya's SD 1.x names keep it
        # (lora_te_text_model_encoder_…): AUTOMATIC1111 and ComfyUI look layers up by those names.
        flat = text_encoder is not None and not hasattr(text_encoder, "text_model")
        text_prefix = "text_encoder.text_model." if flat else "text_encoder."
        kohya = convert_state_dict_to_kohya({**{f"unet.{k}": v for k, v in unet_state.items()},
                                             **{text_prefix + k: v for k, v in text_state.items()}})
        # diffusers names the text encoder of SD 1.x `lora_te1_`, SDXL's first one; SD 1.x tools read `lora_te_`.
        kohya = {"lora_te_" + k.removeprefix("lora_te1_") if k.startswith("lora_te1_") else k: v for k, v in kohya.items()}
        # diffusers writes alpha = rank, right only when alpha == rank; the update is scaled by
        # alpha / rank, so store the alpha this LoRA was trained with.
        for key in kohya:
            if key.endswith(".alpha"):
                kohya[key] = torch.tensor(float(handle.config.alpha))
        info = {"ss_network_module": "networks.lora", "ss_network_dim": str(handle.config.rank),
                "ss_network_alpha": str(handle.config.alpha), "ss_base_model_version": "sd_v1"}
        save_file(kohya, str(Path(tmp) / KOHYA_FILE), metadata=info)
        os.replace(Path(tmp) / KOHYA_FILE, folder / KOHYA_FILE)
    # The restuning file too, so the studio's compare view and the benchmarks load every method
    # the same way (restuning.load), with its config in the header.
    tuner = save(unet, folder / "tuner.safetensors", handle.name)
    return [("lora-diffusers", folder / DIFFUSERS_FILE), ("lora-kohya", folder / KOHYA_FILE), ("tuner", tuner)]


