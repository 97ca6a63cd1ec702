"""Facts about the base model the studio trains on, read from its configs without loading
weights: its family (SD 1.x, 2.x, XL), the U-Net and text encoders (for checking imported tuners
against them) and its native resolution."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from restuning.arch import FAMILIES, family

DEMO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
EXAMPLE_CONCEPTS = DEMO_MODEL.parent / "concepts"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
SETTINGS_FILE = "demo_settings.json"  # a model folder's recommended settings (webui.pipeline reads its sampling)
PHOTO_PROMPTS = ("a photo of sks star", "a photo of a star")  # examples for a model trained on photos


@dataclass
class BaseModel:
    source: str  # hub id, diffusers folder or single checkpoint file, as given to the trainer
    unet_config: dict
    resolution: int  # U-Net sample size x VAE scale factor: 64 for the demo model, 512 / 768 / 1024 for SD v1.5 / 2.1 / XL
    config_source: str = ""  # where the component configs are read: the source, or a single file's bundled configs

    @property
    def family(self) -> str:
        """sd1, sd2 or sdxl (restuning.arch.family)."""
        return family(self.unet_config)

    @property
    def family_label(self) -> str:
        return FAMILIES[self.family]

    @property
    def is_demo(self) -> bool:
        return Path(self.source).resolve() == DEMO_MODEL

    @property
    def prompts(self) -> tuple[str, str]:
        """(instance, class) prompts to show as examples, in the words the model was trained on: a
        model folder's demo_settings.json names them ("prompts"; the demo model's captions read
        "a shape", not photos), else PHOTO_PROMPTS."""
        try:
            named = json.loads((Path(self.source) / SETTINGS_FILE).read_text(encoding="utf-8"))["prompts"]
            instance, class_prompt = named["instance"], named["class"]
        except (OSError, ValueError, KeyError, TypeError):
            return PHOTO_PROMPTS
        if isinstance(instance, str) and isinstance(class_prompt, str) and instance.strip() and class_prompt.strip():
            return instance, class_prompt
        return PHOTO_PROMPTS

    @property
    def name(self) -> str:
        return source_name(self.source)

    @property
    def label(self) -> str:
        """Its name and family, as the Train form lists it: "v1-5-pruned.safetensors (SD 1.x)"."""
        return model_label(self.name, self.family)

    def unet_on_meta(self):
        """A weightless U-Net of this architecture: what restuning.arch fingerprints compare to."""
        import torch
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            return UNet2DConditionModel.from_config(self.unet_config)

    def text_encoders_on_meta(self) -> dict:
        """Weightless text encoders of this model by pipeline attribute (SDXL has two): what an
        imported LoRA that tunes them too is checked against."""
        import torch
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        parts = {"text_encoder": CLIPTextModel}
        if self.family == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection
        out = {}
        for name, cls in parts.items():
            config = CLIPTextConfig.from_pretrained(self.config_source or self.source, subfolder=name)
            with torch.device("meta"):
                out[name] = cls(config)
        return out


    def tokenizers(self) -> dict:
        """This model's tokenizers by pipeline attribute (SDXL has two): what finds an imported
        Res-Tuning tuner's identifier among the tokens."""
        from transformers import CLIPTokenizer

        names = ["tokenizer"] + (["tokenizer_2"] if self.family == "sdxl" else [])
        return {name: CLIPTokenizer.from_pretrained(self.config_source or self.source, subfolder=name) for name in names}


def source_name(source: str) -> str:
    """What a page calls a base model: never a server path, only a folder's or file's own name, or the hub id."""
    if Path(source).resolve() == DEMO_MODEL:
        return "the bundled demo model"
    return Path(source).name if Path(source).is_absolute() else source


def model_label(name: str, family_name: str) -> str:
    return f"{name} ({FAMILIES.get(family_name, family_name)})"


def describe(source: str | None) -> BaseModel:
    """Read the configs of a diffusers folder or hub id; a single checkpoint file has its family's
    published configs (assets/sd-configs, as the trainer converts it). Raises ValueError with a
    readable message."""
    from trainers.models import CONFIGS, FAMILIES as FILE_FAMILIES, ModelError, single_file_family

    source = str(source or DEMO_MODEL)
    path = Path(source)
    config_source = source
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ValueError(f"--model {source}: no such checkpoint file")
        try:
            kind = single_file_family(path)
        except ModelError as exc:
            raise ValueError(f"--model {source}: {exc}") from None
        if kind not in CONFIGS:
            raise ValueError(f"--model {source}: {FILE_FAMILIES[kind]}")
        source, config_source = str(path.resolve()), str(CONFIGS[kind])
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if path.exists() and path.is_dir():
        source = config_source = str(path.resolve())
    try:
        unet = dict(UNet2DConditionModel.load_config(config_source, subfolder="unet"))
        vae = dict(AutoencoderKL.load_config(config_source, subfolder="vae"))
    except (OSError, ValueError) as exc:
        from trainers.models import HUB_ID, hub_offline

        offline = hub_offline(source, exc) if not path.exists() and HUB_ID.match(source) else None
        if offline:
            raise ValueError(f"--model {source}: {offline}") from None
        raise ValueError(f"--model {source}: cannot read its unet/vae configs "
                         f"(a diffusers folder, a hub id available offline, or a .safetensors file): {exc}") from None
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    return BaseModel(source, unet, int(unet.get("sample_size", 64)) * scale, config_source)


def example_concepts() -> dict[str, list[str]]:
    """The bundled example concepts (assets/concepts/<shape>/*.png): shapes the demo model never
    saw, for the Train tab's "try an example" buttons."""
    if not EXAMPLE_CONCEPTS.is_dir():
        return {}
    found = {d.name: sorted(str(f) for f in d.glob("*.png")) for d in sorted(EXAMPLE_CONCEPTS.iterdir()) if d.is_dir()}
    return {name: files for name, files in found.items() if files}
