from __future__ import annotations

from dataclasses import dataclass

from ...config import ConfigError, MethodConfig, option
from .layer import KINDS, OUTPUTS

GRADIENTS = ("exact", "skip-attention", "skip-path")

TAP_GROUPS = ("mid", "up")


@dataclass
class BypassConfig(MethodConfig):
    """Res-Tuning-Bypass (Section 3.2, Eq. 8): a chain of Res-Tuners beside the frozen U-Net.

    The defaults (Convpass and text tuners of width 32, the correction entering the input of the
    second-to-last up block) put 3.0M parameters (0.35% of SD v1.5) in the bypass, near the
    paper's 3.76M (0.44%). Why depth 2 and not the paper's head: docs/bypass.md.
    """

    method = "bypass"
    horizontal: str = option("convpass", "Res-Tuner reading the backbone's feature at each tap", choices=KINDS)
    vertical: str = option("convpass", "Res-Tuner carrying the bypass state from one tap to the next", choices=KINDS)
    taps: tuple = option(TAP_GROUPS, "U-Net parts whose block outputs feed the bypass (mid_block, the up blocks before the injection point)",
                         choices=TAP_GROUPS)
    dim: int = option(32, "tuner width: Convpass and adapter bottleneck, number of prefix or prompt tokens")
    heads: int = option(8, "attention heads of Res-Prefix, Res-Prompt and the text tuners")
    text: bool = option(True, "a cross-attention Res-Tuner at each tap that reads the prompt's (detached) text embeddings")
    output: str = option("zero-conv", "how the bypass state becomes the correction: 'zero-conv' Δ = Z(SiLU(GN(x_L^b))), Z a "
                         "zero-initialised conv; 'gate' g ⊙ (x_L^b − x_L); 'modulate' x_L·γ + β, [γ; β] from Z; "
                         "'rearrange' attention that moves x_L's own features (the last three: ablation rows)", choices=OUTPUTS)
    depth: int = option(2, "where Δ enters: 0 the head's input (the paper's: no backbone block in the backward); k the input of the k-th up "
                        "block from the end, so the last k frozen up blocks render the correction and keep their activations for "
                        "backward (more memory and time; no weight gradients)")
    gradient: str = option("exact", "how training reaches a bypass at depth k > 0: 'exact' through the frozen blocks after it; "
                           "'skip-attention' with their attention blocks' Jacobian taken as the identity (their activations not kept); "
                           "'skip-path' along their linear skip path only (the last two: ablation rows)", choices=GRADIENTS)
    into: str = option("input", "'input': Δ joins the input of the injection point; 'noise': the U-Net's output (depth 0; an ablation row)",
                       choices=("input", "noise"))
    time: str = option("none", "FiLM of the U-Net's time embedding on the output ('out') or on every stage too ('all'); an ablation row",
                       choices=("none", "out", "all"))
    refine: int = option(0, "residual Convpass blocks (with text tuners) after the chain, at the output's resolution; an ablation row")
    trigger: bool = option(False, "scale the correction by a gate on the prompt's most concept-like token (needs text)")
    off_concept_loss: float = option(0.0, "weight of the trainer's off-concept loss: the correction held at zero for prompts that "
                                     "do not name the concept (random vocabulary prompts, the class prompt, the empty prompt) and "
                                     "the same for prompts naming it among other words (needs text; an ablation row, 0: off)")
    readouts: bool = option(False, "every stage's state reaches Δ through its own zero-initialised read-out; an ablation row")

    def validate(self) -> None:
        super().validate()
        if "up" not in self.taps and self.depth == 0:
            raise ConfigError("bypass: taps must include 'up' at depth 0: the last up block's output is what the bypass corrects")
        if self.depth < 0:
            raise ConfigError(f"bypass: depth must be 0 (the head) or a number of up blocks, got {self.depth}")
        if self.into == "noise" and (self.depth or self.output not in ("zero-conv",)):
            raise ConfigError("bypass: into='noise' needs depth 0 and the zero-conv output (the correction is added to the predicted noise)")
        if self.gradient != "exact" and not self.depth:
            raise ConfigError(f"bypass: gradient={self.gradient!r} needs depth > 0 (at the head no frozen block follows the injection)")
        if not 0 <= self.off_concept_loss <= 100:
            raise ConfigError(f"bypass: off_concept_loss must be between 0 and 100, got {self.off_concept_loss}")
        if self.off_concept_loss and not self.text:
            raise ConfigError("bypass: off_concept_loss needs text=true (the loss acts on how the correction reads the prompt)")
        if self.refine < 0:
            raise ConfigError(f"bypass: refine must be 0 or more, got {self.refine}")
