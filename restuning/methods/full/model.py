"""Full fine-tuning: every U-Net weight trains. Kept in the registry so that every consumer (the
trainer, the benchmarks, the studio) treats it like the other methods.
"""

from torch import nn

from ...core import AttachError, Attached
from .config import FullConfig


class FullAttached(Attached):
    routable = False

    def __init__(self, unet: nn.Module, name: str, config: FullConfig):
        super().__init__(name=name, config=config)
        self.unet = unet

    def parameters(self):
        return self.unet.parameters()

    def state_dict(self):
        return {k: v for k, v in self.unet.state_dict().items()}

    def load_state_dict(self, state):
        self.unet.load_state_dict(state, strict=True)

    def set_scale(self, scale):
        if float(scale) != 1.0:
            raise AttachError("full fine-tuning has no strength to set: its weights are the model")

    def detach(self):
        raise AttachError("full fine-tuning changed the U-Net's own weights; load the base model again to undo it")


def attach(unet: nn.Module, config: FullConfig, name: str) -> Attached:
    unet.requires_grad_(True)
    return FullAttached(unet, name, config)
