from dataclasses import dataclass

from ...config import MethodConfig, option
from ...core import BLOCK_GROUPS


@dataclass
class PrefixConfig(MethodConfig):
    method = "prefix"
    ops: tuple = option(("attn1",), "attentions that get learned prefix keys and values", choices=("attn1", "attn2"))
    blocks: tuple = option(("mid", "up"), "U-Net parts whose transformer blocks get prefixes", choices=BLOCK_GROUPS)
    dim: int = option(10, "number of prefix tokens")
