from .config import LoraConfig
from .model import LoraAttached, attach

__all__ = ["LoraAttached", "LoraConfig", "attach"]
