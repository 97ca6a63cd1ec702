"""Facts about the base model the studio trains on, read from its configs without loading
weights: the U-Net (for checking imported tuners against it) and its native resolution."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from restuning.arch import SD15_UNET_CONFIG

DEMO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
EXAMPLE_CONCEPTS = DEMO_MODEL.parent / "concepts"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class BaseModel:
    source: str  # hub id, diffusers folder or single checkpoint file, as given to the trainer
    unet_config: dict
    resolution: int  # U-Net sample size x VAE scale factor: 64 for the demo model, 512 for SD v1.5

    @property
    def is_demo(self) -> bool:
        return Path(self.source).resolve() == DEMO_MODEL

    @property
    def prompts(self) -> tuple[str, str]:
        """(instance, class) prompts to show as examples: the demo model's captions read "a shape",
        "a red circle", not photos."""
        return ("a sks shape", "a shape") if self.is_demo else ("a photo of sks star", "a photo of a star")

    @property
    def name(self) -> str:
        return "the bundled demo model" if self.is_demo else self.source

    def unet_on_meta(self):
        """A weightless U-Net of this architecture: what restuning.arch fingerprints compare to."""
        import torch
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            return UNet2DConditionModel.from_config(self.unet_config)

    def text_encoder_on_meta(self):
        """A weightless text encoder of this model: what an imported LoRA that tunes the text
        encoder too is checked against. A single SD 1.x checkpoint has SD v1.5's (the bundled configs)."""
        import torch
        from transformers import CLIPTextConfig, CLIPTextModel

        from trainers.models import SD1_CONFIG

        source = str(SD1_CONFIG) if Path(self.source).suffix in SINGLE_FILE_SUFFIXES else self.source
        config = CLIPTextConfig.from_pretrained(source, subfolder="text_encoder")
        with torch.device("meta"):
            return CLIPTextModel(config)


def describe(source: str | None) -> BaseModel:
    """Read the configs of a diffusers folder or hub id; a single SD 1.x checkpoint file has the
    SD v1.5 U-Net (every SD 1.x model shares it). Raises ValueError with a readable message."""
    source = str(source or DEMO_MODEL)
    path = Path(source)
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ValueError(f"--model {source}: no such checkpoint file")
        return BaseModel(str(path.resolve()), dict(SD15_UNET_CONFIG), 512)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if path.exists():
        source = str(path.resolve())
    try:
        unet = dict(UNet2DConditionModel.load_config(source, subfolder="unet"))
        vae = dict(AutoencoderKL.load_config(source, subfolder="vae"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model {source}: cannot read its unet/vae configs "
                         f"(a diffusers folder, a hub id available offline, or a .safetensors file): {exc}") from None
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    return BaseModel(source, unet, int(unet.get("sample_size", 64)) * scale)


def example_concepts() -> dict[str, list[str]]:
    """The bundled example concepts (assets/concepts/<shape>/*.png): shapes the demo model never
    saw, for the Train tab's "try an example" buttons."""
    if not EXAMPLE_CONCEPTS.is_dir():
        return {}
    found = {d.name: sorted(str(f) for f in d.glob("*.png")) for d in sorted(EXAMPLE_CONCEPTS.iterdir()) if d.is_dir()}
    return {name: files for name, files in found.items() if files}
