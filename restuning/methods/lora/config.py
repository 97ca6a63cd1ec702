from dataclasses import dataclass

from ...config import MethodConfig, option
from ...core import BLOCK_GROUPS


@dataclass
class LoraConfig(MethodConfig):
    method = "lora"
    rank: int = option(4, "LoRA rank")
    alpha: int = option(4, "LoRA alpha (the update is scaled by alpha / rank)")
    blocks: tuple = option(("mid", "up"), "U-Net parts whose attention projections get LoRA", choices=BLOCK_GROUPS)
