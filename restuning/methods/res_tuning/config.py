from __future__ import annotations

from dataclasses import dataclass

from ...config import ConfigError, MethodConfig, option
from ...core import BLOCK_GROUPS, OPS
from ...tuners import TUNER_KINDS

# The layout that learned a concept best on the demo model (docs/benchmarks.md, "Res-Tuning: what
# makes it learn"): the paper's Tri-Res-Tuner, adapters beside MHA, FFN and the whole block.
# Convolutional Res-Adapters beside the ResNet blocks ("resnet") are an option: at the example's
# recipe they added no concept fidelity, cost preservation and a fifth of the step.
DEFAULT_LAYOUT = {"attn1": "adapter", "ff": "adapter", "block": "adapter"}
# The paper's best layout for classification (Dual, Table 2b, 93.25): one of the forms kept as options.
DUAL_LAYOUT = {"attn1": "adapter", "ff": "adapter"}


@dataclass
class ResTuningConfig(MethodConfig):
    """Mix-Tuning: which Res-Tuner kind sits beside which OP of every chosen block.

    Single: {"ff": "prompt"}; Dual: {"attn1": "adapter", "ff": "adapter"}; Tri adds "block";
    "resnet" puts a convolutional Res-Adapter beside each ResNet block.
    """

    method = "res-tuning"
    tuners: dict = option(DEFAULT_LAYOUT, "OP -> tuner kind, e.g. attn1=adapter,ff=adapter (OPs: attn1, attn2, ff, block, resnet; "
                                          "beside resnet only adapter)")
    blocks: tuple = option(("down", "mid", "up"), "U-Net parts whose blocks get tuners", choices=BLOCK_GROUPS)
    dim: int = option(32, "tuner length: adapter bottleneck, number of prefix or prompt tokens")
    resnet_dim: int = option(16, "bottleneck of the convolutional Res-Adapters beside the ResNet blocks (the resnet OP)")
    heads: int = option(8, "attention heads of Res-Prefix and Res-Prompt")
    identifier: str = option("auto", "the concept's word(s) whose input embedding trains with the tuners (pivotal tuning); "
                                     "'auto': the trainer takes the instance prompt's words its class prompt lacks; '': none")
    off_concept_loss: float = option(0.1, "weight of the trainer's off-concept loss: on prompts that do not name the concept "
                                          "the tuned U-Net's prediction is held to the frozen one's; 0: off")

    def validate(self) -> None:
        super().validate()
        if not self.tuners:
            raise ConfigError("res-tuning: the layout is empty; give at least one OP=kind pair")
        for op, kind in self.tuners.items():
            if op not in OPS:
                raise ConfigError(f"res-tuning: unknown OP {op!r}; choose from {', '.join(OPS)}")
            if kind not in TUNER_KINDS:
                raise ConfigError(f"res-tuning: unknown tuner kind {kind!r} for {op}; choose from {', '.join(TUNER_KINDS)}")
            if op == "resnet" and kind != "adapter":
                raise ConfigError(f"res-tuning: beside resnet only an adapter (convolutional) sits, got {kind!r}")
        if self.resnet_dim < 1:
            raise ConfigError(f"res-tuning: resnet_dim must be a positive whole number, got {self.resnet_dim}")
        if not 0 <= self.off_concept_loss <= 100:
            raise ConfigError(f"res-tuning: off_concept_loss must be between 0 and 100, got {self.off_concept_loss}")
        if len(self.identifier) > 200 or any(ch in self.identifier for ch in "\n\r\t"):
            raise ConfigError("res-tuning: identifier is a word or a few, on one line (at most 200 characters)")
