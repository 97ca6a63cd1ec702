"""restuning.save / restuning.load: one self-describing safetensors file per tuner, exact
round trips, and clear errors for files that do not fit."""

import json

import pytest
import torch
from safetensors.torch import save_file
from safetensors import safe_open

import restuning
from restuning.arch import TINY_ARCHS, build_unet
from tests.conftest import frozen_run, run

CONFIGS = [
    restuning.ResTuningConfig(),
    restuning.ResTuningConfig(tuners={"attn1": "prefix", "attn2": "prompt", "ff": "adapter", "block": "prefix"}, dim=6),
    restuning.AdapterConfig(),
    restuning.PrefixConfig(ops=("attn1", "attn2")),
    restuning.PromptConfig(),
    restuning.LoraConfig(rank=2),
]


def _perturb(handle):
    torch.manual_seed(9)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("config", CONFIGS + [restuning.BypassConfig(dim=4)], ids=lambda c: f"{c.method}")
def test_save_then_load_on_a_fresh_unet_reproduces_outputs_exactly(tmp_path, arch, unet_inputs, config):
    unet = build_unet(arch, seed=0).eval()
    _perturb(restuning.attach(unet, config))
    expected = run(unet, unet_inputs)
    path = restuning.save(unet, tmp_path / "tuner.safetensors")

    fresh = build_unet(arch, seed=0).eval()
    base = frozen_run(fresh, unet_inputs)
    handle = restuning.load(fresh, path)
    assert handle.config == config
    out = run(fresh, unet_inputs)
    assert torch.equal(out, expected)
    assert not torch.equal(out, base)
    restuning.detach(fresh)
    assert torch.equal(run(fresh, unet_inputs), base)


def test_header_carries_config_version_and_architecture(tmp_path, tiny_unet):
    restuning.attach(tiny_unet, restuning.ResTuningConfig(dim=4))
    path = restuning.save(tiny_unet, tmp_path / "t.safetensors")
    header = restuning.read_header(path)
    assert header["format"] == "restuning" and header["format_version"] == "4"
    assert json.loads(header["config"])["dim"] == 4
    assert json.loads(header["base_arch"])["block_out_channels"] == [32, 64]
    assert restuning.read_config(path) == restuning.ResTuningConfig(dim=4)


def _saved(tmp_path, tiny_unet):
    restuning.attach(tiny_unet, restuning.ResTuningConfig())
    return restuning.save(tiny_unet, tmp_path / "t.safetensors")


def _rewrite(path, out, **metadata_changes):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in metadata_changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize(
    "change,message",
    [
        ({"config": None}, "config is missing or not valid JSON"),
        ({"config": "{not json"}, "config is missing or not valid JSON"),
        ({"config": json.dumps({"method": "res-tuning", "tuners": {"ff": "lora"}})}, "unknown tuner kind"),
        ({"config": json.dumps({"method": "nonsense"})}, "unknown method"),
        ({"format_version": "99"}, "newer than this restuning reads"),
        ({"format_version": "x"}, "format_version is missing"),
        ({"format": None}, "not a restuning tuner file"),
    ],
)
def test_broken_headers_give_clear_errors(tmp_path, tiny_unet, change, message):
    bad = _rewrite(_saved(tmp_path, tiny_unet), tmp_path / "bad.safetensors", **change)
    fresh = build_unet("tiny")
    with pytest.raises(restuning.TunerFileError, match=message):
        restuning.load(fresh, bad)
    assert restuning.attached(fresh) == {}


def test_a_file_for_another_architecture_is_refused(tmp_path, tiny_unet):
    from diffusers import UNet2DConditionModel
    from restuning.arch import TINY_UNET_CONFIG

    path = _saved(tmp_path, tiny_unet)
    other = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "block_out_channels": [32, 96]})
    with pytest.raises(restuning.TunerFileError, match=r"another U-Net architecture \(block_out_channels"):
        restuning.load(other, path)
    assert restuning.attached(other) == {}


@pytest.mark.parametrize("trained,loaded", [("tiny-sdxl", "tiny"), ("tiny", "tiny-sdxl"), ("tiny-sd2", "tiny"), ("tiny-sdxl", "tiny-sd2")])
def test_a_file_of_another_family_is_refused_naming_both(tmp_path, trained, loaded):
    from restuning.arch import FAMILIES, family

    unet = build_unet(trained)
    restuning.attach(unet, restuning.ResTuningConfig())
    path = restuning.save(unet, tmp_path / "t.safetensors")
    other = build_unet(loaded)
    theirs, ours = FAMILIES[family(unet.config)], FAMILIES[family(other.config)]
    with pytest.raises(restuning.TunerFileError, match=rf"trained for an {theirs} U-Net and this base model is {ours}, which it cannot "
                                                          r"be used on \(.*: file has .*, model has "):
        restuning.load(other, path)
    assert restuning.attached(other) == {}


def test_files_saved_before_the_family_was_recorded_still_load(tmp_path, tiny_unet, unet_inputs):
    """A header's base_arch without addition_embed_type / use_linear_projection (every file written
    before SDXL and SD 2.x were supported) still fits the U-Net its other fields describe."""
    path = _saved(tmp_path, tiny_unet)
    arch = json.loads(restuning.read_header(path)["base_arch"])
    assert {"addition_embed_type", "use_linear_projection"} <= set(arch)
    old = {k: v for k, v in arch.items() if k not in ("addition_embed_type", "use_linear_projection")}
    older = _rewrite(path, tmp_path / "older.safetensors", base_arch=json.dumps(old))
    fresh = build_unet("tiny")
    restuning.load(fresh, older)
    assert len(restuning.attached(fresh)) == 1


def test_non_safetensors_files_are_refused_without_unpickling(tmp_path, tiny_unet):
    pickle_file = tmp_path / "tuner.safetensors"
    torch.save({"a": torch.zeros(1)}, pickle_file)
    with pytest.raises(restuning.TunerFileError, match="not a safetensors file"):
        restuning.load(tiny_unet, pickle_file)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(restuning.TunerFileError, match="not a safetensors file"):
        restuning.load(tiny_unet, text)
    with pytest.raises(restuning.TunerFileError, match="no such file"):
        restuning.load(tiny_unet, tmp_path / "missing.safetensors")


def test_weights_that_do_not_match_the_config_are_refused(tmp_path, tiny_unet):
    path = _saved(tmp_path, tiny_unet)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(tmp_path / "short.safetensors"), metadata=meta)
    fresh = build_unet("tiny")
    with pytest.raises(restuning.TunerFileError, match="missing"):
        restuning.load(fresh, tmp_path / "short.safetensors")
    assert restuning.attached(fresh) == {}


def test_saving_writes_atomically_and_needs_a_tuner(tmp_path, tiny_unet):
    with pytest.raises(restuning.TunerFileError, match="nothing to save"):
        restuning.save(tiny_unet, tmp_path / "t.safetensors")
    path = _saved(tmp_path, tiny_unet)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_tuner_loads_into_a_stable_diffusion_pipeline(tmp_path, unet_inputs):
    """The README's three lines: from_pretrained, restuning.load(pipe, file), generate; the default
    Res-Tuning config with its identifier's embedding, which the pipeline's text encoder carries."""
    from tests.tiny_pipeline import tiny_pipeline

    pipe = tiny_pipeline()
    restuning.attach(pipe, restuning.ResTuningConfig(identifier="sks"))
    _perturb(restuning.attached(pipe.unet)["default"])
    path = restuning.save(pipe, tmp_path / "concept.safetensors")
    folder = tmp_path / "pipe"
    restuning.detach(pipe.unet)
    pipe.save_pretrained(folder)

    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    with pytest.raises(restuning.AttachError, match="pass the pipeline"):
        restuning.load(loaded.unet, path)  # the identifier's rows need the text encoder
    assert restuning.attached(loaded.unet) == {}
    restuning.load(loaded, path)
    assert "text_encoder.identifier" in restuning.attached(loaded.unet)["default"].modules
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    tuned = loaded("a photo of sks", generator=torch.Generator().manual_seed(0), **kwargs).images
    restuning.set_scale(loaded.unet, 0)
    base = loaded("a photo of sks", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert tuned.shape == (1, 32, 32, 3) and not (tuned == base).all()


@pytest.mark.parametrize("data,message", [
    ({"method": "res-tuning", "dim": "wide"}, "dim must be a whole number"),
    ({"method": "res-tuning", "dim": True}, "dim must be a whole number"),
    ({"method": "res-tuning", "tuners": ["attn1"]}, "tuners must be a mapping of names to names"),
    ({"method": "lora", "blocks": "mid"}, "blocks must be a list of names"),
    ({"method": "bypass", "vertical": 3}, "vertical must be text"),
])
def test_a_config_of_the_wrong_json_types_is_refused(data, message):
    from restuning.methods import config_from_dict

    with pytest.raises(restuning.ConfigError, match=message):
        config_from_dict(data)


def test_a_fingerprint_missing_a_field_does_not_match(tiny_unet):
    from restuning.arch import fingerprint, fingerprint_mismatch

    saved = fingerprint(tiny_unet)
    assert fingerprint_mismatch(saved, tiny_unet) == []
    del saved["block_out_channels"]
    assert fingerprint_mismatch(saved, tiny_unet) == ["block_out_channels: file does not say, model has [32, 64]"]


def test_version_1_files_load_except_the_first_bypass_design(tmp_path, tiny_unet, unet_inputs):
    """Format 2 changed the Bypass and Res-Prefix / Res-Prompt: a version-1 Res-Tuning file of
    adapters still loads; a version-1 Bypass file, or one with a Res-Prefix, is refused with the
    version named, and nothing is attached."""
    old = _rewrite(_saved(tmp_path, tiny_unet), tmp_path / "old.safetensors", format_version="1")
    fresh = build_unet("tiny")
    restuning.load(fresh, old)
    restuning.detach(fresh)
    unet = build_unet("tiny")
    restuning.attach(unet, restuning.BypassConfig(dim=4))
    bypass = restuning.save(unet, tmp_path / "bypass.safetensors")
    old_bypass = _rewrite(bypass, tmp_path / "old_bypass.safetensors", format_version="1")
    with pytest.raises(restuning.TunerFileError, match="bypass file of format version 1.*first Bypass design"):
        restuning.load(fresh, old_bypass)
    assert restuning.attached(fresh) == {}
    prefix_unet = build_unet("tiny")
    restuning.attach(prefix_unet, restuning.ResTuningConfig(tuners={"attn1": "prefix"}))
    old_prefix = _rewrite(restuning.save(prefix_unet, tmp_path / "prefix.safetensors"), tmp_path / "old_prefix.safetensors",
                          format_version="1")
    with pytest.raises(restuning.TunerFileError, match="res-tuning file of format version 1.*Res-Prefix"):
        restuning.load(fresh, old_prefix)
    assert restuning.attached(fresh) == {}


def test_version_2_res_prefix_files_are_refused_and_res_prompt_files_load(tmp_path, tiny_unet):
    """Format 3 gave Res-Prefix an output projection where it had a per-channel gate: a version-2
    file with a Res-Prefix is refused with the reason; one of Res-Prompts still loads."""
    fresh = build_unet("tiny")
    for kind, loads in (("prefix", False), ("prompt", True)):
        unet = build_unet("tiny")
        restuning.attach(unet, restuning.ResTuningConfig(tuners={"attn1": kind}))
        old = _rewrite(restuning.save(unet, tmp_path / f"{kind}.safetensors"), tmp_path / f"old_{kind}.safetensors",
                       format_version="2")
        if loads:
            restuning.load(fresh, old)
            assert len(restuning.attached(fresh)) == 1
        else:
            with pytest.raises(restuning.TunerFileError, match="format version 2.*per-channel gate.*train them again"):
                restuning.load(fresh, old)
            assert restuning.attached(fresh) == {}
