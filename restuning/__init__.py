"""restuning: Res-Tuning and Res-Tuning-Bypass for diffusers U-Nets.

    import restuning
    restuning.attach(pipe, restuning.ResTuningConfig(identifier="sks"))  # freeze the backbone, add Res-Tuners
    restuning.save(pipe, "tuner.safetensors")             # weights + config in one file
    restuning.load(pipe, "tuner.safetensors")             # attach + load, config read from the file
    restuning.load(pipe, "lora.safetensors")              # a diffusers or kohya LoRA too
    restuning.set_scale(unet, 0.7)                        # 0 gives exactly the base model
    restuning.detach(unet)                                # the untouched base model again
"""

from .api import attach, load, read_config
from .config import ConfigError, MethodConfig
from .core import AttachError, attached, detach, route, set_scale, trainable_parameters
from .io import TunerFileError, read_header, save
from .methods import METHODS, config_from_dict
from .methods.adapter import AdapterConfig
from .methods.bypass import BypassConfig, bypass_outputs
from .methods.full import FullConfig
from .methods.lora import LoraConfig
from .methods.prefix import PrefixConfig
from .methods.prompt import PromptConfig
from .methods.res_tuning import ResTuningConfig

__all__ = [
    "METHODS",
    "AdapterConfig",
    "AttachError",
    "BypassConfig",
    "ConfigError",
    "FullConfig",
    "LoraConfig",
    "MethodConfig",
    "PrefixConfig",
    "PromptConfig",
    "ResTuningConfig",
    "TunerFileError",
    "attach",
    "attached",
    "bypass_outputs",
    "config_from_dict",
    "detach",
    "load",
    "read_config",
    "read_header",
    "route",
    "save",
    "set_scale",
    "trainable_parameters",
]
