from dataclasses import dataclass

from ...config import MethodConfig, option
from ...core import BLOCK_GROUPS


@dataclass
class PromptConfig(MethodConfig):
    method = "prompt"
    ops: tuple = option(("attn1",), "attentions whose token sequence gets learned prompt tokens", choices=("attn1", "attn2"))
    blocks: tuple = option(("mid", "up"), "U-Net parts whose transformer blocks get prompts", choices=BLOCK_GROUPS)
    dim: int = option(10, "number of prompt tokens")
