"""The LoRA rules case by case: which key layout a file is (restuning.methods.lora.convert), which
model a handle's state key belongs to, and strength 0 leaving every tuned model (SDXL's second
text encoder too) out of peft's active adapters."""

import pytest
import torch

import restuning
from restuning.arch import TINY_SDXL_TEXT_WIDTHS, TINY_SDXL_UNET_CONFIG
from restuning.methods.lora import convert
from restuning.methods.lora.config import TEXT_ENCODER_ATTENTION, LoraConfig
from restuning.methods.lora.model import _part_of
from tests.tiny_pipeline import WORDS, _text_encoder

VOCAB = len(WORDS) + 2 + 26  # tiny_tokenizer's vocabulary


@pytest.fixture(scope="module")
def sdxl_lora():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)
    first = _text_encoder(VOCAB, TINY_SDXL_TEXT_WIDTHS[0], layers=2)
    second = _text_encoder(VOCAB, TINY_SDXL_TEXT_WIDTHS[1], layers=2, act="gelu", projection=True)
    config = LoraConfig(rank=2, alpha=2, text_encoder=TEXT_ENCODER_ATTENTION, text_encoder_2=TEXT_ENCODER_ATTENTION)
    handle = restuning.attach(unet, config, text_encoder=first, text_encoder_2=second)
    return unet, first, second, handle


def _lora_layers(model, name):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer) and name in m.lora_A]


def test_strength_0_takes_the_lora_out_of_every_tuned_model_so_a_non_finite_one_is_not_computed(sdxl_lora):
    unet, first, second, handle = sdxl_lora
    ids = torch.tensor([[0, 3, 4, 1]])
    models = {"unet": unet, "text_encoder": first, "text_encoder_2": second}
    layers = {which: _lora_layers(model, handle.name) for which, model in models.items()}
    assert all(layers.values()) and len(layers["text_encoder_2"]) == 8  # 4 projections x 2 layers
    assert all(handle.name in m.active_adapters for found in layers.values() for m in found)
    with torch.no_grad():
        for m in layers["text_encoder"] + layers["text_encoder_2"]:
            m.lora_B[handle.name].weight.fill_(float("inf"))  # a LoRA whose output overflows
    restuning.set_scale(unet, 0.0)
    for which, found in layers.items():
        assert all(m.active_adapters == [] for m in found), which
    with torch.no_grad():
        assert torch.isfinite(first(ids).last_hidden_state).all() and torch.isfinite(second(ids).last_hidden_state).all()
    restuning.set_scale(unet, 0.5)
    for which, found in layers.items():
        assert all(m.active_adapters == [handle.name] and m.scaling[handle.name] == 0.5 for m in found), which
    with torch.no_grad():
        assert not torch.isfinite(second(ids).last_hidden_state).all()


LORA_DOWN, LORA_A = ".lora_down.weight", ".lora_A.weight"


@pytest.mark.parametrize("keys, kind", [
    ([], None),
    (["lora_unet_mid_block_attentions_0_to_q" + LORA_DOWN], "kohya"),
    (["lora_unet_x" + LORA_DOWN, "lora_unet_x.alpha", "lora_te_y" + LORA_DOWN, "lora_te1_y.alpha", "lora_te2_z.alpha"], "kohya"),
    (["unet.mid.to_q" + LORA_A], "diffusers"),
    (["unet.mid.to_q.lora.down.weight", "text_encoder.q_proj.lora_linear_layer.up.weight"], "diffusers"),
    (["unet.mid.to_q" + LORA_A, "text_encoder_2.q_proj.lora_B.weight"], "diffusers"),
    (["unet.mid.to_q.weight"], None),                         # diffusers' prefix, but no LoRA part
    (["lora_unet_x" + LORA_DOWN, "unet.mid.to_q" + LORA_A], "mixed"),
    (["lora_unet_x" + LORA_DOWN, "model.diffusion_model.x"], None),
    (["unet.mid.to_q" + LORA_A, "vae.x" + LORA_A], None),
    (["model.diffusion_model.input_blocks.1.weight"], None),
])
def test_a_files_key_layout(keys, kind):
    assert convert.file_format(keys) == kind


@pytest.mark.parametrize("keys, mixed", [
    (["lora_unet_x" + LORA_DOWN, "lora_te_y" + LORA_DOWN], None),
    (["unet.a" + LORA_A, "text_encoder.b.lora.down.weight"], None),        # one layout per part
    (["lora_unet_x" + LORA_DOWN, "unet.a" + LORA_A], ("kohya", "peft")),
    (["unet.a" + LORA_A, "unet.b.lora.down.weight"], ("peft", "diffusers' older")),
    (["text_encoder.a.lora_B.weight", "text_encoder.b.lora_linear_layer.up.weight"], ("peft", "diffusers' older")),
])
def test_a_file_mixing_layouts_within_a_part_is_named(keys, mixed):
    found = convert.mixed_layouts(keys)
    assert (found if found is None else (found[0][0], found[1][0])) == mixed


@pytest.mark.parametrize("key, part", [
    ("down_blocks.1.attentions.0.to_q.lora_A.weight", ""), ("text_encoder.q_proj.lora_A.weight", "text_encoder."),
    ("text_encoder_2.q_proj.lora_A.weight", "text_encoder_2."), ("text_encoder_3.x", ""),
])
def test_a_handle_state_key_belongs_to_one_model(key, part):
    assert _part_of(key) == part


SDXL_SGM = [  # SDXL's own layout (layers_per_block 2): what kohya's SDXL LoRAs name each layer
    ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.conv1"),
    ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.conv1"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"),
    ("down_blocks.1.attentions.1.proj_in", "input_blocks.5.1.proj_in"),
    ("down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q", "input_blocks.8.1.transformer_blocks.0.attn1.to_q"),
    ("mid_block.resnets.0.conv1", "middle_block.0.conv1"),
    ("mid_block.attentions.0.proj_out", "middle_block.1.proj_out"),
    ("mid_block.resnets.1.conv2", "middle_block.2.conv2"),
    ("up_blocks.0.attentions.0.proj_in", "output_blocks.0.1.proj_in"),
    ("up_blocks.0.attentions.2.proj_in", "output_blocks.2.1.proj_in"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.resnets.0.conv1", "output_blocks.3.0.conv1"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.2.conv1", "output_blocks.8.0.conv1"),
]


@pytest.mark.parametrize("path, sgm", SDXL_SGM)
def test_sdxl_layers_get_kohyas_sgm_names(path, sgm):
    from restuning.methods.lora.export import sgm_path

    assert sgm_path(path, TINY_SDXL_UNET_CONFIG) == sgm


@pytest.mark.parametrize("path", ["conv_in", "time_embedding.linear_1", "mid_block.resnets.2.conv1", "down_blocks.0.norm"])
def test_a_layer_outside_the_blocks_has_no_sgm_name(path):
    from restuning.methods.lora.export import sgm_path

    with pytest.raises(ValueError, match="not a layer inside"):
        sgm_path(path, TINY_SDXL_UNET_CONFIG)


@pytest.mark.parametrize("key", ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj" + LORA_DOWN,
                                 "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj" + LORA_A])
def test_a_second_text_encoders_keys_are_refused_on_a_model_with_one(tmp_path, key):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from restuning.arch import TINY_UNET_CONFIG

    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    save_file({"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q" + LORA_DOWN if key.startswith("lora")
               else "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q" + LORA_A: torch.zeros(2, 8),
               key: torch.zeros(2, 8)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(restuning.TunerFileError, match="second text encoder .*as SDXL LoRAs do"):
        convert.read(tmp_path / "x.safetensors", unet)


@pytest.mark.parametrize("part, what", list(convert.NOT_LORA_PARTS.items()))
def test_other_decompositions_are_refused_by_name(tmp_path, part, what):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from restuning.arch import TINY_UNET_CONFIG

    save_file({"lora_unet_x" + LORA_DOWN: torch.zeros(1), f"lora_unet_y.{part}w": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(restuning.TunerFileError, match=f"a {what} file, not a LoRA"):
        convert.read(tmp_path / "x.safetensors", UNet2DConditionModel(**TINY_UNET_CONFIG))
