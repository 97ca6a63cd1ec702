"""LoRA files from elsewhere come in: diffusers' and kohya's formats load through restuning.load
(and the studio's import) and render pixel for pixel as the LoRA they came from, and as diffusers'
own `pipe.load_lora_weights` renders them; files for another model are refused, nothing changed."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import restuning
from restuning.methods.lora import convert
from restuning.methods.lora import export as lora_export
from tests.tiny_pipeline import tiny_pipeline
from trainers.sampling import Column, Sampler, Settings
from trainers.service.uploads import UploadError, check_tuner_file, lora_as_tuner_file

PROMPT = "a photo of sks dog"
pytestmark = pytest.mark.slow  # each renders the tiny pipeline several times (~10 s on 2 cores)


def render(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                height=32, width=32, output_type="pt").images


def trained_lora(pipe, config, seed=1):
    """A project LoRA whose up weights are not zero (a fresh one would change nothing)."""
    handle = restuning.attach(pipe.unet, config, name="mine", text_encoder=pipe.text_encoder)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.normal_(0, 0.2)
    return handle


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A project LoRA (rank 4, alpha 8, all blocks) exported, its images, and the base images."""
    folder = tmp_path_factory.mktemp("lora")
    pipe = tiny_pipeline()
    handle = trained_lora(pipe, restuning.LoraConfig(rank=4, alpha=8, blocks=("down", "mid", "up")))
    tuned = render(pipe)
    lora_export.export(pipe, handle, folder)
    restuning.detach(pipe.unet)
    return folder, tuned, render(pipe)


def kohya_file(diffusers_file, path):
    """kohya's documented SD 1.x layout, written from a diffusers file by hand (not by the
    exporter under test): lora_unet_<path with underscores>.lora_down/lora_up.weight and .alpha."""
    state = load_file(diffusers_file)
    with open(diffusers_file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    alpha = json.loads(header["lora_adapter_metadata"])["unet.lora_alpha"]
    out = {}
    for key, tensor in state.items():
        layer, kind = re.match(r"unet\.(.+)\.lora\.(down|up)\.weight", key).groups()
        name = "lora_unet_" + layer.replace(".", "_")
        out[f"{name}.lora_{kind}.weight"] = tensor
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(out, str(path))
    return path


def test_formats_are_told_apart_by_their_keys(exported, tmp_path):
    folder, _, _ = exported
    assert convert.is_foreign_lora(folder / lora_export.DIFFUSERS_FILE)
    assert convert.is_foreign_lora(folder / lora_export.KOHYA_FILE)
    assert not convert.is_foreign_lora(folder / "tuner.safetensors")
    assert convert.file_format(["lora_unet_mid_block_x.lora_down.weight", "lora_unet_mid_block_x.alpha"]) == "kohya"
    assert convert.file_format(["unet.mid_block.x.lora_A.weight"]) == "diffusers"
    assert convert.file_format(["unet.mid_block.x.weight"]) is None
    pickled = tmp_path / "lora.safetensors"
    torch.save({"unet.x.lora_A.weight": torch.zeros(1)}, pickled)
    assert not convert.is_foreign_lora(pickled)  # never unpickled: refused as not safetensors
    with pytest.raises(restuning.TunerFileError, match="not a safetensors file"):
        restuning.load(tiny_pipeline().unet, pickled)


def test_project_lora_round_trips_through_its_diffusers_file_pixel_identically(exported):
    folder, tuned, base = exported
    pipe = tiny_pipeline()
    handle = restuning.load(pipe.unet, folder / lora_export.DIFFUSERS_FILE)
    config = handle.config
    assert (config.rank, config.alpha, config.blocks, config.targets, config.text_encoder) == (4, 8, ("down", "mid", "up"), "", "")
    assert torch.equal(render(pipe), tuned)
    restuning.set_scale(pipe.unet, 0.0)
    assert torch.equal(render(pipe), base)
    restuning.detach(pipe.unet)
    assert torch.equal(render(pipe), base)

    theirs = tiny_pipeline()
    theirs.load_lora_weights(str(folder / lora_export.DIFFUSERS_FILE))
    assert torch.equal(render(theirs), tuned)


def test_kohya_file_imports_and_matches_diffusers_loader(exported, tmp_path):
    folder, tuned, _ = exported
    path = kohya_file(folder / lora_export.DIFFUSERS_FILE, tmp_path / "my_lora.safetensors")
    pipe = tiny_pipeline()
    handle = restuning.load(pipe.unet, path)
    assert (handle.config.rank, handle.config.alpha) == (4, 8)
    ours = render(pipe)
    theirs = tiny_pipeline()
    theirs.load_lora_weights(str(path))
    assert torch.equal(ours, render(theirs))
    assert torch.equal(ours, tuned)


def test_a_file_covering_other_layers_keeps_them(tmp_path):
    """Only to_k and to_v of the mid block, rank 2: the imported config names those layers."""
    pipe = tiny_pipeline()
    handle = trained_lora(pipe, restuning.LoraConfig(rank=2, alpha=2, blocks=("mid",), targets="to_k,to_v"))
    tuned = render(pipe)
    lora_export.export(pipe, handle, tmp_path)
    restuning.detach(pipe.unet)
    loaded = restuning.load(pipe.unet, tmp_path / lora_export.KOHYA_FILE)
    assert loaded.config.blocks == ("mid",) and loaded.config.rank == 2
    assert {t.rsplit(".", 1)[-1] for t in loaded.config.targets.split(",")} == {"to_k", "to_v"}
    assert torch.equal(render(pipe), tuned)


def test_files_for_another_model_are_refused_and_nothing_changes(exported, tmp_path):
    folder, _, base = exported
    state = load_file(folder / lora_export.DIFFUSERS_FILE)
    pipe = tiny_pipeline()

    wide = {k: torch.zeros(v.shape[0], v.shape[1] * 2) if ".lora.down." in k else v for k, v in state.items()}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(restuning.TunerFileError, match="made for another model.*features"):
        restuning.load(pipe.unet, tmp_path / "wide.safetensors")

    sdxl = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(restuning.TunerFileError, match="second text encoder.*SDXL"):
        restuning.load(pipe.unet, tmp_path / "sdxl.safetensors")

    mixed = dict(state)
    first = next(k for k in state if ".lora.down." in k)
    mixed[first] = torch.zeros(2, state[first].shape[1])
    mixed[first.replace(".down.", ".up.")] = torch.zeros(state[first.replace(".down.", ".up.")].shape[0], 2)
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(restuning.TunerFileError, match="rank or alpha .* differs between layers"):
        restuning.load(pipe.unet, tmp_path / "mixed.safetensors")

    assert not restuning.attached(pipe.unet)
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())
    assert torch.equal(render(pipe), base)


def test_a_file_mixing_key_layouts_is_refused_naming_both(exported, tmp_path):
    """Half the layers in peft's keys (lora_A) and half in diffusers' older ones (lora.down), or
    kohya's beside diffusers': diffusers' loader reads the file by one key's layout, so the rest
    would be skipped or read as layers the model lacks. Refused whichever key comes first."""
    folder, _, base = exported
    state = load_file(folder / lora_export.DIFFUSERS_FILE)
    layers = sorted({k.split(".lora.")[0] for k in state})
    peft = {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v for k, v in state.items()}
    kohya = load_file(folder / lora_export.KOHYA_FILE)
    pipe = tiny_pipeline()
    for first_half_peft in (True, False):
        half = set(layers[: len(layers) // 2])
        mixed = {k: v for k, v in (peft if first_half_peft else state).items() if k.split(".lora")[0] in half}
        mixed.update({k: v for k, v in (state if first_half_peft else peft).items() if k.split(".lora")[0] not in half})
        save_file(mixed, str(tmp_path / "mixed.safetensors"))
        with pytest.raises(restuning.TunerFileError, match=r"mixes LoRA key layouts, peft \(unet\..*lora_A.*\) and diffusers' older "
                                                           r"\(unet\..*lora\.down.*\): .*save it again in one layout"):
            restuning.load(pipe.unet, tmp_path / "mixed.safetensors")
    both = {**{k: v for k, v in kohya.items() if "attn1" in k}, **{k: v for k, v in state.items() if "attn2" in k}}
    save_file(both, str(tmp_path / "both.safetensors"))
    with pytest.raises(restuning.TunerFileError, match=r"mixes LoRA key layouts, kohya \(lora_unet_.*\) and diffusers' older"):
        restuning.load(pipe.unet, tmp_path / "both.safetensors")
    assert not restuning.attached(pipe.unet)
    assert torch.equal(render(pipe), base)


def test_text_encoder_keys_need_the_text_encoder(tmp_path):
    pipe = tiny_pipeline()
    handle = trained_lora(pipe, restuning.LoraConfig(blocks=("mid",), text_encoder="q_proj,v_proj"))
    lora_export.export(pipe, handle, tmp_path)
    restuning.detach(pipe.unet)
    with pytest.raises(restuning.TunerFileError, match=r"tunes the text encoder too .*text_encoder\..*=pipe.text_encoder"):
        restuning.load(pipe.unet, tmp_path / lora_export.DIFFUSERS_FILE)
    assert not restuning.attached(pipe.unet)


@pytest.fixture(scope="module")
def with_text_encoder(tmp_path_factory):
    """A project LoRA of the mid block and of the text encoder's attention (rank 4, alpha 8) in
    diffusers' format, its images, and the images of its U-Net part alone."""
    folder = tmp_path_factory.mktemp("lora-te")
    pipe = tiny_pipeline()
    handle = trained_lora(pipe, restuning.LoraConfig(rank=4, alpha=8, blocks=("mid",), text_encoder="q_proj,k_proj,v_proj,out_proj"))
    tuned = render(pipe)
    lora_export.export(pipe, handle, folder)
    with torch.no_grad():
        for name, p in pipe.text_encoder.named_parameters():
            if "lora_B" in name:
                p.zero_()
    unet_only = render(pipe)
    assert not torch.equal(unet_only, tuned)  # the text encoder's part shows in the images
    return folder / lora_export.DIFFUSERS_FILE, tuned


def text_encoder_variant(diffusers_file, path, variant):
    """The LoRA in one of the layouts found in the wild, written by hand from the diffusers file:
    - "diffusers": as diffusers' save_lora_weights writes it with transformers 5
      (text_encoder.encoder.layers.…lora_linear_layer.down.weight);
    - "diffusers text_model.": as it wrote it with transformers 4, whose CLIPTextModel has a
      `text_model` level (text_encoder.text_model.encoder.…);
    - "kohya": kohya's SD 1.x layout, whose text-encoder keys keep the `text_model_` level
      (lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight, .alpha);
    - "kohya without text_model_": lora_te_encoder_layers_0_….
    """
    state = load_file(diffusers_file)
    with open(diffusers_file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    if variant == "diffusers":
        save_file(state, str(path), metadata=header)
        return path
    if variant == "diffusers text_model.":
        save_file({k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in state.items()}, str(path), metadata=header)
        return path
    alpha = json.loads(header["lora_adapter_metadata"])["unet.lora_alpha"]
    level = "text_model_" if variant == "kohya" else ""
    out = {}
    for key, tensor in state.items():
        if key.startswith("unet."):
            layer, kind = re.match(r"unet\.(.+)\.lora\.(down|up)\.weight", key).groups()
            name = "lora_unet_" + layer.replace(".", "_")
        else:
            layer, kind = re.match(r"text_encoder\.(.+)\.lora_linear_layer\.(down|up)\.weight", key).groups()
            name = "lora_te_" + level + layer.replace(".", "_")
        out[f"{name}.lora_{kind}.weight"] = tensor
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(out, str(path))
    return path


@pytest.mark.parametrize("variant", ["diffusers", "diffusers text_model.", "kohya", "kohya without text_model_"])
def test_a_lora_of_the_text_encoder_too_loads_and_renders_as_diffusers_loader_does(with_text_encoder, variant, tmp_path):
    diffusers_file, tuned = with_text_encoder
    path = text_encoder_variant(diffusers_file, tmp_path / "their_lora.safetensors", variant)
    assert any("te_" in k or k.startswith("text_encoder.") for k in load_file(path))
    pipe = tiny_pipeline()
    handle = restuning.load(pipe.unet, path, text_encoder=pipe.text_encoder)
    assert (handle.config.rank, handle.config.alpha, handle.config.text_encoder) == (4, 8, "q_proj,k_proj,v_proj,out_proj")
    ours = render(pipe)
    theirs = tiny_pipeline()
    theirs.load_lora_weights(str(path))
    assert torch.equal(ours, render(theirs))
    assert torch.equal(ours, tuned)


def test_studio_import_puts_a_kohya_lora_in_the_compare_grid_beside_a_res_tuner(exported, tmp_path):
    folder, tuned, base = exported
    pipe = tiny_pipeline()
    upload = kohya_file(folder / lora_export.DIFFUSERS_FILE, tmp_path / "their_lora.safetensors")
    tuner = lora_as_tuner_file(upload, pipe.unet, pipe.text_encoder)
    assert tuner != upload and restuning.read_header(tuner)["imported_from"] == "kohya"
    config, _ = check_tuner_file(tuner, pipe.unet, base_text_encoder=pipe.text_encoder)
    assert config.method == "lora" and config.rank == 4

    handle = restuning.attach(pipe.unet, restuning.ResTuningConfig(), name="rt")
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    res_tuner = restuning.save(pipe.unet, tmp_path / "rt.safetensors", name="rt")
    restuning.detach(pipe.unet)

    settings = Settings(PROMPT, seed=0, steps=3, guidance=3.0, scheduler="DDIM", height=32, width=32)
    grid = Sampler(pipe).render([Column("base"), Column("res-tuning", tuner=res_tuner), Column("lora", tuner=tuner)], [settings])
    images = [torch.tensor(list(im.getdata())) for im in grid[0]]
    assert not torch.equal(images[2], images[0]) and not torch.equal(images[2], images[1])

    theirs = tiny_pipeline()
    theirs.load_lora_weights(str(upload))
    solo = Sampler(theirs).render([Column("diffusers")], [settings])[0][0]
    assert torch.equal(torch.tensor(list(solo.getdata())), images[2])


def test_studio_import_refuses_a_lora_for_another_model_by_name(exported, tmp_path):
    folder, _, _ = exported
    state = load_file(folder / lora_export.DIFFUSERS_FILE)
    wide = {k: torch.zeros(v.shape[0], v.shape[1] * 2) if ".lora.down." in k else v for k, v in state.items()}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    pipe = tiny_pipeline()
    with pytest.raises(UploadError, match="^wide.safetensors was made for another model"):
        lora_as_tuner_file(tmp_path / "wide.safetensors", pipe.unet, pipe.text_encoder)
    assert not (tmp_path / "wide-restuning.safetensors").exists()
