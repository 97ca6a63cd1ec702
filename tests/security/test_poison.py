"""Issue 26, item 2: one visitor's tuner cannot spoil another's pictures. Imported (and trained)
tuners hold finite floating-point weights; and the shared pipeline computes no tuner a render does
not show, so even one that got in (0 x NaN is NaN) leaves the base model's picture untouched."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import restuning
from restuning.io import TunerFileError
from tests.tiny_pipeline import tiny_pipeline
from trainers.sampling import Column, Sampler, Settings
from trainers.service.uploads import UploadError, check_tuner_file, lora_as_tuner_file

ROW = [Settings("a photo of sks dog", seed=0, steps=2, guidance=3.0, scheduler="DDIM", height=32, width=32)]


def restuning_file(tmp_path, unet, config, name="t"):
    restuning.attach(unet, config, name=name)
    path = restuning.save(unet, tmp_path / f"{name}.safetensors", name=name)
    restuning.detach(unet, name)
    return path


def rewritten(path, out, change):
    """The same file with every tensor passed through `change` (what a crafted upload can hold)."""
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: change(f.get_tensor(k)) for k in f.keys()}, f.metadata()
    save_file(tensors, str(out), metadata=metadata)
    return out


@pytest.mark.parametrize("change, message", [
    (lambda t: torch.full_like(t, float("nan")), "not finite"),
    (lambda t: t.clone().index_fill_(0, torch.tensor([0]), float("inf")), "not finite"),
    (lambda t: t.to(torch.int8), "int8 values"),
    (lambda t: t > 0, "bool values"),
])
def test_an_imported_tuner_holds_finite_floating_point_weights(change, message, tmp_path, tiny_unet):
    for config in (restuning.LoraConfig(rank=2), restuning.ResTuningConfig(dim=4)):
        good = restuning_file(tmp_path, tiny_unet, config)
        assert check_tuner_file(good, tiny_unet)
        with pytest.raises(UploadError, match=message):
            check_tuner_file(rewritten(good, tmp_path / "crafted.safetensors", change), tiny_unet)
        with pytest.raises(TunerFileError, match=message):  # nor does the library load one
            restuning.load(tiny_unet, tmp_path / "crafted.safetensors", name="x")
        assert "x" not in restuning.attached(tiny_unet)


def test_a_diffusers_lora_with_nan_weights_is_refused_at_import(tmp_path, tiny_unet):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    handle = restuning.attach(tiny_unet, restuning.LoraConfig(rank=2), name="l")
    with torch.no_grad():
        for p in handle.parameters():
            p.fill_(float("nan"))
    from restuning.methods.lora.model import peft_view

    with peft_view(tiny_unet):
        state = get_peft_model_state_dict(tiny_unet, adapter_name="l")
    restuning.detach(tiny_unet, "l")
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({f"unet.{k}": v.contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}, str(path))
    with pytest.raises(UploadError, match="not finite"):
        lora_as_tuner_file(path, tiny_unet, None, workdir=tmp_path / "work")


def test_a_trained_tuner_that_diverged_is_not_written(tmp_path, tiny_unet):
    handle = restuning.attach(tiny_unet, restuning.AdapterConfig(dim=4), name="a")
    with torch.no_grad():
        next(iter(handle.parameters())).fill_(float("inf"))
    with pytest.raises(TunerFileError, match="not finite"):
        restuning.save(tiny_unet, tmp_path / "a.safetensors", name="a")
    assert list(tmp_path.iterdir()) == [], "no file, no temporary file"


def test_the_base_model_renders_clean_after_a_poisoned_lora(tmp_path):
    """A LoRA rendered in one visitor's grid stays loaded in the shared pipeline (a cache); its
    weights here turn NaN (the file checks would refuse such a file: this is whatever gets past
    them, an overflow in half precision say). The next visitor's base-model picture is exactly
    the picture of a pipeline that never saw it."""
    reference = Sampler(tiny_pipeline()).render([Column("base")], ROW)[0][0]
    pipe = tiny_pipeline()
    lora = tmp_path / "lora.safetensors"
    restuning.attach(pipe.unet, restuning.LoraConfig(rank=2), name="w")
    restuning.save(pipe.unet, lora, name="w")
    restuning.detach(pipe.unet, "w")
    sampler = Sampler(pipe)
    sampler.render([Column("theirs", tuner=lora)], ROW)
    (name,) = restuning.attached(pipe.unet)
    with torch.no_grad():
        for p in restuning.attached(pipe.unet)[name].parameters():
            p.fill_(float("nan"))
    for columns in ([Column("base")], [Column("base"), Column("theirs again", tuner=lora)]):
        base = sampler.render(columns, ROW)[0][0]
        assert np.asarray(base).max() > 0, "not a black picture"
        assert np.array_equal(np.asarray(base), np.asarray(reference)), "exactly the base model's picture"


def test_a_lora_at_strength_zero_is_exactly_the_base_model(tiny_unet, unet_inputs):
    with torch.no_grad():
        base = tiny_unet(*unet_inputs).sample
    handle = restuning.attach(tiny_unet, restuning.LoraConfig(rank=2), name="bad")
    with torch.no_grad():
        for p in handle.parameters():
            p.fill_(float("nan"))
        restuning.set_scale(tiny_unet, 0.0, name="bad")
        assert torch.equal(tiny_unet(*unet_inputs).sample, base)
        restuning.set_scale(tiny_unet, 1.0, name="bad")
        assert torch.isnan(tiny_unet(*unet_inputs).sample).any(), "on again at strength 1"
    assert all(p.requires_grad for p in handle.parameters()), "switching off and on leaves what trains as it was"
