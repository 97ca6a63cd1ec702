"""Crafted tuner files (issue 13, items 4 and 10): a header that lies about its tensors, or holds
JSON of the wrong type, is refused with a message before anything is attached for real."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import restuning
from restuning.methods import METHODS
from trainers.service.uploads import UploadError, check_tuner_file

SMALL = {"res-tuning": {"dim": 4}, "bypass": {"dim": 8}, "lora": {"rank": 2}, "adapter": {"dim": 4},
         "prefix": {"dim": 4}, "prompt": {"dim": 4}}


def saved(tmp_path, unet, config):
    restuning.attach(unet, config)
    path = tmp_path / f"{config.method}.safetensors"
    restuning.save(unet, path)
    restuning.detach(unet)
    return path


def rewritten(tmp_path, path, **header):
    """The same tensors under a header with some fields replaced (what an attacker can do)."""
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    out = tmp_path / f"crafted-{len(list(tmp_path.iterdir()))}.safetensors"
    save_file(tensors, str(out), metadata={**metadata, **header})
    return out


@pytest.mark.parametrize("method", [m for m in METHODS if m in SMALL])
def test_a_genuine_tuner_of_every_method_passes_the_tensor_check(method, tmp_path, tiny_unet):
    config = restuning.config_from_dict({"method": method, **SMALL[method]})
    assert check_tuner_file(saved(tmp_path, tiny_unet, config), tiny_unet)[0] == config


def test_a_header_that_declares_a_huge_dim_is_refused_without_allocating_it(tmp_path, tiny_unet):
    path = saved(tmp_path, tiny_unet, restuning.ResTuningConfig(dim=4))
    config = json.loads(restuning.read_header(path)["config"])
    crafted = rewritten(tmp_path, path, config=json.dumps({**config, "dim": 3_000_000}))
    with pytest.raises(UploadError, match="tensors do not match its config.*3000000"):
        check_tuner_file(crafted, tiny_unet)
    extra = tmp_path / "extra.safetensors"
    with safe_open(str(path), framework="pt") as f:
        save_file({**{k: f.get_tensor(k) for k in f.keys()}, "more": torch.zeros(4)}, str(extra), metadata=f.metadata())
    with pytest.raises(UploadError, match="1 are not the config's"):
        check_tuner_file(extra, tiny_unet)


@pytest.mark.parametrize("header, message", [
    ({"base_arch": "[]"}, "base_arch does not describe a U-Net"),
    ({"base_arch": "{}"}, "base_arch does not describe a U-Net"),
    ({"base_arch": '"sd15"'}, "base_arch does not describe a U-Net"),
    ({"config": "[]"}, "config is not a JSON object"),
    ({"config": '"res-tuning"'}, "config is not a JSON object"),
    ({"config": '{"method": "res-tuning", "dim": "wide"}'}, "not usable|cannot be attached"),
])
def test_header_fields_of_the_wrong_type_get_a_message(header, message, tmp_path, tiny_unet):
    path = saved(tmp_path, tiny_unet, restuning.ResTuningConfig(dim=4))
    with pytest.raises(UploadError, match=message):
        check_tuner_file(rewritten(tmp_path, path, **header), tiny_unet)
