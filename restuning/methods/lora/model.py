"""LoRA through peft (never hand-written): low-rank updates of the attention projections of the
chosen U-Net parts, injected with diffusers' `unet.add_adapter`.
"""

from torch import nn

from ...core import BLOCK_GROUPS, AttachError, Attached, attached
from .config import LoraConfig

TARGET_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")


class LoraAttached(Attached):
    routable = False

    def __init__(self, unet: nn.Module, name: str, config: LoraConfig):
        super().__init__(name=name, config=config)
        self.unet = unet

    def parameters(self):
        return (p for n, p in self.unet.named_parameters() if f".{self.name}." in n and "lora_" in n)

    def state_dict(self):
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.unet, adapter_name=self.name)

    def load_state_dict(self, state):
        from peft.utils import set_peft_model_state_dict

        expected = self.state_dict()
        if set(expected) != set(state):
            raise ValueError(f"LoRA weights do not fit this model: {len(set(expected) - set(state))} missing, {len(set(state) - set(expected))} unexpected")
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(f"LoRA weight {key} has shape {tuple(tensor.shape)}, model expects {tuple(expected[key].shape)}")
        set_peft_model_state_dict(self.unet, state, adapter_name=self.name)

    def set_scale(self, scale):
        from peft.tuners.tuners_utils import BaseTunerLayer

        super().set_scale(scale)
        for module in self.unet.modules():
            if isinstance(module, BaseTunerLayer) and self.name in module.scaling:
                module.set_scale(self.name, self.scale)

    def detach(self):
        self.unet.delete_adapters(self.name)
        _activate_all(self.unet, exclude=self.name)


def _activate_all(unet: nn.Module, exclude: str | None = None) -> None:
    """Keep every attached LoRA active at once; each one's strength is its scale.

    peft activates only the newest adapter by default (and another one when an active adapter
    is deleted), which would silently switch off LoRAs attached earlier.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [n for n, a in attached(unet).items() if isinstance(a, LoraAttached) and n != exclude]
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter([n for n in names if n in module.lora_A])


def attach(unet: nn.Module, config: LoraConfig, name: str) -> Attached:
    from peft import LoraConfig as PeftLoraConfig

    from peft.tuners.tuners_utils import BaseTunerLayer

    prefixes = tuple(BLOCK_GROUPS[g] for g in config.blocks)
    # A projection that already carries another LoRA is peft's wrapper, not an nn.Linear.
    targets = [
        n for n, m in unet.named_modules()
        if n.startswith(prefixes) and n.endswith(TARGET_SUFFIXES) and isinstance(m, (nn.Linear, BaseTunerLayer))
    ]
    if not targets:
        raise AttachError(f"no attention projections found in {', '.join(config.blocks)}")
    peft_config = PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian", target_modules=targets)
    unet.add_adapter(peft_config, adapter_name=name)
    handle = LoraAttached(unet, name, config)
    attached(unet)[name] = handle  # so that _activate_all sees it; attach() stores it again
    _activate_all(unet)
    return handle
