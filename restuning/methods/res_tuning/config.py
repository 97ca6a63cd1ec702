from __future__ import annotations

from dataclasses import dataclass

from ...config import MethodConfig, option
from ...core import BLOCK_GROUPS, OPS
from ...tuners import TUNER_KINDS

# Dual-Res-Tuner with adapters on MHA and FFN: the paper's best layout (Table 2b, 93.25).
DEFAULT_LAYOUT = {"attn1": "adapter", "ff": "adapter"}


@dataclass
class ResTuningConfig(MethodConfig):
    """Mix-Tuning: which Res-Tuner kind sits beside which OP of every chosen transformer block.

    Single: {"ff": "prompt"}; Dual: {"attn1": "adapter", "ff": "adapter"}; Tri adds "block".
    """

    method = "res-tuning"
    tuners: dict = option(DEFAULT_LAYOUT, "OP -> tuner kind, e.g. attn1=adapter,ff=adapter (OPs: attn1, attn2, ff, block)")
    blocks: tuple = option(("mid", "up"), "U-Net parts whose transformer blocks get tuners", choices=BLOCK_GROUPS)
    dim: int = option(10, "tuner length: adapter bottleneck, number of prefix or prompt tokens")
    heads: int = option(8, "attention heads of Res-Prefix and Res-Prompt")

    def validate(self) -> None:
        super().validate()
        if not self.tuners:
            raise ValueError("res-tuning: the layout is empty; give at least one OP=kind pair")
        for op, kind in self.tuners.items():
            if op not in OPS:
                raise ValueError(f"res-tuning: unknown OP {op!r}; choose from {', '.join(OPS)}")
            if kind not in TUNER_KINDS:
                raise ValueError(f"res-tuning: unknown tuner kind {kind!r} for {op}; choose from {', '.join(TUNER_KINDS)}")
