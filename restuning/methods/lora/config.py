import sys
from dataclasses import dataclass

from ...config import ConfigError, MethodConfig, option
from ...core import BLOCK_GROUPS

# CLIP's attention projections: where diffusers' train_dreambooth_lora.py puts the text encoder's LoRA.
TEXT_ENCODER_ATTENTION = "q_proj,k_proj,v_proj,out_proj"


@dataclass
class LoraConfig(MethodConfig):
    method = "lora"
    rank: int = option(4, "LoRA rank")
    alpha: int = option(4, "LoRA alpha (the update is scaled by alpha / rank); the trainer's --rank without --alpha sets it to the "
                           "rank, as diffusers' train_dreambooth_lora.py does")
    blocks: tuple = option(("mid", "up"), "U-Net parts whose attention projections get LoRA", choices=BLOCK_GROUPS)
    targets: str = option("", "U-Net layers that get LoRA instead of the attention projections: comma-separated "
                              "layer names or name endings within --blocks, as peft's target_modules (e.g. to_k,to_v); "
                              "empty: to_q,to_k,to_v,to_out.0")
    text_encoder: str = option("", "text-encoder layers that get LoRA too, comma-separated names or name endings "
                                   f"(--train_text_encoder sets {TEXT_ENCODER_ATTENTION}); empty: the text encoder is not tuned")
    text_encoder_2: str = option("", "SDXL's second text encoder: its layers that get LoRA too, as --text_encoder names them "
                                     "(--train_text_encoder sets both on SDXL); empty: it is not tuned")
    lora_dropout: float = option(0.0, "dropout on the input of each LoRA update while training (peft's lora_dropout, the name "
                                      "of diffusers' train_dreambooth_lora.py); none at inference")

    def validate(self) -> None:
        super().validate()
        if self.alpha > sys.float_info.max:  # peft divides it by the rank as a float (OverflowError above)
            raise ConfigError(f"lora: alpha must be a number a float holds; got a {len(str(self.alpha))}-digit number")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora: lora_dropout must be at least 0 and below 1, got {self.lora_dropout}")
