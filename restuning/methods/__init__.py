"""The one registry of methods. The trainer, the sampler, the benchmarks and the studio read it;
adding a method means adding one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import MethodConfig
from ..io import save
from . import adapter, bypass, full, lora, prefix, prompt, res_tuning
from .full import export as full_export
from .lora import export as lora_export


def save_tuner(pipeline, handle, folder: Path) -> list[tuple[str, Path]]:
    """The default artefact of a trained method: one restuning tuner file, config in its header."""
    return [("tuner", save(pipeline.unet, Path(folder) / "tuner.safetensors", handle.name))]


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    summary: str
    config: type[MethodConfig]
    attach: Callable  # (unet, config, name) -> Attached
    paper_params_m: float | None = None  # trainable parameters on SD v1.5 in the paper's Table 6
    # (pipeline, handle, folder) -> [(artifact kind, path)]: the files a trained run hands out.
    export: Callable = save_tuner
    # Trainer options this method trains best with on an SD-scale model, used where the user sets
    # none (a model folder can recommend its own: trainers.options.fill_recipe).
    recipe: dict = field(default_factory=lambda: dict(TUNER_RECIPE))


# The paper's generative setting (Table 11): AdamW, lr 1e-4, constant.
TUNER_RECIPE = {"learning_rate": 1e-4}
# Every weight moves: diffusers' DreamBooth recipe for full fine-tuning of SD v1.x.
FULL_RECIPE = {"learning_rate": 5e-6}


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


register(Method("res-tuning", "Res-Tuning", "Res-Tuners beside the frozen attention, feed-forward and block OPs (Eq. 7).",
                res_tuning.ResTuningConfig, res_tuning.attach, 2.54))
register(Method("bypass", "Res-Tuning-Bypass", "A chain of Res-Tuners beside the frozen U-Net; no gradient through the backbone (Eq. 8).",
                bypass.BypassConfig, bypass.attach, 3.76))
register(Method("lora", "LoRA", "Low-rank updates of the attention projections, through peft.",
                lora.LoraConfig, lora.attach, 9.96, export=lora_export.export))
register(Method("adapter", "Adapter", "Houlsby adapters, sequential after the feed-forward network (bound).",
                adapter.AdapterConfig, adapter.attach, 2.51))
register(Method("prefix", "Prefix", "Learned prefix keys and values inside attention (bound).",
                prefix.PrefixConfig, prefix.attach, 4.99))
register(Method("prompt", "Prompt", "Learned tokens appended to the attention's token sequence (bound).",
                prompt.PromptConfig, prompt.attach, 1.25))
register(Method("full", "Full fine-tuning", "Every U-Net weight trains.", full.FullConfig, full.attach, 862.0, export=full_export.export,
                recipe=FULL_RECIPE))


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def method_for_config(config) -> Method:
    if not isinstance(config, MethodConfig):
        raise TypeError(f"expected a restuning method config, got {type(config).__name__}")
    return get(config.method)


def config_from_dict(data: dict) -> MethodConfig:
    return get(data.get("method", "")).config.from_dict(data)
