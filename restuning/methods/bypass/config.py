from __future__ import annotations

from dataclasses import dataclass

from ...config import ConfigError, MethodConfig, option
from ...tuners import TUNER_KINDS

TAP_GROUPS = ("mid", "up")


@dataclass
class BypassConfig(MethodConfig):
    """Res-Tuning-Bypass (Section 3.2, Eq. 8): a chain of Res-Tuners beside the frozen U-Net.

    The defaults (adapters of width 128 at the mid block and the four up blocks) put about
    3.5M parameters (0.41% of SD v1.5) in the bypass, near the paper's 3.76M (0.44%).
    """

    method = "bypass"
    horizontal: str = option("adapter", "Res-Tuner reading the backbone's feature at each tap", choices=TUNER_KINDS)
    vertical: str = option("adapter", "Res-Tuner carrying the bypass state from one tap to the next", choices=TUNER_KINDS)
    taps: tuple = option(TAP_GROUPS, "U-Net parts whose block outputs feed the bypass (mid_block, every up block)", choices=TAP_GROUPS)
    dim: int = option(128, "tuner length: adapter bottleneck, number of prefix or prompt tokens")
    heads: int = option(8, "attention heads of Res-Prefix and Res-Prompt")

    def validate(self) -> None:
        super().validate()
        if "up" not in self.taps:
            raise ConfigError("bypass: taps must include 'up': the last up block's output is what the bypass corrects")
