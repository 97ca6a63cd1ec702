"""--train_text_encoder: LoRA on the CLIP text encoder's attention projections trains beside the
U-Net's (at --text_encoder_lr), is saved in every LoRA file, and renders the same through the
project's sampler, restuning.load and diffusers' own pipe.load_lora_weights. Other methods refuse it."""

import shutil

import pytest
import torch
from safetensors import safe_open

import restuning
from tests.test_trainer import argv, build_tiny, fresh_accelerate_state, load_base, make_images, run_train  # noqa: F401
from trainers import options
from trainers.options import OptionError
from trainers.sampling import Column, Sampler, Settings
from trainers.service.uploads import check_tuner_file, lora_as_tuner_file
from webui.model import describe

SETTINGS = Settings("a photo of sks dog", seed=0, steps=3, guidance=3.0, scheduler="DDIM", height=64, width=64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step LoRA run with the text encoder on the tiny model, and its text-encoder LoRA at the start."""
    root = tmp_path_factory.mktemp("te")
    model, images, out = build_tiny(root / "tiny"), make_images(root / "instance"), root / "run"
    start = {}

    def snapshot(pipe, handle):
        start.update({k: v.detach().clone() for k, v in handle.state_dict().items() if k.startswith("text_encoder.")})

    from accelerate.state import AcceleratorState, GradientState

    # accelerate's process-wide state, cleared as tests/test_trainer.py's autouse fixture does per test
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    result = run_train(argv(model, images, out, "--method", "lora", "--train_text_encoder", "--text_encoder_lr", "5e-3",
                            "--max_train_steps", 3, "--validation_prompt", "a photo of sks dog", "--num_validation_images", 1),
                       on_attached=snapshot)
    return model, out, result, start


@pytest.mark.slow
def test_the_option_trains_the_text_encoders_lora(trained):
    model, out, result, start = trained
    assert result.step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.handle.config.text_encoder == "q_proj,k_proj,v_proj,out_proj"
    now = {k: v for k, v in result.handle.state_dict().items() if k.startswith("text_encoder.")}
    assert start and set(now) == set(start)
    assert any(not torch.equal(now[k].cpu(), start[k].cpu()) for k in now if ".lora_B." in k), "text-encoder LoRA did not move"
    assert {k.split(".")[-3] for k in now} >= {"q_proj", "k_proj", "v_proj", "out_proj"}
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert any(k.startswith("text_encoder.") for k in f.keys())
    with safe_open(str(out / "lora_kohya.safetensors"), "pt") as f:
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in f.keys())


@pytest.mark.slow
def test_saved_files_render_as_the_sampler_renders_them(trained, tmp_path):
    model, out, _, _ = trained
    pipe = load_base(model)
    ours = Sampler(pipe).render([Column("base"), Column("lora", tuner=out / "tuner.safetensors")], [SETTINGS])[0]
    base, tuned = (torch.tensor(list(im.getdata())) for im in ours)
    assert not torch.equal(base, tuned)
    base_keys = {name: set(getattr(load_base(model), name).state_dict()) for name in ("unet", "text_encoder")}
    assert any("lora" in n for n, _ in pipe.text_encoder.named_parameters())
    for name, keys in base_keys.items():
        assert set(getattr(pipe, name).state_dict()) == keys, f"{name}.state_dict() is the base model's with the LoRA attached"
    restuning.detach(pipe.unet)
    assert not any("lora" in n for n, _ in pipe.text_encoder.named_parameters()), "detach takes the text encoder's LoRA off too"
    assert {name: set(getattr(pipe, name).state_dict()) for name in base_keys} == base_keys

    theirs = load_base(model)
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        theirs.load_lora_weights(str(out), weight_name=name)
        image = Sampler(theirs).render([Column("diffusers")], [SETTINGS])[0][0]
        assert torch.equal(torch.tensor(list(image.getdata())), tuned), name
        theirs.unload_lora_weights()

    # restuning.load of the diffusers file itself (the sampler passes the text encoder), and the
    # studio's import: converted to a tuner file, checked on weightless copies of the base model
    base_model = describe(str(model))
    upload = shutil.copy(out / "pytorch_lora_weights.safetensors", tmp_path / "their_lora.safetensors")
    converted = lora_as_tuner_file(upload, base_model.unet_on_meta(), base_model.text_encoders_on_meta()["text_encoder"])
    config, _ = check_tuner_file(converted, base_model.unet_on_meta(), base_text_encoder=base_model.text_encoders_on_meta()["text_encoder"])
    assert config.text_encoder == "q_proj,k_proj,v_proj,out_proj"
    images = Sampler(load_base(model)).render([Column("direct", tuner=upload), Column("studio", tuner=converted)], [SETTINGS])[0]
    for image in images:
        assert torch.equal(torch.tensor(list(image.getdata())), tuned)


def test_other_methods_refuse_it_and_the_rate_needs_it(tmp_path):
    base = ["--instance_data_dir", str(tmp_path), "--instance_prompt", "a sks dog"]
    with pytest.raises(OptionError, match="--train_text_encoder is refused: res-tuning tunes the U-Net's blocks, .*--method lora"):
        options.parse(base + ["--method", "res-tuning", "--train_text_encoder"])
    with pytest.raises(OptionError, match="--text_encoder_lr is for what trains in the text encoder: a LoRA with --train_text_encoder"):
        options.parse(base + ["--method", "lora", "--text_encoder_lr", "1e-5"])
    for method in ("adapter", "bypass"):
        with pytest.raises(OptionError, match="--text_encoder_lr is for what trains in the text encoder"):
            options.parse(base + ["--method", method, "--text_encoder_lr", "1e-5"])
    with pytest.raises(OptionError, match="--text_encoder_lr is for what trains in the text encoder"):
        options.parse(base + ["--method", "res-tuning", "--identifier", "", "--text_encoder_lr", "1e-5"])
    parsed = options.parse(base + ["--method", "res-tuning", "--identifier", "sks", "--text_encoder_lr", "1e-5"])
    assert parsed.args.text_encoder_lr == 1e-5  # the identifier's embedding trains at it
    parsed = options.parse(base + ["--method", "lora", "--train_text_encoder", "--text_encoder", "q_proj,v_proj"])
    assert parsed.method_config.text_encoder == "q_proj,v_proj"
