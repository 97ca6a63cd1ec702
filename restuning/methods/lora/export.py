"""LoRA's artefacts, in the two formats other tools load:

- diffusers: `pytorch_lora_weights.safetensors` (keys `unet.<path>.lora_A.weight`, the peft config
  in the header so alpha survives), loaded by `pipe.load_lora_weights(folder)`;
- kohya / AUTOMATIC1111 / ComfyUI: `lora_kohya.safetensors` (keys `lora_unet_<path>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`), converted by diffusers' `convert_state_dict_to_kohya`;
- restuning: `tuner.safetensors`, like every other method.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...io import save

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"


def export(pipeline, handle, folder: Path) -> list[tuple[str, Path]]:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    unet = pipeline.unet
    peft_state = {k: v.detach().to("cpu", torch.float32).contiguous()
                  for k, v in get_peft_model_state_dict(unet, adapter_name=handle.name).items()}
    metadata = unet.peft_config[handle.name].to_dict()

    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=convert_state_dict_to_diffusers(peft_state),
                                                  unet_lora_adapter_metadata=metadata, safe_serialization=True)
        os.replace(Path(tmp) / DIFFUSERS_FILE, folder / DIFFUSERS_FILE)

        kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
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


