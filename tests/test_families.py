"""SD 2.x and SDXL in the library: the published U-Nets, their families told apart, the bundled
configs a single file loads with (parameter counts, tokenizers), SDXL's LoRA files out in
diffusers' and kohya's formats and back in, and the loader's choices per family."""

import pytest
import torch

import restuning
from restuning.arch import ARCHS, FAMILIES, TINY_ARCHS, build_unet, family
from restuning.methods.lora import convert
from tests.tiny_pipeline import build_tiny, tiny_pipeline
from trainers import models

PROMPT = "a photo of sks dog"


@pytest.mark.parametrize("arch,params,name", [("sd15", 859_520_964, "sd1"), ("sd2", 865_910_724, "sd2"),
                                              ("sdxl", 2_567_463_684, "sdxl"), ("tiny", None, "sd1"),
                                              ("tiny-sd2", None, "sd2"), ("tiny-sdxl", None, "sdxl")])
def test_each_u_net_has_its_published_size_and_family(arch, params, name):
    unet = build_unet(arch, device="meta")
    if params is not None:
        assert sum(p.numel() for p in unet.parameters()) == params
    assert family(unet.config) == name


def test_sdxl_has_its_deep_stacks_and_added_conditioning():
    unet = build_unet("sdxl", device="meta")
    assert [len(a.transformer_blocks) for b in unet.down_blocks for a in getattr(b, "attentions", [])] == [2, 2, 10, 10]
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 10
    assert not hasattr(unet.down_blocks[0], "attentions")  # SDXL's first level has no attention
    tiny = build_unet("tiny-sdxl")
    cond = restuning.arch.added_cond_kwargs(tiny.config, 2, size=64)
    assert cond["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2 and cond["text_embeds"].shape == (2, 32)
    assert restuning.arch.added_cond_kwargs(build_unet("tiny").config, 2) == {}


@pytest.mark.parametrize("name,unet,vae,text,pads", [
    ("sd1", 859_520_964, 83_653_863, [123_060_480], ["<|endoftext|>"]),
    ("sd2", 865_910_724, 83_653_863, [340_387_840], ["!"]),
    ("sdxl", 2_567_463_684, 83_653_863, [123_060_480, 694_659_840], ["<|endoftext|>", "!"]),
])
def test_bundled_configs_describe_the_published_models_and_their_tokenizers(name, unet, vae, text, pads):
    """What a single file is converted with (trainers.models.CONFIGS): SD v1.5's, SD 2.1's (the 768-px
    v model diffusers itself takes for an SD 2.x file) and SDXL base 1.0's components, and CLIP's
    BPE tokenizer (SD 2.x and SDXL's second encoder pad with "!")."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = models.CONFIGS[name]
    encoders = ["text_encoder"] + (["text_encoder_2"] if name == "sdxl" else [])
    with torch.device("meta"):
        models_ = [UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                   AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))]
        models_ += [(CLIPTextModelWithProjection if e == "text_encoder_2" else CLIPTextModel)(CLIPTextConfig.from_pretrained(folder / e))
                    for e in encoders]
    assert [sum(p.numel() for p in m.parameters()) for m in models_] == [unet, vae, *text]
    assert family(models_[0].config) == name
    for sub, pad in zip(["tokenizer", "tokenizer_2"], pads):
        tokenizer = CLIPTokenizer.from_pretrained(folder / sub)
        assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77 and tokenizer.pad_token == pad
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's own ids
    scheduler = models.pipeline_class(name).load_config(folder)["_class_name"]
    assert scheduler == ("StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionPipeline")


def _checkpoint(path, *keys):
    from safetensors.torch import save_file

    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.mark.parametrize("name,text_key", [("sd1", "cond_stage_model.transformer.text_model.x"),
                                           ("sd2", "cond_stage_model.model.transformer.x"),
                                           ("sdxl", "conditioner.embedders.1.model.x")])
def test_a_single_file_of_each_family_converts_with_its_bundled_configs_and_no_hub(tmp_path, monkeypatch, name, text_key):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    seen = {}

    def fake(cls, path, **kwargs):
        seen.update(kwargs, path=path, cls=cls.__name__)
        return tiny_pipeline(0, name)

    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "from_single_file", classmethod(fake))
    source = models.check_source(_checkpoint(tmp_path / f"{name}.safetensors", UNET_KEY, text_key))
    assert (source.kind, source.family) == ("single-file", name)
    pipe = models.load_pipeline(source, torch.float16, prediction_type="epsilon")
    assert (seen["config"], seen["local_files_only"], seen["dtype"]) == (str(models.CONFIGS[name]), True, torch.float16)
    assert seen["cls"] == ("StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionPipeline")
    assert ("safety_checker" in seen) == (name != "sdxl")
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_the_sdxl_refiner_and_other_pipelines_are_refused_by_name(tmp_path):
    with pytest.raises(models.ModelError, match="SDXL refiner.*not a text-to-image base model"):
        models.check_source(_checkpoint(tmp_path / "refiner.safetensors", UNET_KEY, "conditioner.embedders.0.model.x"))
    folder = tmp_path / "flux"
    folder.mkdir()
    for part in models.FOLDER_PARTS:
        (folder / part).mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(models.ModelError, match="holds a FluxPipeline, a pipeline of another kind"):
        models.check_source(folder)


class _Predicting(torch.nn.Module):
    """A stand-in U-Net whose prediction at t = 999 is the latent itself (epsilon) or -1.5 (v)."""

    def __init__(self, v: bool):
        super().__init__()
        self.v = v
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"in_channels": 4, "cross_attention_dim": 1024})()

    def forward(self, latent, t, text):
        assert t.tolist() == [999] and text.shape == (1, 2, 1024)
        return type("O", (), {"sample": torch.full_like(latent, -1.5) if self.v else latent + 0.1})()


def test_an_sd2_file_says_what_it_predicts_through_its_u_net():
    assert models.predicts_v(_Predicting(v=True)) and not models.predicts_v(_Predicting(v=False))


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_a_folder_of_each_family_loads_as_its_pipeline(tmp_path, name):
    folder = build_tiny(tmp_path / name, name)
    source = models.check_source(folder)
    assert source.family == name
    pipe = models.load_pipeline(source)
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionPipeline")
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if name == "sd2" else "epsilon")
    assert family(pipe.unet.config) == name
    if name == "sdxl":
        (folder / "text_encoder_2").rename(tmp_path / "elsewhere")
        with pytest.raises(models.ModelError, match="incomplete: missing text_encoder_2/"):
            models.check_source(folder)


# -- SDXL's LoRA files -------------------------------------------------------------------------------


def _render(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                output_type="pt").images


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory):
    """A LoRA on the tiny SDXL U-Net and both its text encoders (alpha 8, rank 4), exported."""
    from restuning.methods.lora import export as lora_export

    folder = tmp_path_factory.mktemp("sdxl-lora")
    pipe = tiny_pipeline(0, "sdxl", f8=True)
    attention = "q_proj,k_proj,v_proj,out_proj"
    handle = restuning.attach(pipe.unet, restuning.LoraConfig(alpha=8, blocks=("down", "mid", "up"), text_encoder=attention,
                                                              text_encoder_2=attention),
                              text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in handle.parameters():
            p.normal_(0, 0.2)
    written = dict(lora_export.export(pipe, handle, folder))
    return written, _render(pipe), handle.config


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora-diffusers", "lora-kohya"])
def test_sdxl_lora_files_render_in_diffusers_and_come_back_as_they_were(sdxl_lora, kind):
    """Both files load in diffusers' own StableDiffusionXLPipeline.load_lora_weights (kohya's SGM block
    names mapped by diffusers' _maybe_map_sgm_blocks_to_diffusers) and render what the LoRA rendered;
    both import back through restuning.load with the same config."""
    written, tuned, config = sdxl_lora
    theirs = tiny_pipeline(0, "sdxl", f8=True)
    theirs.load_lora_weights(str(written[kind].parent), weight_name=written[kind].name)
    torch.testing.assert_close(_render(theirs), tuned, atol=1e-5, rtol=0)
    ours = tiny_pipeline(0, "sdxl", f8=True)
    handle = restuning.load(ours.unet, written[kind], text_encoder=ours.text_encoder, text_encoder_2=ours.text_encoder_2)
    assert handle.config == config
    torch.testing.assert_close(_render(ours), tuned, atol=1e-5, rtol=0)


def test_sdxl_kohya_file_has_kohyas_names(sdxl_lora):
    from safetensors import safe_open

    written, _, _ = sdxl_lora
    with safe_open(str(written["lora-kohya"]), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_2_attn2_to_out_0.lora_up.weight" in keys
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_0_proj.alpha" not in keys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight" in keys
    assert not [k for k in keys if "down_blocks" in k or "up_blocks" in k or "mid_block" in k]
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_alpha"] == "8"


def test_kohya_block_names_invert_diffusers_own_mapping_on_sdxl():
    """Every attention, feed-forward and resnet layer of SDXL's U-Net: its kohya (SGM) name, read
    by diffusers' lora_state_dict with SDXL's config, names the layer it came from."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_kohya

    from restuning.methods.lora.export import sgm_path

    unet = build_unet("sdxl", device="meta")
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
              and n.startswith(("down_blocks.", "mid_block.", "up_blocks.")) and "upsamplers" not in n]
    assert len(layers) > 700
    state = {f"unet.{sgm_path(n, unet.config)}.lora_{ab}.weight": torch.zeros(1, 1) for n in layers for ab in "AB"}
    read, alphas = StableDiffusionXLPipeline.lora_state_dict(convert_state_dict_to_kohya(state), unet_config=unet.config)
    back, _ = convert._unet_part(read, alphas, None)  # to peft's names, as diffusers' loader goes on
    assert convert._layers(back) == sorted(layers)


def test_an_sdxl_lora_is_refused_on_other_families_and_asks_for_both_encoders(sdxl_lora):
    written, _, _ = sdxl_lora
    sd1 = tiny_pipeline(0, "sd1")
    with pytest.raises(restuning.TunerFileError, match="second text encoder .*as SDXL LoRAs do"):
        restuning.load(sd1.unet, written["lora-kohya"], text_encoder=sd1.text_encoder)
    with pytest.raises(restuning.TunerFileError, match="trained for an SDXL U-Net and this base model is SD 1.x"):
        restuning.load(sd1.unet, written["tuner"], text_encoder=sd1.text_encoder)
    xl = tiny_pipeline(0, "sdxl")
    with pytest.raises(restuning.TunerFileError, match="tunes the text encoder 2 too .*text_encoder_2=pipe.text_encoder_2"):
        restuning.load(xl.unet, written["lora-diffusers"], text_encoder=xl.text_encoder)
    with pytest.raises(restuning.AttachError, match="text_encoder_2=pipe.text_encoder_2"):
        restuning.load(xl.unet, written["tuner"], text_encoder=xl.text_encoder)
    assert restuning.attached(xl.unet) == {} and restuning.attached(sd1.unet) == {}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_method_attaches_to_each_family(arch):
    from restuning.methods import METHODS

    for name, method in METHODS.items():
        unet = build_unet(arch, device="meta")
        handle = restuning.attach(unet, method.config(), name=name)
        assert sum(p.numel() for p in handle.parameters()) > 0, name
    assert set(FAMILIES) == {"sd1", "sd2", "sdxl"} and arch in ARCHS


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m == "bypass" else pytest.mark.slow)
                                    for m in ("bypass", "res-tuning", "lora", "adapter", "prefix", "prompt", "full")])
def test_a_training_step_of_the_full_size_sdxl_u_net_runs_shape_for_shape(method):
    """The published SDXL U-Net (what bench.train_cost --arch sdxl times) with each method, forward
    with its pooled text and size ids and backward, on the meta device: every shape, no memory."""
    from restuning.methods import METHODS

    unet = build_unet("sdxl", device="meta")
    handle = restuning.attach(unet, METHODS[method].config())
    with torch.device("meta"):
        added = restuning.arch.added_cond_kwargs(unet.config, 1, size=256, device="meta")
        out = unet(torch.randn(1, 4, 32, 32), torch.tensor([10]), torch.randn(1, 77, 2048), added_cond_kwargs=added).sample
        out.pow(2).mean().backward()
    assert out.shape == (1, 4, 32, 32)
    trained = [p for p in handle.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)


def test_the_studio_imports_an_sdxl_lora_against_both_encoders(sdxl_lora, tmp_path):
    """The Runs tab's import on an SDXL base model: a kohya SDXL file becomes a tuner file, checked
    on weightless copies of the U-Net and both text encoders; on an SD 2.x base it is refused."""
    import shutil

    from trainers.service.uploads import UploadError, check_tuner_file, lora_as_tuner_file
    from webui.model import describe

    written, _, config = sdxl_lora
    for name in ("sdxl", "sd2"):
        base = describe(str(build_tiny(tmp_path / name, name)))
        encoders = base.text_encoders_on_meta()
        upload = shutil.copy(written["lora-kohya"], tmp_path / f"their_lora_{name}.safetensors")
        if name == "sd2":
            with pytest.raises(UploadError, match="second text encoder"):
                lora_as_tuner_file(upload, base.unet_on_meta(), encoders["text_encoder"], encoders.get("text_encoder_2"))
            continue
        assert set(encoders) == {"text_encoder", "text_encoder_2"}
        converted = lora_as_tuner_file(upload, base.unet_on_meta(), encoders["text_encoder"], encoders["text_encoder_2"])
        found, header = check_tuner_file(converted, base.unet_on_meta(), base_text_encoder=encoders["text_encoder"],
                                         base_text_encoder_2=encoders["text_encoder_2"])
        assert found == config and header["imported_from"] == "kohya"
