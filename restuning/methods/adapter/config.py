from dataclasses import dataclass

from ...config import MethodConfig, option
from ...core import BLOCK_GROUPS


@dataclass
class AdapterConfig(MethodConfig):
    method = "adapter"
    ops: tuple = option(("ff",), "OPs followed by an adapter", choices=("attn1", "attn2", "ff"))
    blocks: tuple = option(("mid", "up"), "U-Net parts whose transformer blocks get adapters", choices=BLOCK_GROUPS)
    dim: int = option(10, "adapter bottleneck width")
